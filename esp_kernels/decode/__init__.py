"""Multi-master distributed decode: partial attention over paged shards, plans, driver."""

from .driver import distributed_decode
from .partial import decode_partial, num_splits_for
from .plan import DecodePlan

__all__ = ["DecodePlan", "decode_partial", "distributed_decode", "num_splits_for"]
