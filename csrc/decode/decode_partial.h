#pragma once

#include "../common/esp_common.h"

namespace esp {

// Partial decode attention of one query token per request over this instance's paged KV shard.
//
//   q            [B, Hq, D] float16/bfloat16 (D contiguous)
//   k_cache, v_cache [num_pages, page_size, Hkv, D] same dtype, any strides with D contiguous
//                (one layer's slice of the cache)
//   block_table  int32 [B, max_pages] on the device: page index of each of the request's pages
//   kv_lens      int32 [B] on the device: tokens of the request stored here (0 allowed)
//   o            float32 [B, Hq, D], lse float32 [B, Hq]: the partial state (natural log);
//                a request with 0 tokens here gets (0, -inf), never garbage or NaN
//   workspace    float32, at least decode_workspace_elems(B, Hq, D, num_splits) elements
//   num_splits   KV splits per request, fixed for the launch; each CTA derives its tiles from
//                kv_lens on the GPU, so the launch is CUDA-graph capturable for a fixed plan
//   deterministic  true: each split takes a fixed token range (bitwise reproducible); false:
//                the splits of a request share its tiles through a counter in the workspace
//                (faster: no CTA waits for a slow sibling; last-bit differences between runs)
//   counters_zeroed  the caller guarantees the workspace's tile counters are zero: a zero-filled
//                workspace used only by calls with this (B, Hq, D, num_splits), each of which
//                leaves them zero again (the split merge resets them). Skips the
//                cudaMemsetAsync that otherwise zeroes them before every launch; the decode
//                driver's own workspace qualifies. With counters that are not zero the balanced
//                schedule skips tiles: pass false for any other workspace.
//   kv_evict_first  the KV copies carry an evict-first L2 policy. Results are the same either
//                way; only speed differs, and only when L2 holds dirty lines at the launch
//                (the Python driver's rule, esp_kernels.decode.partial.kv_evict_first: on for
//                calls that read up to 6x the L2's size of KV).
void decode_partial(const TensorDesc& q, const TensorDesc& k_cache, const TensorDesc& v_cache,
                    const TensorDesc& block_table, const TensorDesc& kv_lens,
                    const TensorDesc& o, const TensorDesc& lse, const TensorDesc& workspace,
                    int num_splits, float softmax_scale, bool deterministic, int device,
                    uintptr_t stream, bool counters_zeroed = false, bool kv_evict_first = false);

int64_t decode_workspace_elems(int batch, int num_q_heads, int head_dim, int num_splits);

}  // namespace esp
