// ring_step host entry: validates the tensors, packs RingStepParams and dispatches on the head dim
// (the kernel and its tiling are in ring_step_kernel.cuh, instantiated in ring_step_d*.cu).
#include "ring_step.h"

#include <climits>
#include <cmath>

#include "ring_step_kernel.cuh"

namespace esp {
namespace {

// q/k/v/o_state: 3-D, D contiguous, 16-byte aligned base and token/head strides multiples of 8
// elements, so every row starts 16-byte aligned (cp.async 16-byte copies, float2 state accesses).
// The stride of a dimension of size 1 is never used, so it is not checked (torch reports
// arbitrary strides there).
void check_rows(const TensorDesc& t, const char* name) {
  ESP_CHECK(t.ndim() == 3, "ring_step: ", name, " must be 3-D [tokens, heads, head_dim], got ",
            t.ndim(), " dims");
  ESP_CHECK(t.stride(2) == 1, "ring_step: ", name, " must have a contiguous head_dim (stride 1), got ",
            t.stride(2));
  ESP_CHECK(aligned_to(t.ptr, 16), "ring_step: ", name, " data pointer must be 16-byte aligned");
  for (int d = 0; d < 2; ++d)
    ESP_CHECK(t.size(d) <= 1 || t.stride(d) % 8 == 0, "ring_step: ", name, " ",
              d == 0 ? "token" : "head", " stride must be a multiple of 8 elements, got ",
              t.stride(d));
}

void check_offsets(const TensorDesc& t, const char* name) {
  ESP_CHECK(t.dtype == DType::kInt32, "ring_step: ", name, " must be int32, got ",
            dtype_name(t.dtype));
  ESP_CHECK(t.ndim() == 1 && t.size(0) >= 1, "ring_step: ", name, " must be 1-D [B+1]");
  ESP_CHECK(t.size(0) <= 1 || t.stride(0) == 1, "ring_step: ", name, " must be contiguous");
}

}  // namespace

void ring_step(const TensorDesc& q, const TensorDesc& k, const TensorDesc& v,
               const TensorDesc& cu_q, const TensorDesc& cu_k, int max_q_len,
               const TensorDesc& o_state, const TensorDesc& lse_state, bool causal,
               int mask_shift, bool accumulate, float softmax_scale, int device,
               uintptr_t stream) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  check_rows(o_state, "o_state");
  ESP_CHECK(q.dtype == DType::kFloat16 || q.dtype == DType::kBFloat16,
            "ring_step: q must be float16 or bfloat16, got ", dtype_name(q.dtype));
  ESP_CHECK(k.dtype == q.dtype, "ring_step: k dtype ", dtype_name(k.dtype),
            " does not match q dtype ", dtype_name(q.dtype));
  ESP_CHECK(v.dtype == q.dtype, "ring_step: v dtype ", dtype_name(v.dtype),
            " does not match q dtype ", dtype_name(q.dtype));
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Tk = k.size(0), Hkv = k.size(1);
  ESP_CHECK(D == 64 || D == 128, "ring_step: head_dim must be 64 or 128, got ", D, " (q)");
  ESP_CHECK(k.size(2) == D, "ring_step: k head_dim ", k.size(2), " does not match q head_dim ", D);
  ESP_CHECK(v.size(0) == Tk && v.size(1) == Hkv && v.size(2) == D, "ring_step: v shape [",
            v.size(0), ", ", v.size(1), ", ", v.size(2), "] does not match k [", Tk, ", ", Hkv,
            ", ", D, "]");
  ESP_CHECK(Hq > 0 && Hkv > 0 && Hq % Hkv == 0, "ring_step: q heads (", Hq,
            ") must be a positive multiple of k/v heads (", Hkv, ")");

  check_offsets(cu_q, "cu_q");
  check_offsets(cu_k, "cu_k");
  ESP_CHECK(cu_k.size(0) == cu_q.size(0), "ring_step: cu_k has ", cu_k.size(0),
            " entries, cu_q has ", cu_q.size(0), " (both must be [B+1])");
  const int64_t B = cu_q.size(0) - 1;

  ESP_CHECK(o_state.dtype == DType::kFloat32, "ring_step: o_state must be float32, got ",
            dtype_name(o_state.dtype));
  ESP_CHECK(o_state.size(0) == Tq && o_state.size(1) == Hq && o_state.size(2) == D,
            "ring_step: o_state shape [", o_state.size(0), ", ", o_state.size(1), ", ",
            o_state.size(2), "] does not match q [", Tq, ", ", Hq, ", ", D, "]");
  ESP_CHECK(lse_state.dtype == DType::kFloat32, "ring_step: lse_state must be float32, got ",
            dtype_name(lse_state.dtype));
  ESP_CHECK(lse_state.ndim() == 2 && lse_state.size(0) == Tq && lse_state.size(1) == Hq,
            "ring_step: lse_state must be [", Tq, ", ", Hq, "] (q tokens, q heads)");
  ESP_CHECK(aligned_to(lse_state.ptr, 4), "ring_step: lse_state data pointer must be 4-byte aligned");

  ESP_CHECK(max_q_len >= 0 && max_q_len <= Tq, "ring_step: max_q_len must be in [0, ", Tq,
            "] (q tokens), got ", max_q_len);
  ESP_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.f,
            "ring_step: softmax_scale must be positive and finite, got ", softmax_scale);
  // Packed (token, head) row indices are int32 in the kernel, with a tile of headroom.
  ESP_CHECK(Tq * Hq <= INT_MAX - ring_step_impl::kBlockM, "ring_step: q has ", Tq * Hq,
            " (token, head) rows; at most ", INT_MAX - ring_step_impl::kBlockM, " supported");
  ESP_CHECK(Tk <= INT_MAX, "ring_step: k has ", Tk, " tokens; at most ", INT_MAX, " supported");

  const int64_t G = Hq / Hkv;
  const int64_t m_tiles =
      (static_cast<int64_t>(max_q_len) * G + ring_step_impl::kBlockM - 1) / ring_step_impl::kBlockM;
  if (Tq == 0 || B == 0 || m_tiles == 0) return;
  ESP_CHECK(m_tiles * B * Hkv <= INT_MAX, "ring_step: grid of ", m_tiles * B * Hkv,
            " blocks (row tiles x requests x kv heads) exceeds ", INT_MAX);

  RingStepParams p{};
  p.q = reinterpret_cast<const void*>(q.ptr);
  p.k = reinterpret_cast<const void*>(k.ptr);
  p.v = reinterpret_cast<const void*>(v.ptr);
  p.cu_q = cu_q.data<const int>();
  p.cu_k = cu_k.data<const int>();
  p.o = o_state.data<float>();
  p.lse = lse_state.data<float>();
  p.q_st = q.stride(0); p.q_sh = q.stride(1);
  p.k_st = k.stride(0); p.k_sh = k.stride(1);
  p.v_st = v.stride(0); p.v_sh = v.stride(1);
  p.o_st = o_state.stride(0); p.o_sh = o_state.stride(1);
  p.lse_st = lse_state.stride(0); p.lse_sh = lse_state.stride(1);
  p.B = static_cast<int>(B);
  p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(G);
  p.num_m_tiles = static_cast<int>(m_tiles);
  p.mask_shift = mask_shift;
  p.causal = causal;
  p.accumulate = accumulate;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;

  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  if (D == 64)
    ring_step_d64(p, q.dtype, s, device);
  else
    ring_step_d128(p, q.dtype, s, device);
}

}  // namespace esp
