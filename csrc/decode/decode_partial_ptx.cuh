// PTX wrappers specific to the decode kernels (sm_90; sm_80 fallbacks for multi-arch builds):
// mbarriers, 1-D bulk (TMA) copies, L2 prefetch and exp2. The tensor-core wrappers shared with
// the ring step (ldmatrix, mma.sync, pack2) are in ../common/mma.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace esp {
namespace decode {
namespace detail {

// ---- stage completion: mbarriers and 1-D bulk copies ----
// sm_90: a stage's barrier takes one arrival (lane 0's arrive.expect_tx of the stage's bytes) and
// completes when the bulk copies (TMA) issued against it have delivered those bytes.
// Older targets (an "80;90a" build): the copies are 16-byte cp.async and each of warp 0's 32
// lanes arrives once its own copies have landed (cp.async.mbarrier.arrive.noinc).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ESP_DECODE_BULK 0
#else
#define ESP_DECODE_BULK 1
#endif
constexpr uint32_t kStageArrivals = ESP_DECODE_BULK ? 1 : 32;

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes the initialized barriers visible to the async proxy (the bulk copies); a __syncthreads
// must follow before any thread uses them.
__device__ __forceinline__ void mbar_init_fence() {
#if ESP_DECODE_BULK
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// Lane 0, before a stage's copies: arrives once and adds `bytes` to the phase's transaction count.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if ESP_DECODE_BULK
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
// Every lane of warp 0, after issuing its copies of a stage.
__device__ __forceinline__ void copies_issued(uint32_t bar) {
#if !ESP_DECODE_BULK
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Blocks until the phase with parity `parity` has completed (all its bytes have landed).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if ESP_DECODE_BULK
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

// Global -> shared copy of `bytes` (a multiple of 16; both ends 16-byte aligned) completing on
// `bar`: one bulk copy through the TMA unit on sm_90.
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                         uint32_t bar) {
#if ESP_DECODE_BULK
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
#else
  for (uint32_t off = 0; off < bytes; off += 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + off),
                 "l"(static_cast<const char*>(src) + off)
                 : "memory");
#endif
}

// ---- tensor cores ----

// 2^x; ex2.approx gives +0 for -inf, which is what masked scores and empty states need.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Programmatic dependent launch: the decode kernel lets the split merge be scheduled early; the
// merge waits here until the decode grid has completed and its writes are visible (a no-op when
// it was launched without the programmatic attribute).
__device__ __forceinline__ void launch_dependents() {
#if ESP_DECODE_BULK
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_prerequisites() {
#if ESP_DECODE_BULK
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Prefetch into L2 of the line holding `p` (a valid global address): nothing is returned and
// nothing waits for it, so it cannot change a result.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Loads of data no thread of this grid writes (q, kv_lens, block table), through the
// read-only path.
template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
  return __ldg(p);
}

}  // namespace detail
}  // namespace decode
}  // namespace esp
