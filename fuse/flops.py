"""Analytical FLOP count of one training step of a fused T5 configuration.

Counts matrix products only (2 FLOPs per multiply-add): the adapters and pooling, every encoder
block at the sequence length it actually sees (tokens join at their layer; blocks before the first
join see nothing), the decoder's self-attention, cross-attention and feed-forward, and the LM head.
Norms, softmax, activations and the position bias are left out (a few percent at most).
Backward costs about twice the forward (gradients for activations and for weights), so a training
step is ``(1 + backward_factor) * forward`` with ``backward_factor = 2``; a frozen part would cost
less, which this count does not model.

Lengths are the padded lengths the model computes on, so they predict time, not useful work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import FusionT5Config


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one batch by part, and the training-step total.

    Attributes:
        adapters: projections and pooling of the vector modalities.
        encoder: all encoder blocks.
        decoder: all decoder blocks (self-attention, cross-attention, feed-forward).
        lm_head: the output projection to the vocabulary.
        lengths: the sequence length each encoder block sees, then the final (decoder-visible) length.
        backward_factor: backward cost as a multiple of the forward.
    """

    adapters: float
    encoder: float
    decoder: float
    lm_head: float
    lengths: tuple[int, ...]
    backward_factor: float = 2.0

    @property
    def forward(self) -> float:
        return self.adapters + self.encoder + self.decoder + self.lm_head

    @property
    def train_step(self) -> float:
        return (1.0 + self.backward_factor) * self.forward


def pooled_length(config: FusionT5Config, name: str, n: int) -> int:
    """Tokens modality ``name`` contributes for ``n`` input tokens."""
    pool = config.pools().get(name)
    return n if pool is None or pool.length is None else pool.length


def encoder_lengths(config: FusionT5Config, input_lens: Mapping[str, int]) -> list[int]:
    """Sequence length seen by each encoder block, then the length of the encoder's output.

    Args:
        config: the model configuration.
        input_lens: padded input length per modality (text: tokens; vector: ``N`` before pooling).
    """
    joins = config.fusion().as_mapping()
    lengths, total = [], 0
    for layer in range(config.num_layers + 1):
        total += sum(pooled_length(config, name, input_lens[name]) for name in joins.get(layer, ()))
        lengths.append(total)
    return lengths


def _ffn(config: FusionT5Config, tokens: int) -> float:
    return 2.0 * tokens * config.d_model * config.d_ff * (3 if config.is_gated_act else 2)


def _encoder_block(config: FusionT5Config, L: int) -> float:
    inner = config.num_heads * config.d_kv
    return 4 * 2.0 * L * config.d_model * inner + 2 * 2.0 * L * L * inner + _ffn(config, L)


def _decoder_block(config: FusionT5Config, T: int, S: int) -> float:
    d, inner = config.d_model, config.num_heads * config.d_kv
    self_attn = 4 * 2.0 * T * d * inner + 2 * 2.0 * T * T * inner
    cross_attn = 2 * 2.0 * T * d * inner + 2 * 2.0 * S * d * inner + 2 * 2.0 * T * S * inner
    return self_attn + cross_attn + _ffn(config, T)


def _adapter(config: FusionT5Config, name: str, n: int) -> float:
    d = config.d_model
    flops = 2.0 * n * config.modality_dims[name] * d
    pool = config.pools()[name]
    if pool.kind == "attention":
        P = pool.length
        flops += 2.0 * n * d * 2 * d  # keys and values
        flops += 2.0 * P * d * d * 2 + 2 * 2.0 * P * n * d  # queries, output projection, scores and mixing
        flops += 2.0 * P * d * 4 * d * 2  # residual MLP
    return flops


def train_step_flops(
    config: FusionT5Config,
    batch_size: int,
    input_lens: Mapping[str, int],
    answer_len: int,
    backward_factor: float = 2.0,
) -> FlopCount:
    """FLOPs of one training step (forward + backward) of ``batch_size`` samples.

    Args:
        config: the model configuration (fusion spec, pooling, decoder depth included).
        batch_size: samples per step.
        input_lens: padded input length per modality, e.g. ``{"question": 24, "image": 196}``.
        answer_len: decoder tokens per sample (labels length).
        backward_factor: backward cost relative to forward.

    Raises:
        KeyError: a modality of the fusion spec missing from ``input_lens``.
    """
    lengths = encoder_lengths(config, input_lens)
    B = batch_size
    vectors = [name for name in config.modality_dims if name in input_lens]
    adapters = B * sum(_adapter(config, name, input_lens[name]) for name in vectors)
    encoder = B * sum(_encoder_block(config, L) for L in lengths[:-1])
    decoder = B * config.num_decoder_layers * _decoder_block(config, answer_len, lengths[-1])
    lm_head = B * 2.0 * answer_len * config.d_model * config.vocab_size
    return FlopCount(adapters, encoder, decoder, lm_head, tuple(lengths), backward_factor)
