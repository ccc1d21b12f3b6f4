"""``embed(config)``: images -> timm ViT tokens -> the LMDB cache, resumable and distributed.

One process or many (``accelerate launch -m embed``). The main process scans the sources, merges
cache parts a killed run left behind, opens the cache (refusing one made by another model,
weights or preprocessing) and finds the ids still missing; it broadcasts them and every process
embeds a contiguous share. A single process writes straight into the cache; with several, each
writes its own part ``CACHE.part{rank}`` (a separate LMDB: one writer per environment), and the
main process merges the parts and deletes them at the end. Every batch is committed in its own
transaction, so a kill loses at most the batches in flight and never a partial value. A launched
process stops when its launcher dies (:mod:`embed.launcher`).
"""

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from store import CacheWriter, StoreError, merge

from .config import EmbedConfig
from .data import ImageDataset, collate
from .decode import draft_target_of
from .errors import EmbedError, SourceError
from .launcher import stop_with_launcher
from .model import LoadedModel, load_model
from .sources import scan
from .writer import BackgroundWriter

log = logging.getLogger(__name__)
_FAILURES_LOGGED = 5  # per process; the rest are only in the failures report


@dataclass
class EmbedSummary:
    """What a run did. Times are summed over processes; ``decode_s`` over DataLoader workers too.

    Attributes:
        cache: the cache directory.
        total: images in the sources.
        embedded: images embedded and written by this run.
        skipped: images already in the cache (not recomputed).
        failed: images that could not be embedded (listed in ``failures_path``).
        failures_path: the failures report, or None when nothing failed.
        processes: processes that took part.
        device: the device of the main process.
        weights: ``random``, ``pretrained:<hub id>`` or ``checkpoint:<path>``.
        shape: shape of one stored value.
        dtype: the cache's dtype.
        wall_s: wall time of the whole run on the main process (model loading and merging included).
        embed_s: wall time of the embedding loop (the slowest process): decode, forward, write.
        decode_s: reading and decoding (worker seconds).
        wait_s: the forward loop waiting for decoded batches (decode starving the model).
        model_s: host-to-device copy, normalisation, forward pass and copy back.
        write_s: the background writer converting and committing (overlaps the forward pass).
        merge_s: merging per-process parts into the cache.
    """

    cache: str
    total: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    failures_path: str | None = None
    processes: int = 1
    device: str = "cpu"
    weights: str = ""
    shape: list = field(default_factory=list)
    dtype: str = "float16"
    wall_s: float = 0.0
    embed_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    merge_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images embedded per second of wall time."""
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


@dataclass
class _Share:
    """One process's part of the work and what became of it."""

    embedded: int = 0
    failures: list = field(default_factory=list)
    embed_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0


def embed(config: EmbedConfig) -> EmbedSummary:
    """Embed every image of ``config.images`` that ``config.out`` does not hold yet.

    Call it in every process of a distributed launch; each returns the same summary.

    Raises:
        EmbedError: bad sources, model or device settings.
        StoreError: the cache cannot be opened or was built with other settings
            (:class:`store.MetadataMismatch` names each differing field).
    """
    t_start = time.perf_counter()
    stop_with_launcher()  # workers of a killed launcher would otherwise run on as orphans
    state = _partial_state(config)
    device = _device(config, state)
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load_model(config, device)
    if config.decode_on_device:
        from .gpu import check_supported

        check_supported(loaded.data_config)
    plan = _plan(config, state, loaded)
    with state.split_between_processes(plan["todo"]) as mine:
        mine = list(mine)
    many = state.num_processes > 1
    target = config.part_path(state.process_index) if many else Path(config.out)
    share = _embed_share(config, loaded, mine, target, plan["producer"], device,
                         show_progress=config.progress and state.is_main_process)
    shares = _gather(share) if many else [share]
    merge_s = 0.0
    failures = [f for s in shares for f in s.failures]
    if state.is_main_process:
        t = time.perf_counter()
        if many:
            _merge_parts(config)
        merge_s = time.perf_counter() - t
        _write_failures(config.failures_path(), failures)
    if many:
        state.wait_for_everyone()
    return EmbedSummary(
        cache=config.out, total=plan["total"], embedded=sum(s.embedded for s in shares),
        skipped=plan["skipped"], failed=len(failures),
        failures_path=str(config.failures_path()) if failures else None,
        processes=state.num_processes, device=str(device), weights=loaded.weights,
        shape=list(loaded.token_shape), dtype=config.dtype, wall_s=time.perf_counter() - t_start,
        embed_s=max(s.embed_s for s in shares),
        decode_s=sum(s.decode_s for s in shares), wait_s=sum(s.wait_s for s in shares),
        model_s=sum(s.model_s for s in shares), write_s=sum(s.write_s for s in shares), merge_s=merge_s)


def _partial_state(config: EmbedConfig):
    from accelerate import PartialState

    # accelerate joins CPU processes (gloo) only when told it runs on the CPU
    return PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())


def _device(config: EmbedConfig, state) -> torch.device:
    if config.device is None:
        device = torch.device(state.device)
    elif config.device == "cpu":
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise EmbedError(f"--device {config.device}: no CUDA device is available")
    elif config.device == "cuda":
        device = torch.device(state.device) if torch.device(state.device).type == "cuda" else torch.device("cuda")
    elif state.num_processes > 1:
        raise EmbedError(f"--device {config.device}: names one GPU; with several processes leave --device "
                         "out and let accelerate assign one GPU per process")
    else:
        device = torch.device(config.device)
    if device.type != "cuda":
        if config.decode_on_device:
            raise EmbedError(f"--decode-on-device needs a CUDA device; this process runs on {device}")
        if config.precision == "bf16":
            raise EmbedError(f"--precision bf16 needs a CUDA device; this process runs on {device}")
    return device


def _precision(config: EmbedConfig, device: torch.device) -> str:
    if config.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return config.precision


def _run_fields(config: EmbedConfig, loaded: LoadedModel, device: torch.device) -> dict:
    """Producer fields recorded for information only: they may change between runs of one cache."""
    import timm

    decode = "cuda (nvjpeg)" if config.decode_on_device else "PIL"
    if config.draft and draft_target_of(loaded.pil_transform) is not None:
        decode += ", JPEG draft (DCT downscale, never below the resize target)"
    return {
        "weights": loaded.weights,
        "versions": {"timm": timm.__version__, "torch": torch.__version__},
        "decode": decode,
        "precision": _precision(config, device),
        "num_prefix_tokens": loaded.num_prefix_tokens,
        "embed_config": config.to_dict(),
    }


def _plan(config: EmbedConfig, state, loaded: LoadedModel) -> dict:
    """On the main process: prepare the cache and list the ids to embed; share that with all."""
    plan, error = None, None
    if state.is_main_process:
        try:
            plan = _prepare_cache(config, loaded, torch.device(loaded.device))
        except (EmbedError, StoreError) as e:
            if state.num_processes == 1:
                raise
            error, plan = e, {"error": f"{type(e).__name__}: {e}"}
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        plan = broadcast_object_list([plan])[0]
        if "error" in plan:
            if error is not None:
                raise error
            raise EmbedError(f"the main process stopped: {plan['error']}")
        if plan["weights_hash"] != loaded.weights_hash:
            raise EmbedError(f"process {state.process_index} loaded other weights than the main process "
                             f"({loaded.weights_hash} vs {plan['weights_hash']})")
    return plan


def _prepare_cache(config: EmbedConfig, loaded: LoadedModel, device: torch.device) -> dict:
    refs = scan(config.images, config.source, config.id_pattern)
    if not refs:
        raise SourceError(f"{', '.join(config.images)}: no images found")
    merged = _merge_parts(config)  # a killed distributed run's parts hold whole, committed values
    if merged:
        log.info("merged %d value(s) left by an earlier run's processes", merged)
    with CacheWriter(config.out, shape=loaded.token_shape, dtype=config.dtype, producer=loaded.identity(),
                     batch_size=config.batch_size) as cache:
        cache.update_producer(**_run_fields(config, loaded, device))
        todo_ids = set(cache.missing([r.id for r in refs]))
        producer = dict(cache.meta.producer)
    todo = [r for r in refs if r.id in todo_ids]
    log.info("%s: %d image(s), %d already in the cache, %d to embed", config.out, len(refs),
             len(refs) - len(todo), len(todo))
    return {"todo": todo, "total": len(refs), "skipped": len(refs) - len(todo), "producer": producer,
            "weights_hash": loaded.weights_hash}


def part_paths(config: EmbedConfig) -> list[Path]:
    """Parts ``CACHE.part<rank>`` present beside the cache, in rank order."""
    out = Path(config.out)
    pattern = re.compile(re.escape(out.name) + r"\.part(\d+)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _merge_parts(config: EmbedConfig) -> int:
    """Merge every part into the cache, then delete the parts; returns the values copied."""
    parts = part_paths(config)
    empty = [p for p in parts if not (p / "data.mdb").is_file()]
    for p in empty:  # a process killed before its first commit
        shutil.rmtree(p)
    parts = [p for p in parts if p not in empty]
    if not parts:
        return 0
    result = merge(config.out, parts)
    for p in parts:
        shutil.rmtree(p)
    return result["copied"]


def _num_workers(config: EmbedConfig) -> int:
    if config.num_workers is not None:
        return config.num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(1, local) - 1)  # leave a core per process to the forward pass


def _embed_share(config: EmbedConfig, loaded: LoadedModel, refs: list, target: Path, producer: dict,
                 device: torch.device, show_progress: bool) -> _Share:
    """Embed ``refs`` into the cache (or part) at ``target``."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    share = _Share()
    if not refs:
        return share
    t_loop = time.perf_counter()
    draft = draft_target_of(loaded.pil_transform) if config.draft else None
    dataset = ImageDataset(refs, loaded.pil_transform, config.max_pixels, draft, raw_jpeg=config.decode_on_device)
    workers = _num_workers(config)
    pin = config.pin_memory if config.pin_memory is not None else device.type == "cuda"
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin, prefetch_factor=4 if workers else None)
    batches = iter(loader)  # forks the workers now, before the writer thread exists
    precision = _precision(config, device)
    out_dtype = getattr(torch, config.dtype)
    bar = tqdm(total=len(refs), unit="img", desc="embed", disable=not show_progress, dynamic_ncols=True,
               mininterval=1.0)
    with CacheWriter(target, shape=loaded.token_shape, dtype=config.dtype, producer=producer,
                     identity=sorted(loaded.identity()), batch_size=2 * config.batch_size) as cache, \
            BackgroundWriter(cache, config.queue_size) as writer, bar, torch.inference_mode():
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            share.wait_s += time.perf_counter() - t
            if batch is None:
                break
            share.decode_s += batch.decode_s
            _note_failures(share, batch.failed)
            t = time.perf_counter()
            ids, pixels = _pixels_on_device(batch, loaded, device, share)
            if ids:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    tokens = loaded.forward_tokens(loaded.normalize(pixels))  # (B, L, D)
                values = tokens.to(out_dtype).cpu()
                if out_dtype != torch.bfloat16:
                    values = values.numpy()  # numpy has no bfloat16; the store converts torch tensors itself
            share.model_s += time.perf_counter() - t
            if ids:
                writer.put(ids, values)
            bar.update(len(batch))
            if share.failures:
                bar.set_postfix(failed=len(share.failures), refresh=False)
    share.embedded = cache.written
    share.write_s = writer.seconds
    share.embed_s = time.perf_counter() - t_loop
    return share


def _pixels_on_device(batch, loaded: LoadedModel, device: torch.device, share: _Share):
    """``(ids, (B, 3, H, W) pixels on device)``; JPEGs left raw are decoded on the device here."""
    ids = list(batch.ids)
    parts = []
    if batch.pixels is not None:
        parts.append(batch.pixels.to(device, non_blocking=True))
    if batch.jpegs:
        from .gpu import decode_resize_crop

        t = time.perf_counter()
        decoded, failed_idx = decode_resize_crop(batch.jpegs, loaded.data_config, device)
        share.decode_s += time.perf_counter() - t
        bad = set(failed_idx)
        _note_failures(share, [{"id": batch.jpeg_ids[i], "path": batch.jpeg_paths[i],
                                "reason": "truncated or corrupt JPEG (nvjpeg could not decode it)"}
                               for i in failed_idx])
        ids += [i for k, i in enumerate(batch.jpeg_ids) if k not in bad]
        if decoded is not None:
            parts.append(decoded)
    if not parts:
        return [], None
    pixels = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts])  # (B, 3, H, W)
    return ids, pixels


def _note_failures(share: _Share, failed: list) -> None:
    for f in failed:
        if len(share.failures) < _FAILURES_LOGGED:
            log.warning("cannot embed id %s (%s): %s", f["id"], f["path"], f["reason"])
        elif len(share.failures) == _FAILURES_LOGGED:
            log.warning("more images failed; see the failures report at the end")
        share.failures.append(f)


def _gather(share: _Share) -> list:
    from accelerate.utils import gather_object

    return gather_object([share])


def _write_failures(path: Path, failures: list) -> None:
    """Write this run's failures as JSON lines (replacing an earlier run's report), or remove a stale one."""
    if not failures:
        if path.exists():
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in sorted(failures, key=lambda d: d["id"]):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    log.warning("%d image(s) failed; listed in %s", len(failures), path)
