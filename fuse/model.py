"""``FusionT5ForConditionalGeneration``: HF's T5 encoder-decoder with the fused encoder.

It *is* a ``T5ForConditionalGeneration`` (same decoder, LM head, parameter names, loss), so
``save_pretrained`` / ``from_pretrained`` (safetensors, the fusion fields in ``config.json``) and
``generate`` are HF's own. Only the encoder differs (:class:`fuse.encoder.FusionT5Encoder`), and
``forward`` takes ``modalities={name: tensor | (tensor, mask)}`` instead of ``input_ids``.

The decoder's depth is a knob: the first ``num_decoder_layers`` blocks of a pretrained decoder are
kept (block 0 owns the relative position bias, so it always stays).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import AutoConfig, AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import T5PreTrainedModel, T5Stack

from .config import FusionT5Config
from .encoder import FusionEncoderOutput, FusionInitMixin, FusionT5Encoder, ModalityInput
from .spec import DecoderDepthError, FusionInputError

log = logging.getLogger(__name__)

class FusionT5ForConditionalGeneration(FusionInitMixin, T5ForConditionalGeneration):
    """T5 with per-layer multimodal fusion in the encoder.

    Args:
        config: a :class:`FusionT5Config`.

    Example:
        >>> config = FusionT5Config.from_name("tiny", fusion_spec="0:question 2:image",
        ...                                   text_modalities=["question"], modality_dims={"image": 48})
        >>> model = FusionT5ForConditionalGeneration(config)
        >>> out = model(modalities={"question": (ids, mask), "image": feats}, labels=labels)
        >>> answers = model.generate(modalities={"question": (ids, mask), "image": feats}, max_new_tokens=8)
    """

    config_class = FusionT5Config
    config: FusionT5Config

    def __init__(self, config: FusionT5Config):
        # Mirrors T5ForConditionalGeneration.__init__ with the fused encoder in place of T5Stack,
        # so the stock encoder is never built and thrown away.
        T5PreTrainedModel.__init__(self, config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)

        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        encoder_config.use_cache = False
        self.encoder = FusionT5Encoder(encoder_config)

        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = T5Stack(decoder_config)

        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()
        self._ignore_cut_decoder_blocks()

    def _ignore_cut_decoder_blocks(self) -> None:
        """A checkpoint's decoder blocks beyond ``num_decoder_layers`` are dropped on load, silently."""
        kept = "|".join(str(i) for i in range(len(self.decoder.block)))
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {
            rf"^decoder\.block\.(?!(?:{kept})\.)\d+\."
        }

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_t5(
        cls,
        name_or_path: str,
        *,
        fusion_spec: Any = None,
        pool: Any = None,
        modality_dims: Mapping[str, int] | None = None,
        text_modalities: list[str] | None = None,
        modality_lengths: Mapping[str, int] | None = None,
        modality_positions: list[str] | None = None,
        decoder_layers: int | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> FusionT5ForConditionalGeneration:
        """Loads a pretrained T5 (hub name or local directory) and adds fresh modality adapters.

        Args:
            name_or_path: e.g. ``"google-t5/t5-base"`` or a directory written by ``save_pretrained``.
            fusion_spec, pool, modality_dims, text_modalities, modality_lengths, modality_positions:
                see :class:`FusionT5Config`.
            decoder_layers: keep the first N decoder blocks (1..all); ``None`` keeps all.
            config_overrides: other ``T5Config`` fields to change (e.g. ``dropout_rate``).
            **from_pretrained_kwargs: passed to ``from_pretrained`` (``dtype``, ``attn_implementation``, ...).

        Raises:
            DecoderDepthError, FusionSpecError, PoolSpecError: an impossible configuration.
        """
        t5_config = T5Config.from_pretrained(name_or_path)
        total = t5_config.num_decoder_layers
        if decoder_layers is not None and not 1 <= decoder_layers <= total:
            raise DecoderDepthError(
                f"--decoder-layers {decoder_layers}: the decoder has {total} blocks (1..{total})"
            )
        config = FusionT5Config.from_t5_config(
            t5_config,
            fusion_spec=fusion_spec,
            pool=pool,
            modality_dims=dict(modality_dims or {}),
            text_modalities=text_modalities,
            modality_lengths=dict(modality_lengths or {}),
            modality_positions=list(modality_positions or []),
            num_decoder_layers=decoder_layers or total,
            **dict(config_overrides or {}),
        )
        if decoder_layers is not None and decoder_layers < total:
            log.info("%s: keeping decoder blocks 0..%d of %d; blocks %d..%d are dropped", name_or_path,
                     decoder_layers - 1, total, decoder_layers, total - 1)
        return cls.from_pretrained(name_or_path, config=config, **from_pretrained_kwargs)

    def truncate_decoder(self, num_layers: int) -> None:
        """Keeps the first ``num_layers`` decoder blocks (block 0 holds the position bias).

        Raises:
            DecoderDepthError: ``num_layers`` outside 1..current depth.
        """
        total = len(self.decoder.block)
        if not 1 <= num_layers <= total:
            raise DecoderDepthError(
                f"--decoder-layers {num_layers}: the decoder has {total} blocks (1..{total})"
            )
        self.decoder.block = nn.ModuleList(list(self.decoder.block)[:num_layers])
        self.decoder.config.num_layers = num_layers
        self.config.num_decoder_layers = num_layers
        self._ignore_cut_decoder_blocks()

    # ----------------------------------------------------------------- named steps
    def encode(self, modalities: Mapping[str, ModalityInput]) -> FusionEncoderOutput:
        """Runs the fused encoder: ``last_hidden_state`` (B, L, d_model) and ``attention_mask`` (B, L)."""
        return self.encoder(modalities)

    def forward(
        self,
        modalities: Mapping[str, ModalityInput] | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Any = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """Encodes the modalities (unless ``encoder_outputs`` is given) and decodes.

        Args:
            modalities: ``{name: tensor | (tensor, mask)}``, see :meth:`FusionT5Encoder.forward`.
            attention_mask: ``(B, L)`` mask of ``encoder_outputs``; taken from ``encoder_outputs``
                (or from the encoder) when ``None``.
            decoder_input_ids, decoder_attention_mask, cache, decoder_inputs_embeds, use_cache:
                as in ``T5ForConditionalGeneration``.
            labels: ``(B, T)`` answer ids, -100 ignored; the decoder input is ``labels`` shifted right.
            **kwargs: passed to the decoder (e.g. ``output_attentions``).

        Returns:
            ``Seq2SeqLMOutput`` with ``loss`` (mean token cross-entropy) when ``labels`` are given.
        """
        if encoder_outputs is None:
            if modalities is None:
                raise FusionInputError("pass modalities={name: tensor | (tensor, mask)} or encoder_outputs")
            encoder_outputs = self.encoder(modalities)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = FusionEncoderOutput(last_hidden_state=encoder_outputs[0])
        if attention_mask is None:
            attention_mask = getattr(encoder_outputs, "attention_mask", None)
        hidden_states = encoder_outputs.last_hidden_state  # (B, L, d_model)

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=hidden_states,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        sequence_output = decoder_outputs[0]  # (B, T, d_model)
        if self.config.scale_decoder_outputs:
            sequence_output = sequence_output * (self.model_dim**-0.5)
        lm_logits = self.lm_head(sequence_output)  # (B, T, V)

        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            loss_fct = CrossEntropyLoss(ignore_index=-100)
            loss = loss_fct(lm_logits.view(-1, lm_logits.size(-1)), labels.view(-1))
        return Seq2SeqLMOutput(
            loss=loss,
            logits=lm_logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=hidden_states,
        )

    @torch.no_grad()
    def generate(
        self,
        modalities: Mapping[str, ModalityInput] | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """HF ``generate`` from the fused encoder: encodes once, then decodes with cross-attention
        to the fused sequence and its mask.

        Args:
            modalities: as in :meth:`forward` (or pass ``encoder_outputs`` from :meth:`encode`).
            attention_mask: mask of ``encoder_outputs``; taken from it when ``None``.
            **generate_kwargs: HF generation options (``max_new_tokens``, ``num_beams``, ...).

        Returns:
            ``(B, T)`` token ids starting with the decoder start token; decode them with the tokenizer.
        """
        if modalities is not None:
            encoder_outputs = self.encoder(modalities)
        if encoder_outputs is None:
            return super().generate(attention_mask=attention_mask, **generate_kwargs)
        if attention_mask is None:
            attention_mask = getattr(encoder_outputs, "attention_mask", None)
        if attention_mask is None:
            hidden = encoder_outputs.last_hidden_state
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # (B, L)
        encoder_outputs = FusionEncoderOutput(last_hidden_state=encoder_outputs.last_hidden_state)
        return super().generate(
            encoder_outputs=encoder_outputs, attention_mask=attention_mask.long(), **generate_kwargs
        )


AutoConfig.register(FusionT5Config.model_type, FusionT5Config, exist_ok=True)
AutoModelForSeq2SeqLM.register(FusionT5Config, FusionT5ForConditionalGeneration, exist_ok=True)
