// decode_partial: host entry. Validates the arguments, launches the paged decode kernel
// (decode_partial_kernel.cuh; instantiated per head dim in decode_partial_d*.cu) and, when the
// KV is split, reduces the splits' states from the workspace with decode_merge_kernel.
//
// Kv heads per CTA (hg): the largest power of two dividing Hkv with hg * mt <= 4 (mt = 1, 2, 4
// head tiles of 16 query heads for G <= 16, 32, 64); the CTA reads the hg heads' rows of a token
// as one contiguous run.
//
// Choosing num_splits (the Python driver implements this as num_splits_for; the kernel accepts
// any value in [1, 256]):
//
//   hg       = largest power of two dividing Hkv, at most 4   (the model assumes G <= 16)
//   pairs    = B * Hkv / hg              CTAs per split
//   slots    = num_sms * ctas_per_sm     ctas_per_sm = 2 at D = 128 (~70 KB smem), 4 at D = 64
//   chunk(s) = roundup(ceil(max_len / s), 64)        tokens per CTA
//   cost(s)  = ceil(pairs * s / slots) * (chunk(s) * hg + 64) + (64 if s > 1 else 0)
//   num_splits = argmin of cost(s) over 1 <= s <= min(256, max(1, ceil(max_len * hg / 256))),
//                the smallest s on ties.
//
// cost is in (token, kv head) rows of one CTA's bandwidth share (~50 ns per row at D = 128 when
// the GPU is saturated): whole waves times per-CTA work, +64 for a CTA's fixed start (kv_lens ->
// block table -> first tile: three dependent memory latencies, ~2-3 us) and +64 for the merge
// launch when the KV is split. Whole waves matter because every CTA of a uniform batch takes the
// same time. On 132 SMs (264 slots), Hkv = 8 (hg = 4): B=1 L=128k picks s=128 (256 CTAs of 1024
// tokens), B=16 L=16k s=8 and B=64 L=4k s=2 (256 CTAs of 2048 tokens), B=8 L=1k s=16 (256 CTAs
// of 64 tokens). The floor of 256 rows per CTA keeps the start cost and the workspace traffic
// (s * B * Hq * (D+1) * 8 bytes) small next to the KV a CTA reads.
//
// Performance notes (H100 run 1 of the previous design: 67-82% of copy bandwidth; cuDNN on
// contiguous KV 94%). That design had one kv head per CTA, 16-byte cp.async of 256-byte head
// rows, 3 stages of 64 tokens, the wait for tile t taken with only tiles t, t+1 in flight, and
// merge_states as a second launch. Bytes in flight were not short by Little's law (64-128 KB per
// SM against ~45 KB at 3 TB/s and ~2 us loaded latency), and page 1 ran within 2-6% of page 16,
// so page tables and TLB reach were not it either. What it did differ in from the kernels that
// reach 94-100% on the same GPU (cuDNN, copy_rows on random 2 KB rows, merge_states) is the
// request stream: 256-byte pieces, each CTA one head's slice of every token row at a 2 KB stride,
// all through the load/store unit's 16-byte requests. B1 L128k lost ~4% more to the merge launch
// (2 CTAs walking 33 states serially, ~10 us).
// Changes, with the predicted effect:
//   1. hg = 4 kv heads per CTA: 1 KB contiguous per token row (page 16: 16 such rows per page).
//   2. 1-D bulk copies (TMA) of those rows, completing on per-stage mbarriers; warp 0 issues 32
//      copies per stage instead of 128 threads issuing 2048 16-byte cp.async.
//   3. Tile t+2 issued before the wait for tile t: all 3 stages (96 KB of KV) in flight per CTA
//      during every wait, ~190 KB per SM, instead of 2 tiles (64 KB per CTA).
//   4. More splits (B1: 128) and decode_merge_kernel (all warps of a CTA on one row's splits,
//      launched programmatically so its launch overlaps the decode tail) instead of
//      merge_states: the B1 merge ~10 us -> ~3 us.
//   Predicted (H100, bf16, page 16; page 1 within ~3%), as time = ~23 us fixed per call (the
//   timing's L2-flush write-back ~17 us, prologue, tail, merge) + bytes / 2.85-3.0 TB/s (cuDNN's
//   steady rate): B16 L16k and B64 L4k 0.38-0.40 ms = 2.7-2.8 TB/s (91-96% of copy, 0.90-0.95x
//   cuDNN); B1 L128k 0.204-0.213 ms = 2.5-2.65 TB/s (85-90%, 0.90-0.95x cuDNN); B8 L1k ~0.028
//   ms. 1.0x cuDNN needs a faster stream than cuDNN's own on contiguous KV, which this does not
//   claim. If (1)-(2) do not move the stream (the limit was elsewhere), (3)-(4) alone give B1
//   ~+5% and the others ~+1-2%.
// Run 4 (H100, page 16): B1 0.236 ms (77%), B16 0.434 (84%), B64 0.402 (90.5%), B8 0.030.
//   A tile is 16 tokens x 4 heads (32 KB of K+V): B1 CTAs stream 64 tiles, B16/B64 128. The
//   kernel's own fixed costs are small: prologue (kv_lens -> table -> first data, three cold
//   DRAM trips) ~3-4 us, fill < 1 us (256 x 64 KB requested at once), drain ~1-2 us + epilogue
//   ~1 us, split merge ~3 us (PDL release, then batched lse and o loads: 3-4 L2 round trips;
//   128 states for B1, 8 for B16, 2 for B64, all 2.1 MB of workspace), so ~10 us = 4% of B1
//   and 2% of B16/B64. Net of those and the ~17 us flush write-back every call pays, the stream
//   runs at ~2.6 (B1), ~2.6 (B16), ~2.9 (B64) TB/s against cuDNN's 3.16 TB/s (its B1 -> B64
//   slope): the gap is in the streaming phase, not in fill/drain/prologue/merge. B16 and B64
//   launch the same work (256 CTAs x 128 tiles, 16384 shuffled pages, 2.1 MB workspace); their
//   8% difference is inside run-to-run spread (previous kernel: B16 faster in run 1, slower in
//   run 2). Untested causes of the stream deficit: DRAM/TLB locality of 1 KB pieces on random
//   pages (page 1 is 3-7% slower still), and one wave of equal CTAs with no dynamic balancing
//   (stragglers set the end). A persistent CTA, 4 stages (1 CTA/SM at D = 128) or a fused
//   last-CTA reduction (B1: one CTA would reduce ~1 MB, slower than this merge's 32 CTAs)
//   address the ~10 us, not the stream. Change: warp 1 prefetches block-table lines into L2
//   two iterations ahead of warp 0's page loads (page 1: a new line every 2 tiles, whose load
//   had one iteration, ~2.6 us, to cover a loaded DRAM latency) and, before kv_lens arrives, the
//   first tiles' lines under len = capacity. Predicted: page 16 unchanged (+-0.5%, ~0.5 us of
//   prologue); page 1 +0-3% (B1 0.237-0.244 ms, B16 0.440-0.453, B64 0.420-0.433). If page 1
//   stays 3-7% behind page 16, that deficit is TLB/DRAM locality, not the table lookups.
// Runs 5-7: B1 78-79% of copy, B16 83-88%, B64 83-85%; balanced tiles (run 7) fixed the tail
//   (SMs active 85% -> 93%) but Nsight Compute still had DRAM at 82% of peak vs cuDNN's 90%.
// Run 8, interleaved A/B of copy mechanisms and depths (same grid, static schedule, B1 page 16):
//   TMA 3 stages 226 us, TMA 2 stages 216, 16-byte cp.async by all threads 3 stages 223, 2
//   stages 216 (and the fastest on page 1 and at B16/B64 page 16 by 1-3%), 6 stages at 1 CTA/SM
//   TMA 285, cp.async 214; 3 CTAs/SM did not help. Kept: cp.async, 2 stages. With the balanced
//   schedule: B1 210 us (86% of copy), B16 386 (93%), B64 388 (93%) page 16; Nsight Compute on
//   pages in pool order: 180 us at 89% of DRAM peak, cuDNN 180 us at 89%. Shuffled pages cost
//   the rest (191 us, 84%): page 16 (32 KB runs) loses almost as much as page 1 (2 KB runs), so
//   it is address-translation reach over the 0.5 GB pool rather than DRAM rows.
#include "decode_partial.h"

#include <cmath>
#include <limits>

#include "decode_partial_kernel.cuh"

namespace esp {
namespace decode {

extern template void launch_decode_partial<__half, 64>(const DecodeParams&, cudaStream_t, int);
extern template void launch_decode_partial<__nv_bfloat16, 64>(const DecodeParams&, cudaStream_t,
                                                              int);
extern template void launch_decode_partial<__half, 128>(const DecodeParams&, cudaStream_t, int);
extern template void launch_decode_partial<__nv_bfloat16, 128>(const DecodeParams&, cudaStream_t,
                                                               int);
extern template void launch_decode_merge<64>(const MergeParams&, cudaStream_t);
extern template void launch_decode_merge<128>(const MergeParams&, cudaStream_t);

}  // namespace decode

namespace {

constexpr int kMaxSplits = 256;  // bounds the workspace; decode_merge_kernel takes any count

}  // namespace

int64_t decode_workspace_elems(int batch, int num_q_heads, int head_dim, int num_splits) {
  ESP_CHECK(batch >= 0 && num_q_heads >= 0 && head_dim >= 0,
            "decode_workspace_elems: sizes must be >= 0");
  ESP_CHECK(num_splits >= 1, "decode_workspace_elems: num_splits must be >= 1, got ", num_splits);
  if (num_splits == 1) return 0;  // the kernel writes o/lse directly
  // o [num_splits, B, Hq, D] then lse [num_splits, B, Hq], both float32, then the balanced
  // schedule's int32 tile counters, one per (request, kv-head group): at most B * Hq.
  // States of every split, then the balanced schedule's int32 tile counter per (request,
  // kv-head group) (groups <= Hq).
  return static_cast<int64_t>(num_splits) * batch * num_q_heads * (head_dim + 1) +
         static_cast<int64_t>(batch) * num_q_heads;
}

void decode_partial(const TensorDesc& q, const TensorDesc& k_cache, const TensorDesc& v_cache,
                    const TensorDesc& block_table, const TensorDesc& kv_lens,
                    const TensorDesc& o, const TensorDesc& lse, const TensorDesc& workspace,
                    int num_splits, float softmax_scale, bool deterministic, int device,
                    uintptr_t stream) {
  using decode::DecodeParams;
  ESP_CHECK(q.ndim() == 3, "decode_partial: q must be [B, Hq, D], got ", q.ndim(), " dims");
  ESP_CHECK(q.dtype == DType::kFloat16 || q.dtype == DType::kBFloat16,
            "decode_partial: q must be float16 or bfloat16, got ", dtype_name(q.dtype));
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  ESP_CHECK(D == 64 || D == 128, "decode_partial: head dim must be 64 or 128, got ", D);
  ESP_CHECK(q.stride(2) == 1, "decode_partial: q must be contiguous in its last (head) dim");
  // Q fragments are read as pairs of elements (4-byte loads).
  ESP_CHECK(aligned_to(q.ptr, 4) && q.stride(0) % 2 == 0 && q.stride(1) % 2 == 0,
            "decode_partial: q must be 4-byte aligned with even batch/head strides");
  ESP_CHECK(B <= 65535, "decode_partial: batch must be <= 65535 (grid z), got ", B);
  ESP_CHECK(B * Hq < std::numeric_limits<int32_t>::max(),
            "decode_partial: batch * q heads must be < 2^31 (merge rows are int32)");

  for (const TensorDesc* t : {&k_cache, &v_cache}) {
    const char* name = t == &k_cache ? "k_cache" : "v_cache";
    ESP_CHECK(t->ndim() == 4, "decode_partial: ", name,
              " must be [num_pages, page_size, Hkv, D], got ", t->ndim(), " dims");
    ESP_CHECK(t->dtype == q.dtype, "decode_partial: ", name, " dtype ", dtype_name(t->dtype),
              " differs from q's ", dtype_name(q.dtype));
    ESP_CHECK(t->size(3) == D, "decode_partial: ", name, " head dim ", t->size(3),
              " differs from q's ", D);
    ESP_CHECK(t->stride(3) == 1, "decode_partial: ", name,
              " must be contiguous in its last (head) dim");
    // 16-byte cp.async of every row chunk.
    ESP_CHECK(aligned_to(t->ptr, 16) && t->stride(0) % 8 == 0 && t->stride(1) % 8 == 0 &&
                  t->stride(2) % 8 == 0,
              "decode_partial: ", name,
              " must be 16-byte aligned with page/slot/head strides that are multiples of 8 "
              "elements");
  }
  ESP_CHECK(v_cache.shape == k_cache.shape, "decode_partial: v_cache shape differs from k_cache");
  const int64_t page_size = k_cache.size(1), Hkv = k_cache.size(2);
  ESP_CHECK(page_size >= 1, "decode_partial: k_cache page_size must be >= 1");
  ESP_CHECK(Hkv >= 1 && Hq >= Hkv && Hq % Hkv == 0, "decode_partial: q heads (", Hq,
            ") must be a positive multiple of k_cache heads (", Hkv, ")");
  const int64_t G = Hq / Hkv;
  ESP_CHECK(G <= decode::kMaxGroup, "decode_partial: q heads per kv head must be <= ",
            decode::kMaxGroup, ", got ", G);

  ESP_CHECK(block_table.ndim() == 2 && block_table.dtype == DType::kInt32 &&
                block_table.size(0) == B,
            "decode_partial: block_table must be int32 [B, max_pages] with B = ", B);
  const int64_t max_pages = block_table.size(1);
  // Token indices stay int32 inside the kernel, with a tile of headroom.
  ESP_CHECK(max_pages * page_size < std::numeric_limits<int32_t>::max() - decode::kTile,
            "decode_partial: block_table max_pages * page_size must be < 2^31 - 64");
  ESP_CHECK(kv_lens.ndim() == 1 && kv_lens.dtype == DType::kInt32 && kv_lens.size(0) == B,
            "decode_partial: kv_lens must be int32 [B] with B = ", B);

  ESP_CHECK(o.ndim() == 3 && o.dtype == DType::kFloat32 && o.size(0) == B && o.size(1) == Hq &&
                o.size(2) == D,
            "decode_partial: o must be float32 [B, Hq, D] = [", B, ", ", Hq, ", ", D, "]");
  ESP_CHECK(o.stride(2) == 1 && aligned_to(o.ptr, 16) && o.stride(0) % 4 == 0 &&
                o.stride(1) % 4 == 0,
            "decode_partial: o must be contiguous in its last dim, 16-byte aligned, with "
            "batch/head strides that are multiples of 4");
  ESP_CHECK(lse.ndim() == 2 && lse.dtype == DType::kFloat32 && lse.size(0) == B &&
                lse.size(1) == Hq,
            "decode_partial: lse must be float32 [B, Hq] = [", B, ", ", Hq, "]");

  ESP_CHECK(num_splits >= 1 && num_splits <= kMaxSplits,
            "decode_partial: num_splits must be in [1, ", kMaxSplits, "], got ", num_splits);
  ESP_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.f,
            "decode_partial: softmax_scale must be finite and > 0, got ", softmax_scale);
  const int64_t ws_need =
      decode_workspace_elems(static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(D),
                             num_splits);
  if (num_splits > 1) {
    bool contiguous = true;
    int64_t expect = 1;
    for (int i = workspace.ndim() - 1; i >= 0; --i) {
      if (workspace.size(i) != 1 && workspace.stride(i) != expect) contiguous = false;
      expect *= workspace.size(i);
    }
    ESP_CHECK(workspace.dtype == DType::kFloat32 && contiguous && workspace.numel() >= ws_need,
              "decode_partial: workspace must be contiguous float32 with at least ", ws_need,
              " elements (decode_workspace_elems), got ", workspace.numel());
    ESP_CHECK(aligned_to(workspace.ptr, 16), "decode_partial: workspace must be 16-byte aligned");
  }
  if (B == 0) return;

  DecodeParams p{};
  p.q = reinterpret_cast<const void*>(q.ptr);
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.k = reinterpret_cast<const void*>(k_cache.ptr);
  p.k_sp = k_cache.stride(0);
  p.k_ss = k_cache.stride(1);
  p.k_sh = k_cache.stride(2);
  p.v = reinterpret_cast<const void*>(v_cache.ptr);
  p.v_sp = v_cache.stride(0);
  p.v_ss = v_cache.stride(1);
  p.v_sh = v_cache.stride(2);
  p.block_table = block_table.data<const int>();
  p.bt_sb = block_table.stride(0);
  p.bt_sp = block_table.stride(1);
  p.kv_lens = kv_lens.data<const int>();
  p.kl_s = kv_lens.stride(0);
  p.batch = static_cast<int>(B);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.group = static_cast<int>(G);
  p.page_size = static_cast<int>(page_size);
  p.max_pages = static_cast<int>(max_pages);
  p.num_splits = num_splits;
  {
    // hg: the largest power of two dividing Hkv with hg * (head tiles) <= 4 warps.
    const int max_hg = decode::kMaxHeadsPerCta / decode::head_tiles(static_cast<int>(G));
    int hg = 1;
    while (hg * 2 <= max_hg && Hkv % (hg * 2) == 0) hg *= 2;
    p.heads_per_cta = hg;
  }
  p.scale_log2 = static_cast<float>(static_cast<double>(softmax_scale) * 1.4426950408889634);

  // One split: the kernel writes the final state. Several: each split writes its slot of the
  // workspace, viewed as o [S, B, Hq, D] then lse [S, B, Hq], and decode_merge_kernel reduces them.
  const int64_t ws_o_elems = num_splits * B * Hq * D;
  float* ws = workspace.data<float>();
  if (num_splits == 1) {
    p.o = o.data<float>();
    p.o_ss = 0;
    p.o_sb = o.stride(0);
    p.o_sh = o.stride(1);
    p.lse = lse.data<float>();
    p.lse_ss = 0;
    p.lse_sb = lse.stride(0);
    p.lse_sh = lse.stride(1);
  } else {
    p.o = ws;
    p.o_ss = B * Hq * D;
    p.o_sb = Hq * D;
    p.o_sh = D;
    p.lse = ws + ws_o_elems;
    p.lse_ss = B * Hq;
    p.lse_sb = Hq;
    p.lse_sh = 1;
  }

  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  p.tile_counter = nullptr;
  if (num_splits > 1 && !deterministic) {
    // A memset node in a captured graph, so every replay starts from zero.
    p.tile_counter = reinterpret_cast<int*>(ws + ws_o_elems + num_splits * B * Hq);
    ESP_CUDA_CHECK(cudaMemsetAsync(p.tile_counter, 0,
                                   sizeof(int) * B * (Hkv / p.heads_per_cta), s));
  }
  ESP_DISPATCH_HALF(q.dtype, T, [&] {
    if (D == 64) {
      decode::launch_decode_partial<T, 64>(p, s, device);
    } else {
      decode::launch_decode_partial<T, 128>(p, s, device);
    }
  });

  if (num_splits > 1) {
    decode::MergeParams m{};
    m.o = ws;
    m.lse = ws + ws_o_elems;
    m.o_ss = B * Hq * D;
    m.l_ss = B * Hq;
    m.out = o.data<float>();
    m.out_sb = o.stride(0);
    m.out_sh = o.stride(1);
    m.lse_out = lse.data<float>();
    m.lse_sb = lse.stride(0);
    m.lse_sh = lse.stride(1);
    m.splits = num_splits;
    m.rows = static_cast<int>(B * Hq);
    m.heads = static_cast<int>(Hq);
    // Warps per row: enough to spread the splits (one split per warp per step at D = 128, two at
    // D = 64), at most the CTA's 8.
    const int per_step = D == 64 ? 2 : 1;
    m.warps_per_row = 1;
    while (m.warps_per_row < 8 && m.warps_per_row * per_step < num_splits) m.warps_per_row *= 2;
    if (D == 64) {
      decode::launch_decode_merge<64>(m, s);
    } else {
      decode::launch_decode_merge<128>(m, s);
    }
  }
}

}  // namespace esp
