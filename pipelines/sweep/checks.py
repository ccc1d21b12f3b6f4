"""The checks of a sweep before any training: every grid point against the model and the caches
(:func:`check_grid`), a runs directory against the sweep (:func:`check_settings`), and whether a
killed run can go on from its checkpoint (:func:`resumable`)."""

import json
import logging
from pathlib import Path

from fuse import T5_PRESETS, PoolSpec

from ..errors import GridError, SweepError
from ..train.config import TrainConfig
from .grid import RESULTS, join, qualified_pool

log = logging.getLogger(__name__)

# Settings that name where a run's files go or how it is shown, not what it computes: they may
# differ between a finished run and its rerun.
NOT_SETTINGS = ("out", "progress", "overwrite", "resume", "stop_at")


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
    """A vector modality's value shape ``(tokens, dim)``, from its cache's metadata (or the shards' for
    values inline: ``--cache MODALITY=inline``)."""
    from ..data.stream import open_caches
    from ..train.streams import stream_configs

    reader = open_caches(stream_configs(base)[0])[modality]
    try:
        return tuple(reader.meta.shape)
    finally:
        getattr(reader, "close", lambda: None)()


def check_grid(cfg, base: TrainConfig) -> list:
    """Every grid point checked against the model and the caches; returns the points.

    Raises:
        GridError: a fusion layer, decoder depth or pooling the model or a cache cannot have; the
            message names the sweep's flag.
    """
    encoder, decoder = t5_depths(base.t5)
    depth = (f"the encoder of --t5 {base.t5} has {encoder} layers, so a fusion layer is in 0..{encoder} "
             f"(0 = early, {encoder} = late fusion)")
    for m, layers in cfg.grid().items():
        late = [L for L in layers if L > encoder]
        if late:
            raise GridError(f"{cfg.grid_flag(m, late)}: {depth}")
    fixed = cfg.base_spec()
    for layer, names in fixed.layers if fixed else ():
        if layer > encoder:
            raise GridError(f"--fuse {cfg.fuse}: {layer}:{','.join(names)}: {depth}")
    if base.t5 not in T5_PRESETS:  # a pretrained decoder can only be cut, not grown
        deep = [d for d in cfg.decoder_layers if d > decoder]
        if deep:
            raise GridError(f"--decoder-layers {join(deep)}: --t5 {base.t5} has {decoder} decoder layers; "
                            f"a pretrained decoder keeps at most that many")
    for m in cfg.vectors():
        tokens = cache_shape(base, m)[0]
        mine = [p for p in cfg.pools if not qualified_pool(p) or p.partition(":")[0] == m]
        long = [p for p in mine if (PoolSpec.from_value(p.partition(":")[2] if qualified_pool(p) else p).length
                                    or 0) > tokens]
        if long:
            raise GridError(f"--pool {join(long)}: the {m} cache holds {tokens} tokens per item; "
                            f"pooling keeps at most that many")
    points, skipped = cfg._points(decoder if base.decoder_layers is None else base.decoder_layers)
    for note in skipped:
        log.warning("%s", note)
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
    return {k: v for k, v in config.items() if k not in NOT_SETTINGS + ("fuse", "pool", "decoder_layers", "seed")}


def resumable(run_dir: Path, run: TrainConfig) -> bool:
    """Whether a broken run can go on from its last checkpoint: there is one, short of the last step,
    and the run was started (``config.json``) with the very settings of ``run``."""
    try:
        step = json.loads((run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())["step"]
        started = json.loads((run_dir / "config.json").read_text())
        same = {k: v for k, v in started.items() if k not in NOT_SETTINGS} == \
            {k: v for k, v in json.loads(json.dumps(run.to_dict())).items() if k not in NOT_SETTINGS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return same and isinstance(step, int) and step < run.steps
