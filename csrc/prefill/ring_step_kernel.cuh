// ring_step kernel: FlashAttention-2-style partial attention of this rank's queries against one KV
// block, merged into the running fp32 (o, lse) state in the epilogue (no separate merge pass).
//
// Work mapping. One CTA = one tile of kBlockM "rows" of one (request, KV head). A row is a
// (query token, query head of the KV head's group) pair, packed token-major: row p is token p / G,
// head kvh*G + p % G (G = Hq / Hkv). So the G heads that share a KV head read every K/V tile once
// (GQA packing, as FlashInfer does), and a causal tile spans only kBlockM / G tokens, which makes
// the diagonal (masked) region short.
//
// Per CTA: 4 warps, each owns 32 rows (two m16 tiles, so every K/V fragment loaded with ldmatrix
// feeds two MMAs); S = Q K^T and O = P V with mma.sync.m16n8k16, fp32 accumulators, P kept in
// registers as the A operand of P V. K/V tiles of BN keys stream through a two-stage cp.async
// ring (tile n-1 loads while tile n computes); each tile is consumed in steps of SN keys.
// Register budget at D = 128 (255 per thread, 2 CTAs per SM): O takes 128, so
//   - Q stays in shared memory and is re-read with ldmatrix each step (in registers it would take
//     64 more);
//   - SN = 32 (S: 32 registers). With SN = 64 ptxas spills, whatever else is trimmed;
//   - the O rescale of the online softmax is lazy (see attend_tile).
// Shared layout: 16-byte chunks XOR-swizzled by (row & 7), so the 8 rows of every ldmatrix phase
// and every cp.async phase hit distinct banks.
//
// Key tiles are visited from the last one down: the masked tiles (causal diagonal, partial tail of
// the block) come first, then a mask-free loop. Tiles no row can see are never loaded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../common/mma.cuh"
#include "../common/vec.cuh"

namespace esp {

struct RingStepParams {
  const void* q;       // row (t, h) at q + t*q_st + h*q_sh, D contiguous (likewise k, v, o)
  const void* k;
  const void* v;
  const int* cu_q;     // [B+1] on the device
  const int* cu_k;
  float* o;            // fp32 running output [Tq, Hq, D]
  float* lse;          // fp32 running natural-log LSE [Tq, Hq]: lse + t*lse_st + h*lse_sh
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh, lse_st, lse_sh;
  int B;
  int Hkv;
  int G;               // query heads per KV head
  int num_m_tiles;     // row tiles of the longest request: ceil(max_q_len * G / kBlockM)
  int mask_shift;
  bool causal;
  bool accumulate;
  float scale_log2;    // softmax_scale * log2(e): the softmax runs in the exp2 domain
};

// One translation unit per head dim (ring_step_d64.cu, ring_step_d128.cu) so the heavy
// instantiations compile in parallel; ring_step.cu only validates and calls these.
void ring_step_d64(const RingStepParams& p, DType dtype, cudaStream_t stream, int device);
void ring_step_d128(const RingStepParams& p, DType dtype, cudaStream_t stream, int device);

namespace ring_step_impl {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 32;                  // two m16 MMA tiles per warp
constexpr int kBlockM = kWarps * kWarpRows;    // 128 packed rows per CTA
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kRefSlack = 8.f;  // log2 units: p = exp2(...) stays <= 256 (see attend_tile)

// Every tile must start on a multiple of its row size (D*2 <= 256 bytes, see swizzled); dynamic
// shared memory only promises 16-byte alignment, so the kernel rounds its base up to 256 and asks
// for that much slack.
constexpr int kSmemAlign = 256;

template <int D, int BN>
constexpr int smem_bytes() {  // dynamic shared memory of one CTA
  return (kBlockM + 4 * BN) * D * 2 + kSmemAlign;  // Q + two stages of (K, V), 16-bit elements
}

// Shared tiles: rows of D 16-bit elements (D*2 bytes), 16-byte chunk c of row r stored at chunk
// c ^ (r & 7). The 8 rows of an ldmatrix phase and the 8 chunks of a cp.async phase then hit 8
// distinct 16-byte bank groups. Every tile starts on a multiple of 256 bytes.
//
// Address of chunk 2*kk + hi (hi in {0, 1}) of row r, for any kk: with a = the address for kk = 0,
// it is a ^ (32*kk), because 2*kk + hi = 2*kk ^ hi, the swizzle is a XOR of the chunk index, and
// the row starts on a multiple of D*2 > 32*kk, so the XOR only touches the chunk bits. So each lane
// keeps one address per operand and every k-step costs one LOP, instead of a register per
// (row, k-step) address.
template <int D>
__device__ __forceinline__ uint32_t swizzled(uint32_t tile, int r, int c) {
  return tile + static_cast<uint32_t>(r * D * 2 + ((c ^ (r & 7)) << 4));
}

// 16-byte async copy; `full == false` writes 16 zero bytes and reads nothing (src must still be a
// valid address, callers pass the start of the request's rows).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// The value of x, hidden from the optimizer (an empty volatile asm "produces" it), so that
// expressions using it are evaluated where written instead of being hoisted out of a loop.
__device__ __forceinline__ int64_t opaque(int64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}
template <typename T>
__device__ __forceinline__ const T* opaque(const T* x) {
  asm volatile("" : "+l"(x));
  return x;
}

// Number of keys (a prefix of the request's block) that query token `tok` may see:
// key b is visible iff b < len_k and (not causal or b <= tok + shift). 64-bit so any shift works.
__device__ __forceinline__ int visible_end(int tok, int shift, int len_k) {
  const long long e = static_cast<long long>(tok) + shift + 1;
  return static_cast<int>(e < 0 ? 0 : (e > len_k ? len_k : e));
}

// What a CTA works on. Block order: KV head fastest, then request, then row tile from the last
// (heaviest under a causal mask) to the first, so the longest CTAs start in the first wave.
struct Tile {
  int kvh, row0;
  int q_start, rows;  // first query token of the request; packed rows = its tokens * G
  int k_start, len_k;
};
__device__ __forceinline__ Tile locate_tile(const RingStepParams& p, int block) {
  Tile t;
  t.kvh = block % p.Hkv;
  const int rest = block / p.Hkv;
  const int b = rest % p.B;
  t.row0 = (p.num_m_tiles - 1 - rest / p.B) * kBlockM;
  t.q_start = p.cu_q[b];
  t.rows = (p.cu_q[b + 1] - t.q_start) * p.G;
  t.k_start = p.cu_k[b];
  t.len_k = p.cu_k[b + 1] - t.k_start;
  return t;
}

// One step of SN keys for one warp: S = Q K^T (32 x SN), mask, online softmax, O += P V.
// q_addr: this lane's ldmatrix address in the warp's Q rows, k_addr / v_addr: in the stage's K / V
// tile, each for k-step 0 (see swizzled). The lane roles of each ldmatrix.x4 are chosen so that its
// 4 destination registers are already in MMA operand order: HMMA reads an A fragment from 4
// consecutive registers and a B fragment from 2, and any other order costs MOVs and registers.
// key0: local index of the step's first key; lim[i][h]: keys visible to this thread's row (i, h)
// (read only when kMasked).
template <typename T, int D, int SN, bool kMasked>
__device__ __forceinline__ void attend_tile(uint32_t q_addr, uint32_t k_addr, uint32_t v_addr,
                                            int lane, int key0, const int (&lim)[2][2],
                                            float scale_log2, float (&acc_o)[2][D / 8][4],
                                            float (&m_ref)[2][2], float (&row_sum)[2][2]) {
  constexpr int kRowBytes = D * 2;
  float s[2][SN / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < SN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][j][e] = 0.f;

#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t qa[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)  // (rows 0-7, k lo), (8-15, k lo), (0-7, k hi), (8-15, k hi)
      ldmatrix_x4(qa[i], (q_addr ^ (kk * 32)) + i * 16 * kRowBytes);
#pragma unroll
    for (int jj = 0; jj < SN / 16; ++jj) {
      uint32_t kb[4];  // (keys 0-7, k lo), (keys 0-7, k hi), (keys 8-15, k lo), (keys 8-15, k hi)
      ldmatrix_x4(kb, (k_addr ^ (kk * 32)) + jj * 16 * kRowBytes);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mma_16816<T>(s[i][2 * jj], qa[i], kb[0], kb[1]);
        mma_16816<T>(s[i][2 * jj + 1], qa[i], kb[2], kb[3]);
      }
    }
  }

  // Accumulator layout: s[i][j][e] is row i*16 + (lane >> 2) + 8*(e >> 1),
  // key key0 + j*8 + 2*(lane & 3) + (e & 1).
  if constexpr (kMasked) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < SN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + j * 8 + 2 * (lane & 3) + (e & 1) >= lim[i][e >> 1]) s[i][j][e] = -INFINITY;
  }

  // Online softmax in the exp2 domain against a lazily moved reference max m_ref (scaled units,
  // per row): p = 2^(s*scale_log2 - m_ref). The reference only moves when a step's max exceeds it
  // by more than kRefSlack, so p <= 2^kRefSlack, harmless in fp32 sums and in 16-bit P (the final
  // o = acc / l is exact whatever the reference). The O/l rescale is then a rare warp-uniform
  // branch (on random data only a row's first visible step) instead of D FMULs per thread every
  // step; kept out of the MMA stream, it also stops ptxas from interleaving those FMULs with the
  // HMMAs, one of the things that pushed the D = 128 kernel into spills.
  float t[2][2];
  bool grow = false;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < SN / 8; ++j) mx = fmaxf(mx, fmaxf(s[i][j][2 * h], s[i][j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      t[i][h] = mx * scale_log2;  // -inf when the row sees nothing in this step
      // -inf + slack = -inf: a row's first visible key always moves its reference.
      grow |= t[i][h] > m_ref[i][h] + kRefSlack;
    }
  if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!(t[i][h] > m_ref[i][h] + kRefSlack)) continue;
        const float alpha = ex2(m_ref[i][h] - t[i][h]);  // 0 when m_ref was -inf
        m_ref[i][h] = t[i][h];
        row_sum[i][h] *= alpha;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          acc_o[i][d][2 * h] *= alpha;
          acc_o[i][d][2 * h + 1] *= alpha;
        }
      }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // m_ref is -inf only if the row has seen no key yet, and then all its s are -inf too:
      // subtracting 0 gives p = 0 instead of NaN.
      const float m_use = m_ref[i][h] == -INFINITY ? 0.f : m_ref[i][h];
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < SN / 8; ++j)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s[i][j][e] = ex2(fmaf(s[i][j][e], scale_log2, -m_use));
          sum += s[i][j][e];
        }
      // Per-lane partial sum (the row's 4 lanes share m_ref); reduced in the epilogue.
      row_sum[i][h] += sum;
    }

  // P (in registers, rounded to T) is directly the A operand of P V: the C layout of n-tiles
  // 2kk, 2kk+1 is the A layout of k-step kk.
#pragma unroll
  for (int kk = 0; kk < SN / 16; ++kk) {
    uint32_t pa[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      pa[i][0] = pack2<T>(s[i][2 * kk][0], s[i][2 * kk][1]);
      pa[i][1] = pack2<T>(s[i][2 * kk][2], s[i][2 * kk][3]);
      pa[i][2] = pack2<T>(s[i][2 * kk + 1][0], s[i][2 * kk + 1][1]);
      pa[i][3] = pack2<T>(s[i][2 * kk + 1][2], s[i][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t vb[4];  // transposed: (keys 0-7, d lo), (8-15, d lo), (0-7, d hi), (8-15, d hi)
      ldmatrix_x4_trans(vb, (v_addr ^ (dd * 32)) + kk * 16 * kRowBytes);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mma_16816<T>(acc_o[i][2 * dd], pa[i], vb[0], vb[1]);
        mma_16816<T>(acc_o[i][2 * dd + 1], pa[i], vb[2], vb[3]);
      }
    }
  }
}

// 2 CTAs per SM: 8 warps to hide MMA/ldmatrix latency; also what the register file allows at
// up to 255 registers per thread.
template <typename T, int D, int BN, int SN>
__global__ void __launch_bounds__(kThreads, 2) ring_step_kernel(const RingStepParams p) {
  constexpr int kRowBytes = D * 2;
  constexpr uint32_t kTileBytes = BN * kRowBytes;
  constexpr int kChunkGroups = D / 64;  // a thread copies chunks c8 + 8u, u < kChunkGroups
  static_assert(D % 64 == 0 && SN % 16 == 0 && BN % SN == 0, "tile shape");

  const Tile tile = locate_tile(p, blockIdx.x);
  const int row0 = tile.row0, rows = tile.rows, len_k = tile.len_k, kvh = tile.kvh;
  if (row0 >= rows) return;
  const int G = p.G;

  // Keys [0, n_end) are seen by some row of the tile, keys [0, full_end) by every row.
  const int first_tok = row0 / G;
  const int last_tok = (min(rows, row0 + kBlockM) - 1) / G;
  const int n_end = p.causal ? visible_end(last_tok, p.mask_shift, len_k) : len_k;
  const int full_end = p.causal ? visible_end(first_tok, p.mask_shift, len_k) : len_k;
  const int n_blocks = (n_end + BN - 1) / BN;
  const int n_full = full_end / BN;  // tiles [0, n_full) need no mask
  if (n_blocks == 0 && p.accumulate) return;  // no row sees a key: every state stays as it is

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;

  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t sq = (smem_u32(smem) + (kSmemAlign - 1)) & ~static_cast<uint32_t>(kSmemAlign - 1);
  const uint32_t skv = sq + kBlockM * kRowBytes;  // stage s: K at skv + 2s*kTileBytes, V after

  float acc_o[2][D / 8][4];
  float m_ref[2][2], row_sum[2][2];  // reference max (scaled, see attend_tile), partial sum
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int d = 0; d < D / 8; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[i][d][e] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_ref[i][h] = -INFINITY;
      row_sum[i][h] = 0.f;
    }
  }

  if (n_blocks > 0) {
    // Copies: a thread moves 16-byte chunks c8 + 8u of rows r16 + 16i (Q) or r8 + 8i (K, V), so
    // (row & 7) is the same for all its rows and every destination is one register plus an
    // immediate.
    const int c8 = tid & 7;
    const T* q_req = static_cast<const T*>(p.q) + tile.q_start * p.q_st + kvh * G * p.q_sh;
    {
      const int r16 = tid >> 3;
      const uint32_t dst = swizzled<D>(sq, r16, c8);
#pragma unroll
      for (int i = 0; i < kBlockM / 16; ++i) {
        const int prow = row0 + r16 + 16 * i;
        const bool ok = prow < rows;
        const T* src = ok ? q_req + static_cast<int64_t>(prow / G) * p.q_st +
                                static_cast<int64_t>(prow % G) * p.q_sh + c8 * 8
                          : q_req;
#pragma unroll
        for (int u = 0; u < kChunkGroups; ++u)
          cp_async_16(dst + i * 16 * kRowBytes + u * 128, src + (ok ? u * 64 : 0), ok);
      }
    }
    // K/V: threads 0-63 copy K, 64-127 copy V (one global pointer per thread, not two).
    // Only the first tile loaded (n_blocks - 1, the highest) can run past the block's end; its
    // missing rows are zero-filled, since V garbage (even NaN) times p = 0 would be NaN. Every
    // later tile is full, so the in-loop copies carry no bounds checks.
    const bool copies_v = tid >= 64;  // warp-uniform
    const int r8 = (tid & 63) >> 3;
    const T* kv_req = copies_v
        ? static_cast<const T*>(p.v) + tile.k_start * p.v_st + kvh * p.v_sh
        : static_cast<const T*>(p.k) + tile.k_start * p.k_st + kvh * p.k_sh;
    // One opaque 64-bit pointer: left alone, the compiler keeps its parts (request base, row
    // offset) in separate 64-bit registers through the key loop.
    const T* kv_thr = opaque(kv_req + r8 * (copies_v ? p.v_st : p.k_st) + c8 * 8);
    const uint32_t kv_dst = swizzled<D>(skv + (copies_v ? kTileBytes : 0), r8, c8);
    auto load_kv = [&](int n, int stage, auto bounded) {
      const uint32_t dst = kv_dst + 2 * stage * kTileBytes;
      // The row offsets are recomputed on every call: `opaque` stops the compiler from hoisting
      // them out of the key loop, where they would pin BN/8 64-bit registers and spill.
      auto copy = [&](int64_t st) {
        st = opaque(st);
        const T* src0 = kv_thr + static_cast<int64_t>(n) * BN * st;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
          const T* src = src0 + 8 * i * st;
          bool ok = true;
          if constexpr (decltype(bounded)::value) ok = n * BN + r8 + 8 * i < len_k;
#pragma unroll
          for (int u = 0; u < kChunkGroups; ++u)
            cp_async_16(dst + i * 8 * kRowBytes + u * 128, ok ? src + u * 64 : kv_req, ok);
        }
      };
      if (copies_v)
        copy(p.v_st);
      else
        copy(p.k_st);
    };
    // Tile n lives in stage n & 1.
    load_kv(n_blocks - 1, (n_blocks - 1) & 1, std::true_type{});
    cp_async_commit();

    // ldmatrix lane roles: lanes 8m..8m+7 address the rows of matrix m.
    //   Q (A, rows x k):   rows (lane & 15),                      chunk lane >> 4
    //   K (B, keys x k):   rows 8*(lane >> 4) + (lane & 7),       chunk (lane >> 3) & 1
    //   V (B^T, keys x d): rows 8*((lane >> 3) & 1) + (lane & 7), chunk lane >> 4
    const uint32_t q_addr = swizzled<D>(sq, warp * kWarpRows + (lane & 15), lane >> 4);
    const uint32_t k_off = swizzled<D>(0, ((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
    const uint32_t v_off =
        swizzled<D>(kTileBytes, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4);

    auto step = [&](int n, auto masked) {
      // After this barrier tile n is visible to all threads and every warp has finished tile
      // n+1, so its stage may be refilled with tile n-1 while tile n computes.
      cp_async_wait_all();
      __syncthreads();
      if (n > 0) load_kv(n - 1, (n - 1) & 1, std::false_type{});
      cp_async_commit();
      const uint32_t stage = skv + 2 * (n & 1) * kTileBytes;
      int lim[2][2] = {};
      if constexpr (decltype(masked)::value) {
        // Visible-key limits of this thread's 4 rows, only computed on the masked tiles.
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int tok = (row0 + warp * kWarpRows + i * 16 + h * 8 + (lane >> 2)) / G;
            lim[i][h] = p.causal ? visible_end(tok, p.mask_shift, len_k) : len_k;
          }
      }
#pragma unroll
      for (int j = 0; j < BN / SN; ++j)
        attend_tile<T, D, SN, decltype(masked)::value>(
            q_addr, stage + k_off + j * SN * kRowBytes, stage + v_off + j * SN * kRowBytes, lane,
            n * BN + j * SN, lim, p.scale_log2, acc_o, m_ref, row_sum);
    };
    // Two loops so the mask-free one carries none of the mask's state.
    int n = n_blocks - 1;
    for (; n >= n_full; --n) step(n, std::true_type{});
    for (; n >= 0; --n) step(n, std::false_type{});
  }

  // Epilogue: block state (o_blk = acc / l, lse_blk) merged with the stored state, per row.
  // Row (i, h) of this thread: packed row row0 + warp*32 + i*16 + h*8 + lane/4; its 4 lanes hold
  // columns d*8 + 2*(lane & 3) + {0, 1}. The tile coordinates are recomputed here (opaque block
  // index, so the compiler cannot reuse the first copy) to keep them out of the key loop's
  // registers.
  const Tile et = locate_tile(p, opaque(static_cast<int>(blockIdx.x)));
  float* o_row[2][2];
  float* lse_ptr[2][2];
  float lse_prev[2][2];
  bool valid[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = row_sum[i][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      row_sum[i][h] = l;
      const int prow = et.row0 + warp * kWarpRows + i * 16 + h * 8 + (lane >> 2);
      valid[i][h] = prow < et.rows;
      const int64_t t = et.q_start + prow / G;
      const int64_t hq = static_cast<int64_t>(et.kvh) * G + prow % G;
      o_row[i][h] = p.o + t * p.o_st + hq * p.o_sh + 2 * (lane & 3);
      lse_ptr[i][h] = p.lse + t * p.lse_st + hq * p.lse_sh;
      lse_prev[i][h] =
          (p.accumulate && valid[i][h] && l > 0.f) ? *lse_ptr[i][h] : -INFINITY;
    }
  // All 4 lanes of a row read its lse before lane 0 of the quad overwrites it.
  __syncwarp();

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!valid[i][h]) continue;
      const float l = row_sum[i][h];
      float* orow = o_row[i][h];
      if (l == 0.f) {
        // No visible key in this block: keep the state (accumulate) or write the empty state.
        if (p.accumulate) continue;
#pragma unroll
        for (int d = 0; d < D / 8; ++d)
          *reinterpret_cast<float2*>(orow + d * 8) = make_float2(0.f, 0.f);
        if ((lane & 3) == 0) *lse_ptr[i][h] = -INFINITY;
        continue;
      }
      // l > 0 implies a finite reference.
      const float lse_blk = (m_ref[i][h] + log2f(l)) * kLn2;
      const float lp = lse_prev[i][h];
      float lse_new = lse_blk, w_blk = 1.f / l, w_prev = 0.f;
      const bool has_prev = lp != -INFINITY;  // -inf = empty so far: o_prev is never read
      if (has_prev) {
        const float mx = fmaxf(lp, lse_blk);
        const float e_prev = expf(lp - mx), e_blk = expf(lse_blk - mx);
        const float sum = e_prev + e_blk;  // >= 1: one of the two exponents is 0
        lse_new = mx + logf(sum);
        w_prev = e_prev / sum;
        w_blk = e_blk / (sum * l);
      }
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        float2 out = make_float2(acc_o[i][d][2 * h] * w_blk, acc_o[i][d][2 * h + 1] * w_blk);
        if (has_prev) {
          const float2 old = *reinterpret_cast<const float2*>(orow + d * 8);
          out.x = fmaf(old.x, w_prev, out.x);
          out.y = fmaf(old.y, w_prev, out.y);
        }
        *reinterpret_cast<float2*>(orow + d * 8) = out;
      }
      if ((lane & 3) == 0) *lse_ptr[i][h] = lse_new;
    }
}

template <typename T, int D, int BN, int SN>
void launch_ring_step(const RingStepParams& p, cudaStream_t stream, int device) {
  constexpr int smem = smem_bytes<D, BN>();
  auto kernel = ring_step_kernel<T, D, BN, SN>;
  // Two CTAs per SM need 2 x smem of the unified L1/shared array: the full carveout.
  set_smem_attributes_once(reinterpret_cast<const void*>(kernel), smem, device);
  const int blocks = p.num_m_tiles * p.B * p.Hkv;  // host checked it fits in int
  kernel<<<blocks, kThreads, smem, stream>>>(p);
  check_launch("ring_step_kernel");
}

}  // namespace ring_step_impl
}  // namespace esp
