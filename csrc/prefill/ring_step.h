#pragma once

#include "../common/esp_common.h"

namespace esp {

// One ring step of striped prefill: partial attention of this rank's query stripes against one
// KV block, merged into the running fp32 state inside the kernel (no separate merge pass).
//
//   q        [Tq, Hq, D]  float16/bfloat16, this rank's queries packed by request (cu_q)
//   k, v     [Tk, Hkv, D] same dtype, the KV block packed by request (cu_k)
//   cu_q     int32 [B+1] on the device; cu_k int32 [B+1] on the device
//   max_q_len  longest request in q (host value; sizes the grid)
//   o_state  float32 [Tq, Hq, D]: normalized running output;  lse_state float32 [Tq, Hq]
//   causal: key b (local index in its request) is visible to query a iff b <= a + mask_shift.
//           Striping with P ranks, queries on rank i, keys from rank j: shift 0 if j <= i else -1.
//   accumulate=false: state overwritten (first step); rows that see no key get (0, -inf).
//   accumulate=true : merged into the state; rows that see no key keep their state.
// Head dims 64 and 128; Hq % Hkv == 0 (all query heads of a KV head share one load of K/V).
void ring_step(const TensorDesc& q, const TensorDesc& k, const TensorDesc& v,
               const TensorDesc& cu_q, const TensorDesc& cu_k, int max_q_len,
               const TensorDesc& o_state, const TensorDesc& lse_state, bool causal,
               int mask_shift, bool accumulate, float softmax_scale, int device,
               uintptr_t stream);

}  // namespace esp
