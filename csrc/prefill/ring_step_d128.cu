// Explicit instantiations of the ring step for head dim 128 (see ring_step_kernel.cuh).
// BLOCK_N = 64: S (32 x 64 per warp, 64 fp32 registers) plus O (32 x 128, 128 registers) is what
// fits in 255 registers without spilling; FlashAttention-2 uses the same 128 x 64 tile at D = 128.
#include "ring_step_kernel.cuh"

namespace esp {

void ring_step_d128(const RingStepParams& p, DType dtype, cudaStream_t stream) {
  ESP_DISPATCH_HALF(dtype, T, [&] { ring_step_impl::launch_ring_step<T, 128, 64>(p, stream); });
}

}  // namespace esp
