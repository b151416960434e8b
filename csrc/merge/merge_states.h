#pragma once

#include "../common/esp_common.h"

namespace esp {

// o: [S, T, H, D] (float32/float16/bfloat16, any strides but a contiguous D), lse: [S, T, H] fp32.
// out: [T, H, D] (float32/float16/bfloat16), lse_out: [T, H] fp32 or null.
// out may alias state 0 (and lse_out lse of state 0): the in-place form used for running states.
void merge_states(const TensorDesc& o, const TensorDesc& lse, const TensorDesc& out,
                  const TensorDesc* lse_out, int device, uintptr_t stream);

// The same merge with the states gathered from pools of state rows: o [R, H, D], lse [R, H];
// state s of row t is pool row rows[s, t] (int32 [S, T], contiguous; every value in [0, R), not
// checked: the caller builds the index). Multi-master decode merges its own and received states
// this way in one launch (a row gather before the merge cost a launch, ~5 us of host time).
void merge_states_gather(const TensorDesc& o, const TensorDesc& lse, const TensorDesc& rows,
                         const TensorDesc& out, const TensorDesc* lse_out, int device,
                         uintptr_t stream);

}  // namespace esp
