"""The names a sweep folder is made of, what a grid point is, and how grid points sort.

A runs directory holds ``runs/<point>/`` (one training each: ``results.json``, or ``failed.json``
with the reason when its loss diverged or it raised), ``summary.{json,csv,md}`` and ``figures/``.

A run's name says where its swept modalities join, what it goes without, its decoder depth, its
pooling and its repeat: ``f3-d2-pool_none-r0`` when one modality is swept (its layer 3),
``image3-audio0-d2-pool_none-r0`` when several are, ``no_image-audio0-d2-pool_none-r0`` for that
point trained without the image (``--ablate``), ``base-d2-pool_none-r0`` when no layer is swept.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from fuse.spec import POOL_TYPES, FusionSpec

RUNS = "runs"
RESULTS = "results.json"
FAILED = "failed.json"
FIGURES = "figures"


@dataclass(frozen=True)
class GridPoint:
    """One training of the sweep.

    Attributes:
        layers: ``((modality, layer), ...)``: the join layer of each swept modality, in ``--fuse-grid``
            order; ``None`` for a modality this run goes without.
        decoder_layers: the decoder's depth.
        pools: ``((modality, "TYPE[:LENGTH]"), ...)``: the pooling of each vector modality the run fuses.
        repeat: the repeat index (seed = base seed + repeat).
        ablated: the vector modality this run goes without (``--ablate``); "" for the grid point itself.
    """

    layers: tuple
    decoder_layers: int
    pools: tuple
    repeat: int
    ablated: str = ""

    @property
    def pool(self) -> str:
        """The pooling's label (:func:`pool_label`)."""
        return pool_label(dict(self.pools))

    @property
    def name(self) -> str:
        if len(self.layers) == 1:  # one swept modality: the names sweeps have always had (f3-...)
            (modality, layer), = self.layers
            parts = [f"no_{modality}" if layer is None else f"f{layer}"]
        else:
            parts = [f"no_{m}" if layer is None else f"{m}{layer}" for m, layer in self.layers]
        if self.ablated and self.ablated not in dict(self.layers):  # a modality of --fuse, not swept
            parts.append(f"no_{self.ablated}")
        return "-".join((parts or ["base"]) + [f"d{self.decoder_layers}", f"pool_{pool_tag(self.pool)}",
                                               f"r{self.repeat}"])


def spec_without(spec: FusionSpec, name: str) -> FusionSpec | None:
    """A :class:`fuse.FusionSpec` less the modality ``name`` (None when nothing is left)."""
    kept = tuple((layer, tuple(n for n in names if n != name)) for layer, names in spec.layers)
    kept = tuple((layer, names) for layer, names in kept if names)
    return FusionSpec(kept) if kept else None


def pool_label(pools: dict) -> str:
    """The label of a run's pooling ``{vector modality: "TYPE[:LENGTH]"}``: ``none`` when no modality is
    pooled, ``TYPE:LENGTH`` when every one is pooled alike (one modality: its pooling), else
    ``MOD:TYPE[:LENGTH] ...`` in the given order."""
    specs = [str(s) for s in pools.values()]
    if all(s == "none" for s in specs):
        return "none"
    if len(set(specs)) == 1:
        return specs[0]
    return " ".join(f"{m}:{s}" for m, s in pools.items())


def pool_tag(label: str) -> str:
    """A pool label as a run name holds it: ``attention14``, ``image_attention4_audio_none``."""
    return "_".join(item.replace(":", "_", 1) if " " in label else item
                    for item in label.split()).replace(":", "")


def _pool_key(spec: str) -> tuple:
    kind, _, length = spec.partition(":")
    return (kind != "none", kind, int(length) if length.isdigit() else 0)


def pool_sort_key(pool: str) -> tuple:
    """``none`` first, then by type and length; per-modality labels after those, item by item."""
    if " " in pool:
        return (2, tuple(_pool_key(item.partition(":")[2]) for item in pool.split()))
    return (0 if pool == "none" else 1, _pool_key(pool))


def swept_modalities(rows: list) -> list:
    """The modalities whose join layer differs between the sweep's own points (summary rows with their
    ``layers``; ablations left out), in join order."""
    seen = {}
    for r in rows:
        if not r.get("ablated"):
            for m, layer in (r.get("layers") or {}).items():
                seen.setdefault(m, set()).add(layer)
    return [m for m, layers in seen.items() if len(layers) > 1]


# ---- the grid flags ----------------------------------------------------------------------------------

def parse_fuse_grid(value) -> dict:
    """``"image=0,4 audio=0,2,4"`` (or a mapping) -> ``{"image": (0, 4), "audio": (0, 2, 4)}``.

    Raises:
        ValueError: a malformed item or a modality given twice, naming ``--fuse-grid``.
    """
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = []
        for item in str(value).replace(";", " ").split():
            name, sep, text = item.partition("=")
            if not sep or not name or not text.strip(","):
                raise ValueError(f"--fuse-grid {item}: expected MODALITY=L,L,..., "
                                 f"e.g. --fuse-grid \"image=0,4 audio=0,2\"")
            try:
                items.append((name, [int(v) for v in text.split(",") if v.strip()]))
            except ValueError:
                raise ValueError(f"--fuse-grid {item}: the layers are comma-separated integers, "
                                 f"e.g. {name}=0,2,4") from None
    grid = {}
    for name, layers in items:
        if name in grid:
            raise ValueError(f"--fuse-grid {name}={join(layers)}: '{name}' is given twice")
        grid[name] = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
    return grid


def format_fuse_grid(grid: dict) -> str:
    return " ".join(f"{m}={join(layers)}" for m, layers in grid.items())


def qualified_pool(pool: str) -> bool:
    """Whether a ``--pool`` item names its modality (``image:mean:4``) rather than a pooling (``mean:4``)."""
    return str(pool).partition(":")[0] not in POOL_TYPES


def join(values) -> str:
    return ",".join(str(v) for v in values)
