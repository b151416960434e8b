"""Paged KV cache, proactive retention during the ring, and reactive migration."""

from .cache import CacheOutOfMemory, CacheStats, PagedKVCache
from .copy import copy_rows
from .migration import (MigrationEntry, MigrationError, MigrationPlan, MigrationRunner,
                        migrate_kv)
from .retention import RetentionPlan, RetentionWriter

__all__ = ["CacheOutOfMemory", "CacheStats", "PagedKVCache", "copy_rows", "MigrationEntry",
           "MigrationError", "MigrationPlan", "MigrationRunner", "migrate_kv", "RetentionPlan",
           "RetentionWriter"]
