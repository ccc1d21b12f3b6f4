"""Stage 1: images, audio or video -> encoder tokens -> the LMDB embedding cache (:mod:`store`).

Images and video frames go through a timm ViT (:mod:`embed.model`), audio through a transformers
audio encoder (:mod:`embed.audio_model`); one loop (:mod:`embed.run`) serves all three
(``EmbedConfig(modality=...)``, :mod:`embed.modality`).

Example:
    >>> from embed import EmbedConfig, embed
    >>> summary = embed(EmbedConfig(images=["val2014/"], out="cache/vit_b16", pretrained=True))
    >>> summary.embedded, summary.failed
"""

from .config import DEFAULT_MODEL, EmbedConfig
from .decode import BadImage, open_rgb
from .errors import EmbedError, ModelError, SourceError
from .model import LoadedModel, load_model, state_dict_hash
from .run import EmbedSummary, embed
from .sources import ImageRef, read_bytes, scan

__all__ = [
    "EmbedConfig", "DEFAULT_MODEL", "embed", "EmbedSummary", "load_model", "LoadedModel",
    "state_dict_hash", "scan", "ImageRef", "read_bytes", "open_rgb", "BadImage", "EmbedError",
    "SourceError", "ModelError",
]
