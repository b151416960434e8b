// Instantiations of the ring step for head dim 64 (see ring_step_kernel.cuh).
// BN = 128 keys per K/V tile: Q (16 KB) + 2 stages x (K, V) (64 KB) + 1 KB = 81 KB, 2 CTAs per SM,
// half as many barriers per key as BN = 64. SN = 32 keys per softmax step: 220 registers, no
// spills (SN = 64 with BN = 128 spills; BN = SN = 64 fits too, at one barrier per 64 keys).
#include "ring_step_kernel.cuh"

namespace esp {

void ring_step_d64(const RingStepParams& p, DType dtype, cudaStream_t stream, int device) {
  ESP_DISPATCH_HALF(dtype, T,
                    [&] { ring_step_impl::launch_ring_step<T, 64, 128, 32>(p, stream, device); });
}

}  // namespace esp
