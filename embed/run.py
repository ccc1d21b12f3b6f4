"""``embed(config)``: images, audio or video -> encoder tokens -> the LMDB cache, resumable and distributed.

One loop for every modality: a per-modality embedder (:mod:`embed.modality`) scans the sources,
decodes in DataLoader workers (bad input becomes a failure, odd input a flag, never an exception)
and runs the model; this module plans, splits, writes, merges and reports.

One process or many (``accelerate launch -m embed``). The main process scans the sources, merges
cache parts a killed run left behind, opens the cache (refusing one made by another model,
weights or preprocessing) and finds the ids still missing; it broadcasts them and every process
embeds a contiguous share. A single process writes straight into the cache; with several, each
writes its own part ``CACHE.part{rank}`` (a separate LMDB: one writer per environment), and the
main process merges the parts and deletes them at the end. Every batch is committed in its own
transaction, so a kill loses at most the batches in flight and never a partial value. A launched
process stops when its launcher dies (:mod:`embed.launcher`).
"""

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
from .errors import EmbedError, SourceError
from .launcher import stop_with_launcher
from .modality import make_embedder
from .reports import flag_counts, write_failures, write_flags
from .writer import BackgroundWriter

log = logging.getLogger(__name__)
_FAILURES_LOGGED = 5  # per process; the rest are only in the failures report


@dataclass
class EmbedSummary:
    """What a run did. Times are summed over processes; ``decode_s`` over DataLoader workers too.

    Attributes:
        cache: the cache directory.
        total: sources (images, audio or video files) found.
        embedded: sources embedded and written by this run.
        skipped: sources already in the cache (not recomputed).
        failed: sources that could not be embedded (listed in ``failures_path``).
        failures_path: the failures report, or None when nothing failed.
        flagged: sources embedded with a remark (padded, cropped, windowed, resampled, silent...).
        flag_counts: how many sources carry each kind of flag (``padded``, ``cropped``, ...).
        flags_path: the flags report (JSON lines), or None when nothing is flagged.
        values: values written (more than ``embedded`` when ``--windows`` splits long files).
        modality: ``image``, ``audio`` or ``video``.
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
    flagged: int = 0
    flag_counts: dict = field(default_factory=dict)
    flags_path: str | None = None
    values: int = 0
    modality: str = "image"
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
    values: int = 0
    failures: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    embed_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0


def embed(config: EmbedConfig) -> EmbedSummary:
    """Embed every source of ``config.images`` that ``config.out`` does not hold yet.

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
    embedder = make_embedder(config, device)
    loaded = embedder.model
    plan = _plan(config, state, embedder)
    with state.split_between_processes(plan["todo"]) as mine:
        mine = list(mine)
    many = state.num_processes > 1
    target = config.part_path(state.process_index) if many else Path(config.out)
    share = _embed_share(config, embedder, mine, target, plan["producer"], device,
                         show_progress=config.progress and state.is_main_process)
    shares = _gather(share) if many else [share]
    merge_s = 0.0
    failures = [f for s in shares for f in s.failures]
    flags = [f for s in shares for f in s.flags]
    if state.is_main_process:
        t = time.perf_counter()
        if many:
            _merge_parts(config)
        merge_s = time.perf_counter() - t
        write_failures(config.failures_path(), failures)
        flags = write_flags(config.flags_path(), flags, [r.id for r in plan["todo"]])
    if many:
        state.wait_for_everyone()
    return EmbedSummary(
        cache=config.out, total=plan["total"], embedded=sum(s.embedded for s in shares),
        skipped=plan["skipped"], failed=len(failures),
        failures_path=str(config.failures_path()) if failures else None,
        flagged=len(flags), flag_counts=flag_counts(flags), flags_path=str(config.flags_path()) if flags else None,
        values=sum(s.values for s in shares), modality=config.modality,
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


def _plan(config: EmbedConfig, state, embedder) -> dict:
    """On the main process: prepare the cache and list the ids to embed; share that with all."""
    plan, error = None, None
    if state.is_main_process:
        try:
            plan = _prepare_cache(config, embedder, torch.device(embedder.model.device))
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
        if plan["weights_hash"] != embedder.model.weights_hash:
            raise EmbedError(f"process {state.process_index} loaded other weights than the main process "
                             f"({embedder.model.weights_hash} vs {plan['weights_hash']})")
    return plan


def _prepare_cache(config: EmbedConfig, embedder, device: torch.device) -> dict:
    refs = embedder.scan()
    if not refs:
        raise SourceError(f"{', '.join(config.images)}: no {config.modality} files found")
    loaded = embedder.model
    merged = _merge_parts(config)  # a killed distributed run's parts hold whole, committed values
    if merged:
        log.info("merged %d value(s) left by an earlier run's processes", merged)
    with CacheWriter(config.out, shape=loaded.token_shape, dtype=config.dtype, producer=loaded.identity(),
                     batch_size=config.batch_size) as cache:
        cache.update_producer(**embedder.run_fields(), precision=_precision(config, device),
                              embed_config=config.to_dict())
        todo_keys = set(cache.missing([embedder.done_key(r) for r in refs]))
        producer = dict(cache.meta.producer)
    todo = [r for r in refs if embedder.done_key(r) in todo_keys]
    log.info("%s: %d %s(s), %d already in the cache, %d to embed", config.out, len(refs), embedder.noun,
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


def _embed_share(config: EmbedConfig, embedder, refs: list, target: Path, producer: dict,
                 device: torch.device, show_progress: bool) -> _Share:
    """Embed ``refs`` into the cache (or part) at ``target``."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    share = _Share()
    if not refs:
        return share
    t_loop = time.perf_counter()
    loaded = embedder.model
    dataset, collate = embedder.dataset(refs)
    workers = _num_workers(config)
    pin = config.pin_memory if config.pin_memory is not None else device.type == "cuda"
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin, prefetch_factor=4 if workers else None)
    batches = iter(loader)  # forks the workers now, before the writer thread exists
    precision = _precision(config, device)
    out_dtype = getattr(torch, config.dtype)
    bar = tqdm(total=len(refs), unit=embedder.noun, desc="embed", disable=not show_progress, dynamic_ncols=True,
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
            share.flags += getattr(batch, "flagged", [])
            t = time.perf_counter()
            ids, inputs, failed, device_decode_s = embedder.on_device(batch, device)
            share.decode_s += device_decode_s
            _note_failures(share, failed)
            if ids:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    # rows (windows of long files) beyond a batch run as further forward passes
                    tokens = torch.cat([embedder.forward(part) for part in _rows(inputs, config.batch_size)])
                values = tokens.to(out_dtype).cpu()  # (B, L, D)
                if out_dtype != torch.bfloat16:
                    values = values.numpy()  # numpy has no bfloat16; the store converts torch tensors itself
            share.model_s += time.perf_counter() - t
            if ids:
                writer.put(ids, values)
            share.embedded += len(batch) - len(batch.failed) - len(failed)
            bar.update(len(batch))
            if share.failures:
                bar.set_postfix(failed=len(share.failures), refresh=False)
    share.values = cache.written
    share.write_s = writer.seconds
    share.embed_s = time.perf_counter() - t_loop
    return share


def _rows(inputs, size: int) -> list:
    """``inputs`` (a tensor, or a dict of tensors with one leading dimension) in slices of ``size`` rows."""
    n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    if n <= size:
        return [inputs]
    if isinstance(inputs, dict):
        return [{k: v[i:i + size] for k, v in inputs.items()} for i in range(0, n, size)]
    return [inputs[i:i + size] for i in range(0, n, size)]


def _note_failures(share: _Share, failed: list) -> None:
    for f in failed:
        if len(share.failures) < _FAILURES_LOGGED:
            log.warning("cannot embed id %s (%s): %s", f["id"], f["path"], f["reason"])
        elif len(share.failures) == _FAILURES_LOGGED:
            log.warning("more items failed; see the failures report at the end")
        share.failures.append(f)


def _gather(share: _Share) -> list:
    from accelerate.utils import gather_object

    return gather_object([share])
