// decode_partial kernels: attention of one query token per request over a paged KV shard, giving
// the partial state (o normalized fp32, lse natural log) that multi-master decode merges, and the
// reduction of the KV splits' states.
//
// Work split. Grid (Hkv / hg, num_splits, B): one CTA per (group of hg kv heads, split, request)
// computes all G = Hq/Hkv query heads of its hg kv heads, so every K/V row crosses the memory bus
// once. hg (heads_per_cta, chosen on the host: the largest power of two dividing Hkv with hg * mt
// <= 4 warps) makes the rows a CTA reads per token hg * D * 2 bytes long and contiguous in the
// cache layout [page, slot, head, D] (1 KB at hg = 4, D = 128, bf16) instead of one head's 256
// bytes, so a warp's copies of a token read one contiguous run. More heads, in a CTA of 8 warps
// (all 8 kv heads of a request, whole 2 KB rows, one CTA per SM), were 3-5% slower on H100 at the
// long shapes on 16- and 1-token pages (bench/results/2026-12-07_h100_whole_rows). Each CTA derives
// its tiles from kv_lens on the GPU (below), so the launch depends only on host ints and is
// CUDA-graph capturable; a CTA with no tokens writes (0, -inf).
//
// Tile schedule. A tile is one pipeline stage of T = 64 / hg tokens. Static (deterministic):
// split s takes the contiguous range [s * chunk, (s+1) * chunk) of the request, chunk =
// ceil(len / num_splits) rounded up to 64 tokens. Balanced (the default when num_splits > 1):
// the num_splits CTAs of a (request, kv-head group) share its tiles: CTA s first takes tiles
// 2s and 2s+1 (no atomic before the first copies), then the next unclaimed tile from a
// per-group counter (zeroed by the host before the launch), claimed two iterations before its
// page indices are read. A state is exact for any set of tokens, so each CTA still writes one
// state to its split's slot and the merge is unchanged; only the fp32 summation order depends
// on which CTA claimed which tile (results can differ in the last bits between runs). Why:
// Nsight Compute on H100 (B1 L128k, static, one wave of 256 equal CTAs) showed the SMs active
// for only 85% of the kernel's cycles (CTAs with the same bytes to read finish far apart) with
// DRAM at 79% of peak; in-order pages or whole-page reads did not change the time
// (bench/diag_decode.py). cuDNN's one-wave kernel kept its SMs active 91% at 90% of peak.
//
// Memory pipeline. A stage holds kRows = 64 (token, head) rows of K and of V: T = 64 / hg tokens of
// the hg heads (32 KB at D = 128). All 128 threads fill it with 16-byte cp.async (.cg, L2 only, L2
// fetching 128-byte lines: see decode_partial_ptx.cuh for why that size), a warp's 32 copies
// covering 512 contiguous bytes, and each thread then arrives on the stage's mbarrier through
// cp.async.mbarrier.arrive (the arrival fires when its copies have landed). kStages = 2: the loop
// issues tile t+1 before it waits for tile t, so 32-64 KB of KV per CTA, 64-128 KB per SM (2 CTAs
// at D = 128), are in flight. Why not more: on H100 (bench/NOTES.md) 1-D bulk copies (TMA, issued
// by warp 0) with 3 stages in flight streamed 3-4% slower than this, and with every copy mechanism
// 2 stages beat 3 (and 6 stages at 1 CTA per SM), so deeper is not better here (on one-token pages
// too: 3 stages 0.996-0.999x, h100_page1_variants); at kernel level on in-order pages this streams
// like cuDNN's decode kernel (Nsight Compute: 180 us, 89% of DRAM peak, both), and on shuffled
// 16-token pages like FlashInfer's tensor-core kernel (B16 L16k: 354.0 against 355.2 us, 90.7 /
// 90.4% of peak, both at 12% occupancy). Nor more CTAs: a third per SM (launch bounds 3, 168
// registers) streamed 0.4-1.4% slower at the long shapes and 4.5-5.8% at B8 L1k with the same
// splits, +-1% at best with more. Each thread loads the page indices of its rows one iteration
// before it issues them; warp 1 prefetches the block-table lines into L2 two iterations before that
// load (and, while kv_lens is in flight, the lines of the first tiles under the guess len = table
// capacity). Tokens past `end` in the last tile copy the row of token end-1 (real, finite data; its
// scores are masked to -inf, so P = 0 there) rather than stale shared memory. Token rows in shared
// memory are unpadded and swizzled: 16-byte chunk c of token row r lies at chunk c ^ (r % 8) of
// the row, so the 8 rows an ldmatrix reads sit on 8 distinct 4-bank groups and every 32-byte
// sector of KV lands in one 32-byte-aligned piece of shared memory. Why not the 16-byte pad the
// kernel had (same bank spread): it shifted odd token rows by 16 bytes against their sectors,
// and L2 then served every such sector twice. Nsight Compute on H100 (B16 L16k page 16): padded,
// 50.4 M L2 read sectors and 30.6 M requests for 33.6 M sectors of DRAM reads (48% hit rate);
// swizzled, 33.6 M and 16.9 M (0.7%), the same as FlashInfer's tensor-core kernel (33.6 M,
// 17.1 M); paired, 1.007-1.015x at the six long shapes, pages 16 and 1
// (bench/results/2026-12-07_h100_swizzle).
//
// L2 policy (template kEvictFirst, chosen per call on the host). With it the KV copies carry an
// evict-first policy, so the stream replaces its own lines, not what the work before it left in
// L2. H100, after a 256 MB write (dirty L2, as triton's do_bench leaves it), paired: 33.5-134 MB
// of KV per call 1.07-1.15x faster (B8 L1k 28.6 -> 25.6 us: the lines it no longer evicts need
// no write-back), 268 MB 1.01-1.02x, 537 MB (B1 L128k) 0.99x and 1.07 GB 0.97x (B16 L16k 383 ->
// 393 us; not isolated: likely a long stream kept to the ways the dirty lines leave); after a clean
// eviction 0.99-1.01x at every size. So the host turns it on up to 6x the L2's size
// (esp_kernels.decode.partial.kv_evict_first).
//
// Math. Tensor cores (mma.sync m16n8k16, fp32 accumulate) with the query heads of one kv head as
// the 16 MMA rows: S = Q K^T per 16-token block, online softmax in fp32 (exp2 of pre-scaled
// scores), O += P V with P rounded to the input type as in FlashAttention-2. Padding G = 4 heads
// to 16 rows wastes 3/4 of the MMA work, still a few % of the tensor-core time the bandwidth
// leaves. Warp w has the role p = w % (hg*mt): kv head h = p / mt of the group, head tile
// ht = p % mt (mt = 1, 2, 4 for G <= 16, 32, 64), and token group tg = w / (hg*mt): it takes the
// 16-token blocks tg + k * ntg (ntg = 4 / (hg*mt)) of every stage, mt blocks per stage.
//
// In-CTA merge. Each warp keeps its own (max, sum, O) per head row; at the end the ntg warps of a
// (head, head tile) meet in shared memory (reusing the pipeline buffers) and are combined exactly
// like merge_states. Splits > 1 write their states to the workspace and decode_merge_kernel
// reduces them (any number of splits; warps of a CTA share the splits of one row). Merging in
// the last CTA of each group instead (measured on H100) saved the merge launch but took as long inside the
// kernel (B16: 5 us either way), and cost B8 L1k ~2 us; so did merging among the splits of a
// group run as one thread-block cluster, through distributed shared memory (B8 L1k 29.6 against
// 29.5 us, the long shapes within 0.1%; bench/results/2026-12-07_h100_cluster_merge). The
// merge launch is hidden by programmatic dependent launch, so the second launch stays.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/mma.cuh"
#include "../common/vec.cuh"
#include "decode_partial_ptx.cuh"

namespace esp {
namespace decode {

struct DecodeParams {
  const void* q;  // q + b*q_sb + h*q_sh + d
  int64_t q_sb, q_sh;
  const void* k;  // k + page*k_sp + slot*k_ss + kvh*k_sh + d
  int64_t k_sp, k_ss, k_sh;
  const void* v;
  int64_t v_sp, v_ss, v_sh;
  const int* block_table;  // block_table + b*bt_sb + logical_page*bt_sp
  int64_t bt_sb, bt_sp;
  const int* kv_lens;  // kv_lens + b*kl_s
  int64_t kl_s;
  // Output row of (split, b, h): o + split*o_ss + b*o_sb + h*o_sh (D contiguous); lse likewise.
  // The final o/lse when num_splits == 1, the workspace otherwise.
  float* o;
  int64_t o_ss, o_sb, o_sh;
  float* lse;
  int64_t lse_ss, lse_sb, lse_sh;
  int batch, num_kv_heads, group, page_size, max_pages, num_splits;
  int heads_per_cta;  // hg: kv heads per CTA, a power of two <= 4 dividing num_kv_heads
  // Balanced schedule (num_splits > 1): one zeroed counter per (request, kv-head group),
  // tile_counter[b * (Hkv / hg) + group]; nullptr: static ranges (deterministic).
  int* tile_counter;
  float scale_log2;   // softmax_scale * log2(e): scores go through exp2
  bool kv_evict_first;  // the KV copies carry an evict-first L2 policy (decode_partial.h)
};

// Reduction of the splits' states: out row (b, h) = merge over s of the state at
// o + s*o_ss + (b*H + h)*D, lse + s*l_ss + b*H + h.
struct MergeParams {
  const float* o;
  const float* lse;
  int64_t o_ss, l_ss;
  float* out;
  int64_t out_sb, out_sh;
  float* lse_out;
  int64_t lse_sb, lse_sh;
  int* counters;            // the balanced schedule's tile counters, reset to zero here
  int n_counters;
  int splits, rows, heads;  // rows = B * H
  int warps_per_row;        // 1, 2, 4 or 8 warps of a CTA share one row's splits (set by the launcher)
};

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;        // (token, kv head) rows of K, and of V, per pipeline stage
constexpr int kStages = 2;
constexpr int kTileRing = 4;     // balanced schedule: tile ids published ahead (see the kernel)
constexpr int kTile = 64;        // a CTA's token range is a multiple of kTile tokens
constexpr int kMaxGroup = 16 * kWarps;  // one 16-row head tile per warp at most
constexpr int kMaxHeadsPerCta = kWarps;
constexpr int kMergeThreads = 256;

// Shared-memory layout of a stage: T = kRows / hg token rows of K, then T of V, each row the hg
// heads' D elements, unpadded (a multiple of 128 bytes; swizzled, see swizzle_chunk). So a stage
// is 2 * kRows head rows whatever hg is (32 KB at D = 128).
template <typename T, int D>
constexpr int kStageBytes = 2 * kRows * D * static_cast<int>(sizeof(T));
template <typename T, int D>
constexpr int kSmemBytes = kStages * kStageBytes<T, D>;
// Head tiles of 16 query heads per kv head.
__host__ __device__ constexpr int head_tiles(int group) {
  return group <= 16 ? 1 : (group <= 32 ? 2 : 4);
}

template <typename T, int D>
void launch_decode_partial(const DecodeParams& p, cudaStream_t stream, int device);
template <int D>
void launch_decode_merge(MergeParams p, cudaStream_t stream);  // chooses p.warps_per_row

namespace detail {

// Where 16-byte chunk `chunk` of token row `row` lies within the row in shared memory: its low 3
// bits XOR row % 8, so each 128-byte piece of a row is permuted within itself.
__device__ __forceinline__ int swizzle_chunk(int chunk, int row) { return chunk ^ (row & 7); }

// One warp, one 16-token block `kb` of the stage in shared memory (k_head/v_head: shared
// addresses of the warp's kv head in the stage's first K/V token row; token rows `rb` bytes
// apart, swizzled: the rows a lane addresses all have r % 8 = lane % 8), against the warp's 16
// head rows held as A fragments in `qa`. Updates the running state of this thread's two rows
// (lane/4 and lane/4 + 8): row_ms = running max of scaled scores (log2 units), row_l = this
// thread's share of the row sum, o = unnormalized output fragments.
template <typename T, int D>
__device__ __forceinline__ void attend_block(uint32_t k_head, uint32_t v_head, uint32_t rb, int kb,
                                             int first_tok, int end, float scale_log2,
                                             const uint32_t (&qa)[D / 16][4],
                                             float (&o)[D / 8][4], float (&row_ms)[2],
                                             float (&row_l)[2], int lane) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per head row

  // S = Q K^T: two n-tiles of 8 tokens; each ldmatrix.x4 gives the B fragments of two k-steps.
  float s[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    const uint32_t row_addr = k_head + (kb * 16 + j * 8 + (lane & 7)) * rb;
#pragma unroll
    for (int c4 = 0; c4 < kChunks / 4; ++c4) {
      const int chunk = c4 * 4 + (lane >> 3);
      uint32_t b[4];
      ldmatrix_x4(b, row_addr + (swizzle_chunk(chunk, lane) << 4));
      mma_16816<T>(s[j], qa[2 * c4], b[0], b[1]);
      mma_16816<T>(s[j], qa[2 * c4 + 1], b[2], b[3]);
    }
  }
  // s[j][e]: row lane/4 (e < 2) or lane/4 + 8 (e >= 2), token j*8 + (lane%4)*2 + e%2 of the block.
  if (first_tok + 16 > end) {
    const int tok = first_tok + (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (tok + j * 8 + (e & 1) >= end) s[j][e] = -INFINITY;
  }

  // Online softmax; the 4 lanes of a quad share a row, so row maxima reduce over xor 1 and 2.
  float mx[2] = {fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])),
                 fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]))};
  float sub[2], alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    const float m_new = fmaxf(row_ms[i], mx[i] * scale_log2);
    // A row that has seen only masked tokens keeps max -inf; subtracting 0 instead of -inf
    // keeps exp2 at exp2(-inf) = 0 rather than NaN.
    sub[i] = m_new == -INFINITY ? 0.f : m_new;
    alpha[i] = ex2(row_ms[i] - sub[i]);
    row_ms[i] = m_new;
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = ex2(fmaf(s[j][e], scale_log2, -sub[e >> 1]));
  row_l[0] = row_l[0] * alpha[0] + ((s[0][0] + s[0][1]) + (s[1][0] + s[1][1]));
  row_l[1] = row_l[1] * alpha[1] + ((s[0][2] + s[0][3]) + (s[1][2] + s[1][3]));
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o[n][0] *= alpha[0];
    o[n][1] *= alpha[0];
    o[n][2] *= alpha[1];
    o[n][3] *= alpha[1];
  }

  // O += P V: the S accumulator layout is the A layout of a k16 step over the block's tokens.
  const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                          pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
  // ldmatrix.trans matrices: tokens 0-7 / 8-15 (lanes 0-7 / 8-15) of chunk 2c, then of chunk 2c+1.
  const uint32_t v_row_addr = v_head + (kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * rb;
#pragma unroll
  for (int c2 = 0; c2 < kChunks / 2; ++c2) {
    const int chunk = c2 * 2 + (lane >> 4);
    uint32_t b[4];
    ldmatrix_x4_trans(b, v_row_addr + (swizzle_chunk(chunk, lane) << 4));
    mma_16816<T>(o[2 * c2], pa, b[0], b[1]);
    mma_16816<T>(o[2 * c2 + 1], pa, b[2], b[3]);
  }
}

// The next value of a balanced-schedule tile counter (one thread). atomicInc, not atomicAdd:
// ptxas turns a one-thread atomicAdd (an inline-PTX atom.add too) into a warp-aggregated atomic
// whose result is shuffled to the lanes at once, so thread 0 waited the whole L2 round trip there
// every iteration (7% of the kernel's warp-stall samples at B16 L16k, and the CTA behind it at
// the next barrier) although the loop reads the value an iteration later. An increment is not
// aggregated; its wrap bound is never reached (counters stay below the tile count). H100,
// paired: 1.0-1.3% faster at the long shapes on 16- and 1-token pages, B8 L1k unchanged
// (bench/results/2026-12-07_h100_claim_atomic).
__device__ __forceinline__ int claim_counter(int* counter) {
  return static_cast<int>(atomicInc(reinterpret_cast<unsigned*>(counter), 0x7fffffffu));
}

}  // namespace detail

template <typename T, int D, bool kEvictFirst>
__global__ void __launch_bounds__(kThreads, D == 64 ? 4 : 2)
    decode_partial_kernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr int kHeadBytes = D * static_cast<int>(sizeof(T));
  // Merge buffer rows padded by 4 floats: the float2 fragment stores of 8 rows then hit
  // distinct banks (a 512-byte stride would put all 8 rows on the same banks).
  constexpr int kRedStride = D + 4;
  static_assert(kWarps * 16 * kRedStride * 4 <= kSmemBytes<T, D>,
                "merge buffer fits in the pipeline buffers");
  // Copies: in pass i, thread tid moves 16-byte chunk tid % kCpr of head row
  // i * kRpp + tid / kCpr (head row = token * hg + head) of the stage's K and of its V.
  constexpr int kCpr = kHeadBytes / 16;  // chunks per head row: 16 (D 128) or 8 (D 64)
  constexpr int kRpp = kThreads / kCpr;  // head rows per pass
  constexpr int kPasses = kRows / kRpp;  // passes per stage: 8 (D 128) or 4 (D 64)

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_max[kWarps][16], s_sum[kWarps][16];
  __shared__ __align__(8) uint64_t full_bar[kStages];
  __shared__ int s_first[kStages];  // first token of the tile in each stage, -1: none
  __shared__ int s_tile[kTileRing];  // balanced: tile of slot u at s_tile[u % kTileRing]

  const int grp = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.group;
  const int hg = p.heads_per_cta, kvh0 = grp * hg;
  const int hg_log2 = hg == 4 ? 2 : (hg == 2 ? 1 : 0);
  const int T_stage = kRows >> hg_log2;                      // tokens per stage
  // Shared-memory layout (kStageBytes): token row and stage bytes.
  const uint32_t rb = hg * kHeadBytes;
  constexpr uint32_t sb = kStageBytes<T, D>;
  const uint32_t smem0 = smem_u32(smem_raw);

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s)
      detail::mbar_init(smem_u32(&full_bar[s]), kThreads);
  }
  // The split merge (if any) may be scheduled now; it waits for this whole grid to complete.
  detail::launch_dependents();

  // The length is clamped to what the block table can address, so a bad kv_lens cannot read
  // past block_table (the host checks max_pages * page_size < 2^31 - 64).
  const int64_t cap = static_cast<int64_t>(p.max_pages) * p.page_size;
  // q, kv_lens and the block table are read-only for this grid: __ldg (read-only data path).
  const int len_in = __ldg(p.kv_lens + b * p.kl_s);
  const int* bt = p.block_table + b * p.bt_sb;
  const int ps = p.page_size;
  // Which tiles (T_stage tokens each) this CTA computes; see "Tile schedule" in the header.
  const bool balanced = p.tile_counter != nullptr;  // the host sets it only for num_splits > 1
  // Static schedule: tokens per split for a request of n tokens (n <= cap < 2^31, so unsigned
  // 32-bit arithmetic is exact and cheaper than 64-bit division).
  auto split_chunk = [&](int64_t n) -> int64_t {
    const unsigned S = static_cast<unsigned>(p.num_splits);
    return ((static_cast<unsigned>(n) + S - 1) / S + kTile - 1) / kTile * kTile;
  };
  // While kv_lens is in flight, warp 1 prefetches the block-table lines of the first kStages
  // tiles this CTA would have if the request filled its table (len = cap; exact for a full
  // table, a few wasted prefetches otherwise), so the lookups below hit L2 instead of paying a
  // second DRAM round trip. Tokens are probed 16 apart (16 entries = 64 bytes at page 1).
  if (warp == 1 && 16 * lane <= kStages * T_stage && cap > 0) {
    int64_t first_g = int64_t{split} * kStages * T_stage, span = int64_t{kStages} * T_stage;
    if (!balanced) {
      const int64_t chunk_g = split_chunk(cap);
      first_g = split * chunk_g;
      span = min(chunk_g, span);
    }
    if (first_g < cap) {
      const int64_t tok = min(first_g + 16 * lane, min(cap, first_g + span) - 1);
      detail::prefetch_l2(bt + static_cast<int>(static_cast<unsigned>(tok) /
                                                static_cast<unsigned>(ps)) * p.bt_sp);
    }
  }
  const int64_t len = max(int64_t{0}, min(static_cast<int64_t>(len_in), cap));
  int start = 0, end = static_cast<int>(len);  // tile i covers [start + i*T_stage, ...) < end
  if (!balanced) {
    const int64_t chunk = split_chunk(len);
    start = static_cast<int>(min(len, split * chunk));
    end = static_cast<int>(min(len, split * chunk + chunk));
  }
  const int num_tiles = (end - start + T_stage - 1) / T_stage;
  // Tile of pipeline slot t, or -1 past the last: static, tile t of the range; balanced, tile
  // split * kStages + t for the first kStages slots, then tiles taken from the request's counter
  // (value c -> tile num_splits * kStages + c).
  auto valid_tile = [&](int tile) { return tile < num_tiles ? tile : -1; };
  int* const counter = balanced ? p.tile_counter + b * gridDim.x + grp : nullptr;
  const int first_dynamic_tile = p.num_splits * kStages;

  // Block-table prefetch (static schedule; warp 1, lanes < n_probes): the L2 lines holding the
  // page indices of `tile`, probed every 16 tokens and at its last token, so with contiguous
  // table rows every line its lookups read is touched. Every thread loads the indices of tile
  // t+kStages during iteration t; warp 1 prefetches tile t+kStages+kBtAhead then, so that load
  // hits L2 rather than waiting a loaded DRAM latency (page 1: a new 128-byte line every 2 tiles
  // at hg = 4). The balanced schedule learns its tiles only two iterations ahead and skips this
  // (thread 0 prefetching a counter tile's lines when it publishes the tile was 0.7-1% slower at
  // the long shapes on H100, page 16 and 1: bench/results/2026-12-07_h100_page1_variants).
  // Addresses stay inside the table (tile < num_tiles, token < end <= cap).
  constexpr int kBtAhead = 2;
  const int n_probes = T_stage / 16 + 1;
  auto prefetch_pages = [&](int tile, int probe) {
    if (tile >= num_tiles || probe >= n_probes) return;
    const int first = start + tile * T_stage;
    const int tok = min(probe * 16 < T_stage ? first + probe * 16 : first + T_stage - 1, end - 1);
    detail::prefetch_l2(
        bt + static_cast<int>(static_cast<unsigned>(tok) / static_cast<unsigned>(ps)) * p.bt_sp);
  };
  if (!balanced && warp == 1 && lane < kBtAhead * n_probes)
    prefetch_pages(kStages + lane / n_probes, lane % n_probes);

  // Page and slot of each of this thread's copies of `tile`; tokens past `end` take end-1.
  auto lookup = [&](int tile, int (&page)[kPasses], int (&slot)[kPasses]) {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int hr = i * kRpp + tid / kCpr;
      const int tok = min(start + tile * T_stage + (hr >> hg_log2), end - 1);
      // Unsigned division is cheaper; both are >= 0.
      const int lp = static_cast<int>(static_cast<unsigned>(tok) / static_cast<unsigned>(ps));
      page[i] = __ldg(bt + lp * p.bt_sp);
      slot[i] = tok - lp * ps;
    }
  };
  // Fills the stage of slot t with `tile` (every thread its chunks), or, for tile -1, only
  // arrives. Each thread's arrival fires when its copies have landed, so the stage's phase
  // completes when all 2 * kRows head rows are in shared memory. The slot's first token (-1:
  // none, the loop ends there) goes to s_first[stage]; the __syncthreads at the top of the
  // next iteration publishes it before any warp reads it.
  auto issue = [&](int t, int tile, const int (&page)[kPasses], const int (&slot)[kPasses]) {
    const int stage = t % kStages;
    if (tid == 0) s_first[stage] = tile < 0 ? -1 : start + tile * T_stage;
    if (tile >= 0) {
      const int col = (tid % kCpr) * 8;  // elements: 16 bytes of 2-byte T
      const uint32_t dst0 = smem0 + stage * sb;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int hr = i * kRpp + tid / kCpr;
        const int tok = hr >> hg_log2, head = hr & (hg - 1);
        const uint32_t dst =
            dst0 + tok * rb + head * kHeadBytes + (detail::swizzle_chunk(tid % kCpr, tok) << 4);
        const T* ksrc = static_cast<const T*>(p.k) + page[i] * p.k_sp + slot[i] * p.k_ss +
                        (kvh0 + head) * p.k_sh + col;
        const T* vsrc = static_cast<const T*>(p.v) + page[i] * p.v_sp + slot[i] * p.v_ss +
                        (kvh0 + head) * p.v_sh + col;
        if constexpr (kEvictFirst) {
          detail::cp_async_16_evict_first(dst, ksrc);
          detail::cp_async_16_evict_first(dst + T_stage * rb, vsrc);
        } else {
          detail::cp_async_16(dst, ksrc);
          detail::cp_async_16(dst + T_stage * rb, vsrc);
        }
      }
    }
    detail::arrive_on_copies(smem_u32(&full_bar[stage]));
  };

  // Warp role: kv head h of the group, head tile ht, token group tg (see the header comment).
  const int mt = head_tiles(G);
  const int roles = hg * mt;
  const int role = warp % roles, h = role / mt, ht = role % mt;
  const int tg = warp / roles, ntg = kWarps / roles;

  // Tiles of the pipeline slots (see "Tile schedule"): static, slot u takes tile u of the range;
  // balanced, slot u < kStages takes tile split * kStages + u and later slots come from the
  // counter. Slot u's pages are looked up in iteration u - kStages and its copies issued in
  // iteration u - kStages + 1, so for a counter slot thread 0 takes the counter value in
  // iteration u - kStages - 2 and publishes the tile in s_tile during iteration
  // u - kStages - 1; the __syncthreads that opens iteration u - kStages makes it visible
  // (the first two counter slots are taken before the loop). Tiles only run out, never return:
  // once a slot has none, no later slot has one (counter values only grow).
  auto first_tile = [&](int u) { return valid_tile(balanced ? split * kStages + u : u); };
  int page[kPasses], slot[kPasses];
  int look_tile = first_tile(kStages - 1);  // the slot whose pages are in page/slot
  if (look_tile >= 0) lookup(look_tile, page, slot);
  {
    int pre_page[kStages - 1][kPasses], pre_slot[kStages - 1][kPasses];
#pragma unroll
    for (int u = 0; u < kStages - 1; ++u)
      if (first_tile(u) >= 0) lookup(first_tile(u), pre_page[u], pre_slot[u]);
    __syncthreads();  // the barriers are initialized
#pragma unroll
    for (int u = 0; u < kStages - 1; ++u) issue(u, first_tile(u), pre_page[u], pre_slot[u]);
  }
  // Balanced: thread 0 takes the first two counter values only now, with the first copies in
  // flight, and in one round trip (the second is wasted when the first is already past the end;
  // an earlier version took them one after the other before the first copies and cost B8 L1k
  // ~4 us). The __syncthreads opening iteration 0 publishes s_tile.
  int grab = 0, published = -1;  // thread 0: counter value of the next slot to publish
  if (balanced && tid == 0) {
    const int c0 = detail::claim_counter(counter);
    grab = detail::claim_counter(counter);
    published = valid_tile(first_dynamic_tile + c0);
    s_tile[kStages % kTileRing] = published;
  }

  // Q as MMA A fragments (rows = the warp's 16 heads, zero past G), loaded while pages arrive.
  uint32_t qa[D / 16][4];
  {
    const int r0 = ht * 16 + (lane >> 2), r1 = r0 + 8;
    const T* q_row = static_cast<const T*>(p.q) + b * p.q_sb + (lane & 3) * 2;
    // Rows past G read nothing; clamping keeps even their pointers inside q.
    const int64_t qh = static_cast<int64_t>(kvh0 + h) * G;
    const T* q0 = q_row + (qh + min(r0, G - 1)) * p.q_sh;
    const T* q1 = q_row + (qh + min(r1, G - 1)) * p.q_sh;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qa[ks][0] = r0 < G ? __ldg(reinterpret_cast<const unsigned*>(q0 + ks * 16)) : 0u;
      qa[ks][1] = r1 < G ? __ldg(reinterpret_cast<const unsigned*>(q1 + ks * 16)) : 0u;
      qa[ks][2] = r0 < G ? __ldg(reinterpret_cast<const unsigned*>(q0 + ks * 16 + 8)) : 0u;
      qa[ks][3] = r1 < G ? __ldg(reinterpret_cast<const unsigned*>(q1 + ks * 16 + 8)) : 0u;
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float row_ms[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

  // Slots are consumed in order, so the loop ends at the first empty slot with no copy in
  // flight.
  for (int t = 0;; ++t) {
    // Every warp is done with slot t-1, whose stage slot t+kStages-1 reuses: refill it before
    // waiting for slot t, so all kStages stages are in flight during the wait.
    __syncthreads();
    const int next = t + kStages - 1;
    issue(next, look_tile, page, slot);
    int tile = -1;  // of slot next + 1, looked up now, issued one iteration later
    if (look_tile >= 0) tile = balanced ? s_tile[(next + 1) % kTileRing] : valid_tile(next + 1);
    if (tile >= 0) lookup(tile, page, slot);
    look_tile = tile;
    if (balanced && tid == 0) {
      published = published >= 0 ? valid_tile(first_dynamic_tile + grab) : -1;
      s_tile[(next + 2) % kTileRing] = published;
      if (published >= 0) grab = detail::claim_counter(counter);
    }
    if (!balanced && warp == 1 && lane < n_probes) prefetch_pages(next + 1 + kBtAhead, lane);
    const int stage = t % kStages;
    const int t0 = s_first[stage];
    if (t0 < 0) break;  // uniform: every warp reads the same value
    detail::mbar_wait(smem_u32(&full_bar[stage]), (t / kStages) & 1);

    const uint32_t k_head = smem0 + stage * sb + h * kHeadBytes;
    const uint32_t v_head = k_head + T_stage * rb;
#pragma unroll 1
    for (int s = 0; s < mt; ++s) {
      const int kb = tg + s * ntg;
      if (t0 + kb * 16 >= end) break;  // warp-uniform; later blocks are further out
      detail::attend_block<T, D>(k_head, v_head, rb, kb, t0 + kb * 16, end, p.scale_log2, qa, o,
                                 row_ms, row_l, lane);
    }
  }

  // ---- in-CTA merge of the warps' states, then the store ----
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_l[i] += __shfl_xor_sync(0xffffffffu, row_l[i], 1);
    row_l[i] += __shfl_xor_sync(0xffffffffu, row_l[i], 2);
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      s_max[warp][(lane >> 2) + 8 * i] = row_ms[i];
      s_sum[warp][(lane >> 2) + 8 * i] = row_l[i];
    }
  }
  __syncthreads();  // every stage has been consumed: the buffers are free for the merge

  const int64_t out_row = split * p.o_ss + b * p.o_sb;
  const int64_t lse_row = split * p.lse_ss + b * p.lse_sb;
  const int64_t qh0 = static_cast<int64_t>(kvh0) * G;  // first query head of the group
  float* red = reinterpret_cast<float*>(smem_raw);     // [kWarps][16][kRedStride]
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = (lane >> 2) + 8 * i, g = ht * 16 + r;
    if (g >= G) continue;
    // State of all warps on this head: max M, sum L = sum_w l_w * 2^(m_w - M).
    float m_all = -INFINITY;
    for (int k = 0; k < ntg; ++k) m_all = fmaxf(m_all, s_max[k * roles + role][r]);
    float l_all = 0.f;
    for (int k = 0; k < ntg; ++k) {
      // Empty warp: sum 0 (skipped). A NaN score leaves the max (fmaxf drops NaN, possibly at
      // -inf) but not the sum, so a NaN sum is kept and makes L, hence o and lse, NaN.
      const float l = s_sum[k * roles + role][r];
      if (l != 0.f) l_all += l * ex2(s_max[k * roles + role][r] - m_all);
    }
    // An empty warp (max -inf) has o = 0 and weight 0; an empty head (L = 0) gets (0, -inf).
    const float w = (l_all != 0.f && row_ms[i] != -INFINITY)
                        ? ex2(row_ms[i] - m_all) / l_all
                        : 0.f;
    float* dst = red + (warp * 16 + r) * kRedStride + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * i] * w, o[n][2 * i + 1] * w);
    if (tg == 0 && (lane & 3) == 0) {
      // lse = ln(sum exp(scale * s)) = (M + log2 L) * ln 2, M in log2 units.
      p.lse[lse_row + (qh0 + h * G + g) * p.lse_sh] =
          l_all != 0.f ? (m_all + __log2f(l_all)) * 0.69314718055994531f : -INFINITY;
    }
  }
  __syncthreads();

  // Sum the token-group warps of each head and store 16-byte, coalesced rows. Query row qr of
  // the group is kv head qr / G, head qr % G: role (qr / G) * mt + (qr % G) / 16.
  constexpr int kVec4 = D / 4;
  for (int idx = tid; idx < hg * G * kVec4; idx += kThreads) {
    const int qr = idx / kVec4, c4 = idx % kVec4;
    const int g = qr % G, rrole = (qr / G) * mt + (g >> 4);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k = 0; k < ntg; ++k) {
      const float4 x = *reinterpret_cast<const float4*>(
          red + ((k * roles + rrole) * 16 + (g & 15)) * kRedStride + c4 * 4);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    *reinterpret_cast<float4*>(p.o + out_row + (qh0 + qr) * p.o_sh + c4 * 4) = acc;
  }
}

// One row (b, h) per warps_per_row warps: each warp takes every (warps_per_row * kSpw)-th split
// (kSpw = 32 lanes / (D/4) float4 columns: 1 at D = 128, 2 at D = 64), loading each split's lse
// and o together, kUnroll splits in flight per lane, and merges them online into (max, sum, o);
// the warps' partial states meet in shared memory. Why one load phase: the merge runs after the
// decode grid, so its dependent memory round trips are the call's tail; reading every lse
// first (for the row's max and sum) and the o values after was two. Same semantics as
// merge_states: empty states (lse -inf) are skipped, never multiplied, a row with only empty
// states gives (0, -inf), and a NaN lse makes the row NaN (fmax_nan).
template <int D>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const MergeParams p) {
  constexpr int kCols = D / 4;
  constexpr int kSpw = 32 / kCols;
  constexpr int kWarpsM = kMergeThreads / 32;
  constexpr int kUnroll = 8;
  __shared__ float4 part[kWarpsM][32];
  __shared__ float part_max[kWarpsM][kSpw], part_sum[kWarpsM][kSpw];

  detail::wait_prerequisites();  // the decode grid has completed (programmatic launch)
  // No CTA of the decode grid reads its counters any more: leave them zero for the next launch
  // on this workspace (decode_partial's counters_zeroed).
  for (int i = blockIdx.x * kMergeThreads + threadIdx.x; i < p.n_counters;
       i += gridDim.x * kMergeThreads)
    p.counters[i] = 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wpr = p.warps_per_row;
  const int row = blockIdx.x * (kWarpsM / wpr) + warp / wpr;
  const int sw = warp % wpr;  // this warp's share of the row's splits
  const bool valid = row < p.rows;
  const int c = lane % kCols, sub = lane / kCols;  // float4 column, split lane group
  const float* lrow = p.lse + row;

  // This lane group's running state: max m, sum l of exp(lse - m), o = sum of exp(lse - m) o_s.
  float m = -INFINITY, l = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (valid) {
    const int step = wpr * kSpw;
    const float* obase = p.o + static_cast<int64_t>(row) * D + c * 4;
    for (int s0 = sw * kSpw + sub; s0 < p.splits; s0 += kUnroll * step) {
      float ls[kUnroll];
      float4 x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int s = s0 + u * step;
        ls[u] = s < p.splits ? lrow[s * p.l_ss] : -INFINITY;
        x[u] = s < p.splits ? *reinterpret_cast<const float4*>(obase + s * p.o_ss)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      float mc = m;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mc = fmax_nan(mc, ls[u]);
      if (mc == -INFINITY) continue;  // only empty states so far
      // Rescale what was merged (nothing yet when m is -inf; NaN stays NaN).
      const float r = m == -INFINITY ? 0.f : __expf(m - mc);
      l *= r;
      acc.x *= r;
      acc.y *= r;
      acc.z *= r;
      acc.w *= r;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (ls[u] == -INFINITY) continue;  // empty state: skipped, never multiplied by 0
        const float w = __expf(ls[u] - mc);
        l += w;
        acc.x = fmaf(w, x[u].x, acc.x);
        acc.y = fmaf(w, x[u].y, acc.y);
        acc.z = fmaf(w, x[u].z, acc.z);
        acc.w = fmaf(w, x[u].w, acc.w);
      }
      m = mc;
    }
  }
  part[warp][lane] = acc;
  if (c == 0) {
    part_max[warp][sub] = m;
    part_sum[warp][sub] = l;
  }
  __syncthreads();
  if (valid && sw == 0 && lane < kCols) {
    float mx = -INFINITY;
    for (int w2 = 0; w2 < wpr; ++w2)
#pragma unroll
      for (int k = 0; k < kSpw; ++k) mx = fmax_nan(mx, part_max[warp + w2][k]);
    float sum = 0.f;
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mx != -INFINITY) {
      for (int w2 = 0; w2 < wpr; ++w2)
#pragma unroll
        for (int k = 0; k < kSpw; ++k) {
          const float mk = part_max[warp + w2][k];
          if (mk == -INFINITY) continue;  // a lane group that saw only empty states
          const float e = __expf(mk - mx);
          const float4 y = part[warp + w2][lane + k * kCols];
          sum = fmaf(part_sum[warp + w2][k], e, sum);
          r.x = fmaf(y.x, e, r.x);
          r.y = fmaf(y.y, e, r.y);
          r.z = fmaf(y.z, e, r.z);
          r.w = fmaf(y.w, e, r.w);
        }
      const float inv = 1.f / sum;
      r.x *= inv;
      r.y *= inv;
      r.z *= inv;
      r.w *= inv;
    }
    const int bb = row / p.heads, hh = row % p.heads;
    *reinterpret_cast<float4*>(p.out + bb * p.out_sb + hh * p.out_sh + c * 4) = r;
    if (lane == 0)
      p.lse_out[bb * p.lse_sb + hh * p.lse_sh] = mx == -INFINITY ? -INFINITY : mx + __logf(sum);
  }
}

template <typename T, int D>
void launch_decode_partial(const DecodeParams& p, cudaStream_t stream, int device) {
  auto kernel =
      p.kv_evict_first ? decode_partial_kernel<T, D, true> : decode_partial_kernel<T, D, false>;
  set_smem_attributes_once(reinterpret_cast<const void*>(kernel), kSmemBytes<T, D>, device);
  const dim3 grid(p.num_kv_heads / p.heads_per_cta, p.num_splits, p.batch);
  kernel<<<grid, kThreads, kSmemBytes<T, D>, stream>>>(p);
  check_launch("decode_partial_kernel");
}

template <int D>
void launch_decode_merge(MergeParams p, cudaStream_t stream) {
  // Warps per row: enough to spread the splits (kSpw of them per warp per step: 1 at D = 128,
  // 2 at D = 64), at most the CTA's 8.
  constexpr int kSpw = 32 / (D / 4);
  p.warps_per_row = 1;
  while (p.warps_per_row < 8 && p.warps_per_row * kSpw < p.splits) p.warps_per_row *= 2;
  const int rows_per_block = (kMergeThreads / 32) / p.warps_per_row;
  const int blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  // Programmatic dependent launch: the merge's CTAs are scheduled while the decode grid drains
  // (hiding the launch gap) and wait in griddepcontrol.wait for its completion. If the launch
  // is refused, launch it the ordinary way.
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kMergeThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cudaLaunchKernelEx(&cfg, decode_merge_kernel<D>, p) != cudaSuccess) {
    (void)cudaGetLastError();
    decode_merge_kernel<D><<<blocks, kMergeThreads, 0, stream>>>(p);
  }
  check_launch("decode_merge_kernel");
}

}  // namespace decode
}  // namespace esp
