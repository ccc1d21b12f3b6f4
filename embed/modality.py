"""What stage 1's one loop (:mod:`embed.run`) needs of a modality: sources, decoding, the model.

An embedder names its files (``scan``), the cache key that says a source is done (``done_key``),
the DataLoader's dataset and collate (decoding in workers, never raising for bad input: failures
and flags travel in the batch), the step that moves a batch to the device, and the forward pass to
``(B, L, D)`` tokens; ``model`` carries ``identity()``, ``token_shape``, ``weights`` and
``weights_hash`` (:class:`embed.model.LoadedModel` for images and video,
:class:`embed.audio_model.LoadedAudioModel` for audio). :data:`EMBEDDERS` maps ``--modality`` to
the class.
"""

import time

import torch

from .config import EmbedConfig
from .errors import ModelError
from .sources import EXTENSIONS, ImageRef, scan


class ImageEmbedder:
    """Images -> the timm ViT's patch tokens (the stage's original path, JPEGs on the GPU optional)."""

    noun = "image"

    def __init__(self, config: EmbedConfig, device: torch.device):
        from .model import load_model

        self.config = config
        self.model = load_model(config, device)
        if config.decode_on_device:
            from .gpu import check_supported

            check_supported(self.model.data_config)

    def scan(self) -> list[ImageRef]:
        c = self.config
        return scan(c.images, c.source, c.id_pattern, EXTENSIONS[c.modality])

    def done_key(self, ref: ImageRef) -> str:
        return ref.id

    def dataset(self, refs: list):
        from .data import ImageDataset, collate
        from .decode import draft_target_of

        draft = draft_target_of(self.model.pil_transform) if self.config.draft else None
        return ImageDataset(refs, self.model.pil_transform, self.config.max_pixels, draft,
                            raw_jpeg=self.config.decode_on_device), collate

    def on_device(self, batch, device: torch.device) -> tuple[list, torch.Tensor | None, list, float]:
        """``(ids, (B, 3, H, W) pixels, failures, decode seconds)``; raw JPEGs are decoded here."""
        ids, parts, failed, seconds = list(batch.ids), [], [], 0.0
        if batch.pixels is not None:
            parts.append(batch.pixels.to(device, non_blocking=True))
        if batch.jpegs:
            from .gpu import decode_resize_crop

            t = time.perf_counter()
            decoded, failed_idx = decode_resize_crop(batch.jpegs, self.model.data_config, device)
            seconds = time.perf_counter() - t
            bad = set(failed_idx)
            failed = [{"id": batch.jpeg_ids[i], "path": batch.jpeg_paths[i],
                       "reason": "truncated or corrupt JPEG (nvjpeg could not decode it)"} for i in failed_idx]
            ids += [i for k, i in enumerate(batch.jpeg_ids) if k not in bad]
            if decoded is not None:
                parts.append(decoded)
        if not parts:
            return [], None, failed, seconds
        pixels = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts])  # (B, 3, H, W)
        return ids, pixels, failed, seconds

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_tokens(self.model.normalize(pixels))  # (B, L, D)

    def run_fields(self) -> dict:
        """Producer fields recorded for information only: they may change between runs of one cache."""
        import timm

        from .decode import draft_target_of

        decode = "cuda (nvjpeg)" if self.config.decode_on_device else "PIL"
        if self.config.draft and draft_target_of(self.model.pil_transform) is not None:
            decode += ", JPEG draft (DCT downscale, never below the resize target)"
        return {"weights": self.model.weights, "versions": {"timm": timm.__version__, "torch": torch.__version__},
                "decode": decode, "num_prefix_tokens": self.model.num_prefix_tokens}


class AudioEmbedder:
    """Audio files (and the audio track of containers) -> an audio encoder's tokens."""

    noun = "clip"

    def __init__(self, config: EmbedConfig, device: torch.device):
        from .audio_model import load_audio_model

        self.config = config
        self.model = load_audio_model(config, device)
        self.features_on = config.features_on
        if self.features_on == "auto":  # see EmbedConfig.features_on
            self.features_on = "workers" if device.type == "cuda" else "batch"

    scan = ImageEmbedder.scan

    def done_key(self, ref: ImageRef) -> str:
        from .audio import window_id

        # window 0 is written after a file's other windows, in the same or a later transaction
        return window_id(ref.id, 0) if self.config.windows else ref.id

    def dataset(self, refs: list):
        from .audio import AudioDataset, collate_clips
        from .audio_model import Waveforms

        m = self.model
        features = m.features if self.features_on == "workers" else Waveforms()
        return AudioDataset(refs, m.sample_rate, m.clip_samples, m.windows, features), collate_clips

    def on_device(self, batch, device: torch.device):
        """The features on the device; computed here from the waveforms with ``--features-on batch``."""
        if batch.inputs is None:
            return [], None, [], 0.0
        inputs = batch.inputs
        if "waveform" in inputs:
            features = self.model.features(list(inputs["waveform"].numpy()))  # name -> (B, ...)
            inputs = {k: torch.from_numpy(v) for k, v in features.items()}
        return batch.ids, {k: v.to(device, non_blocking=True) for k, v in inputs.items()}, [], 0.0

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.model.forward_tokens(inputs)  # (B, L, D)

    def run_fields(self) -> dict:
        import av
        import soundfile
        import transformers

        return {"weights": self.model.weights, "source": self.model.source,
                "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                             "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__,
                             "av": av.__version__},
                "decode": "soundfile, else PyAV (FFmpeg); channels averaged; libswresample",
                "features_on": self.features_on}


class VideoEmbedder:
    """Video files -> T frames each through the timm ViT, optionally pooled per frame."""

    noun = "video"

    def __init__(self, config: EmbedConfig, device: torch.device):
        from .model import load_model

        self.config = config
        self.image = load_model(config, device)
        self.keep = config.pool_tokens()
        n, d = self.image.token_shape
        patch_embed = getattr(self.image.model, "patch_embed", None)
        grid = tuple(getattr(patch_embed, "grid_size", ()) or ())
        if len(grid) != 2 or grid[0] * grid[1] != n:
            side = round(n ** 0.5)
            grid = (side, side) if side * side == n else ()
        if self.keep not in (None, 1) and not grid:
            raise ModelError(f"--frame-pool {config.frame_pool}: the model's {n} tokens per frame form no grid")
        self.grid = grid
        per_frame = n if self.keep is None else self.keep
        self.model = _VideoModel(self, (config.frames * per_frame, d), per_frame)

    scan = ImageEmbedder.scan
    done_key = ImageEmbedder.done_key

    def run_fields(self) -> dict:
        import av
        import timm

        return {"weights": self.image.weights, "num_prefix_tokens": self.image.num_prefix_tokens,
                "versions": {"timm": timm.__version__, "torch": torch.__version__, "av": av.__version__},
                "decode": "PyAV (FFmpeg), each frame through timm's PIL transform"}

    def dataset(self, refs: list):
        from .video import VideoDataset, collate_videos

        return VideoDataset(refs, self.image.pil_transform, self.config.frames, self.config.fps), collate_videos

    def on_device(self, batch, device: torch.device):
        if batch.inputs is None:
            return [], None, [], 0.0
        return batch.ids, batch.inputs.to(device, non_blocking=True), [], 0.0

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` uint8 -> ``(B, T * N', D)``, frame-major."""
        from .video import pool_frames

        b, t = frames.shape[:2]
        tokens = self.image.forward_tokens(self.image.normalize(frames.flatten(0, 1)))  # (B * T, N, D)
        tokens = pool_frames(tokens, self.keep, self.grid)  # (B * T, N', D)
        return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])  # (B, T * N', D)


class _VideoModel:
    """The video embedder's model as the loop sees it: the ViT's identity plus the frame sampling."""

    def __init__(self, owner: VideoEmbedder, token_shape: tuple, per_frame: int):
        self.owner = owner
        self.token_shape = token_shape
        self.per_frame = per_frame
        self.weights = owner.image.weights
        self.weights_hash = owner.image.weights_hash
        self.num_prefix_tokens = owner.image.num_prefix_tokens
        self.pil_transform = owner.image.pil_transform
        self.device = owner.image.device

    def identity(self) -> dict:
        c = self.owner.config
        return {**self.owner.image.identity(), "modality": "video", "frames": c.frames, "fps": c.fps,
                "frame_pool": c.frame_pool, "tokens_per_frame": self.per_frame,
                "layout": "frame-major (T * tokens_per_frame, D)"}


EMBEDDERS = {"image": ImageEmbedder, "audio": AudioEmbedder, "video": VideoEmbedder}


def make_embedder(config: EmbedConfig, device: torch.device):
    """The embedder of ``config.modality``, its model loaded on ``device``."""
    return EMBEDDERS[config.modality](config, device)
