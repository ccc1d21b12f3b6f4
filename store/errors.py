"""The cache's own exceptions. Library code raises these; CLIs turn them into messages."""


class StoreError(Exception):
    """Base class of every error the cache raises."""


class NotACacheError(StoreError):
    """The path holds no cache (no LMDB environment, or one without a metadata record)."""


class SchemaError(StoreError):
    """The cache was written by another schema version of this format."""


class MetadataMismatch(StoreError):
    """The cache's metadata differs from what the caller expects.

    Attributes:
        diffs: list of ``(field, cache_value, expected_value)`` tuples, one per differing field.
    """

    def __init__(self, path, diffs):
        self.path = str(path)
        self.diffs = list(diffs)
        lines = [f"  {field}: cache has {have!r}, expected {want!r}" for field, have, want in self.diffs]
        super().__init__(f"cache {self.path} was built with other settings:\n" + "\n".join(lines))


class MissingIdError(StoreError, KeyError):
    """An id is absent from the cache."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CacheDamagedError(StoreError):
    """The cache's file is damaged: shorter than the database it holds, or with unreadable pages."""


class CorruptValueError(StoreError):
    """A stored value has the wrong size or fails its checksum."""


class ValueShapeError(StoreError, ValueError):
    """An array handed to the writer does not match the cache's shape."""
