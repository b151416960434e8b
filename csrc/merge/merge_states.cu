// merge_states: exact merge of S partial attention states (o_s, lse_s) per (token, head) row.
//
//   lse = log(sum_s exp(lse_s)),  o = sum_s exp(lse_s - lse) * o_s
//
// A state with lse = -inf is the empty set: it is skipped (never multiplied), so garbage or NaN
// in its o cannot leak into the result, and a row whose states are all empty gives (0, -inf).
// A NaN lse (or NaN in a non-empty state's o) makes the row NaN: the max over lse values is
// NaN-propagating (fmax_nan), otherwise a NaN next to empty states would read as empty.
// Memory-bound: each thread moves VEC consecutive elements of one row (16-byte accesses for
// half types) and recomputes the row's weights from the S lse values (L1-resident, cheap).
#include "merge_states.h"

#include <cmath>

#include "../common/vec.cuh"

namespace esp {
namespace {

constexpr int kMaxStates = 64;  // weights live in registers; more states are rejected on host

struct MergeParams {
  // State s of row (t, h), element d at o + s*o_ss + r*o_st + h*o_sh + d, with r = t, or
  // r = rows[s*T + t] when gathering (then o_ss = l_ss = 0: o/lse are pools of state rows).
  const void* o;
  int64_t o_ss, o_st, o_sh;
  const float* lse;     // lse + s*l_ss + r*l_st + h*l_sh
  int64_t l_ss, l_st, l_sh;
  const int* rows;      // null: no gather
  void* out;            // out + t*out_st + h*out_sh + d
  int64_t out_st, out_sh;
  float* lse_out;       // may be null
  int64_t lo_st, lo_sh;
  int S, T, H, D;
  int lanes_per_row;
};

// A row's chunks are handled by G consecutive lanes of one warp (G = power of two covering the
// row's D/VEC chunks, at most 32). All lanes read the row's lse values before a __syncwarp and the
// row's lse is written after it, so the in-place form (lse_out aliasing lse of state 0) is safe.
// PAIR: the two-state form (running-state merges, finalize). Both states' o chunks and lse values
// are loaded up front, before any arithmetic, so a lane waits for one DRAM round trip instead of
// two (lse, then o behind a branch): bf16 pairs ran at 51% of copy bandwidth that way on H100.
// GATHER: the states of a row come from pool rows p.rows[s*T + t] (a template flag: a runtime
// branch on p.rows in the state loops cost the 8-state merge 11% of its bandwidth on H100).
template <typename TIn, typename TOut, int VEC, bool PAIR, bool GATHER>
__global__ void merge_states_kernel(MergeParams p) {
  const int G = p.lanes_per_row;
  const int lane = threadIdx.x & 31;
  const int sub = lane / G, sl = lane % G;
  const int rows_per_warp = 32 / G;
  const int chunks_per_row = p.D / VEC;
  const int64_t nrows = static_cast<int64_t>(p.T) * p.H;
  const int64_t warp_id = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // `base` is warp-uniform, so every lane reaches the same __syncwarp.
  for (int64_t base = warp_id * rows_per_warp; base < nrows; base += num_warps * rows_per_warp) {
    const int64_t row = base + sub;
    const bool valid = row < nrows;
    const int h = valid ? static_cast<int>(row % p.H) : 0;
    const int64_t t = valid ? row / p.H : 0;
    float lse = -INFINITY;
    if (PAIR && valid) {
      const float* lrow = p.lse + t * p.l_st + h * p.l_sh;
      const TIn* obase = static_cast<const TIn*>(p.o) + t * p.o_st + h * p.o_sh;
      TOut* orow = static_cast<TOut*>(p.out) + t * p.out_st + h * p.out_sh;
      for (int c = sl; c < chunks_per_row; c += G) {
        float v0[VEC], v1[VEC];
        load_as_float<TIn, VEC>(obase + c * VEC, v0);
        load_as_float<TIn, VEC>(obase + p.o_ss + c * VEC, v1);
        const float l0 = lrow[0], l1 = lrow[p.l_ss];
        const float m = fmax_nan(l0, l1);
        const float m_safe = m == -INFINITY ? 0.f : m;
        const float e0 = __expf(l0 - m_safe), e1 = __expf(l1 - m_safe);  // exp(-inf) = 0
        const float sum = e0 + e1;
        lse = m == -INFINITY ? -INFINITY : m + __logf(sum);
        const float inv = m == -INFINITY ? 0.f : 1.f / sum;
        const float w0 = e0 * inv, w1 = e1 * inv;
        float acc[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i)  // selects, not products: an empty state's o never leaks
          acc[i] = (l0 == -INFINITY ? 0.f : w0 * v0[i]) + (l1 == -INFINITY ? 0.f : w1 * v1[i]);
        store_from_float<TOut, VEC>(orow + c * VEC, acc);
      }
    } else if (valid) {
      const float* lrow = p.lse + (GATHER ? 0 : t * p.l_st) + h * p.l_sh;
      const TIn* obase = static_cast<const TIn*>(p.o) + (GATHER ? 0 : t * p.o_st) + h * p.o_sh;
      // State s's lse and o row (pool row rows[s, t] when gathering).
      auto pool_row = [&](int s) -> int64_t {
        return __ldg(p.rows + static_cast<int64_t>(s) * p.T + t);
      };
      auto lse_of = [&](int s) -> float {
        if constexpr (GATHER) return lrow[pool_row(s) * p.l_st];
        else return lrow[s * p.l_ss];
      };
      auto o_of = [&](int s) -> const TIn* {
        if constexpr (GATHER) return obase + pool_row(s) * p.o_st;
        else return obase + s * p.o_ss;
      };
      float m = -INFINITY;
      for (int s = 0; s < p.S; ++s) m = fmax_nan(m, lse_of(s));
      if (m != -INFINITY) {
        float sum = 0.f;
        for (int s = 0; s < p.S; ++s) sum += __expf(lse_of(s) - m);
        lse = m + __logf(sum);
      }
      TOut* orow = static_cast<TOut*>(p.out) + t * p.out_st + h * p.out_sh;
      for (int c = sl; c < chunks_per_row; c += G) {
        float acc[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
        if (lse != -INFINITY) {
          for (int s = 0; s < p.S; ++s) {
            const float ls = lse_of(s);
            if (ls == -INFINITY) continue;  // empty state: skipped, never multiplied by 0
            const float w = __expf(ls - lse);
            float v[VEC];
            load_as_float<TIn, VEC>(o_of(s) + c * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] = fmaf(w, v[i], acc[i]);
          }
        }
        store_from_float<TOut, VEC>(orow + c * VEC, acc);
      }
    }
    __syncwarp();
    if (valid && sl == 0 && p.lse_out != nullptr) p.lse_out[t * p.lo_st + h * p.lo_sh] = lse;
  }
}

template <typename TIn, typename TOut, int VEC>
void launch(const MergeParams& p, cudaStream_t stream, int device) {
  const bool pair = p.S == 2 && p.rows == nullptr, gather = p.rows != nullptr;
  MergeParams q = p;
  const int chunks = p.D / VEC;
  q.lanes_per_row = 1;
  while (q.lanes_per_row < chunks && q.lanes_per_row < 32) q.lanes_per_row *= 2;
  const int64_t rows = static_cast<int64_t>(p.T) * p.H;
  if (rows == 0) return;
  const int threads = 256;
  const int64_t rows_per_block = threads / q.lanes_per_row;
  const int64_t want = (rows + rows_per_block - 1) / rows_per_block;
  // Enough blocks to fill every SM many times over; the grid-stride loop covers the rest.
  const int64_t cap = static_cast<int64_t>(num_sms(device)) * 32;
  const int blocks = static_cast<int>(want < cap ? want : cap);
  if (gather) {
    merge_states_kernel<TIn, TOut, VEC, false, true><<<blocks, threads, 0, stream>>>(q);
  } else if (pair) {
    merge_states_kernel<TIn, TOut, VEC, true, false><<<blocks, threads, 0, stream>>>(q);
  } else {
    merge_states_kernel<TIn, TOut, VEC, false, false><<<blocks, threads, 0, stream>>>(q);
  }
  check_launch("merge_states_kernel");
}

bool vec_ok(const MergeParams& p, size_t in_size, size_t out_size, int vec) {
  if (p.D % vec != 0) return false;
  const size_t in_bytes = in_size * vec, out_bytes = out_size * vec;
  auto stride_ok = [&](int64_t s) { return s % vec == 0; };
  return aligned_to(reinterpret_cast<uintptr_t>(p.o), in_bytes) && stride_ok(p.o_ss) &&
         stride_ok(p.o_st) && stride_ok(p.o_sh) &&
         aligned_to(reinterpret_cast<uintptr_t>(p.out), out_bytes) && stride_ok(p.out_st) &&
         stride_ok(p.out_sh);
}

}  // namespace

namespace {

void check_out(const TensorDesc& out, const TensorDesc* lse_out, int T, int H, int D,
               MergeParams& p) {
  ESP_CHECK(out.ndim() == 3 && out.size(0) == T && out.size(1) == H && out.size(2) == D,
            "merge_states: out must be [T, H, D] = [", T, ", ", H, ", ", D, "]");
  ESP_CHECK(out.stride(-1) == 1, "merge_states: the head dimension of out must be contiguous");
  p.out = reinterpret_cast<void*>(out.ptr);
  p.out_st = out.stride(0); p.out_sh = out.stride(1);
  if (lse_out != nullptr) {
    ESP_CHECK(lse_out->dtype == DType::kFloat32 && lse_out->ndim() == 2 &&
                  lse_out->size(0) == T && lse_out->size(1) == H,
              "merge_states: lse_out must be float32 [T, H]");
    p.lse_out = lse_out->data<float>();
    p.lo_st = lse_out->stride(0); p.lo_sh = lse_out->stride(1);
  }
}

void run(const MergeParams& p, DType in, DType out, int device, uintptr_t stream) {
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  ESP_DISPATCH_FLOAT(in, TIn, [&] {
    ESP_DISPATCH_FLOAT(out, TOut, [&] {
      if (vec_ok(p, sizeof(TIn), sizeof(TOut), 8)) {
        launch<TIn, TOut, 8>(p, s, device);
      } else {
        launch<TIn, TOut, 1>(p, s, device);
      }
    });
  });
}

}  // namespace

void merge_states(const TensorDesc& o, const TensorDesc& lse, const TensorDesc& out,
                  const TensorDesc* lse_out, int device, uintptr_t stream) {
  ESP_CHECK(o.ndim() == 4, "merge_states: o must be [S, T, H, D], got ", o.ndim(), " dims");
  ESP_CHECK(lse.ndim() == 3, "merge_states: lse must be [S, T, H]");
  ESP_CHECK(lse.dtype == DType::kFloat32, "merge_states: lse must be float32");
  ESP_CHECK(o.stride(-1) == 1, "merge_states: the head dimension must be contiguous");
  const int S = static_cast<int>(o.size(0)), T = static_cast<int>(o.size(1)),
            H = static_cast<int>(o.size(2)), D = static_cast<int>(o.size(3));
  ESP_CHECK(S >= 1 && S <= kMaxStates, "merge_states: number of states must be in [1, ",
            kMaxStates, "], got ", S);
  ESP_CHECK(lse.size(0) == S && lse.size(1) == T && lse.size(2) == H,
            "merge_states: lse shape does not match o");
  MergeParams p{};
  p.o = reinterpret_cast<const void*>(o.ptr);
  p.o_ss = o.stride(0); p.o_st = o.stride(1); p.o_sh = o.stride(2);
  p.lse = lse.data<const float>();
  p.l_ss = lse.stride(0); p.l_st = lse.stride(1); p.l_sh = lse.stride(2);
  check_out(out, lse_out, T, H, D, p);
  p.S = S; p.T = T; p.H = H; p.D = D;
  run(p, o.dtype, out.dtype, device, stream);
}

void merge_states_gather(const TensorDesc& o, const TensorDesc& lse, const TensorDesc& rows,
                         const TensorDesc& out, const TensorDesc* lse_out, int device,
                         uintptr_t stream) {
  ESP_CHECK(o.ndim() == 3, "merge_states_gather: o must be [R, H, D], got ", o.ndim(), " dims");
  ESP_CHECK(lse.ndim() == 2 && lse.dtype == DType::kFloat32,
            "merge_states_gather: lse must be float32 [R, H]");
  ESP_CHECK(o.stride(-1) == 1, "merge_states_gather: the head dimension must be contiguous");
  const int64_t R = o.size(0);
  const int H = static_cast<int>(o.size(1)), D = static_cast<int>(o.size(2));
  ESP_CHECK(lse.size(0) == R && lse.size(1) == H,
            "merge_states_gather: lse shape does not match o");
  ESP_CHECK(rows.ndim() == 2 && rows.dtype == DType::kInt32 &&
                (rows.numel() == 0 || ((rows.size(1) <= 1 || rows.stride(1) == 1) &&
                                       (rows.size(0) <= 1 || rows.stride(0) == rows.size(1)))),
            "merge_states_gather: rows must be contiguous int32 [S, T]");
  const int S = static_cast<int>(rows.size(0)), T = static_cast<int>(rows.size(1));
  ESP_CHECK(S >= 1 && S <= kMaxStates, "merge_states_gather: number of states must be in [1, ",
            kMaxStates, "], got ", S);
  MergeParams p{};
  p.o = reinterpret_cast<const void*>(o.ptr);
  p.o_st = o.stride(0); p.o_sh = o.stride(1);
  p.lse = lse.data<const float>();
  p.l_st = lse.stride(0); p.l_sh = lse.stride(1);
  p.rows = rows.data<const int>();
  check_out(out, lse_out, T, H, D, p);
  p.S = S; p.T = T; p.H = H; p.D = D;
  run(p, o.dtype, out.dtype, device, stream);
}

}  // namespace esp
