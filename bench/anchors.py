"""Same-run anchors from the carried `.anchors/` folder (installed by bench/gpu_check.sh into
/tmp/fi and /tmp/site, see the anchors README in the shared folder): FlashInfer's FA3 prefill (one
call over a sequence, or one ring step with its LSE) and its paged decode. cuDNN is measured
through torch SDPA's cuDNN backend (on contiguous KV it timed within 2% of the cuDNN frontend's
paged graph on H100).

Each function returns a callable to time, or None after printing one line that says why the
anchor is absent (not installed, or refused the shape), so a benchmark skips it and goes on.
FlashInfer's LSE is base 2; the step anchors return it in natural log, as ours.
"""

from __future__ import annotations

import math

import torch

_FLASHINFER = None
_REPORTED = set()


def _absent(what: str, why: str) -> None:
    if (what, why) not in _REPORTED:
        _REPORTED.add((what, why))
        print(f"  anchor {what} skipped: {why}", flush=True)
    return None


def flashinfer():
    """The flashinfer module, or None (printing why once)."""
    global _FLASHINFER
    if _FLASHINFER is None:
        try:
            import flashinfer as fi
        except Exception as exc:  # noqa: BLE001 - any import failure means "absent"
            _FLASHINFER = False
            _absent("FlashInfer", f"not importable ({type(exc).__name__}: {exc}); carry "
                                  ".anchors/ and run through bench/gpu_check.sh")
        else:
            _FLASHINFER = fi
    return _FLASHINFER or None


def fa3_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True):
    """One FlashInfer FA3 call over a whole sequence: q [L, Hq, D], k/v [L, Hkv, D] (NHD, GQA)."""
    fi = flashinfer()
    if fi is None:
        return None
    scale = q.shape[-1] ** -0.5

    def run():
        return fi.single_prefill_with_kv_cache(q, k, v, causal=causal, sm_scale=scale,
                                               backend="fa3")
    try:
        run()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a refused shape skips the anchor
        return _absent("FA3 (FlashInfer)",
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return run


_LN2 = math.log(2.0)


def fa3_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One FlashInfer FA3 causal call that also returns the LSE: q [n, Hq, D], k/v [n, Hkv, D]
    (GQA as is) -> (o [n, Hq, D], lse [n, Hq] fp32, natural log: FlashInfer's is base 2).
    Raises whatever FlashInfer raises; `step_attend` probes it once."""
    o, lse2 = flashinfer().single_prefill_with_kv_cache(q, k, v, causal=True, sm_scale=scale,
                                                         backend="fa3", return_lse=True)
    return o, lse2 * _LN2


def cudnn_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """torch's cuDNN SDPA kernel (the one that returns its LSE), causal, K/V expanded to the
    query heads (same FLOPs; this aten op has no GQA argument)."""
    G = q.shape[1] // k.shape[1]
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k.repeat_interleave(G, dim=1),
                                                    v.repeat_interleave(G, dim=1)))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qt, kt, vt, None, True, 0.0, True, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse.reshape(q.shape[1], -1).transpose(0, 1)


def step_attend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """An anchor kernel for one ring step, as `attend(q, k, v, scale) -> (o, lse)`: "FA3"
    (FlashInfer) or "cuDNN" (torch SDPA's cuDNN kernel), or None after printing why it is
    absent. Probed once on (q, k, v)."""
    if name == "FA3":
        if flashinfer() is None:
            return None
        attend = fa3_attend
    elif name == "cuDNN":
        attend = cudnn_attend
    else:
        raise ValueError(f"unknown step anchor {name!r}")
    try:
        attend(q, k, v, q.shape[-1] ** -0.5)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a refused shape skips the anchor
        return _absent(f"{name} steps", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return attend


class _Workspace:
    buf = None


def flashinfer_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                      block_table: torch.Tensor, seq_len: int, tensor_cores: bool = True):
    """FlashInfer's paged batch decode over our pages: q [B, Hq, D], k/v pages
    [num_pages, page_size, Hkv, D] (NHD), block_table [B, pages] int32, every request seq_len
    tokens."""
    fi = flashinfer()
    if fi is None:
        return None
    B, Hq, D = q.shape
    page_size, Hkv = k_pages.shape[1], k_pages.shape[2]
    pages = math.ceil(seq_len / page_size)
    dev = q.device
    if _Workspace.buf is None:
        _Workspace.buf = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * pages
    indices = block_table[:, :pages].reshape(-1).to(torch.int32).contiguous()
    last = torch.full((B,), seq_len - (pages - 1) * page_size, dtype=torch.int32, device=dev)
    try:
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(_Workspace.buf, kv_layout="NHD",
                                                        use_tensor_cores=tensor_cores)
        wrapper.plan(indptr, indices, last, Hq, Hkv, D, page_size, q_data_type=q.dtype,
                     kv_data_type=k_pages.dtype)

        def run():
            return wrapper.run(q, (k_pages, v_pages))
        run()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a refused shape skips the anchor
        kind = "tensor cores" if tensor_cores else "CUDA cores"
        return _absent(f"FlashInfer decode ({kind}, page {page_size})",
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return run
