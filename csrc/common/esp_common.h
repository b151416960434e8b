// Shared types of the torch-free core: dtype codes, tensor descriptors, error checks.
//
// The Python layer passes every tensor as a TensorDesc (device pointer, dtype, shape, strides in
// elements) plus a device index and a raw cudaStream_t, so nothing here depends on PyTorch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace esp {

// Codes shared with esp_kernels/_core.py (DTYPE_CODES). Keep the two in sync.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kUInt8 = 5,
};

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kUInt8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

struct TensorDesc {
  uintptr_t ptr = 0;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements

  int ndim() const { return static_cast<int>(shape.size()); }
  int64_t size(int i) const { return shape.at(i < 0 ? i + ndim() : i); }
  int64_t stride(int i) const { return strides.at(i < 0 ? i + ndim() : i); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  template <typename T>
  T* data() const { return reinterpret_cast<T*>(ptr); }
};

template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// Bad arguments: surfaces in Python as ValueError (pybind11 maps std::invalid_argument).
#define ESP_CHECK(cond, ...)                                                          \
  do {                                                                                \
    if (!(cond)) throw std::invalid_argument(::esp::str_cat(__VA_ARGS__));            \
  } while (0)

// Runtime failures (CUDA errors): surface in Python as RuntimeError.
#define ESP_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess)                                                          \
      throw std::runtime_error(::esp::str_cat(#expr, " failed: ",                     \
                                              cudaGetErrorString(err_)));             \
  } while (0)

// Call right after a <<<>>> launch: catches bad configurations and earlier async errors.
inline void check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(str_cat(kernel_name, " launch failed: ", cudaGetErrorString(err)));
}

// Makes `device` current for the launch and restores the previous device afterwards. The core
// links its own static CUDA runtime, so it must not rely on the caller's runtime having set it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    ESP_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) ESP_CUDA_CHECK(cudaSetDevice(device));
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Multiprocessor count of the current device, cached per device (grid sizing).
int num_sms(int device);

// Lets `kernel` use `smem_bytes` of dynamic shared memory and asks for the largest shared-memory
// carveout (several CTAs per SM need it), once per (kernel, device): the attributes persist, and
// setting them on every launch costs two driver calls per layer on the host's critical path.
void set_smem_attributes_once(const void* kernel, int smem_bytes, int device);

}  // namespace esp
