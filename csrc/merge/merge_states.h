#pragma once

#include "../common/esp_common.h"

namespace esp {

// o: [S, T, H, D] (float32/float16/bfloat16, any strides but a contiguous D), lse: [S, T, H] fp32.
// out: [T, H, D] (float32/float16/bfloat16), lse_out: [T, H] fp32 or null.
// out may alias state 0 (and lse_out lse of state 0): the in-place form used for running states.
void merge_states(const TensorDesc& o, const TensorDesc& lse, const TensorDesc& out,
                  const TensorDesc* lse_out, int device, uintptr_t stream);

}  // namespace esp
