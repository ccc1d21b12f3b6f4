"""The fused T5 encoder: HF transformers' own ``T5Block``s in an explicit loop, with modalities
joining before chosen blocks (thesis "Where to Fuse", Lund University 2024).

``FusionT5Encoder`` subclasses ``T5Stack`` so its parameter names (``block.N...``,
``final_layer_norm``, ``embed_tokens``) are T5's: a stock T5 checkpoint loads into it unchanged.
The adapters of vector modalities live beside them under ``adapters.<modality>``.

Where joined tokens sit, and which positions they take
------------------------------------------------------
At a join the sequence is ``[tokens so far] + [new modality tokens, in spec order]`` and every
sample is then *left-aligned*: its real tokens first, in that order (earlier tokens, then each new
modality's real tokens), and all padding at the end. T5 has no absolute positions; its relative
position bias (owned by block 0, ``compute_bias``) is recomputed for the new length ``L``, so a
sample's real tokens always occupy positions ``0..n-1`` with the same relative distances whatever
the batch pads. Padding is excluded by the attention mask and moved out of the way at every join,
so a sample's outputs do not depend on how much padding its batch adds. With no extra tokens the
sequence, positions, mask and bias are exactly stock T5's (stock T5 also right-pads).

The returned ``last_hidden_state`` is ``(B, L_total, d_model)`` with ``L_total`` the padded sum of
every modality's length after pooling, and ``attention_mask`` marks the real tokens (``None`` when
no input had padding); the decoder's cross-attention takes both.

Attention: the bias and the padding mask are folded into one additive ``(B, H, L, L)`` tensor
built once per length and shared by all blocks, for the ``eager`` and ``sdpa`` implementations
(SDPA takes it as ``attn_mask`` with ``scale=1``, as T5 does not scale scores). Other
implementations get HF's own mask and the bias separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as hf_init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.t5.modeling_t5 import T5Stack

from .config import FusionT5Config
from .modality import ModalityAdapter
from .spec import FusionInputError

# A modality's input: a tensor, or (tensor, mask) with mask (B, N) of 1/True for real tokens.
ModalityInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class FusionEncoderOutput(BaseModelOutput):
    """``BaseModelOutput`` plus the mask of the fused sequence.

    Attributes:
        last_hidden_state: ``(B, L_total, d_model)``.
        attention_mask: ``(B, L_total)`` bool, True for real tokens; ``None`` if nothing is padding.
    """

    attention_mask: torch.Tensor | None = None


class FusionInitMixin:
    """T5's weight initialisation for the fused model, and the adapters' own on top of it.

    transformers 5 treats a model class defined outside the library as "custom code" and, for such
    classes, marks every module that owns no parameter directly as initialised without calling
    ``_init_weights`` on it (``PreTrainedModel._initialize_weights``). T5's attention and
    feed-forward layers own none (their ``nn.Linear`` children do), so the encoder's q/k/v/o,
    wi/wo and relative position bias kept the generic ``std = initializer_factor = 1`` init instead
    of T5's (q: (d_model * d_kv)^-1/2, ...). That check is meant for remote code whose
    ``_init_weights`` writes tensors in place; ours, T5's and the adapters' use
    ``transformers.initialization``, which skips tensors loaded from a checkpoint by their own flag.
    So these classes are library code as far as initialisation goes. ``tests/test_fuse_init.py``
    compares every parameter family with stock ``T5ForConditionalGeneration``, so a release that
    changes this mechanism fails the suite instead of silently confounding results.
    """

    @classmethod
    def is_custom_code(cls) -> bool:
        return False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ModalityAdapter):
            # Runs after its children: overrides the generic init T5 gives their linears (std 1).
            module.reset_parameters(init=hf_init)
        else:
            super()._init_weights(module)


class FusionT5Encoder(FusionInitMixin, T5Stack):
    """T5 encoder stack whose blocks admit modalities at the layers of ``config.fusion_spec``.

    Args:
        config: an encoder config (``is_decoder=False``).
        embed_tokens: the shared token embedding (T5's ``shared``).
    """

    def __init__(self, config: FusionT5Config, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        if embed_tokens is not None:
            self.embed_tokens = embed_tokens
        self.spec = config.fusion()  # parsed once: forward reads it on every call
        self.joins = self.spec.as_mapping()  # {layer: [modality, ...]}
        pools = config.pools()
        self.adapters = nn.ModuleDict(
            {
                name: ModalityAdapter(
                    dim, config.d_model, pools[name], config.num_heads, config.layer_norm_epsilon,
                    positions=config.position_length(name), name=name,
                )
                for name, dim in config.modality_dims.items()
            }
        )
        self.post_init()

    # ----------------------------------------------------------------- named steps
    def embed_modality(self, name: str, value: ModalityInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens of one modality: ``(B, P, d_model)`` and a ``(B, P)`` bool mask or ``None``."""
        x, mask = value if isinstance(value, (tuple, list)) else (value, None)
        mask = None if mask is None else mask.to(device=x.device, dtype=torch.bool)
        if self.config.is_text(name):
            if x.dim() != 2 or x.is_floating_point():
                raise FusionInputError(
                    f"text modality '{name}': expected (B, L) token ids, got {tuple(x.shape)} {x.dtype}"
                )
            return self.embed_tokens(x), mask  # (B, L, d_model)
        dim = self.config.modality_dims[name]
        if x.dim() != 3 or x.shape[-1] != dim:
            raise FusionInputError(
                f"vector modality '{name}': expected (B, N, {dim}) features, got {tuple(x.shape)}"
            )
        adapter = self.adapters[name]
        length = adapter.pool_spec.length
        if length is not None and length > x.shape[1]:
            raise FusionInputError(
                f"--pool {name}:{adapter.pool_spec}: pooling to {length} tokens but '{name}' has {x.shape[1]}"
            )
        return adapter(x, mask)  # (B, P, d_model)

    def join(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        new: list[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Appends new tokens and left-aligns each sample's real tokens (see module docstring)."""
        parts = [hidden] + [self.dropout(tokens) for tokens, _ in new]
        hidden = torch.cat(parts, dim=1)  # (B, L + P_1 + ... + P_m, D)
        masks = [mask] + [m for _, m in new]
        if all(m is None for m in masks):
            return hidden, None
        B, L, D = hidden.shape
        full = torch.cat([torch.ones(p.shape[:2], dtype=torch.bool, device=hidden.device) if m is None else m
                          for p, m in zip(parts, masks)], dim=1)  # (B, L): a mask of ones where a part has none
        # A stable sort on "is padding" puts real tokens first and keeps their order.
        order = torch.sort((~full).to(torch.int32), dim=1, stable=True).indices  # (B, L)
        hidden = hidden.gather(1, order.unsqueeze(-1).expand(B, L, D))  # (B, L, D)
        return hidden, full.gather(1, order)

    def attention_bias(
        self, hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Relative position bias for the current length, with the padding mask folded in if possible.

        Returns:
            ``(attention_mask, position_bias)`` to hand to every ``T5Block``.
        """
        L = hidden.shape[1]
        bias = self.block[0].layer[0].SelfAttention.compute_bias(L, L, device=hidden.device)  # (1, H, L, L)
        if mask is None:
            return None, bias
        if self.config._attn_implementation in ("eager", "sdpa", None):
            # Half the dtype's minimum: as good as -inf after softmax, yet bias + pad stays finite in fp16,
            # so even a sample with no real token at all gives no NaN.
            pad = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device)
            pad = pad.masked_fill(~mask, torch.finfo(bias.dtype).min / 2)  # (B, L): 0 for real tokens
            return None, bias + pad[:, None, None, :]  # (B, H, L, L)
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask), bias

    # ----------------------------------------------------------------- forward
    def forward(self, modalities: Mapping[str, ModalityInput], **kwargs) -> FusionEncoderOutput:
        """Encodes every modality of the fusion spec.

        Args:
            modalities: ``{name: tensor | (tensor, mask)}``; text: ``(B, L)`` token ids, vector:
                ``(B, N, D)`` features; masks ``(B, L|N)`` with 1/True for real tokens.
            **kwargs: passed to each ``T5Block`` (attention-implementation options).

        Returns:
            :class:`FusionEncoderOutput` with ``last_hidden_state`` and ``attention_mask``.

        Raises:
            FusionInputError: a modality missing, unexpected, of the wrong shape, or batch sizes differ.
        """
        joins = self.joins
        expected = {name for names in joins.values() for name in names}
        missing, extra = expected - set(modalities), set(modalities) - expected
        if missing or extra:
            raise FusionInputError(
                f"the fusion spec {self.spec} needs modalities {sorted(expected)}; "
                f"missing {sorted(missing) or 'none'}, unexpected {sorted(extra) or 'none'}"
            )
        first = next(iter(modalities.values()))
        first = first[0] if isinstance(first, (tuple, list)) else first
        B = first.shape[0]
        weight = self.embed_tokens.weight
        hidden = torch.zeros(B, 0, self.config.d_model, device=weight.device, dtype=weight.dtype)  # (B, 0, D)
        mask, attention_mask, position_bias = None, None, None
        for i, layer_module in enumerate(self.block):
            if i in joins:
                hidden, mask = self.join(hidden, mask, self._embed_layer(joins[i], modalities, B))
                attention_mask, position_bias = self.attention_bias(hidden, mask)
            if hidden.shape[1] == 0:
                continue  # nothing has joined yet: a block over zero tokens is a no-op
            # Called as T5Stack calls it (positional, for gradient checkpointing); no cross-attention.
            hidden, _, _ = layer_module(
                hidden, attention_mask, position_bias, None, None, None, cache=None, **kwargs
            )
        hidden = self.dropout(self.final_layer_norm(hidden))
        late = len(self.block)
        if late in joins:
            hidden, mask = self.join(hidden, mask, self._embed_layer(joins[late], modalities, B))
        return FusionEncoderOutput(last_hidden_state=hidden, attention_mask=mask)

    def _embed_layer(
        self, names, modalities, batch_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = []
        for name in names:
            tokens, mask = self.embed_modality(name, modalities[name])
            if tokens.shape[0] != batch_size:
                raise FusionInputError(
                    f"modality '{name}' has batch size {tokens.shape[0]}, expected {batch_size}"
                )
            out.append((tokens, mask))
        return out
