"""``TrainConfig``: everything ``fuse-train`` varies, its presets, and how a config file merges in.

Precedence: a preset's values, then the config file (YAML or JSON), then the flags given on the
command line. The resolved config is saved as ``OUT/config.json`` and in ``results.json``.
"""

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

from fuse import FusionSpec, coerce_pools

from ..data.example import DEFAULT_TEXT_LEN

SCHEDULES = ("linear", "cosine", "constant_with_warmup")
OPTIMIZERS = ("adamw", "adafactor")
PRECISIONS = ("no", "bf16", "fp16")
IMAGE_SOURCES = ("cache", "online")
TEXT = "question"  # VQA's text field

# Named presets (flags and the config file override them).
TRAIN_PRESETS = {
    # The thesis' models: t5-base from the hub over ViT-B/16 tokens (196×768) from the cache (the thesis
    # also fixes the data protocol: a random 80/20 split, best and last accuracy). The thesis gives no
    # optimisation settings: batch 128, lr 1e-4, AdamW, 20k steps and bf16 are ours.
    "paper": dict(t5="google-t5/t5-base", tokenizer="google-t5/t5-base", fuse="0:question 0:image",
                  batch_size=128, lr=1e-4, optimizer="adamw", steps=20000, eval_every=2000,
                  mixed_precision="bf16", expect={"image": {"shape": [196, 768],
                                                            "producer": {"model": "vit_base_patch16_224"}}}),
    # Trains on the CPU of a 2-core machine in minutes: the small demo T5 (word tokens) over the demo
    # ViT's 9 tokens joined mid-encoder (before block 2 of 4), with a position embedding per image
    # token (T5 has no absolute positions). The fusion layer is the most accurate of 0, 2 and 4 on
    # the quickstart's data at 3,000 steps: 92.6 / 92.7 / 92.0% (README, "fuse-train").
    "demo": dict(t5="demo", tokenizer="words", fuse="0:question 2:image", positions="image", batch_size=64,
                 lr=2.5e-4, steps=3000, eval_every=1000, warmup=0.06, eval_limit=2000,
                 expect={"image": {"producer": {
                     "model": "vit_shapes_patch16_48",
                     # its shipped weights as embed hashes them (scripts/demo_vit.py prints it): a cache
                     # embedded with other (random) weights is refused, naming producer.weights_hash
                     "weights_hash": "sha256:532f9c2ef6546ef9138271e256727c2dcca38e020f97a1c073fbd0c9eb26c1f9"}}}),
}

# Settings a --resume may change: where the run is, how it is shown and how many threads or which
# device compute it, none of what it computes (a preset is only a name: its values are compared).
# Every other one (the model, the data and its order, the optimizer, the schedule, the evaluation)
# must be the checkpoint's: the continued run would otherwise be another run under the same name,
# its history mixing two.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "stop_at", "progress", "log_every", "threads", "device", "preset",
                     "compile", "pad_multiple")


@dataclass
class TrainConfig:
    """A training run. Field names are the CLI flags (``batch_size`` is ``--batch-size``).

    Attributes:
        shards: folder written by ``vqa-data shards`` (train and eval sides, manifest).
        caches: vector field -> embedding cache (``--cache image=PATH``). A field of ``fuse`` with a cache
            is a vector field, looked up by its own id; one without is a text field of the data.
            ``inline`` (the default for a field the shards carry): the values come with the shards.
        out: run directory.
        t5: a T5 preset of ``fuse.T5_PRESETS`` (random weights), a hub name or a local directory.
        fuse: fusion spec, e.g. ``"0:question 6:image"`` or ``"0:title,question 4:image 7:audio"``: any
            text and vector fields of the data (the shards' manifest lists them).
        text_len: text field -> its token limit (``--text-len title=32``; default 128 each).
        pool: pooling per vector modality, e.g. ``"image:attention:14"`` (empty: none).
        positions: vector modalities whose tokens get a learned position embedding, e.g. ``"image"``
            (empty: none; see :class:`fuse.FusionT5Config`).
        decoder_layers: the decoder's depth: the first N blocks of a pretrained T5 (1 to its depth), or
            N random blocks of a preset, more than its own if asked (default: the model's own).
        expect: modality -> partial cache metadata the model needs (refuses other caches).
        warmup: fraction of the steps (< 1) or a number of steps.
        eval_limit: score the first N questions of the selection side at each evaluation (default or
            0: all); the eval side's final score, when a select side picks the checkpoint, takes all.
        image_source: ``cache`` reads the cache; ``online`` runs the ViT on the images each step.
        threads: torch threads for CPU work; default: every CPU of the process (the stream's
            workers sleep while the batches they made wait: :meth:`cpu_threads`). Give fewer when
            other work shares the CPU (``fuse-sweep --parallel`` and ``fuse-avdemo`` split it).
        compile: ``torch.compile`` the training step's forward and backward (once per padded shape:
            ``pad_multiple``); evaluation runs the model as it is.
        pad_multiple: pad each text field and the answer to a multiple of this many tokens; default
            8 with ``compile`` (a few shapes, each compiled once), else 1 (each batch's longest).
        stop_at: stop after this step with a checkpoint, as a time-boxed job would, to continue
            later with ``resume`` (the schedule still runs to ``steps``).
    """

    shards: str = ""
    caches: dict = field(default_factory=dict)
    out: str = "runs/train"
    preset: str = ""
    t5: str = "demo"
    tokenizer: str = "byt5"
    fuse: str = "0:question 0:image"
    text_len: dict = field(default_factory=dict)
    pool: str = ""
    positions: str = ""
    decoder_layers: int | None = None
    expect: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "linear"
    warmup: float = 0.05
    clip: float = 1.0
    dropout: float = 0.0
    eval_every: int = 500
    eval_limit: int | None = None
    log_every: int = 10
    max_answer_len: int = 16
    max_new_tokens: int = 16
    shuffle_buffer: int = 2000
    num_workers: int = 2
    threads: int | None = None
    compile: bool = False
    pad_multiple: int | None = None
    allow_missing: bool = False
    seed: int = 0
    mixed_precision: str = "no"
    device: str = "auto"
    image_source: str = "cache"
    resume: bool = False
    stop_at: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name, value, choices in (("--optimizer", self.optimizer, OPTIMIZERS),
                                     ("--schedule", self.schedule, SCHEDULES),
                                     ("--mixed-precision", self.mixed_precision, PRECISIONS),
                                     ("--image-source", self.image_source, IMAGE_SOURCES)):
            if value not in choices:
                raise ValueError(f"{name} {value}: choose one of {', '.join(choices)}")
        for name in ("steps", "batch_size", "eval_batch_size", "grad_accum", "eval_every", "log_every",
                     "max_answer_len", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 0):
            raise ValueError(f"--eval-limit {self.eval_limit}: must be 0 (all) or a positive integer")
        for name in ("threads", "stop_at", "pad_multiple"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
        if not isinstance(self.warmup, (int, float)) or self.warmup < 0:
            raise ValueError(f"--warmup {self.warmup}: must be a fraction of the steps (< 1) or a number of steps")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"--lr {self.lr}: must be positive")
        for name, value, high in (("--dropout", self.dropout, 1.0), ("--clip", self.clip, None),
                                  ("--weight-decay", self.weight_decay, None)):
            if not isinstance(value, (int, float)) or value < 0 or (high is not None and value >= high):
                bound = f"in [0, {high})" if high is not None else ">= 0 (0: off)"
                raise ValueError(f"{name} {value}: must be a number {bound}")
        if self.decoder_layers is not None and self.decoder_layers < 1:
            raise ValueError(f"--decoder-layers {self.decoder_layers}: the decoder needs at least 1 block")
        FusionSpec.coerce(self.fuse)  # raises FusionSpecError naming --fuse
        pools = coerce_pools(self.pool or None)  # raises PoolSpecError naming --pool
        for name in self._positions():
            if name not in self.caches:
                raise ValueError(f"--positions {name}: not a vector modality of --fuse {self.fuse} (no --cache "
                                 f"{name}=PATH)")
        for name in pools:
            if name in self.fused_modalities() and name not in self.caches:
                raise ValueError(f"--pool {name}: not a vector modality of --fuse {self.fuse} (no --cache {name}=PATH)")
        if not isinstance(self.text_len, dict):
            raise ValueError(f"--text-len {self.text_len}: give FIELD=TOKENS")
        for name, n in self.text_len.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"--text-len {name}={n}: must be a positive number of tokens")
            if name not in self.text_fields():
                raise ValueError(f"--text-len {name}: not a text field of --fuse {self.fuse}")

    def text_fields(self) -> list:
        """The fused fields without a cache: text fields of the data, in join order."""
        return [name for name in self.fused_modalities() if name not in self.caches]

    def vector_fields(self) -> list:
        """The fused fields with a cache, in join order."""
        return [name for name in self.fused_modalities() if name in self.caches]

    def text_lens(self) -> dict:
        """Text field -> its token limit."""
        return {name: self.text_len.get(name, DEFAULT_TEXT_LEN) for name in self.text_fields()}

    def check_fields(self, fields: dict, where: str = "the shards") -> None:
        """Refuse a ``--fuse`` or ``--cache`` naming a field the data lacks, before any step.

        Args:
            fields: ``{"texts": [...], "vectors": [...]}`` of the data (its manifest's ``fields``).
            where: the data, for messages.

        Raises:
            ValueError: naming the field, what it would be, and the data's fields.
        """
        texts, vectors = list(fields.get("texts", [])), list(fields.get("vectors", []))
        has = f"text fields: {', '.join(texts) or 'none'}; vector fields: {', '.join(vectors) or 'none'}"
        for name in self.text_fields():
            if name in vectors:
                raise ValueError(f"--fuse {self.fuse}: '{name}' is a vector field of {where}: give its cache with "
                                 f"--cache {name}=PATH")
            if name not in texts:
                raise ValueError(f"--fuse {self.fuse}: {where} have no field '{name}' ({has})")
        for name in self.caches:
            if name not in vectors:
                what = "a text field" if name in texts else "no field"
                raise ValueError(f"--cache {name}=PATH: {where} have {what} '{name}', so no id to look it up "
                                 f"by ({has})")

    def position_modalities(self) -> list:
        """The fused vector modalities named in ``positions`` (split on spaces or commas); a modality
        with a cache but not in ``fuse`` (a question-only run of a preset) gets none."""
        return [name for name in self._positions() if name in self.fused_modalities()]

    def _positions(self) -> list:
        return sorted(set(self.positions.replace(",", " ").split()))

    @cached_property
    def _fused(self) -> tuple:
        return tuple(FusionSpec.coerce(self.fuse).modalities())

    def fused_modalities(self) -> list:
        """Every modality of the fusion spec, in join order (parsed once per config)."""
        return list(self._fused)

    def cpu_threads(self, num_processes: int = 1) -> int:
        """torch's CPU threads per process: ``threads``, else every core of the process' share.

        The stream's workers need little CPU (about 1% of a demo step's time) and sleep while their
        prefetched batches wait, so they leave the cores to torch: on a quiet 2-core machine the
        demo step ran 1.7x faster at 2 threads than at 1 beside 2 workers (README, "fuse-train").
        Threads that share their cores with other busy processes thrash (an evaluation at 2 threads
        on a 2-core machine busy with other work: 53 questions/s, at 1 thread 650-780): runs side by
        side give each its share (``fuse-sweep --parallel``, ``fuse-avdemo`` do).
        """
        return self.threads or max(1, (os.cpu_count() or 1) // num_processes)

    def pad_length(self) -> int:
        """The multiple text and answer tokens are padded to in training (``pad_multiple``)."""
        return self.pad_multiple or (8 if self.compile else 1)

    def tokenizer_path(self) -> str:
        """``words`` is the word-level tokenizer ``vqa-data shards`` writes beside the shards."""
        return str(Path(self.shards) / "tokenizer") if self.tokenizer == "words" else self.tokenizer

    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, saved: dict, ignore=()) -> list:
        """``[(setting, saved value, this value)]`` for each setting whose value differs from ``saved``
        (a :meth:`to_dict` read back from JSON), in field order. A setting ``saved`` lacks (written
        by an older version) counts as its default; one this version does not know is ignored."""
        mine = json.loads(json.dumps(self.to_dict()))  # the JSON types ``saved`` has: lists, not tuples
        out = []
        for f in fields(self):
            if f.name in ignore:
                continue
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            theirs = saved.get(f.name, json.loads(json.dumps(default)))
            if theirs != mine[f.name]:
                out.append((f.name, theirs, mine[f.name]))
        return out

    @staticmethod
    def flag(name: str) -> str:
        """The CLI flag of a setting: ``batch_size`` -> ``--batch-size``, ``caches`` -> ``--cache``."""
        return "--cache" if name == "caches" else "--" + name.replace("_", "-")

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def resolve(cls, preset: str = "", file: str = None, **flags) -> "TrainConfig":
        """Preset, then config file, then flags (``None`` flags are not given).

        A fused field whose values the shards carry (``vqa-data shards --inline``) and that has no
        ``--cache`` gets ``--cache FIELD=inline``. A preset's positions and cache expectations apply only
        to the vector fields the final ``fuse`` has (fused, with a cache), so ``--preset demo --fuse 0:question`` is the preset's question-only
        model, no cache needed, and ``--preset demo`` without ``--cache`` resolves (the data's check
        then asks for the cache).
        """
        values, own = {}, {}
        if preset:
            if preset not in TRAIN_PRESETS:
                raise ValueError(f"--preset {preset}: unknown (known: {', '.join(TRAIN_PRESETS)})")
            values.update(TRAIN_PRESETS[preset], preset=preset)
            own = {k: v for k, v in TRAIN_PRESETS[preset].items() if k in ("positions", "expect")}
        if file:
            given = read_config_file(file)
            values.update(given)
            own = {k: v for k, v in own.items() if k not in given}
        given = {k: v for k, v in flags.items() if v is not None}
        values.update(given)
        own = {k: v for k, v in own.items() if k not in given}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{file or 'config'}: unknown setting(s) {', '.join(unknown)}")
        if values.get("shards"):
            values["caches"] = {**_inline_caches(values["shards"], values.get("fuse", cls.fuse)),
                                **(values.get("caches") or {})}
        values.update(_for_fused(own, values.get("fuse", cls.fuse), values.get("caches") or {}))
        return cls(**values)


def _inline_caches(shards, fuse) -> dict:
    """``{field: "inline"}`` for each fused field whose values the shards carry (``vqa-data shards
    --inline``): such a field needs no ``--cache``. Nothing when the manifest cannot be read (the run
    names that error when it opens the data)."""
    from ..data.inline import INLINE
    from ..data.shards import read_manifest
    from ..errors import PipelineError

    try:
        inline = read_manifest(shards).get("inline") or {}
        fused = FusionSpec.coerce(fuse).modalities()
    except (PipelineError, ValueError):
        return {}
    return {name: INLINE for name in fused if name in inline}


def _for_fused(own: dict, fuse, caches) -> dict:
    """A preset's own ``positions`` and ``expect`` (not given again by a file or a flag), less the
    modalities that ``fuse`` lacks or that have no cache (a fused field without one is a text field)."""
    try:
        fused = set(FusionSpec.coerce(fuse).modalities()) & set(caches)
    except ValueError:
        return {}  # TrainConfig names the bad --fuse
    out = {}
    if "positions" in own:
        out["positions"] = " ".join(n for n in own["positions"].replace(",", " ").split() if n in fused)
    if "expect" in own:
        out["expect"] = {k: v for k, v in own["expect"].items() if k in fused}
    return out


def read_config_file(path) -> dict:
    """A YAML or JSON mapping of TrainConfig fields."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return data
