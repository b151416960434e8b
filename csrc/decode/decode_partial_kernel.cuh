// decode_partial kernel: attention of one query token per request over a paged KV shard, giving
// the partial state (o normalized fp32, lse natural log) that multi-master decode merges.
//
// Work split. Grid (Hkv, num_splits, B): one CTA per (kv head, split, request) computes all
// G = Hq/Hkv query heads of its kv head, so every K/V row crosses the memory bus once. blockIdx.x
// is the kv head so the Hkv CTAs that read the same pages (a slot holds all kv heads) run side
// by side and hit the same DRAM rows. Each CTA derives its token range [start, end) from kv_lens on
// the GPU (chunk = ceil(len / num_splits) rounded up to a tile), so the launch depends only on
// host ints and is CUDA-graph capturable; a CTA with no tokens writes (0, -inf).
//
// Memory pipeline. 128 threads stream 64-token tiles of K and V into shared memory with 16-byte
// cp.async (16 consecutive threads cover one 256-byte row of D = 128: fully coalesced whatever
// the page size), 3 stages deep: two tiles (64 KB at D = 128) stay in flight per CTA while one is
// consumed, and two CTAs fit per SM (96 KB smem each), i.e. ~128 KB in flight per SM against the
// ~25 KB Little's law asks for at 3 TB/s. Rows past `end` are zero-filled (cp.async src-size 0)
// so stale or uninitialized shared memory can never put NaN into P.V. Block-table entries are
// loaded into registers one tile before the copies that need them, so their latency hides behind
// a tile of compute instead of stalling the issue.
//
// Math. Tensor cores (mma.sync m16n8k16, fp32 accumulate) with the query heads as the 16 MMA
// rows: S = Q K^T per 16-token block, online softmax in fp32 (exp2 of pre-scaled scores), O += P V
// with P rounded to the input type as in FlashAttention-2. Padding G = 4 heads to 16 rows wastes
// 3/4 of the MMA work, which is still < 5% of the tensor-core time the bandwidth leaves (128
// MMAs per 32 KB tile vs ~5800 cycles per tile per CTA at 2.5 TB/s), and it keeps G up to 16 at
// the same cost. Warp w takes head tile w % MT (MT = 1, 2, 4 for G <= 16, 32, 64) and token
// blocks w / MT + k * (4/MT) of each tile; for G <= 16 the 4 warps take the 4 16-token
// blocks. Shared tiles use a 16-byte-chunk XOR swizzle (chunk ^ row % 8) so ldmatrix and
// cp.async are free of bank conflicts.
//
// In-CTA merge. Each warp keeps its own (max, sum, O) per head row; at the end they meet in
// shared memory (reusing the pipeline buffers) and are combined exactly like merge_states.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "../common/vec.cuh"

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
  float scale_log2;  // softmax_scale * log2(e): scores go through exp2
};

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;  // tokens per pipeline stage: one 16-token MMA block per warp
constexpr int kStages = 3;
constexpr int kMaxGroup = 16 * kWarps;  // one 16-row head tile per warp at most

template <typename T, int D>
constexpr int smem_bytes() {
  return kStages * 2 * kTile * D * static_cast<int>(sizeof(T));
}

template <typename T, int D>
void launch_decode_partial(const DecodeParams& p, cudaStream_t stream, int device);

namespace detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one 32-bit MMA operand register: `lo` (the lower column) in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x; ex2.approx gives +0 for -inf, which is what masked scores and empty states need.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One warp, one 16-token block `kb` of the tile in shared memory (k_tile/v_tile: shared
// addresses of this stage's K and V, [kTile][D] with swizzled 16-byte chunks), against the
// warp's 16 head rows held as A fragments in `qa`. Updates the running state of this thread's
// two rows (lane/4 and lane/4 + 8): row_ms = running max of scaled scores (log2 units),
// row_l = this thread's share of the row sum, o = unnormalized output fragments.
template <typename T, int D>
__device__ __forceinline__ void attend_block(uint32_t k_tile, uint32_t v_tile, int kb,
                                             int first_tok, int end, float scale_log2,
                                             const uint32_t (&qa)[D / 16][4],
                                             float (&o)[D / 8][4], float (&row_ms)[2],
                                             float (&row_l)[2], int lane) {
  constexpr int kChunks = D / 8;
  constexpr uint32_t kRowBytes = D * sizeof(T);

  // S = Q K^T: two n-tiles of 8 tokens; each ldmatrix.x4 gives the B fragments of two k-steps.
  float s[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    const uint32_t row_addr = k_tile + (kb * 16 + j * 8 + (lane & 7)) * kRowBytes;
#pragma unroll
    for (int c4 = 0; c4 < kChunks / 4; ++c4) {
      const int chunk = c4 * 4 + (lane >> 3);
      uint32_t b[4];
      ldsm_x4(b, row_addr + ((chunk ^ (lane & 7)) << 4));
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
  const uint32_t v_row_addr =
      v_tile + (kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes;
#pragma unroll
  for (int c2 = 0; c2 < kChunks / 2; ++c2) {
    const int chunk = c2 * 2 + (lane >> 4);
    uint32_t b[4];
    ldsm_x4_trans(b, v_row_addr + ((chunk ^ (lane & 7)) << 4));
    mma_16816<T>(o[2 * c2], pa, b[0], b[1]);
    mma_16816<T>(o[2 * c2 + 1], pa, b[2], b[3]);
  }
}

}  // namespace detail

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) decode_partial_kernel(const DecodeParams p) {
  static_assert(D % 64 == 0 && D <= 128, "head dims 64 and 128");
  constexpr int kChunks = D / 8;                     // 16-byte chunks per row
  constexpr int kRowStep = kThreads / kChunks;       // rows one CTA-wide copy pass covers
  constexpr int kRowsPerThread = kTile / kRowStep;   // 8 at D = 128
  constexpr int kStageElems = 2 * kTile * D;         // K tile then V tile
  // Merge buffer rows padded by 4 floats: the float2 fragment stores of 8 rows then hit
  // distinct banks (a 512-byte stride would put all 8 rows on the same banks).
  constexpr int kRedStride = D + 4;
  static_assert(kWarps * 16 * kRedStride * 4 <= smem_bytes<T, D>(), "merge buffer fits");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ float s_max[kWarps][16], s_sum[kWarps][16];

  const int kvh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.group;

  // This CTA's token range. The length is clamped to what the block table can address, so a
  // bad kv_lens cannot read past block_table (the host checks max_pages * page_size < 2^31 - 64).
  const int64_t cap = static_cast<int64_t>(p.max_pages) * p.page_size;
  const int64_t len =
      max(int64_t{0}, min(static_cast<int64_t>(__ldg(p.kv_lens + b * p.kl_s)), cap));
  const int64_t chunk = ((len + p.num_splits - 1) / p.num_splits + kTile - 1) / kTile * kTile;
  const int start = static_cast<int>(min(len, split * chunk));
  const int end = static_cast<int>(min(len, split * chunk + chunk));
  const int num_tiles = (end - start + kTile - 1) / kTile;

  // Copy assignment: thread -> chunk `cc` of rows row0 + i * kRowStep of every tile.
  const int cc = tid % kChunks, row0 = tid / kChunks;
  const T* k_src = static_cast<const T*>(p.k) + kvh * p.k_sh + cc * 8;
  const T* v_src = static_cast<const T*>(p.v) + kvh * p.v_sh + cc * 8;
  const int* bt = p.block_table + b * p.bt_sb;
  const int ps = p.page_size;

  auto load_pages = [&](int tile, int (&page)[kRowsPerThread], int (&slot)[kRowsPerThread]) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int tok = start + tile * kTile + row0 + i * kRowStep;
      page[i] = 0;
      slot[i] = 0;
      if (tok < end) {
        // Unsigned division is cheaper; both are >= 0.
        const int lp = static_cast<int>(static_cast<unsigned>(tok) / static_cast<unsigned>(ps));
        page[i] = __ldg(bt + lp * p.bt_sp);
        slot[i] = tok - lp * ps;
      }
    }
  };
  auto issue = [&](int tile, const int (&page)[kRowsPerThread],
                   const int (&slot)[kRowsPerThread]) {
    T* k_dst = smem + (tile % kStages) * kStageElems;
    T* v_dst = k_dst + kTile * D;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = row0 + i * kRowStep;
      const int bytes = start + tile * kTile + r < end ? 16 : 0;
      const int swz = r * D + ((cc ^ (r & 7)) << 3);
      detail::cp_async_16(detail::smem_addr(k_dst + swz),
                          k_src + page[i] * p.k_sp + slot[i] * p.k_ss, bytes);
      detail::cp_async_16(detail::smem_addr(v_dst + swz),
                          v_src + page[i] * p.v_sp + slot[i] * p.v_ss, bytes);
    }
  };

  // Head tiles: warp -> (head tile ht, token-block group tg); see the header comment.
  const int mt = G <= 16 ? 1 : (G <= 32 ? 2 : 4);
  const int ht = warp % mt, tg = warp / mt, ntg = kWarps / mt;

  // Pages of the first kStages tiles are read together so the prologue waits one latency.
  int pre_page[kStages - 1][kRowsPerThread], pre_slot[kStages - 1][kRowsPerThread];
  int page[kRowsPerThread], slot[kRowsPerThread];
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_pages(s, pre_page[s], pre_slot[s]);
  load_pages(kStages - 1, page, slot);

  // Q as MMA A fragments (rows = the warp's 16 heads, zero past G), loaded while pages arrive.
  uint32_t qa[D / 16][4];
  {
    const int h0 = ht * 16 + (lane >> 2), h1 = h0 + 8;
    const T* q_row = static_cast<const T*>(p.q) + b * p.q_sb + (lane & 3) * 2;
    // Rows past G read nothing; clamping keeps even their pointers inside q.
    const T* q0 = q_row + static_cast<int64_t>(kvh * G + min(h0, G - 1)) * p.q_sh;
    const T* q1 = q_row + static_cast<int64_t>(kvh * G + min(h1, G - 1)) * p.q_sh;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qa[ks][0] = h0 < G ? __ldg(reinterpret_cast<const unsigned*>(q0 + ks * 16)) : 0u;
      qa[ks][1] = h1 < G ? __ldg(reinterpret_cast<const unsigned*>(q1 + ks * 16)) : 0u;
      qa[ks][2] = h0 < G ? __ldg(reinterpret_cast<const unsigned*>(q0 + ks * 16 + 8)) : 0u;
      qa[ks][3] = h1 < G ? __ldg(reinterpret_cast<const unsigned*>(q1 + ks * 16 + 8)) : 0u;
    }
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) issue(s, pre_page[s], pre_slot[s]);
    detail::cp_async_commit();  // empty groups keep the wait_group count uniform
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float row_ms[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

  for (int t = 0; t < num_tiles; ++t) {
    detail::cp_async_wait<kStages - 2>();  // this thread's copies of tile t have landed
    __syncthreads();  // everyone's have, and every warp is done with tile t-1's stage
    const int next = t + kStages - 1;  // goes into the stage tile t-1 used
    if (next < num_tiles) issue(next, page, slot);
    detail::cp_async_commit();
    if (next + 1 < num_tiles) load_pages(next + 1, page, slot);  // used one iteration later

    const T* k_tile = smem + (t % kStages) * kStageElems;
    const uint32_t k_addr = detail::smem_addr(k_tile);
    const uint32_t v_addr = detail::smem_addr(k_tile + kTile * D);
    const int t0 = start + t * kTile;
#pragma unroll 1
    for (int s = 0; s < mt; ++s) {
      const int kb = tg + s * ntg;
      if (t0 + kb * 16 >= end) break;  // warp-uniform; later blocks are further out
      detail::attend_block<T, D>(k_addr, v_addr, kb, t0 + kb * 16, end, p.scale_log2, qa, o,
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
  detail::cp_async_wait<0>();  // only empty groups can remain; the buffer is reused below
  __syncthreads();

  const int64_t out_row = split * p.o_ss + b * p.o_sb;
  const int64_t lse_row = split * p.lse_ss + b * p.lse_sb;
  float* red = reinterpret_cast<float*>(smem_raw);  // [kWarps][16][kRedStride]
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = (lane >> 2) + 8 * i, h = ht * 16 + r;
    if (h >= G) continue;
    // State of all warps on this head: max M, sum L = sum_w l_w * 2^(m_w - M).
    float m_all = -INFINITY;
    for (int g = 0; g < ntg; ++g) m_all = fmaxf(m_all, s_max[g * mt + ht][r]);
    float l_all = 0.f;
    for (int g = 0; g < ntg; ++g) {
      const float m = s_max[g * mt + ht][r];
      if (m != -INFINITY) l_all += s_sum[g * mt + ht][r] * detail::ex2(m - m_all);
    }
    // An empty warp (max -inf) has o = 0 and weight 0; an empty head (L = 0) gets (0, -inf).
    const float w = (l_all > 0.f && row_ms[i] != -INFINITY)
                        ? detail::ex2(row_ms[i] - m_all) / l_all
                        : 0.f;
    float* dst = red + (warp * 16 + r) * kRedStride + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * i] * w, o[n][2 * i + 1] * w);
    if (tg == 0 && (lane & 3) == 0) {
      // lse = ln(sum exp(scale * s)) = (M + log2 L) * ln 2, M in log2 units.
      p.lse[lse_row + static_cast<int64_t>(kvh * G + h) * p.lse_sh] =
          l_all > 0.f ? (m_all + __log2f(l_all)) * 0.69314718055994531f : -INFINITY;
    }
  }
  __syncthreads();

  // Sum the token-group warps of each head and store 16-byte, coalesced rows.
  constexpr int kVec4 = D / 4;
  for (int idx = tid; idx < G * kVec4; idx += kThreads) {
    const int h = idx / kVec4, c4 = idx % kVec4;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int g = 0; g < ntg; ++g) {
      const float4 x = *reinterpret_cast<const float4*>(
          red + ((g * mt + (h >> 4)) * 16 + (h & 15)) * kRedStride + c4 * 4);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    *reinterpret_cast<float4*>(p.o + out_row + static_cast<int64_t>(kvh * G + h) * p.o_sh +
                               c4 * 4) = acc;
  }
}

template <typename T, int D>
void launch_decode_partial(const DecodeParams& p, cudaStream_t stream, int device) {
  constexpr int kSmem = smem_bytes<T, D>();
  {
    // The opt-in above 48 KB is per device and per kernel; set it once, not every launch
    // (host overhead budget per decode layer is ~10-30 us).
    static std::mutex mu;
    static std::vector<char> ready;
    std::lock_guard<std::mutex> lock(mu);
    if (device >= static_cast<int>(ready.size())) ready.resize(device + 1, 0);
    if (!ready[device]) {
      ESP_CUDA_CHECK(cudaFuncSetAttribute(decode_partial_kernel<T, D>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
      ready[device] = 1;
    }
  }
  const dim3 grid(p.num_kv_heads, p.num_splits, p.batch);
  decode_partial_kernel<T, D><<<grid, kThreads, kSmem, stream>>>(p);
  check_launch("decode_partial_kernel");
}

}  // namespace decode
}  // namespace esp
