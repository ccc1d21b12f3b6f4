"""The LMDB embedding cache: image id -> one fixed-shape array (format: :mod:`store.format`)."""

from .cache import CacheReader, CacheWriter
from .env import is_cache
from .errors import (
    CacheDamagedError, CorruptValueError, MetadataMismatch, MissingIdError, NotACacheError, SchemaError, StoreError,
    ValueShapeError,
)
from .format import DTYPES, SCHEMA_VERSION, CacheMeta
from .ops import AtomicShardWriter, export, info, merge, stats, verify

__all__ = [
    "CacheReader", "CacheWriter", "CacheMeta", "is_cache", "info", "stats", "verify", "merge", "export",
    "AtomicShardWriter", "StoreError", "NotACacheError", "SchemaError", "MetadataMismatch",
    "MissingIdError", "CorruptValueError", "CacheDamagedError", "ValueShapeError", "DTYPES", "SCHEMA_VERSION",
]
