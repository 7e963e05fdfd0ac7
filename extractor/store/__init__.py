"""The store writer: partitioned Parquet with per-shard commit markers (no Ray here)."""

from .writer import ShardWriter, StoreWriter

__all__ = ["ShardWriter", "StoreWriter"]
