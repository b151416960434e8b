// copy_rows: dst[o, dst_idx[i], :] = src[o, src_idx[i], :] — the one data mover behind
// proactive retention (ring KV block -> paged cache), and migration pack (paged cache -> contiguous
// chunk, all layers) / unpack (chunk -> freshly allocated pages).
//
// Pure bandwidth: a row (one token's K or V of all local heads, Hkv*D elements, 2 KB for 8x128
// bf16) is moved by a group of lanes with 16-byte accesses; each lane issues UNROLL loads before
// its stores so the memory system sees enough parallelism.
#include "copy_rows.h"

#include "../common/vec.cuh"

namespace esp {
namespace {

struct CopyParams {
  const char* src;
  char* dst;
  const int32_t* src_idx;  // null: identity
  const int32_t* dst_idx;  // null: identity
  int64_t n_rows;          // rows per outer slice
  int64_t n_outer;
  int64_t src_os, src_rs;  // strides in bytes
  int64_t dst_os, dst_rs;
  int64_t row_vecs;        // row length in units of VEC_BYTES
  int lanes_per_row;       // power of two <= 32
};

// G = lanes_per_row consecutive lanes copy one row, so the row's indices and addresses are
// computed once per row, not per 16-byte vector (a 64-bit divide per vector would cost as much
// issue bandwidth as the copy itself at ~3 TB/s).
template <int VEC_BYTES, int UNROLL>
__global__ void copy_rows_kernel(CopyParams p) {
  using V = Pack<uint8_t, VEC_BYTES>;
  const int G = p.lanes_per_row;
  const int lane = threadIdx.x & 31;
  const int sub = lane / G, sl = lane % G;
  const int rows_per_warp = 32 / G;
  const int64_t warp_id = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t total_rows = p.n_outer * p.n_rows;
  for (int64_t r = warp_id * rows_per_warp + sub; r < total_rows; r += num_warps * rows_per_warp) {
    const int64_t i = r % p.n_rows;
    const int64_t o = r / p.n_rows;
    const int64_t s = p.src_idx ? p.src_idx[i] : i;
    const int64_t d = p.dst_idx ? p.dst_idx[i] : i;
    if (s < 0 || d < 0) continue;  // negative index: this row is not copied
    const V* sp = reinterpret_cast<const V*>(p.src + o * p.src_os + s * p.src_rs);
    V* dp = reinterpret_cast<V*>(p.dst + o * p.dst_os + d * p.dst_rs);
    for (int64_t v0 = sl; v0 < p.row_vecs; v0 += static_cast<int64_t>(G) * UNROLL) {
      V vals[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)  // all loads first: UNROLL 16-byte loads in flight
        if (v0 + u * G < p.row_vecs) vals[u] = sp[v0 + u * G];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (v0 + u * G < p.row_vecs) dp[v0 + u * G] = vals[u];
    }
  }
}

template <int VEC_BYTES>
void launch(CopyParams p, int device, cudaStream_t stream) {
  constexpr int kUnroll = 4;
  const int64_t total_rows = p.n_outer * p.n_rows;
  if (total_rows == 0 || p.row_vecs == 0) return;
  p.lanes_per_row = 1;
  while (p.lanes_per_row < p.row_vecs && p.lanes_per_row < 32) p.lanes_per_row *= 2;
  const int threads = 256;
  const int64_t rows_per_block = threads / p.lanes_per_row;
  const int64_t want = (total_rows + rows_per_block - 1) / rows_per_block;
  const int64_t cap = static_cast<int64_t>(num_sms(device)) * 16;
  const int blocks = static_cast<int>(want < cap ? want : cap);
  copy_rows_kernel<VEC_BYTES, kUnroll><<<blocks, threads, 0, stream>>>(p);
  check_launch("copy_rows_kernel");
}

void check_index(const TensorDesc* idx, const char* name) {
  if (idx == nullptr) return;
  ESP_CHECK(idx->dtype == DType::kInt32 && idx->ndim() == 1,
            "copy_rows: ", name, " must be int32 [n]");
  ESP_CHECK(idx->stride(0) == 1 || idx->size(0) <= 1, "copy_rows: ", name, " must be contiguous");
}

}  // namespace

void copy_rows(const TensorDesc& src, const TensorDesc* src_idx, const TensorDesc& dst,
               const TensorDesc* dst_idx, int device, uintptr_t stream) {
  ESP_CHECK(src.ndim() == 3 && dst.ndim() == 3,
            "copy_rows: src and dst must be [n_outer, rows, row_len]");
  ESP_CHECK(src.dtype == dst.dtype, "copy_rows: src is ", dtype_name(src.dtype), " but dst is ",
            dtype_name(dst.dtype));
  ESP_CHECK(src.size(0) == dst.size(0), "copy_rows: src has ", src.size(0),
            " outer slices but dst has ", dst.size(0));
  ESP_CHECK(src.size(2) == dst.size(2), "copy_rows: row lengths differ (src ", src.size(2),
            ", dst ", dst.size(2), ")");
  ESP_CHECK(src.stride(2) == 1 && dst.stride(2) == 1, "copy_rows: rows must be contiguous");
  check_index(src_idx, "src_idx");
  check_index(dst_idx, "dst_idx");
  int64_t n = src_idx ? src_idx->size(0) : (dst_idx ? dst_idx->size(0) : src.size(1));
  ESP_CHECK(!(src_idx && dst_idx) || src_idx->size(0) == dst_idx->size(0),
            "copy_rows: src_idx and dst_idx lengths differ");
  ESP_CHECK(src_idx || n <= src.size(1), "copy_rows: ", n, " rows requested but src has ",
            src.size(1));
  ESP_CHECK(dst_idx || n <= dst.size(1), "copy_rows: ", n, " rows requested but dst has ",
            dst.size(1));

  const int64_t es = static_cast<int64_t>(dtype_size(src.dtype));
  CopyParams p{};
  p.src = reinterpret_cast<const char*>(src.ptr);
  p.dst = reinterpret_cast<char*>(dst.ptr);
  p.src_idx = src_idx ? src_idx->data<const int32_t>() : nullptr;
  p.dst_idx = dst_idx ? dst_idx->data<const int32_t>() : nullptr;
  p.n_rows = n;
  p.n_outer = src.size(0);
  p.src_os = src.stride(0) * es; p.src_rs = src.stride(1) * es;
  p.dst_os = dst.stride(0) * es; p.dst_rs = dst.stride(1) * es;
  const int64_t row_bytes = src.size(2) * es;

  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  auto fits = [&](int64_t vb) {
    return row_bytes % vb == 0 && p.src_os % vb == 0 && p.src_rs % vb == 0 &&
           p.dst_os % vb == 0 && p.dst_rs % vb == 0 && aligned_to(src.ptr, vb) &&
           aligned_to(dst.ptr, vb);
  };
  if (fits(16)) {
    p.row_vecs = row_bytes / 16;
    launch<16>(p, device, s);
  } else if (fits(4)) {
    p.row_vecs = row_bytes / 4;
    launch<4>(p, device, s);
  } else {
    p.row_vecs = row_bytes;
    launch<1>(p, device, s);
  }
}

}  // namespace esp
