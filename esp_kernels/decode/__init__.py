"""Multi-master distributed decode: partial attention over paged shards, plans, driver."""

from .driver import distributed_decode, distributed_decode_steps
from .partial import decode_partial, num_splits_for
from .plan import DecodePlan

__all__ = ["DecodePlan", "decode_partial", "distributed_decode", "distributed_decode_steps",
           "num_splits_for"]
