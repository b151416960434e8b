"""The public ops as torch custom ops (namespace `esp_kernels`), so that torch.compile traces
them as single graph nodes instead of breaking the graph at every call:

    torch.ops.esp_kernels.merge_states_out(o_a, lse_a, o_b, lse_b, out!, lse_out!, backend)
    torch.ops.esp_kernels.merge_states_(o_a!, lse_a!, o_b, lse_b, backend)
    torch.ops.esp_kernels.merge_states_multi_out(o, lse, out!, lse_out!, backend)
    torch.ops.esp_kernels.decode_partial(q, k_cache, v_cache, block_table, kv_lens, o!, lse!,
                                         workspace!?, num_splits?, max_len?, scale,
                                         deterministic, backend)
    torch.ops.esp_kernels.copy_rows(src, src_idx?, dst!, dst_idx?, backend)
    torch.ops.esp_kernels.ring_step(q, k, v, cu_q, cu_k, max_q_len, o_state!, lse_state!,
                                    causal, mask_shift, accumulate, softmax_scale, backend)

(`!`: written in place, declared in the schema so functionalization orders it; `?`: optional.)
Every op writes its outputs in place and returns nothing, so each fake (meta) implementation is
a no-op: shapes never depend on data.

The public functions (esp.merge_states, esp.decode_partial, ...) check their arguments and call
these ops while torch.compile traces them; eagerly they call the same implementations directly,
because a dispatcher round trip costs host time the drivers cannot spare (on the build machine:
2.0 us per call through a `define`d op, 20 us through `torch.library.custom_op`, 0.2 us for the
`torch.compiler.is_compiling()` test that picks the path). The ops can be called directly too.
"""

from __future__ import annotations

import torch

from .decode.partial import decode_partial_
from .kvcache.copy import copy_rows_
from .merge import _run as merge_multi_
from .merge import merge_two_
from .prefill.step import run_step

_LIB = torch.library.Library("esp_kernels", "DEF")


def _register(schema: str, impl):
    """Define `esp_kernels::<schema>`, implemented by `impl` on every device, with a no-op fake
    (outputs are written in place)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"esp_kernels::{name}", lambda *args: None, lib=_LIB)


_register("merge_states_out(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, Tensor(a!) out, "
          "Tensor(b!) lse_out, str backend) -> ()", merge_two_)
_register("merge_states_(Tensor(a!) o_a, Tensor(b!) lse_a, Tensor o_b, Tensor lse_b, "
          "str backend) -> ()",
          lambda o_a, lse_a, o_b, lse_b, backend: merge_two_(o_a, lse_a, o_b, lse_b, o_a, lse_a,
                                                             backend))
_register("merge_states_multi_out(Tensor o, Tensor lse, Tensor(a!) out, Tensor(b!) lse_out, "
          "str backend) -> ()", merge_multi_)
_register("decode_partial(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
          "Tensor kv_lens, Tensor(a!) o, Tensor(b!) lse, Tensor(c!)? workspace, "
          "int? num_splits, int? max_len, float scale, bool deterministic, str backend) -> ()",
          decode_partial_)
_register("copy_rows(Tensor src, Tensor? src_idx, Tensor(a!) dst, Tensor? dst_idx, "
          "str backend) -> ()", copy_rows_)
_register("ring_step(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k, int max_q_len, "
          "Tensor(a!) o_state, Tensor(b!) lse_state, bool causal, int mask_shift, "
          "bool accumulate, float softmax_scale, str backend) -> ()",
          lambda q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal, mask_shift,
          accumulate, softmax_scale, backend: run_step(
              q, k, v, cu_q, cu_k, max_q_len, o_state, lse_state, causal=causal,
              mask_shift=mask_shift, accumulate=accumulate, softmax_scale=softmax_scale,
              backend=backend))

OPS = ("merge_states_out", "merge_states_", "merge_states_multi_out", "decode_partial",
       "copy_rows", "ring_step")
