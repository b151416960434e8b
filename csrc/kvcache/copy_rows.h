#pragma once

#include "../common/esp_common.h"

namespace esp {

// Row gather/scatter behind retention writes and migration pack/unpack:
//   for o < n_outer, i < n:  dst[o, dst_idx[i], :] = src[o, src_idx[i], :]
// src [n_outer, src_rows, row], dst [n_outer, dst_rows, row]: same dtype, row contiguous, any
// outer/row strides. src_idx / dst_idx: int32 [n] on the device, or null for the identity
// (then n is the other index's length, or src_rows). A negative index skips that row.
void copy_rows(const TensorDesc& src, const TensorDesc* src_idx, const TensorDesc& dst,
               const TensorDesc* dst_idx, int device, uintptr_t stream);

}  // namespace esp
