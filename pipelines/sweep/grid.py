"""The names a sweep folder is made of, and how grid points sort.

A runs directory holds ``runs/<point>/`` (one training each: ``results.json``, or ``failed.json``
with the reason when its loss diverged or it raised), ``summary.{json,csv,md}`` and ``figures/``.
"""

from dataclasses import dataclass

RUNS = "runs"
RESULTS = "results.json"
FAILED = "failed.json"
FIGURES = "figures"


@dataclass(frozen=True)
class GridPoint:
    """One training of the sweep."""

    fuse_layer: int
    decoder_layers: int
    pool: str  # "none" or "TYPE:LENGTH"
    repeat: int

    @property
    def name(self) -> str:
        return f"f{self.fuse_layer}-d{self.decoder_layers}-pool_{self.pool.replace(':', '')}-r{self.repeat}"


def pool_sort_key(pool: str) -> tuple:
    """``none`` first, then by type and length."""
    kind, _, length = pool.partition(":")
    return (kind != "none", kind, int(length) if length else 0)


def point_key(key: tuple) -> tuple:
    """Sort key of ``(fuse_layer, decoder_layers, pool)``; a model's own decoder depth (None) first."""
    fuse_layer, decoder_layers, pool = key
    return (fuse_layer, -1 if decoder_layers is None else decoder_layers, pool_sort_key(pool))
