"""``EmbedConfig``: every setting of stage 1, validated once, saved into the cache's metadata."""

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store import DTYPES

SOURCE_KINDS = ("auto", "folder", "list", "wds")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_MODEL = "vit_base_patch16_224"
MODALITIES = ("image", "audio", "video")
# AudioSet-trained (527 sound classes, the domain of VGGSound/AudioSet/VALOR), and its tokens are
# patch tokens like ViT-B/16's: 1214 x 768 for 10 s after the cls and distillation tokens.
DEFAULT_AUDIO_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
DEFAULT_FRAMES = 8
FRAME_POOLS = ("none", "mean", "grid:K")
FEATURES_ON = ("auto", "workers", "batch")
# PIL's own default (Image.MAX_IMAGE_PIXELS): about 0.25 GB of 24-bit pixels
DEFAULT_MAX_PIXELS = 89_478_485
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class EmbedConfig:
    """Settings of one embedding run.

    Attributes:
        images: the sources (images, audio or video files, per ``modality``): folders, list files (``id<TAB>path``) or WebDataset ``.tar`` shards
            (brace patterns such as ``imgs-{000..009}.tar`` are expanded).
        out: the cache directory (created, or resumed when it exists).
        model: a timm model name (image, video: run on each frame); for audio a transformers model:
            hub id, local folder (``save_pretrained``) or a registered short name
            (:data:`embed.audio_model.SHIPPED`). None: :data:`DEFAULT_MODEL`, or
            :data:`DEFAULT_AUDIO_MODEL` for audio.
        pretrained: True: the model's pretrained weights (shipped with this project, as
            ``vit_shapes_patch16_48``'s, or from the hub); False: random weights (seeded by
            ``seed``); None (default): the shipped weights where the model has them (see
            :func:`embed.registry.shipped_weights`), else random ones, unless ``checkpoint`` is given.
        checkpoint: a local weights file (``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.ckpt``
            read with ``torch.load(weights_only=True)``).
        model_kwargs: extra keyword arguments of ``timm.create_model`` (e.g. ``{"depth": 2}``).
        img_size: input size override (passed to the model and to timm's preprocessing).
        layer: None for the final-norm output of ``forward_features``; else the output of
            transformer block ``layer`` (negative counts from the end; no final norm).
        batch_size: images per forward pass (and per cache transaction).
        dtype: the cache's value dtype.
        device: ``cpu``, ``cuda`` or ``cuda:N``; None lets accelerate choose.
        precision: ``fp32``, ``bf16`` (CUDA autocast) or ``auto`` (bf16 on CUDA, fp32 on CPU).
        num_workers: DataLoader decode workers per process; None picks from the CPU count.
        threads: torch intra-op threads per process; None keeps torch's default.
        source: how to read ``images``; ``auto`` decides per path.
        id_pattern: regex with one group, searched in each file name of a folder source.
        max_pixels: images with more pixels are refused as decompression bombs.
        draft: let JPEGs decode at a reduced DCT scale when still at least the resize target.
        decode_on_device: decode JPEGs on the GPU (``torchvision.io.decode_jpeg``).
        pin_memory: pin batches for the host-to-device copy; None means "when on CUDA".
        seed: seed of a random initialisation.
        failures: the failures report; None puts ``<out>.failures.jsonl`` beside the cache.
        queue_size: batches that may wait for the cache writer before the forward pass blocks.
        progress: show a progress bar on the main process.
        modality: ``image``, ``audio`` or ``video``.
        clip_seconds: audio: the fixed clip length (crop or pad); None: the encoder's natural length.
        windows: audio: a file longer than the clip becomes consecutive windows ``{id}#w{k}``.
        features_on: audio: where the feature extractor (spectrogram) runs: ``workers`` (beside the
            decoding, in the DataLoader workers), ``batch`` (in the main process, on each batch) or
            ``auto``: workers when the encoder runs on CUDA (the main process only feeds the GPU),
            the batch on the CPU (measured faster there: bench/embed_audio_bench.py).
        frames: video: frames T per clip (None: :data:`DEFAULT_FRAMES`).
        fps: video: sample at this rate from the start (at most ``frames``, padded to it) instead of
            spreading ``frames`` uniformly over the clip.
        frame_pool: video: ``none`` (every patch token), ``mean`` (one token per frame) or
            ``grid:K`` (K tokens per frame, K a square: adaptive average pooling of the patch grid).
    """

    images: tuple
    out: str
    model: str | None = None
    pretrained: bool | None = None
    checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    img_size: int | None = None
    layer: int | None = None
    batch_size: int = 64
    dtype: str = "float16"
    device: str | None = None
    precision: str = "auto"
    num_workers: int | None = None
    threads: int | None = None
    source: str = "auto"
    id_pattern: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True
    decode_on_device: bool = False
    pin_memory: bool | None = None
    seed: int = 0
    failures: str | None = None
    queue_size: int = 2
    progress: bool = True
    modality: str = "image"
    clip_seconds: float | None = None
    windows: bool = False
    features_on: str = "auto"
    frames: int | None = None
    fps: float | None = None
    frame_pool: str = "none"

    def __post_init__(self):
        if isinstance(self.images, (str, os.PathLike)):
            self.images = (self.images,)
        self.images = tuple(str(p) for p in self.images)
        self.out = str(self.out)
        if not self.images:
            raise ValueError("IMAGES: give at least one folder, list file or .tar shard")
        if not self.out:
            raise ValueError("--out: give the cache directory")
        if self.modality not in MODALITIES:
            raise ValueError(f"--modality {self.modality}: choose one of {', '.join(MODALITIES)}")
        if self.model is None:
            self.model = DEFAULT_AUDIO_MODEL if self.modality == "audio" else DEFAULT_MODEL
        if not self.model:
            raise ValueError("--model: give a timm model name, e.g. vit_base_patch16_224")
        if self.pretrained is not None and self.checkpoint:
            flag = "--pretrained" if self.pretrained else "--no-pretrained"
            raise ValueError(f"{flag} and --checkpoint exclude each other: choose one source of weights")
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
            if not Path(self.checkpoint).is_file():
                raise ValueError(f"--checkpoint {self.checkpoint}: no such file")
            if not self.checkpoint.lower().endswith(CHECKPOINT_SUFFIXES):
                raise ValueError(f"--checkpoint {self.checkpoint}: expected one of "
                                 f"{', '.join(CHECKPOINT_SUFFIXES)} (pickled objects are never loaded)")
        if isinstance(self.model_kwargs, str):
            self.model_kwargs = parse_model_kwargs(self.model_kwargs)
        if not isinstance(self.model_kwargs, dict):
            raise ValueError("--model-kwargs: must be a JSON object, e.g. '{\"depth\": 2}'")
        for key in ("pretrained", "checkpoint_path", "img_size"):
            if key in self.model_kwargs:
                flag = {"pretrained": "--pretrained", "checkpoint_path": "--checkpoint"}.get(key, "--img-size")
                raise ValueError(f"--model-kwargs: set {key!r} with {flag} instead")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"--img-size {self.img_size}: must be a positive number of pixels")
        _positive("--batch-size", self.batch_size)
        _positive("--queue-size", self.queue_size)
        _positive("--max-pixels", self.max_pixels)
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers {self.num_workers}: must be 0 (decode in the main process) or more")
        if self.threads is not None:
            _positive("--threads", self.threads)
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"--source {self.source}: choose one of {', '.join(SOURCE_KINDS)}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device}: use cpu, cuda or cuda:N")
        if self.device == "cpu" and (self.precision == "bf16" or self.decode_on_device):
            flag = "--precision bf16" if self.precision == "bf16" else "--decode-on-device"
            raise ValueError(f"{flag} needs a CUDA device, not --device cpu")
        if self.id_pattern is not None:
            try:
                groups = re.compile(self.id_pattern).groups
            except re.error as e:
                raise ValueError(f"--id-pattern '{self.id_pattern}': not a regular expression ({e})") from None
            if groups != 1:
                raise ValueError(f"--id-pattern '{self.id_pattern}': needs exactly one group (the id), "
                                 f"has {groups}")
        if Path(self.out).resolve() in {Path(p).resolve() for p in self.images}:
            raise ValueError(f"--out {self.out}: the cache cannot be one of the image sources")
        self._check_modality_flags()

    def _check_modality_flags(self) -> None:
        """Each modality's own flags, refused with the others (they would be silently ignored)."""
        given = {"--clip-seconds": self.clip_seconds is not None, "--windows": self.windows,
                 "--frames": self.frames is not None, "--fps": self.fps is not None,
                 "--frame-pool": self.frame_pool != "none", "--checkpoint": self.checkpoint is not None,
                 "--model-kwargs": bool(self.model_kwargs), "--img-size": self.img_size is not None,
                 "--decode-on-device": self.decode_on_device, "--features-on": self.features_on != "auto"}
        allowed = {"image": {"--checkpoint", "--model-kwargs", "--img-size", "--decode-on-device"},
                   "audio": {"--clip-seconds", "--windows", "--features-on"},
                   "video": {"--frames", "--fps", "--frame-pool", "--checkpoint", "--model-kwargs", "--img-size"}}
        for flag, on in given.items():
            if on and flag not in allowed[self.modality]:
                raise ValueError(f"{flag} does not apply to --modality {self.modality}")
        if self.features_on not in FEATURES_ON:
            raise ValueError(f"--features-on {self.features_on}: choose one of {', '.join(FEATURES_ON)}")
        if self.clip_seconds is not None and not self.clip_seconds > 0:
            raise ValueError(f"--clip-seconds {self.clip_seconds}: must be a positive number of seconds")
        if self.modality == "video":
            if self.frames is None:
                self.frames = DEFAULT_FRAMES
            _positive("--frames", self.frames)
            if self.fps is not None and not self.fps > 0:
                raise ValueError(f"--fps {self.fps}: must be a positive number of frames per second")
            self.pool_tokens()  # validates --frame-pool

    def pool_tokens(self) -> int | None:
        """Tokens per frame that ``--frame-pool`` keeps: None (all), 1 (mean) or K (``grid:K``)."""
        pool = self.frame_pool
        if pool == "none":
            return None
        if pool == "mean":
            return 1
        k = pool.removeprefix("grid:")
        if pool.startswith("grid:") and k.isdigit() and int(k) > 0 and round(int(k) ** 0.5) ** 2 == int(k):
            return int(k)
        raise ValueError(f"--frame-pool {pool}: choose none, mean or grid:K with K a square (1, 4, 9, 16, ...)")

    def failures_path(self) -> Path:
        """Where failed images are reported: ``--failures`` or ``<out>.failures.jsonl``."""
        if self.failures:
            return Path(self.failures)
        out = Path(self.out)
        return out.with_name(out.name + ".failures.jsonl")

    def flags_path(self) -> Path:
        """Where items embedded with a remark (padded, cropped, resampled, silent) are listed:
        ``<out>.flags.jsonl`` beside the cache (beside ``--failures`` when that is given)."""
        failures = self.failures_path()
        return failures.with_name(failures.name.removesuffix(".failures.jsonl").removesuffix(".jsonl")
                                  + ".flags.jsonl")

    def part_path(self, rank: int) -> Path:
        """The cache part that process ``rank`` of a distributed run writes."""
        out = Path(self.out)
        return out.with_name(f"{out.name}.part{rank}")

    def create_kwargs(self) -> dict:
        """Keyword arguments of ``timm.create_model`` besides the name and ``pretrained``."""
        kwargs = dict(self.model_kwargs)
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        return kwargs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images"] = list(self.images)
        return d


def parse_model_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--model-kwargs {text!r}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs {text!r}: must be a JSON object, e.g. '{{\"depth\": 2}}'")
    return value


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag} {value}: must be a positive integer")
