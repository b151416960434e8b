"""Multi-master distributed decode: partial attention over paged shards, plans, runners."""

from .driver import decode_runner, distributed_decode, distributed_decode_steps
from .layout import DecodeLayout, decode_layout
from .partial import decode_partial, num_splits_for
from .plan import DecodePlan
from .runner import DecodeRunner

__all__ = ["DecodeLayout", "DecodePlan", "DecodeRunner", "decode_layout", "decode_partial",
           "decode_runner", "distributed_decode", "distributed_decode_steps", "num_splits_for"]
