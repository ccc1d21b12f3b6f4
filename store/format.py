"""The on-disk format of the embedding cache (schema version 1).

One LMDB environment (a directory holding ``data.mdb`` and ``lock.mdb``) with three named
databases:

- ``embeddings``: key = the image id as UTF-8 bytes; value = the raw bytes of one array of the
  cache's fixed shape and dtype, C order, little endian. bfloat16 values are the upper 16 bits of
  the float32 pattern (``torch.bfloat16``'s layout). Never pickled.
- ``checksums``: key = the image id; value = the CRC-32 of the value bytes, 4 bytes little endian.
- ``meta``: key ``b"meta"``; value = a JSON object, see :class:`CacheMeta`.

Named databases keep the main database free of user keys (LMDB stores sub-database names in the
main database, so an id such as ``meta`` could otherwise collide with them).
"""

import datetime as _dt
import json
import math
import sys
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import NotACacheError, SchemaError, ValueShapeError

FORMAT_NAME = "where-to-fuse/embedding-cache"
SCHEMA_VERSION = 1
DB_EMBEDDINGS = b"embeddings"
DB_CHECKSUMS = b"checksums"
DB_META = b"meta"
META_KEY = b"meta"
DTYPES = ("float16", "bfloat16", "float32")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

assert sys.byteorder == "little", "the cache format is little endian"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def checksum(buf) -> bytes:
    """CRC-32 of a value, as stored in the ``checksums`` database."""
    return zlib.crc32(buf).to_bytes(4, "little")


@dataclass
class CacheMeta:
    """The metadata record of a cache.

    Attributes:
        shape: shape of every value, e.g. ``(196, 768)``.
        dtype: one of ``float16``, ``bfloat16``, ``float32``.
        producer: what made the values (stage 1 fills it: model, weights, weights_hash,
            preprocessing, tokens, versions). Compared when a writer reopens the cache.
        count: number of entries, updated in the same transaction as the entries.
        identity: the producer fields that decide the values (those given when the cache was
            created; fields added later, such as versions or the run's settings, are for
            information). Empty in caches written before it existed: then every field counts.
    """

    shape: tuple
    dtype: str = "float16"
    producer: dict = field(default_factory=dict)
    count: int = 0
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME
    checksum: str = "crc32"
    identity: list = field(default_factory=list)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not self.shape or any(s <= 0 for s in self.shape):
            raise ValueError(f"shape {self.shape}: every dimension must be positive")

    @property
    def nbytes(self) -> int:
        """Bytes of one value."""
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]

    def to_json(self) -> bytes:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, path="") -> "CacheMeta":
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise NotACacheError(f"{path}: the metadata record is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise NotACacheError(f"{path}: the metadata record is not a {FORMAT_NAME} record")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"{path}: cache schema version {version} is not the supported version {SCHEMA_VERSION}; "
                "rebuild it with `embed` (the values cannot be read safely)")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def defining(self) -> dict:
        """What decides the values: shape, dtype and the producer's identity fields (every producer
        field when the cache predates :attr:`identity`). Two caches are interchangeable, and may
        be merged, when these are equal."""
        producer = {k: self.producer[k] for k in self.identity if k in self.producer} if self.identity \
            else dict(self.producer)
        return {"shape": list(self.shape), "dtype": self.dtype, "producer": producer}

    def differences(self, expected: dict, prefix="") -> list:
        """Fields whose values differ from ``expected`` (a possibly nested, partial dict).

        Returns:
            ``[(dotted_field, cache_value, expected_value), ...]``; only keys present in
            ``expected`` are compared.
        """
        mine = asdict(self)
        mine["shape"] = list(self.shape)
        return _diff(mine, expected, prefix)


def _diff(have: dict, want: dict, prefix: str) -> list:
    out = []
    for key, w in want.items():
        name = f"{prefix}{key}"
        h = have.get(key) if isinstance(have, dict) else None
        if isinstance(w, dict) and isinstance(h, dict):
            out += _diff(h, w, name + ".")
            continue
        if isinstance(w, tuple):
            w = list(w)
        if h != w:
            out.append((name, h, w))
    return out


def encode(array, meta: CacheMeta) -> memoryview:
    """The raw bytes of one value (or a batch, leading dimension first) in the cache's dtype.

    A view of the caller's memory where no conversion is needed (LMDB copies it on put).
    """
    shape = tuple(array.shape)
    if shape[-len(meta.shape):] != meta.shape:
        raise ValueShapeError(f"array of shape {shape} does not fit the cache's shape {meta.shape}")
    if meta.dtype == "bfloat16" or not isinstance(array, np.ndarray):
        import torch

        t = torch.as_tensor(array).detach().to("cpu", dtype=getattr(torch, meta.dtype)).contiguous()
        return memoryview(t.view(torch.uint8).numpy()).cast("B")
    return memoryview(np.ascontiguousarray(array, dtype=meta.dtype)).cast("B")


def decode(buf, meta: CacheMeta) -> np.ndarray:
    """A writable numpy array of one value. bfloat16 values come back as float32 (exact)."""
    if meta.dtype == "bfloat16":
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(meta.shape)
    return np.frombuffer(buf, dtype=meta.dtype).reshape(meta.shape).copy()
