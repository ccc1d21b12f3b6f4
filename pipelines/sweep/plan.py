"""What a sweep is and what is left of it: :class:`SweepConfig`, the grid's checks and :func:`plan`.

A grid point is a fusion layer L of the swept modality (``--fuse "0:question L:image"``), a decoder
depth, a pooling setting and a repeat index (seed = base seed + repeat), trained into
``RUNS_DIR/runs/<name>/`` (``f3-d2-pool_none-r0``) by :func:`pipelines.sweep.run.run_sweep`. Every
grid point is checked against the model and the cache before any training; :func:`plan` says which
runs are finished, failed, broken or still to do.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from fuse import T5_PRESETS, FusionConfigError, PoolSpec

from ..errors import GridError, SweepError
from ..train.config import TEXT, TrainConfig
from .grid import RUNS, GridPoint
from .report import RESULTS, classify

# Named grids; flags given on the command line override their values.
GRIDS = {
    # Early, mid and late fusion of the demo T5 (4 encoder layers) × 1 and 2 decoder layers, two seeds
    # each, on the shapes data: twelve runs of 300 steps, about 10 minutes on 2 CPU cores. Runs this
    # short need a higher rate than the demo's 2.5e-4 (tuned for 3,000 steps).
    "cpu": dict(fuse_layers=(0, 2, 4), decoder_layers=(1, 2), pools=("none",), repeats=2,
                train=dict(preset="demo", steps=300, eval_every=50, lr=1e-3)),
}

# Settings that name where a run's files go or how it is shown, not what it computes: they may
# differ between a finished run and its rerun.
_NOT_SETTINGS = ("out", "progress", "overwrite", "resume", "stop_at")


@dataclass
class SweepConfig:
    """A sweep. Field names are the CLI flags (``fuse_layers`` is ``--fuse-layers``).

    Attributes:
        out: the runs directory (``runs/``, ``summary.*``, ``figures/``, ``sweep.json``).
        shards: folder written by ``vqa-data shards``; or
        vqa: a VQA v2 folder: its shards are written to ``out/qa`` once.
        caches: modality -> embedding cache (``--cache image=PATH``).
        modality: the vector modality whose join layer is swept (the question joins at 0).
        fuse_layers: the fusion layers of ``modality`` (0 = early, encoder depth = late).
        decoder_layers: decoder depths; empty: the model's own.
        pools: pooling of ``modality``: ``none`` or ``TYPE:LENGTH`` (``attention:14``).
        repeats: runs per grid point, seeds ``seed``, ``seed + 1``, ...
        train: ``fuse-train`` settings shared by every run (``preset``, ``file`` (a config file) and
            TrainConfig fields; ``None`` values are not given).
        retry_failed: redo runs that failed (diverged or raised) before, instead of keeping their failure.
    """

    out: str
    shards: str = ""
    vqa: str = ""
    caches: dict = field(default_factory=dict)
    modality: str = "image"
    fuse_layers: tuple = ()
    decoder_layers: tuple = ()
    pools: tuple = ("none",)
    repeats: int = 1
    train: dict = field(default_factory=dict)
    retry_failed: bool = False

    def __post_init__(self):
        self.fuse_layers, self.decoder_layers = tuple(self.fuse_layers), tuple(self.decoder_layers)
        if bool(self.shards) == bool(self.vqa):
            raise ValueError("give one of --shards DIR (from `vqa-data shards`) or --vqa DIR (a VQA v2 folder)")
        if self.modality == TEXT:
            raise ValueError(f"--modality {TEXT}: the question always joins at layer 0; sweep a vector modality")
        if self.modality not in self.caches:
            raise ValueError(f"--cache: no cache for the swept modality '{self.modality}' "
                             f"(--cache {self.modality}=PATH)")
        if not self.fuse_layers:
            raise ValueError("--fuse-layers: give at least one layer, e.g. --fuse-layers 0,2,4 (or --grid cpu)")
        for flag, values in (("--fuse-layers", self.fuse_layers), ("--decoder-layers", self.decoder_layers)):
            if len(set(values)) != len(values):
                raise ValueError(f"{flag} {_join(values)}: a value is given twice")
        for layer in self.fuse_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"--fuse-layers {layer}: a fusion layer is an integer >= 0")
        for depth in self.decoder_layers:
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
                raise ValueError(f"--decoder-layers {depth}: the decoder needs at least 1 block")
        if not self.pools:
            raise ValueError("--pool: give at least one pooling setting, e.g. --pool none,attention:14")
        self.pools = tuple(_pool(p, self.modality) for p in self.pools)
        if len(set(self.pools)) != len(self.pools):
            raise ValueError(f"--pool {_join(self.pools)}: a setting is given twice")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"--repeats {self.repeats}: must be at least 1")

    @classmethod
    def resolve(cls, grid: str = "", **values) -> "SweepConfig":
        """A named grid's values, then the given ones (``None`` = not given; ``train`` merges)."""
        merged = {}
        if grid:
            if grid not in GRIDS:
                raise ValueError(f"--grid {grid}: unknown (known: {', '.join(GRIDS)})")
            merged.update({k: v for k, v in GRIDS[grid].items() if k != "train"})
            merged["train"] = dict(GRIDS[grid].get("train", {}))
        train = {**merged.pop("train", {}), **{k: v for k, v in values.pop("train", {}).items() if v is not None}}
        merged.update({k: v for k, v in values.items() if v is not None})
        return cls(train=train, **merged)

    def base_train(self) -> TrainConfig:
        """The TrainConfig every run starts from (preset, file and flags merged; not yet a grid point)."""
        flags = dict(self.train)
        preset, file = flags.pop("preset", "") or "", flags.pop("file", None)
        data = str(Path(self.shards).resolve()) if self.shards else str(Path(self.out).resolve() / "qa")
        caches = {k: str(Path(v).resolve()) for k, v in self.caches.items()}
        return TrainConfig.resolve(preset, file, **flags, shards=data, caches=caches,
                                   fuse=f"0:{TEXT} 0:{self.modality}")

    def points(self, decoder_default: int) -> list:
        """Every grid point, repeats innermost (all of a point's repeats finish together)."""
        return [GridPoint(L, d, p, r) for L in self.fuse_layers for d in (self.decoder_layers or (decoder_default,))
                for p in self.pools for r in range(self.repeats)]

    def run_config(self, base: TrainConfig, point: GridPoint) -> TrainConfig:
        pool = "" if point.pool == "none" else f"{self.modality}:{point.pool}"
        return dataclasses.replace(base, fuse=f"0:{TEXT} {point.fuse_layer}:{self.modality}", pool=pool,
                                   decoder_layers=point.decoder_layers, seed=base.seed + point.repeat,
                                   out=str(Path(self.out).resolve() / RUNS / point.name))


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def _pool(text, modality: str) -> str:
    try:
        return str(PoolSpec.from_value(str(text), modality))
    except FusionConfigError as e:
        raise ValueError(str(e).replace(f"--pool {modality}:", "--pool ", 1)) from None


# ---- checks before any training ---------------------------------------------------------------------

def t5_depths(t5: str) -> tuple:
    """``(encoder layers, decoder layers)`` of a T5 preset, hub name or local directory."""
    if t5 in T5_PRESETS:
        arch = T5_PRESETS[t5]
        return arch["num_layers"], arch.get("num_decoder_layers", arch["num_layers"])
    try:
        from transformers import AutoConfig

        arch = AutoConfig.from_pretrained(t5)
    except (OSError, ValueError) as e:
        raise SweepError(f"--t5 {t5}: cannot read its config to check the grid ({str(e).splitlines()[0]})") from None
    return arch.num_layers, arch.num_decoder_layers


def cache_shape(base: TrainConfig, modality: str) -> tuple:
    """The swept modality's value shape ``(tokens, dim)``, from the cache's metadata."""
    from store import CacheReader

    with CacheReader(base.caches[modality], expect=base.expect.get(modality)) as reader:
        return tuple(reader.meta.shape)


def check_grid(cfg: SweepConfig, base: TrainConfig) -> list:
    """Every grid point checked against the model and the cache; returns the points.

    Raises:
        GridError: a fusion layer, decoder depth or pooling the model or cache cannot have; the
            message names the sweep's flag.
    """
    encoder, decoder = t5_depths(base.t5)
    late = [L for L in cfg.fuse_layers if L > encoder]
    if late:
        raise GridError(f"--fuse-layers {_join(late)}: the encoder of --t5 {base.t5} has {encoder} layers, so a "
                        f"fusion layer is in 0..{encoder} (0 = early, {encoder} = late fusion)")
    if base.t5 not in T5_PRESETS:  # a pretrained decoder can only be cut, not grown
        deep = [d for d in cfg.decoder_layers if d > decoder]
        if deep:
            raise GridError(f"--decoder-layers {_join(deep)}: --t5 {base.t5} has {decoder} decoder layers; "
                            f"a pretrained decoder keeps at most that many")
    tokens = cache_shape(base, cfg.modality)[0]
    long = [p for p in cfg.pools if p != "none" and PoolSpec.from_value(p).length > tokens]
    if long:
        raise GridError(f"--pool {_join(long)}: the {cfg.modality} cache holds {tokens} tokens per item; "
                        f"pooling keeps at most that many")
    points = cfg.points(decoder if base.decoder_layers is None else base.decoder_layers)
    for point in points:
        cfg.run_config(base, point)  # each run's TrainConfig validates
    return points


def check_settings(runs_root: Path, base: TrainConfig) -> None:
    """A runs directory holds one experiment: every finished run must share the settings of this
    sweep (all but the grid's own fusion layer, pooling, decoder depth and seed).

    Raises:
        SweepError: naming the first run and the settings that differ.
    """
    want = _settings(base.to_dict())
    for run_dir in sorted(runs_root.glob("*/")):
        try:
            results = json.loads((run_dir / RESULTS).read_text())
            if results.get("stopped"):
                continue  # --stop-at: not finished
            have = _settings(results["config"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not finished or broken: it will be redone
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            detail = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:4])
            raise SweepError(f"{run_dir} finished with other settings ({detail}): sweep into another --out, "
                             f"or delete that run to redo it")


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_SETTINGS + ("fuse", "pool", "decoder_layers", "seed")}


def resumable(run_dir: Path, run: TrainConfig) -> bool:
    """Whether a broken run can go on from its last checkpoint: there is one, short of the last step,
    and the run was started (``config.json``) with the very settings of ``run``."""
    try:
        step = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())["step"]
        started = json.loads((run_dir / "config.json").read_text())
        same = {k: v for k, v in started.items() if k not in _NOT_SETTINGS} == \
            {k: v for k, v in json.loads(json.dumps(run.to_dict())).items() if k not in _NOT_SETTINGS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return same and isinstance(step, int) and step < run.steps


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
