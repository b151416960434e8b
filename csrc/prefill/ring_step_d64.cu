// Explicit instantiations of the ring step for head dim 64 (see ring_step_kernel.cuh).
// BLOCK_N = 128: O is only 64 registers at D = 64, so S can take 128 and each iteration (one
// barrier, one cp.async stage) covers twice the keys; FlashAttention-2 uses 128 x 128 at D = 64.
#include "ring_step_kernel.cuh"

namespace esp {

void ring_step_d64(const RingStepParams& p, DType dtype, cudaStream_t stream) {
  ESP_DISPATCH_HALF(dtype, T, [&] { ring_step_impl::launch_ring_step<T, 64, 128>(p, stream); });
}

}  // namespace esp
