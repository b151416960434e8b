// Device helpers shared by the kernels: element conversions and wide vector loads/stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "esp_common.h"

namespace esp {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// max(a, b) that returns NaN when either is NaN. fmaxf follows IEEE maxNum and returns the
// other operand, so a NaN lse would vanish from a merge's max and its row would read as the empty
// state (0, -inf). Used only where lse values are reduced, never in the attention inner loops.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}

// VEC consecutive elements of T, aligned so the compiler emits 16-byte loads (two for 32 bytes).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Dispatch a floating dtype code to a C++ type: F is called with a value of that type's pointer.
#define ESP_DISPATCH_FLOAT(dtype, T, ...)                                             \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case ::esp::DType::kFloat32: { using T = float; return __VA_ARGS__(); }         \
      case ::esp::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }        \
      case ::esp::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }\
      default:                                                                        \
        throw std::invalid_argument(::esp::str_cat("unsupported dtype ",             \
                                                   ::esp::dtype_name(dtype)));       \
    }                                                                                 \
  }()

#define ESP_DISPATCH_HALF(dtype, T, ...)                                              \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case ::esp::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }        \
      case ::esp::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }\
      default:                                                                        \
        throw std::invalid_argument(::esp::str_cat("expected float16 or bfloat16, got ", \
                                                   ::esp::dtype_name(dtype)));       \
    }                                                                                 \
  }()

inline bool aligned_to(uintptr_t p, size_t bytes) { return p % bytes == 0; }

}  // namespace esp
