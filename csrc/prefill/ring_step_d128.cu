// Instantiations of the ring step for head dim 128 (see ring_step_kernel.cuh).
// BN = 64 keys per K/V tile: Q (32 KB) + 2 stages x (K, V) (64 KB) + 1 KB alignment = 97 KB, so 2
// CTAs fit on an SM. SN = 32 keys per softmax step: O (128 fp32 registers per thread) + S (32)
// compile to 255 registers without spills; SN = 64 spills.
#include "ring_step_kernel.cuh"

namespace esp {

void ring_step_d128(const RingStepParams& p, DType dtype, cudaStream_t stream, int device) {
  ESP_DISPATCH_HALF(dtype, T,
                    [&] { ring_step_impl::launch_ring_step<T, 128, 64, 32>(p, stream, device); });
}

}  // namespace esp
