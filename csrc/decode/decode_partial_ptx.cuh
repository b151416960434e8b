// PTX wrappers of the decode kernels (sm_90; sm_80 fallbacks for multi-arch builds):
// shared-memory addresses, mbarriers, 1-D bulk (TMA) copies, ldmatrix, mma.sync and exp2. Every
// inline-asm statement of the decode kernels lives here, so a host emulator can stand in for this
// one header (ESP_DECODE_EMULATOR in decode_partial_kernel.cuh) and run the kernels' own index
// logic on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace esp {
namespace decode {
namespace detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The kernel's dynamic shared memory (declared here so the emulator can supply its own).
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(128) unsigned char esp_decode_dyn_smem[];
  return esp_decode_dyn_smem;
}

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
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one 32-bit MMA operand register: `lo` (the lower column) in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

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

// Loads of data no thread of this grid writes (q, kv_lens, block table), through the
// read-only path.
template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
  return __ldg(p);
}

}  // namespace detail
}  // namespace decode
}  // namespace esp
