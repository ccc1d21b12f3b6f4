"""Vector-modality adapter: turns ``(B, N, D)`` features of any width into T5-ready tokens.

Steps, in order (each named so the encoder can be read top-down):

1. ``project``: ``Linear(D -> d_model)``;
2. ``pool``: to ``P`` tokens (see :mod:`fuse.pooling`), in ``d_model`` so attention pooling can use
   the model's head count;
3. ``norm``: T5's RMS norm (``T5LayerNorm``), so the tokens arrive at the scale T5 blocks expect
   after their own pre-norms, and already normalised for late fusion;
4. ``+ modality_embedding``: one learned ``d_model`` vector per modality (a token-type embedding);
5. ``+ position_embedding`` (optional): one learned ``d_model`` vector per token index. T5 has no
   absolute positions, and a modality joined after the last encoder block reaches the decoder's
   cross-attention as a bag of tokens: whatever the features carry of their place is all there is.

Text modalities need no adapter: they are token ids embedded with T5's shared embedding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.t5.modeling_t5 import T5LayerNorm

from .pooling import AttentionPool, create_pool
from .spec import FusionInputError, PoolSpec


# The scale of the RMS-normalised tokens the embedding is added to (and of T5's own token embeddings):
# at the modality embedding's 0.02 the demo's late-fusion model never learned positions in 3,000 steps.
POSITION_INIT_STD = 1.0


class ModalityAdapter(nn.Module):
    """Projection, pooling, RMS norm and modality embedding for one vector modality.

    Args:
        in_dim: feature width ``D`` of the modality.
        d_model: the T5 model width.
        pool: how to pool (``PoolSpec("none")`` keeps every token).
        num_heads: heads for attention pooling.
        eps: RMS-norm epsilon (T5's ``layer_norm_epsilon``).
        positions: learn a position embedding for this many tokens (after pooling); ``None``: none.
        name: the modality's name, for messages.
    """

    def __init__(
        self, in_dim: int, d_model: int, pool: PoolSpec | None = None, num_heads: int = 1, eps: float = 1e-6,
        positions: int | None = None, name: str = "vector",
    ):
        super().__init__()
        self.name = name
        self.pool_spec = pool or PoolSpec()
        self.proj = nn.Linear(in_dim, d_model)
        self.pool = create_pool(self.pool_spec.kind, d_model, self.pool_spec.length, num_heads)
        self.norm = T5LayerNorm(d_model, eps=eps)
        self.modality_embedding = nn.Parameter(torch.zeros(d_model))
        self.position_embedding = nn.Parameter(torch.zeros(positions, d_model)) if positions else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, init=nn.init) -> None:
        """Initialises every parameter of the adapter.

        Args:
            init: the module of init functions to use; the model passes ``transformers.initialization``
                so that weights loaded from a checkpoint are never overwritten.
        """
        init.normal_(self.proj.weight, mean=0.0, std=self.proj.in_features**-0.5)
        init.zeros_(self.proj.bias)
        init.ones_(self.norm.weight)
        init.normal_(self.modality_embedding, mean=0.0, std=0.02)
        if self.position_embedding is not None:
            init.normal_(self.position_embedding, mean=0.0, std=POSITION_INIT_STD)
        if isinstance(self.pool, AttentionPool):
            self.pool.reset_parameters(init=init)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Maps ``(B, N, D)`` features (and an optional ``(B, N)`` mask) to ``(B, P, d_model)`` tokens."""
        x = self.proj(x.to(self.proj.weight.dtype))  # (B, N, d_model)
        x, mask = self.pool(x, mask)  # (B, P, d_model), (B, P) | None
        x = self.norm(x) + self.modality_embedding  # (B, P, d_model)
        if self.position_embedding is not None:
            if x.shape[1] > len(self.position_embedding):
                raise FusionInputError(f"{x.shape[1]} '{self.name}' tokens, but position embeddings for "
                                       f"{len(self.position_embedding)}")
            x = x + self.position_embedding[: x.shape[1]]  # (B, P, d_model)
        return x, mask
