"""Batches: records -> tokens (in the DataLoader workers) -> plus cache values (in the loading process).

The values are looked up where the batch is consumed, not in the workers. The cache is a memory
map of the page cache, so this process can copy each value once, straight into the batch array;
looked up in a worker, a value would be copied into the worker, then into a fresh shared-memory
segment per batch (with a page fault per 4 KiB), then mapped here: 1,900 samples/s against 10,000
on the 2-core dev VM (``bench/stream_bench.py``, 196x768 float16, batch 64, 2 workers). Workers
still open the caches, lazily, to drop records with missing ids when that is allowed
(:class:`DropMissing`).
"""

import logging

try:
    import fcntl
except ImportError:  # not Unix
    fcntl = None

import numpy as np
import torch

from store import CorruptValueError, MissingIdError

from ..errors import PipelineError
from ..metrics.vqa import target_answer
from .tokens import char_limit, cut_text, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_ID_FIELD = "image_id"


def _record_ids(samples, modality, field_name):
    ids = []
    for s in samples:
        if field_name not in s:
            raise PipelineError(f"question {s.get('question_id')}: record has no {field_name} "
                                f"(the id of modality {modality!r})")
        ids.append(str(s[field_name]))
    return ids


class DropMissing:
    """Stream stage: drop records whose id a cache lacks (used only when that is allowed; the
    pre-flight check has counted them)."""

    def __init__(self, readers: dict, id_fields: dict):
        self.readers, self.id_fields = readers, id_fields

    def __call__(self, src):
        for rec in src:
            ids = {n: str(rec.get(self.id_fields.get(n, DEFAULT_ID_FIELD))) for n in self.readers}
            if all(ids[n] in r for n, r in self.readers.items()):
                yield rec


class Collate:
    """Records -> a batch without the cache values: padded tokens, ids and the metric's fields.

    Runs in the DataLoader workers. Arrays are numpy (pickled inline to the main process: cheaper
    than one shared-memory segment per small tensor); :class:`AttachVectors` makes them tensors.
    The tokenizer is loaded on first use in each process and never pickled. Questions and targets
    are cut to :func:`~pipelines.data.tokens.char_limit` characters first (the tokens are the same;
    a huge text costs no more than a long one), with a warning for the first text cut.
    """

    def __init__(self, modalities: dict, tokenizer: str = "byt5", max_question_len: int = 128,
                 max_answer_len: int = 32):
        self.modalities = dict(modalities)  # modality -> record id field
        self.tokenizer_name, self.max_question_len, self.max_answer_len = tokenizer, max_question_len, max_answer_len
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
                    log.warning("question %s: its %s has %s characters: cut to %s before tokenizing (its first "
                                "%d tokens are kept either way); other long texts are cut without a warning",
                                sample.get("question_id"), what, f"{len(text):,}", f"{char_limit(max_length):,}",
                                max_length)
                    self._warned = True
                    break
        return out

    def __call__(self, samples: list) -> dict:
        questions = self.cut(samples, [s["question"] for s in samples], self.max_question_len, "question")
        # a question of a split without annotations (VQA's test splits) is answered, never trained on
        targets = self.cut(samples, [target_answer(s["answers"]) if s["answers"] else "" for s in samples],
                           self.max_answer_len, "answer")
        input_ids, attention_mask = self.tokenizer.encode_batch(questions, self.max_question_len)  # (B, Lq)
        answer_ids, answer_mask = self.tokenizer.encode_batch(targets, self.max_answer_len)  # (B, La)
        return {
            "input_ids": input_ids.numpy(),
            "attention_mask": attention_mask.numpy(),
            "labels": answer_ids.masked_fill(answer_mask == 0, -100).numpy(),
            "ids": {name: _record_ids(samples, name, f) for name, f in self.modalities.items()},
            "question_id": np.array([int(s["question_id"]) for s in samples], dtype=np.int64),
            "image_id": [str(s["image_id"]) for s in samples],
            "question": questions,
            "answers": [list(s["answers"]) for s in samples],
            "answer_type": [s["answer_type"] for s in samples],
            "question_type": [s.get("question_type", "") for s in samples],
            "target": targets,
        }


class AttachVectors:
    """Completes a :class:`Collate` batch where it is consumed: numpy -> tensors, and
    ``batch["vectors"][name]`` = the cache values of ``batch["ids"][name]``, (B, *value shape), in
    the cache's dtype (float16, bfloat16 or float32), each copied once from the memory map."""

    def __init__(self, readers: dict):
        self.readers = readers

    def values(self, name: str, ids: list) -> torch.Tensor:
        reader = self.readers[name]
        try:
            out = reader.get_batch(ids)  # (B, *value shape), valid after forks: a copy
        except (MissingIdError, CorruptValueError) as e:
            hint = " (run the pre-flight check first)" if isinstance(e, MissingIdError) else ""
            raise type(e)(f"{name} {e}{hint}") from None
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if reader.meta.dtype == "bfloat16" else t

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        for key in ("input_ids", "attention_mask", "labels", "question_id"):
            out[key] = torch.as_tensor(batch[key])
        out["vectors"] = {name: self.values(name, ids) for name, ids in batch["ids"].items()}
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
