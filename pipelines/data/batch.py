"""Batches: examples -> tokens (in the DataLoader workers) -> plus cache values (in the loading process).

The values are looked up where the batch is consumed, not in the workers. The cache is a memory
map of the page cache, so this process can copy each value once, straight into the batch array;
looked up in a worker, a value would be copied into the worker, then into a fresh shared-memory
segment per batch (with a page fault per 4 KiB), then mapped here: 1,900 samples/s against 10,000
on the 2-core dev VM (``bench/stream_bench.py``, 196x768 float16, batch 64, 2 workers). Workers
still open the caches, lazily, to drop records with missing ids when that is allowed
(:class:`DropMissing`).
"""

import logging

import numpy as np

try:
    import fcntl
except ImportError:  # not Unix
    fcntl = None

import torch

from store import CorruptValueError, MissingIdError

from ..errors import PipelineError
from .inline import batch_values, is_inline
from .tokens import char_limit, cut_text, load_tokenizer

log = logging.getLogger(__name__)


def missing_field(example: dict, kind: str, name: str) -> PipelineError:
    """The error for an example without the ``kind`` (``texts``, ``vectors``) field ``name``."""
    what = "text" if kind == "texts" else "vector"
    fields = ", ".join([*example["texts"], *example["vectors"]]) or "none"
    return PipelineError(f"example {example.get('id')}: has no {what} field {name!r} (its fields: {fields})")


def field_values(samples: list, kind: str, name: str) -> list:
    """Each example's ``kind`` (``texts`` or ``vectors``) field ``name``; a vector field's id as str."""
    out = []
    for s in samples:
        value = s[kind].get(name)
        if value is None:
            raise missing_field(s, kind, name)
        out.append(str(value) if kind == "vectors" else value)
    return out


class DropMissing:
    """Stream stage: drop examples whose id a cache lacks (used only when that is allowed; the
    pre-flight check has counted them)."""

    def __init__(self, readers: dict):
        self.readers = readers

    def __call__(self, src):
        for rec in src:
            if all(str(rec["vectors"].get(n)) in r for n, r in self.readers.items()):
                yield rec


def bucket_length(length: int, multiple: int, cap: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, at most ``cap`` (``multiple`` 1: as is)."""
    return min(-(-length // multiple) * multiple, max(cap, length))


def pad_columns(array, length: int, value: int):
    """``array`` (B, L) right-padded with ``value`` to ``length`` columns."""
    extra = length - array.shape[1]
    return array if extra <= 0 else np.pad(array, ((0, 0), (0, extra)), constant_values=value)


class Collate:
    """Examples -> a batch without the cache values: each text field's padded tokens, the target's,
    the vector fields' ids and the metric's fields.

    Runs in the DataLoader workers. Arrays are numpy (pickled inline to the main process: cheaper
    than one shared-memory segment per small tensor); :class:`AttachVectors` makes them tensors.
    The tokenizer is loaded on first use in each process and never pickled. Texts and targets are
    cut to :func:`~pipelines.data.tokens.char_limit` characters first (the tokens are the same; a
    huge text costs no more than a long one), with a warning for the first text cut.

    Args:
        texts: text field -> its token limit (the fused text fields).
        vectors: the vector fields whose ids the batch carries.
        tokenizer: see :func:`~pipelines.data.tokens.load_tokenizer`.
        max_answer_len: the target's token limit.
        inline: the vector fields whose values the examples carry (:mod:`pipelines.data.inline`):
            stacked here, in the worker, as ``batch["inline"][name]`` (B, *shape).
        pad_multiple: pad each text field and the target to a multiple of this many tokens (at most
            its limit), so that a compiled step sees a few shapes instead of one per longest text; 1:
            to the batch's longest.
    """

    def __init__(self, texts: dict, vectors=(), tokenizer: str = "byt5", max_answer_len: int = 32, inline=(),
                 pad_multiple: int = 1):
        self.texts, self.vectors, self.inline = dict(texts), list(vectors), list(inline)
        self.pad_multiple = pad_multiple
        self.tokenizer_name, self.max_answer_len = tokenizer, max_answer_len
        self._tokenizer = None
        self._warned = False  # about a cut text: once per process and stream

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def cut(self, samples: list, texts: list, max_length: int, what: str) -> list:
        """``texts`` cut by :func:`~pipelines.data.tokens.cut_text`; the first one cut is logged."""
        out = [cut_text(t, max_length) for t in texts]
        if not self._warned:
            for sample, text, kept in zip(samples, texts, out):
                if len(kept) < len(text):
                    log.warning("example %s: its %s has %s characters: cut to %s before tokenizing (its first "
                                "%d tokens are kept either way); other long texts are cut without a warning",
                                sample.get("id"), what, f"{len(text):,}", f"{char_limit(max_length):,}",
                                max_length)
                    self._warned = True
                    break
        return out

    def __call__(self, samples: list) -> dict:
        texts, tokens = {}, {}
        for name, max_len in self.texts.items():
            texts[name] = self.cut(samples, field_values(samples, "texts", name), max_len, name)
            ids, mask = self.tokenizer.encode_batch(texts[name], max_len)  # (B, L_name)
            length = bucket_length(ids.shape[1], self.pad_multiple, max_len)
            tokens[name] = (pad_columns(ids.numpy(), length, self.tokenizer.pad_token_id), pad_columns(mask.numpy(), length, 0))
        # an example without annotations (VQA's test splits) is answered, never trained on
        targets = self.cut(samples, [s["target"] for s in samples], self.max_answer_len, "target")
        answer_ids, answer_mask = self.tokenizer.encode_batch(targets, self.max_answer_len)  # (B, La)
        labels = answer_ids.masked_fill(answer_mask == 0, -100).numpy()
        return {
            "tokens": tokens,
            "labels": pad_columns(labels, bucket_length(labels.shape[1], self.pad_multiple, self.max_answer_len), -100),
            "ids": {name: field_values(samples, "vectors", name) for name in self.vectors},
            "id": [s["id"] for s in samples],
            "texts": texts,
            "target": targets,
            "references": [list(s["references"]) for s in samples],
            "groups": [s.get("groups") or {} for s in samples],
            "inline": {name: batch_values(samples, name) for name in self.inline},
        }


class AttachVectors:
    """Completes a :class:`Collate` batch where it is consumed: numpy -> tensors, and
    ``batch["vectors"][name]`` = the cache values of ``batch["ids"][name]``, (B, *value shape), in
    the cache's dtype (float16, bfloat16 or float32), each copied once from the memory map, or the
    values the batch carries (an inline field: :mod:`pipelines.data.inline`)."""

    def __init__(self, readers: dict):
        self.readers = readers

    def values(self, name: str, batch: dict) -> torch.Tensor:
        reader = self.readers[name]
        if is_inline(reader):
            out = batch["inline"][name]  # (B, *value shape), stacked by the worker
        else:
            out = self.lookup(name, batch["ids"][name])
        t = torch.as_tensor(out)
        return t.view(torch.bfloat16) if reader.meta.dtype == "bfloat16" else t

    def lookup(self, name: str, ids: list):
        reader = self.readers[name]
        try:
            return reader.get_batch(ids)  # (B, *value shape), valid after forks: a copy
        except (MissingIdError, CorruptValueError) as e:
            hint = " (run the pre-flight check first)" if isinstance(e, MissingIdError) else ""
            raise type(e)(f"{name} {e}{hint}") from None

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        out["tokens"] = {name: (torch.as_tensor(ids), torch.as_tensor(mask)) for name, (ids, mask) in batch["tokens"].items()}
        out["labels"] = torch.as_tensor(batch["labels"])
        out["vectors"] = {name: self.values(name, batch) for name in self.readers if name in batch["ids"]}
        out.pop("inline", None)
        return out


def as_is(batch):
    """``collate_fn`` for a DataLoader of ready batches: keep numpy arrays numpy (the default would
    move each into its own shared-memory segment)."""
    return batch


RESULT_PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


def widen_result_pipe(batches) -> bool:
    """Let the workers' batches queue up in the pipe that carries them to this process.

    The pipe holds 64 KiB by default, less than one batch of tokens and texts (~80 KiB at batch 64),
    so while this process copies cache values, a worker's sending thread blocks mid-batch and then
    waits for its process' GIL to write the rest. With 1 MiB the training stream of
    ``bench/stream_bench.py`` ran ~25% faster on the 2-core dev VM. The pipe is a private detail of
    torch's DataLoader iterator (``_worker_result_queue``): without it, or if Linux refuses, nothing
    changes.

    Returns:
        Whether the pipe was widened.
    """
    reader = getattr(getattr(batches, "_worker_result_queue", None), "_reader", None)
    if reader is None or not hasattr(fcntl, "F_SETPIPE_SZ"):  # F_SETPIPE_SZ: Linux only
        return False
    try:
        fcntl.fcntl(reader.fileno(), fcntl.F_SETPIPE_SZ, RESULT_PIPE_BYTES)
    except OSError as e:  # e.g. over the per-user pipe limit: the default pipe still works
        log.debug("cannot widen the DataLoader's result pipe: %s", e)
        return False
    return True


class VectorLoader:
    """Iterates a DataLoader of :class:`Collate` batches and attaches the cache values.

    Attributes:
        loader: the underlying ``torch.utils.data.DataLoader``.
    """

    def __init__(self, loader, attach: AttachVectors):
        self.loader, self.attach = loader, attach

    def __iter__(self):
        batches = iter(self.loader)
        widen_result_pipe(batches)
        for batch in batches:
            yield self.attach(batch)

    def __len__(self) -> int:
        return len(self.loader)  # map-style (eval) loaders only
