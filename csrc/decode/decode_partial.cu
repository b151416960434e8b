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
//   slots    = num_sms * ctas_per_sm     ctas_per_sm = 2 at D = 128 (64 KB smem), 4 at D = 64
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
// The designs tried (v1-v5) and their H100 measurements are in bench/NOTES.md; the kernel
// header (decode_partial_kernel.cuh) says why the current pipeline is what it is.
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
extern template void launch_decode_merge<64>(MergeParams, cudaStream_t);
extern template void launch_decode_merge<128>(MergeParams, cudaStream_t);

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
  return static_cast<int64_t>(num_splits) * batch * num_q_heads * (head_dim + 1) +
         static_cast<int64_t>(batch) * num_q_heads;
}

void decode_partial(const TensorDesc& q, const TensorDesc& k_cache, const TensorDesc& v_cache,
                    const TensorDesc& block_table, const TensorDesc& kv_lens,
                    const TensorDesc& o, const TensorDesc& lse, const TensorDesc& workspace,
                    int num_splits, float softmax_scale, bool deterministic, int device,
                    uintptr_t stream, bool counters_zeroed, bool kv_evict_first) {
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
  p.kv_evict_first = kv_evict_first;

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
  int* const counters =
      num_splits > 1 ? reinterpret_cast<int*>(ws + ws_o_elems + num_splits * B * Hq) : nullptr;
  const int n_counters = static_cast<int>(B * (Hkv / p.heads_per_cta));
  p.tile_counter = nullptr;
  if (num_splits > 1 && !deterministic) {
    p.tile_counter = counters;
    // Otherwise a memset node in a captured graph, so every replay starts from zero. Skipped
    // when the merge of the previous call on this workspace left them zero: one of the 4.34
    // CUDA API calls of a one-instance decode layer (H100, bench/diag_host.py --calls).
    if (!counters_zeroed)
      ESP_CUDA_CHECK(cudaMemsetAsync(counters, 0, sizeof(int) * n_counters, s));
  }
  try {
    ESP_DISPATCH_HALF(q.dtype, T, [&] {
      if (D == 64) {
        decode::launch_decode_partial<T, 64>(p, s, device);
      } else {
        decode::launch_decode_partial<T, 128>(p, s, device);
      }
    });

    if (num_splits > 1) {
      decode::MergeParams m{};
      m.o = p.o;  // the workspace states the decode kernel wrote
      m.lse = p.lse;
      m.o_ss = p.o_ss;
      m.l_ss = p.lse_ss;
      m.out = o.data<float>();
      m.out_sb = o.stride(0);
      m.out_sh = o.stride(1);
      m.lse_out = lse.data<float>();
      m.lse_sb = lse.stride(0);
      m.lse_sh = lse.stride(1);
      m.splits = num_splits;
      m.rows = static_cast<int>(B * Hq);
      m.heads = static_cast<int>(Hq);
      m.counters = counters;  // zeroed for the next call once the decode grid has completed
      m.n_counters = n_counters;
      if (D == 64) {
        decode::launch_decode_merge<64>(m, s);
      } else {
        decode::launch_decode_merge<128>(m, s);
      }
    }
  } catch (...) {
    // A launch refused after the decode kernel was queued leaves the counters set, and the next
    // call with counters_zeroed would skip tiles: zero them (after a sticky error this fails
    // too, and so does every later call).
    if (p.tile_counter != nullptr)
      (void)cudaMemsetAsync(counters, 0, sizeof(int) * n_counters, s);
    throw;
  }
}

}  // namespace esp
