"""What a sweep is and what is left of it: :class:`SweepConfig`, the grid's checks and :func:`plan`.

A sweep fixes part of the fusion spec (``--fuse``, fuse-train's syntax; default ``0:question``) and
varies the join layers of some modalities on top of it (``--fuse-grid "image=0,4 audio=0,2,4"``:
every combination of the lists; ``--modality image --fuse-layers 0,2,4`` is ``--fuse-grid
image=0,2,4``). A grid point is a layer per swept modality, a decoder depth, a pooling setting and a
repeat index (seed = base seed + repeat), trained into ``RUNS_DIR/runs/<name>/`` (names: see
:mod:`.grid`) by :func:`pipelines.sweep.run.run_sweep`. ``--ablate`` adds, for every grid point, the
same point without each vector modality in turn (a vector modality is one with a ``--cache``; a text
field has none). Every run is checked against the model and the caches before any training;
:func:`plan` says which runs are finished, failed, broken or still to do.
"""

import dataclasses
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from fuse import FusionConfigError, FusionSpec, PoolSpec

from ..data.inline import INLINE
from ..data.splits import SPLIT_BY
from ..train.config import TrainConfig
from .checks import check_grid, check_settings
from .grid import (
    RUNS,
    GridPoint,
    format_fuse_grid,
    join,
    parse_fuse_grid,
    qualified_pool,
    spec_without,
)
from .jobs import ExecutorConfig
from .report import classify

DEFAULT_FUSE = "0:question"  # VQA's question at layer 0, as the thesis fused it

# Named grids; flags given on the command line override their values.
GRIDS = {
    # Early, mid and late fusion of the demo T5 (4 encoder layers) × 1 and 2 decoder layers, two seeds
    # each, on the shapes data: twelve runs of 300 steps, about 10 minutes on 2 CPU cores. Runs this
    # short need a higher rate than the demo's 2.5e-4 (tuned for 3,000 steps).
    "cpu": dict(fuse_layers=(0, 2, 4), decoder_layers=(1, 2), pools=("none",), repeats=2,
                train=dict(preset="demo", steps=300, eval_every=50, lr=1e-3)),
}

@dataclass
class SweepConfig:
    """A sweep. Field names are the CLI flags (``fuse_grid`` is ``--fuse-grid``).

    Attributes:
        out: the runs directory (``runs/``, ``summary.*``, ``figures/``, ``sweep.json``).
        shards: folder written by ``vqa-data shards``; or
        vqa: a VQA v2 folder: its shards are written to ``out/qa`` once,
        split_by: split 80/20 by ``image`` (no image on both sides; "" = image) or by ``question``
            (a random 80% of the questions, as the thesis did); with ``vqa`` only.
        caches: vector modality -> embedding cache (``--cache image=PATH``).
        fuse: the fixed part of every run's fusion spec (fuse-train's ``--fuse``; "" = none).
        fuse_grid: swept modality -> its join layers (``"image=0,4 audio=0,2,4"`` or a mapping); every
            combination is a grid point, on top of ``fuse``.
        modality, fuse_layers: the older form of a one-modality grid: ``fuse_grid = {modality: fuse_layers}``
            (modality default ``image``).
        decoder_layers: decoder depths; empty: the model's own.
        pools: pooling settings: ``none`` or ``TYPE:LENGTH`` (``attention:14``), for every vector
            modality alike; or ``MODALITY:TYPE[:LENGTH]`` items, the product over the modalities named
            (one not named: none).
        ablate: also train each grid point without each vector modality in turn.
        repeats: runs per grid point, seeds ``seed``, ``seed + 1``, ...
        train: ``fuse-train`` settings shared by every run (``preset``, ``file`` (a config file) and
            TrainConfig fields; ``None`` values are not given).
        retry_failed: redo runs that failed (diverged or raised) before, instead of keeping their failure.
        executor: where the points run (:class:`pipelines.sweep.jobs.ExecutorConfig`: in turn in this
            process, as submitit jobs on this machine, or on Slurm).
    """

    out: str
    shards: str = ""
    vqa: str = ""
    split_by: str = ""
    caches: dict = field(default_factory=dict)
    fuse: str = DEFAULT_FUSE
    fuse_grid: dict = field(default_factory=dict)
    modality: str = ""
    fuse_layers: tuple = ()
    decoder_layers: tuple = ()
    pools: tuple = ("none",)
    ablate: bool = False
    repeats: int = 1
    train: dict = field(default_factory=dict)
    retry_failed: bool = False
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self):
        self.fuse_layers, self.decoder_layers = tuple(self.fuse_layers), tuple(self.decoder_layers)
        if bool(self.shards) == bool(self.vqa):
            raise ValueError("give one of --shards DIR (from `vqa-data shards`) or --vqa DIR (a VQA v2 folder)")
        if self.split_by and self.split_by not in SPLIT_BY:
            raise ValueError(f"--split-by {self.split_by}: choose one of {', '.join(SPLIT_BY)}")
        if self.split_by and not self.vqa:
            raise ValueError(f"--split-by {self.split_by}: only with --vqa (--shards were split when written)")
        self.fuse_grid = parse_fuse_grid(self.fuse_grid or {})
        if self.fuse_layers and self.fuse_grid:
            raise ValueError("--fuse-layers: give the grid as --fuse-grid or as --modality/--fuse-layers, not both")
        if self.modality and not self.fuse_layers:
            raise ValueError(f"--modality {self.modality}: give its layers with --fuse-layers L,L "
                             f"(or --fuse-grid {self.modality}=L,L)")
        if self.fuse_layers and (self.modality or "image") not in self.caches:
            m = self.modality or "image"
            raise ValueError(f"--cache: no cache for the swept modality '{m}' (--cache {m}=PATH)")
        base = self.base_spec()  # raises FusionSpecError naming --fuse
        for m, layers in self.grid().items():
            flag = self.grid_flag(m, layers)
            if not (isinstance(m, str) and m.replace("_", "a").replace("-", "a").isalnum()):
                raise ValueError(f"{flag}: a modality name is a word (letters, digits, _ and -)")
            if not layers:
                raise ValueError(f"{flag}: give at least one layer, e.g. {self.grid_flag(m, (0, 2, 4))}"
                                 + ("" if self.fuse_grid else " (or --grid cpu)"))
            if len(set(layers)) != len(layers):
                raise ValueError(f"{flag}: a value is given twice")
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                    raise ValueError(f"{self.grid_flag(m, [layer])}: a fusion layer is an integer >= 0")
            if base is not None and m in base.modalities():
                raise ValueError(f"{flag}: '{m}' is in --fuse {self.fuse} too; a modality joins once, so fix it "
                                 f"there or sweep it here")
        if not self.vectors():
            raise ValueError(f"--fuse-grid {format_fuse_grid(self.grid())!r}: nothing to sweep: no modality of it "
                             f"or of --fuse {self.fuse!r} has a --cache (given: {', '.join(self.caches) or 'none'}); "
                             f"e.g. --fuse-grid image=0,2,4 --cache image=PATH (or --fuse-layers 0,2,4, or --grid cpu)")
        for depth in self.decoder_layers:
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
                raise ValueError(f"--decoder-layers {depth}: the decoder needs at least 1 block")
        if len(set(self.decoder_layers)) != len(self.decoder_layers):
            raise ValueError(f"--decoder-layers {join(self.decoder_layers)}: a value is given twice")
        if not self.pools:
            raise ValueError("--pool: give at least one pooling setting, e.g. --pool none,attention:14")
        self.pools = tuple(self._pool(p) for p in self.pools)
        if len(set(self.pools)) != len(self.pools):
            raise ValueError(f"--pool {join(self.pools)}: a setting is given twice")
        if len({qualified_pool(p) for p in self.pools}) > 1:
            raise ValueError(f"--pool {join(self.pools)}: give every setting as TYPE[:LENGTH] (every vector "
                             f"modality alike) or every one as MODALITY:TYPE[:LENGTH], not both")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"--repeats {self.repeats}: must be at least 1")

    @classmethod
    def resolve(cls, grid: str = "", **values) -> "SweepConfig":
        """A named grid's values, then the given ones (``None`` = not given; ``train`` merges; a given
        ``fuse_grid`` replaces the named grid's ``fuse_layers``)."""
        merged = {}
        if grid:
            if grid not in GRIDS:
                raise ValueError(f"--grid {grid}: unknown (known: {', '.join(GRIDS)})")
            merged.update({k: v for k, v in GRIDS[grid].items() if k != "train"})
            merged["train"] = dict(GRIDS[grid].get("train", {}))
        train = {**merged.pop("train", {}), **{k: v for k, v in values.pop("train", {}).items() if v is not None}}
        given = {k: v for k, v in values.items() if v is not None}
        if given.get("fuse_grid"):
            merged.pop("fuse_layers", None)
        merged.update(given)
        return cls(train=train, **merged)

    # ---- the grid's axes ----

    def base_spec(self) -> FusionSpec | None:
        """The fixed part of the spec (``--fuse``); None when it is empty."""
        return FusionSpec.coerce(self.fuse) if str(self.fuse).strip() else None

    def grid(self) -> dict:
        """Swept modality -> its join layers."""
        return {self.modality or "image": self.fuse_layers} if self.fuse_layers else dict(self.fuse_grid)

    def grid_flag(self, modality: str, layers) -> str:
        """The flag that swept ``modality``, for messages: ``--fuse-grid image=5`` (or ``--fuse-layers 5``)."""
        return f"--fuse-layers {join(layers)}" if self.fuse_layers else f"--fuse-grid {modality}={join(layers)}"

    def vectors(self) -> list:
        """The sweep's vector modalities (those with a cache), fixed ones first, in join order."""
        base = self.base_spec()
        names = list(base.modalities() if base else ()) + list(self.grid())
        return [m for m in names if m in self.caches]

    def _pool(self, text) -> str:
        text = str(text)
        if not qualified_pool(text) or not (text.partition(":")[0] in self.vectors() or text.count(":") == 2):
            try:
                return str(PoolSpec.from_value(text, "?"))
            except FusionConfigError as e:
                raise ValueError(str(e).replace("--pool ?:", "--pool ", 1)) from None
        name, _, rest = text.partition(":")
        if name not in self.vectors():
            raise ValueError(f"--pool {text}: '{name}' is not a vector modality of the sweep "
                             f"({', '.join(self.vectors())})")
        return f"{name}:{PoolSpec.from_value(rest, name)}"  # its errors read "--pool NAME:REST: ..."

    def pool_settings(self) -> list:
        """Every pooling setting, as ``{vector modality: "TYPE[:LENGTH]"}``."""
        vectors = self.vectors()
        if not any(qualified_pool(p) for p in self.pools):
            return [{m: p for m in vectors} for p in self.pools]
        per = {}
        for item in self.pools:
            m, _, p = item.partition(":")
            per.setdefault(m, []).append(p)
        return [dict(zip(vectors, combo)) for combo in product(*(per.get(m, ["none"]) for m in vectors))]

    def fusion(self, point: GridPoint) -> str:
        """The fusion spec of a run (``--fuse``): the fixed part less the ablated modality, then each
        swept modality at its layer (``0:question 3:image``); "" when nothing is left."""
        parts = []
        base = self.base_spec()
        kept = spec_without(base, point.ablated) if base is not None else None
        if kept is not None:
            parts.append(str(kept))
        parts += [f"{layer}:{m}" for m, layer in point.layers if layer is not None]
        return " ".join(parts)

    def points(self, decoder_default: int) -> list:
        """Every grid point, repeats innermost (all of a point's repeats finish together); with
        ``ablate``, then every point's ablations (each once: points that differ only in the removed
        modality's layer or pooling share them)."""
        return self._points(decoder_default)[0]

    def skipped_ablations(self, decoder_default: int = 1) -> list:
        """What ``ablate`` leaves out: one line per spec that removing a modality would leave empty."""
        return self._points(decoder_default)[1]

    def _points(self, decoder_default: int) -> tuple:
        grid = self.grid()
        full = [GridPoint(tuple(zip(grid, layers)), d, tuple(pools.items()), r)
                for layers in product(*grid.values()) for d in (self.decoder_layers or (decoder_default,))
                for pools in self.pool_settings() for r in range(self.repeats)]
        if not self.ablate:
            return full, []
        ablations, skipped = [], []
        for point in full:
            for m in self.vectors():
                without = GridPoint(tuple((n, None if n == m else layer) for n, layer in point.layers),
                                    point.decoder_layers, tuple((n, p) for n, p in point.pools if n != m),
                                    point.repeat, ablated=m)
                if not self.fusion(without):
                    note = f"--ablate: {self.fusion(point)} without {m} fuses nothing; not trained"
                    if note not in skipped:
                        skipped.append(note)
                elif without not in ablations:
                    ablations.append(without)
        return full + ablations, skipped

    # ---- the runs ----

    def base_train(self) -> TrainConfig:
        """The TrainConfig every run starts from (preset, file and flags merged; every modality of the
        sweep fused, so a preset's positions and cache expectations apply to each; not yet a grid point)."""
        flags = dict(self.train)
        preset, file = flags.pop("preset", "") or "", flags.pop("file", None)
        data = str(Path(self.shards).resolve()) if self.shards else str(Path(self.out).resolve() / "qa")
        caches = {k: v if v == INLINE else str(Path(v).resolve()) for k, v in self.caches.items()}
        first = GridPoint(tuple((m, layers[0]) for m, layers in self.grid().items()), 1, (), 0)
        return TrainConfig.resolve(preset, file, **flags, shards=data, caches=caches, fuse=self.fusion(first))

    def run_config(self, base: TrainConfig, point: GridPoint) -> TrainConfig:
        pool = " ".join(f"{m}:{p}" for m, p in point.pools if p != "none")
        return dataclasses.replace(base, fuse=self.fusion(point), pool=pool, decoder_layers=point.decoder_layers,
                                   seed=base.seed + point.repeat, out=str(Path(self.out).resolve() / RUNS / point.name))


# ---- the sweep --------------------------------------------------------------------------------------

def plan(cfg: SweepConfig) -> tuple:
    """``(base TrainConfig, [(point, status, reason)])``; status: finished, failed, broken or todo.

    Raises:
        GridError, ValueError: an impossible grid point or setting.
        SweepError: the runs directory holds finished runs with other settings.
    """
    base = cfg.base_train()
    points = check_grid(cfg, base)
    runs_root = Path(cfg.out) / RUNS
    check_settings(runs_root, base)
    todo = []
    for point in points:
        run_dir = runs_root / point.name
        status, reason, _ = classify(run_dir) if run_dir.exists() else ("todo", "", None)
        todo.append((point, status, reason))
    return base, todo
