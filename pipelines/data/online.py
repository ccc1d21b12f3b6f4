"""Image embeddings computed on the fly: the ViT that filled a cache, rebuilt from its metadata.

``fuse-train --image-source online`` (the comparison the cache exists for) and ``fuse-eval --image``
use the cache's producer record (the ``embed`` settings, weights and their hash) to rebuild the very
same ViT and preprocessing, and refuse to go on if the weights hash differs.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import PipelineError
from .vqa import image_path

log = logging.getLogger(__name__)


def embed_config(producer: dict, device="cpu"):
    """The :class:`embed.EmbedConfig` a cache was embedded with, from its ``producer`` metadata.

    Raises:
        PipelineError: the metadata lacks the embed settings.
    """
    from embed import EmbedConfig

    settings = dict(producer.get("embed_config") or {})
    if not settings:
        raise PipelineError("the cache's metadata does not say how it was embedded (no producer.embed_config)")
    settings.update(images=("<online>",), out="<online cache>", progress=False, device=str(device))
    known = set(EmbedConfig.__dataclass_fields__)
    return EmbedConfig(**{k: v for k, v in settings.items() if k in known})


def _check_weights(producer: dict, weights: str, weights_hash: str) -> None:
    if producer.get("weights_hash") and weights_hash != producer["weights_hash"]:
        raise PipelineError(f"the encoder rebuilt from the cache's metadata ({weights}) has weights "
                            f"{weights_hash}, the cache was made with {producer['weights_hash']}")


def load_vit(producer: dict, device="cpu"):
    """The ``embed`` ViT that wrote an image cache, from the cache's ``producer`` metadata.

    Returns:
        ``(embed.LoadedModel, embed.EmbedConfig)``: the model and the settings it embedded with.

    Raises:
        PipelineError: the metadata lacks the embed settings, the cache is not an image cache, or the
            rebuilt weights differ.
    """
    from embed import load_model

    config = embed_config(producer, device)
    if config.modality != "image":
        raise PipelineError(f"the cache holds {config.modality} tokens (embed --modality {config.modality}); "
                            "embedding on the fly during training takes images only: embed the files into the cache")
    loaded = load_model(config, device=device)
    _check_weights(producer, loaded.weights, loaded.weights_hash)
    return loaded, config


@torch.inference_mode()
def embed_file(producer: dict, path, device="cpu") -> torch.Tensor:
    """One file's tokens, ``(1, L, D)``, made as ``embed`` made the cache's values: the same modality
    (image, audio, video), encoder, weights and settings, read from the cache's ``producer``.

    Raises:
        PipelineError: the metadata lacks the settings, the rebuilt weights differ, or the file cannot
            be embedded (missing, not an image/sound/video, ...: the line ``embed`` would report).
    """
    from embed.modality import make_embedder
    from embed.sources import ImageRef

    config = embed_config(producer, device)
    if config.modality == "audio" and config.windows:
        config.windows = False  # one file, one value: its first window (the clip length is the cache's)
    embedder = make_embedder(config, torch.device(device))
    _check_weights(producer, embedder.model.weights, embedder.model.weights_hash)
    dataset, collate = embedder.dataset([ImageRef("file", str(path))])
    batch = collate([dataset[0]])
    if batch.failed:
        raise PipelineError(f"{path}: cannot embed it: {batch.failed[0]['reason']}")
    _, inputs, failed, _ = embedder.on_device(batch, torch.device(device))
    if failed or inputs is None:
        reason = failed[0]["reason"] if failed else "nothing decoded"
        raise PipelineError(f"{path}: cannot embed it: {reason}")
    return embedder.forward(inputs).float()  # (1, L, D)


class ImageEmbedder:
    """Reads images by id and runs the ViT over them: ``(B, N, D)`` tokens like the cache's values.

    Images are decoded as ``embed`` decoded them (the same JPEG draft scale and pixel limit), so the
    tokens equal the cache's values up to its float16 rounding.

    Args:
        vit: ``(embed.LoadedModel, embed.EmbedConfig)`` from :func:`load_vit`.
        vqa_dir: the folder holding the image folders ``{split}2014/`` (the shards' ``--images-root``,
            else the VQA folder they were made from).
        splits: the splits to look in.
        threads: decoding threads (PIL releases the GIL while decoding).
    """

    def __init__(self, vit, vqa_dir, splits=("train",), threads: int = 2):
        from embed.decode import draft_target_of

        (self.vit, config), self.root, self.splits = vit, Path(vqa_dir), tuple(splits)
        self.max_pixels = config.max_pixels
        self.draft = draft_target_of(self.vit.pil_transform) if config.draft else None
        self._pool = ThreadPoolExecutor(max(1, threads))

    def path(self, image_id: str) -> Path:
        for split in self.splits:
            p = image_path(self.root, split, image_id)
            if p.is_file():
                return p
        raise PipelineError(f"image {image_id}: no file under {self.root} for splits {', '.join(self.splits)}")

    def pixels(self, path) -> torch.Tensor:
        from embed import BadImage, open_rgb

        try:
            return self.vit.pil_transform(open_rgb(Path(path).read_bytes(), self.max_pixels, self.draft))  # uint8 (3, H, W)
        except BadImage as e:
            raise PipelineError(f"{path}: cannot embed it: {e}") from None

    @torch.inference_mode()
    def embed_paths(self, paths) -> torch.Tensor:
        x = torch.stack(list(self._pool.map(self.pixels, paths))).to(self.vit.device)  # (B, 3, H, W)
        return self.vit.forward_tokens(self.vit.normalize(x)).float()  # (B, N, D)

    def __call__(self, image_ids) -> torch.Tensor:
        return self.embed_paths([self.path(i) for i in image_ids])
