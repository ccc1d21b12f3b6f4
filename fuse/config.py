"""``FusionT5Config``: a ``transformers.T5Config`` plus where and how each modality joins.

The extra fields are plain JSON values so that ``save_pretrained`` writes them into
``config.json`` beside T5's own; the methods turn them into typed objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import T5Config

from .spec import (
    DecoderDepthError,
    FusionSpec,
    PoolSpec,
    PoolSpecError,
    coerce_pools,
    pools_to_dict,
    validate_pools,
)

# Architecture shapes only; weights are random unless loaded with
# ``FusionT5ForConditionalGeneration.from_t5``.
T5_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: fast on 2 CPU cores; ByT5's 384-token vocabulary needs no tokenizer files.
    "tiny": dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=2,
                 num_heads=4),
    # The demo preset of fuse-train: trains on 2 CPU cores in minutes. Four decoder blocks: with the
    # image joined late, the decoder does all the image-question reasoning, and its blocks are cheap
    # (2 answer tokens against ~12 question tokens in each encoder block).
    "demo": dict(vocab_size=384, d_model=128, d_kv=32, d_ff=512, num_layers=4, num_decoder_layers=4,
                 num_heads=4),
    # The CPU benchmark: 12 encoder layers so every thesis fusion layer 0/3/6/9/12 exists.
    "cpu-bench": dict(vocab_size=384, d_model=256, d_kv=64, d_ff=1024, num_layers=12, num_decoder_layers=2,
                      num_heads=4),
    # Shapes of the hub checkpoints, for FLOP counts and GPU timing with random weights.
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
}

# Keys of a saved T5 config that describe the file, not the model; dropped when converting.
_T5_FILE_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")
_FUSION_KEYS = ("fusion_spec", "pool", "modality_dims", "text_modalities", "modality_lengths",
                "modality_positions")


@strict
class FusionT5Config(T5Config):
    """T5 configuration with per-layer multimodal fusion.

    Args (beyond ``T5Config``'s):
        fusion_spec: ``{layer: [modality, ...]}`` (any form :meth:`FusionSpec.coerce` takes); stored
            as ``{"0": ["question"], "6": ["image"]}``. Default: every text modality at layer 0.
        pool: ``{modality: {"type": "attention", "length": 14}}`` (or ``"attention:14"``); vector
            modalities absent here are not pooled.
        modality_dims: ``{modality: D}`` feature width of every vector modality.
        text_modalities: names of the token-id modalities. Default ``["text"]``.
        modality_lengths: optional ``{modality: N}`` input lengths of vector modalities, used to
            reject impossible pooling at construction and by FLOP counts.
        modality_positions: vector modalities whose tokens get a learned position embedding (one
            vector per token after pooling; their length must be in ``modality_lengths``). Default:
            none: the design's adapter (projection, pooling, norm, modality embedding) alone.
    """

    model_type = "fusion_t5"

    fusion_spec: dict | str | None = None
    pool: dict | str | None = None
    modality_dims: dict | None = None
    text_modalities: list | None = None
    modality_lengths: dict | None = None
    modality_positions: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "decoder_start_token_id", None) is None:
            # T5 starts decoding from the pad token; hub configs say so, bare T5Config() does not.
            self.decoder_start_token_id = self.pad_token_id
        if self.text_modalities is None:
            self.text_modalities = ["text"]
        self.text_modalities = [str(name) for name in self.text_modalities]
        self.modality_dims = {str(k): int(v) for k, v in (self.modality_dims or {}).items()}
        self.modality_lengths = {str(k): int(v) for k, v in (self.modality_lengths or {}).items()}
        self.modality_positions = sorted(str(name) for name in (self.modality_positions or []))
        default = {0: self.text_modalities}
        spec = FusionSpec.coerce(self.fusion_spec if self.fusion_spec is not None else default)
        self.fusion_spec = spec.to_dict()
        self.pool = pools_to_dict(coerce_pools(self.pool))
        self.check()

    # ----------------------------------------------------------------- derived values
    def fusion(self) -> FusionSpec:
        """The fusion spec as a :class:`FusionSpec`."""
        return FusionSpec.from_dict(self.fusion_spec)

    def pools(self) -> dict[str, PoolSpec]:
        """``{modality: PoolSpec}`` for every vector modality (``none`` where not configured)."""
        pools = coerce_pools(self.pool)
        return {name: pools.get(name, PoolSpec()) for name in self.modality_dims}

    def position_length(self, name: str) -> int | None:
        """Tokens of vector modality ``name`` after pooling if it has position embeddings, else None."""
        if name not in self.modality_positions:
            return None
        pool = self.pools()[name]
        return pool.length if pool.length is not None else self.modality_lengths[name]

    def is_text(self, name: str) -> bool:
        return name in self.text_modalities

    def get_text_config(self, decoder=None, encoder=None):
        """HF's text config of one end of the model; the decoder's has ``num_decoder_layers`` layers.

        Generation sizes its key/value cache from ``get_text_config(decoder=True).num_hidden_layers``,
        which for T5 is ``num_layers``, the *encoder's* depth (transformers 5.24 maps
        ``decoder_layers``, not T5's ``num_decoder_layers``): a decoder deeper than the encoder got
        too few cache layers and ``generate`` failed with ``IndexError: list index out of range``
        (stock ``T5ForConditionalGeneration`` too). For the decoder end HF already returns a copy,
        so setting its depth here changes nothing else.
        """
        config = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder and config is not self:
            config.num_layers = self.num_decoder_layers
        return config

    def to_t5_config(self) -> T5Config:
        """The stock ``T5Config`` of the same architecture (the fusion fields dropped)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _T5_FILE_KEYS and k not in _FUSION_KEYS}
        return T5Config(**data)

    def check(self) -> None:
        """Validates the fusion spec, pooling and decoder depth against the architecture.

        Raises:
            FusionSpecError, PoolSpecError, DecoderDepthError: with the CLI flag form in the message.
        """
        spec = self.fusion()
        spec.validate(self.num_layers, self.text_modalities, self.modality_dims)
        pools = coerce_pools(self.pool)
        validate_pools(pools, self.modality_dims, self.modality_lengths)
        for name in self.modality_positions:
            if name not in self.modality_dims:
                raise PoolSpecError(f"--positions {name}: not a vector modality (those: "
                                    f"{', '.join(self.modality_dims) or 'none'})")
            if name not in self.modality_lengths and pools.get(name, PoolSpec()).length is None:
                raise PoolSpecError(f"--positions {name}: needs the number of '{name}' tokens (modality_lengths)")
        for name, dim in self.modality_dims.items():
            if dim < 1:
                raise PoolSpecError(f"--modality-dim {name}={dim}: a feature width must be >= 1")
        if not 1 <= self.num_decoder_layers:
            raise DecoderDepthError(
                f"--decoder-layers {self.num_decoder_layers}: the decoder needs at least 1 block"
            )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> FusionT5Config:
        """A preset architecture (a key of :data:`T5_PRESETS`) with fusion fields in ``overrides``.

        Raises:
            KeyError: an unknown preset name, listing the known ones.
        """
        if name not in T5_PRESETS:
            raise KeyError(f"unknown T5 preset '{name}' (known: {', '.join(T5_PRESETS)})")
        return cls(**{**T5_PRESETS[name], **overrides})

    @classmethod
    def from_t5_config(cls, t5_config: T5Config | Mapping[str, Any], **fusion: Any) -> FusionT5Config:
        """Wraps a stock ``T5Config`` (or its dict) with the given fusion fields.

        Args:
            t5_config: the pretrained model's config.
            **fusion: ``fusion_spec``, ``pool``, ``modality_dims``, ``text_modalities``,
                ``modality_lengths`` and any ``T5Config`` override (e.g. ``num_decoder_layers``).
        """
        data = dict(t5_config.to_dict() if isinstance(t5_config, T5Config) else t5_config)
        for key in _T5_FILE_KEYS:
            data.pop(key, None)
        data.update(fusion)
        return cls(**data)
