// Instantiations of the decode and split-merge kernels for head dim 128 (one unit per head dim:
// parallel build).
#include "decode_partial_kernel.cuh"

namespace esp {
namespace decode {

template void launch_decode_partial<__half, 128>(const DecodeParams&, cudaStream_t, int);
template void launch_decode_partial<__nv_bfloat16, 128>(const DecodeParams&, cudaStream_t, int);
template void launch_decode_merge<128>(MergeParams, cudaStream_t);

}  // namespace decode
}  // namespace esp
