// PTX wrappers specific to the decode kernels: mbarriers completed by cp.async arrivals, 16-byte
// cp.async, programmatic dependent launch and L2 prefetch (sm_80 and up; sm_90 extras behind
// ESP_DECODE_SM90). The tensor-core wrappers (ldmatrix, mma.sync, pack2, ex2) are in
// ../common/mma.cuh.
#pragma once

#include <cstdint>

namespace esp {
namespace decode {
namespace detail {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ESP_DECODE_SM90 0
#else
#define ESP_DECODE_SM90 1
#endif

// ---- stage completion: every thread's copies arrive on the stage's mbarrier ----
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// 16-byte global -> shared copy through L2 only (.cg: the KV is read once, L1 would only evict),
// with L2 fetching the 128-byte line around it. In an older kernel (static schedule) a 256-byte
// hint was worth up to 2.5% on H100 at the long shapes and 128 bytes about half of that. In the
// padded-row kernel before the swizzle (24060ed) on H100 (B16 L16k page 16, Nsight Compute),
// 128 B did the same work in 13% fewer L2 sector accesses (67.9 against 77.9 M, the same 1.07 GB
// read from DRAM), taking L2 from 93% to 88% of its throughput at the same DRAM rate; 128 B was
// 1.003-1.004x 256 B at five of the six long shapes, pages 16 and 1 (0.997 at B64 L4k page 16),
// and no hint 0.988-0.997x (bench/results/2026-12-07_h100_l2_hint_128); 256 B on the swizzled
// rows is not measured. On an H200 (DRAM 1.4x the H100's against the same L2) the 256-byte
// padded kernel was L2-bound (92% of L2 throughput at 74% of DRAM peak,
// bench/results/2026-12-07_h200_decode).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src)
               : "memory");
}
// The same copy with an evict-first L2 policy: the line is the first its set gives up, so a
// short stream replaces its own lines rather than the lines the work before it left (dirty ones
// must be written back first). The policy is created inside the copy's asm block: one created
// once and passed in was dropped by ptxas, leaving the copy's descriptor register undefined (an
// illegal instruction at launch); here the SASS materializes it before every copy group. It keeps
// the 256-byte prefetch: this path serves calls of at most 6x the L2's size of KV, where it was
// measured (bench/results/2026-12-07_h100_l2_policy); 128 B has not been timed on it.
__device__ __forceinline__ void cp_async_16_evict_first(uint32_t dst, const void* src) {
  asm volatile(
      "{\n"
      ".reg .b64 pol;\n"
      "createpolicy.fractional.L2::evict_first.b64 pol, 1.0;\n"
      "cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, pol;\n"
      "}\n" ::"r"(dst),
      "l"(src)
      : "memory");
}
// One arrival on `bar`, made when every cp.async this thread issued before has landed (noinc:
// the barrier's expected count already includes it).
__device__ __forceinline__ void arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase with parity `parity` has completed (all its bytes have landed).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if ESP_DECODE_SM90
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.test_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// ---- programmatic dependent launch, prefetch ----

// Programmatic dependent launch: the decode kernel lets the split merge be scheduled early; the
// merge waits here until the decode grid has completed and its writes are visible (a no-op when
// it was launched without the programmatic attribute).
__device__ __forceinline__ void launch_dependents() {
#if ESP_DECODE_SM90
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_prerequisites() {
#if ESP_DECODE_SM90
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Prefetch into L2 of the line holding `p` (a valid global address): nothing is returned and
// nothing waits for it, so it cannot change a result.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

}  // namespace detail
}  // namespace decode
}  // namespace esp
