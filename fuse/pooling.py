"""Token pooling for vector modalities: ``none``, ``mean``, ``max`` and ``attention``.

Every pool maps ``(B, N, D)`` tokens and an optional ``(B, N)`` validity mask to ``(B, P, D)``
tokens and a ``(B, P)`` mask (``None`` when every output token is valid).

- ``mean`` / ``max`` split each sample's *valid* tokens, in order, into ``P`` contiguous groups of
  near-equal size (token ``j`` of ``n`` goes to group ``floor(j * P / n)``) and reduce each group.
  Grouping by the sample's own valid count makes the result independent of how much padding the
  batch adds. With no mask and ``N`` divisible by ``P`` this is a plain reshape-and-reduce.
  The groups are 1-D runs of the token order, which for a ViT is raster order: ViT-B/16's 196
  patch tokens pooled to 14 give one average per *row* of the 14x14 grid (each a 1x14 strip), not
  2-D windows (7x7 windows of 2x2 patches would be 49 tokens). This is the thesis' pooling over the
  token sequence; a 2-D window pooling is not offered.
- ``attention`` is Set Transformer's pooling by multihead attention (PMA, Lee et al. 2019) in the
  form of timm's ``AttentionPoolLatent``: ``P`` learned queries attend over the tokens, then the
  attention output is projected and a residual MLP with a LayerNorm in front is added
  (``y + MLP(LN(y))``). So it is more than "learned queries attending over the tokens": it has
  a per-token MLP of its own.

Pooling runs on the adapter's output, after the projection to ``d_model``
(:class:`fuse.modality.ModalityAdapter`): for ``mean`` that is the same as pooling first (the
projection is linear), for ``max`` and ``attention`` it is not (the max and the attention are over
projected features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NoPool(nn.Module):
    """Keeps every token."""

    def __init__(self, dim: int, length: int | None = None, num_heads: int = 1) -> None:
        super().__init__()

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, mask


class _GroupPool(nn.Module):
    """Reduces contiguous groups of valid tokens to ``length`` tokens (see module docstring)."""

    reduce: str = "mean"

    def __init__(self, dim: int, length: int, num_heads: int = 1) -> None:
        super().__init__()
        self.length = length

    def _reduce_reshaped(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(2) if self.reduce == "mean" else x.amax(2)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        P = self.length
        if mask is None and N % P == 0:
            return self._reduce_reshaped(x.reshape(B, P, N // P, D)), None  # (B, P, D)
        if mask is None:
            rank = torch.arange(N, device=x.device).expand(B, N)  # (B, N)
            count = torch.full((B, 1), N, device=x.device)
            valid = None
        else:
            valid = mask.bool()
            rank = valid.long().cumsum(1) - 1  # position of each token among its sample's valid tokens
            count = valid.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        group = torch.div(rank * P, count, rounding_mode="floor")  # (B, N), in 0..P-1
        if valid is not None:
            group = torch.where(valid, group, torch.full_like(group, P))  # padding: a discarded group P
        index = group.unsqueeze(-1).expand(B, N, D)  # (B, N, D)
        out = x.new_zeros(B, P + 1, D).scatter_reduce(
            1, index, x, reduce="mean" if self.reduce == "mean" else "amax", include_self=False
        )[:, :P]  # (B, P, D); an empty group stays 0 and is masked below
        if valid is None:
            return out, None
        counts = torch.zeros(B, P + 1, device=x.device).scatter_add_(1, group, valid.float())  # (B, P + 1)
        filled = counts[:, :P] > 0  # (B, P)
        return out, filled


class MeanPool(_GroupPool):
    reduce = "mean"


class MaxPool(_GroupPool):
    reduce = "max"


class AttentionPool(nn.Module):
    """``length`` learned queries attend over the tokens (PMA / timm ``AttentionPoolLatent``).

    Args:
        dim: token width (the model's ``d_model``).
        length: number of learned queries, i.e. output tokens.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the residual MLP, as a multiple of ``dim``.
    """

    def __init__(self, dim: int, length: int, num_heads: int = 1, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            num_heads = 1
        self.length, self.num_heads, self.head_dim = length, num_heads, dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, length, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, init=nn.init) -> None:
        """timm-style init: latent ~ N(0, dim^-1/2), linear weights trunc-normal(0.02), zero biases.

        Args:
            init: the module of init functions (``transformers.initialization`` inside the model,
                so that weights loaded from a checkpoint are not overwritten).
        """
        dim = self.latent.shape[-1]
        init.normal_(self.latent, mean=0.0, std=dim**-0.5)
        for module in (self.q, self.kv, self.proj, self.mlp[0], self.mlp[2]):
            init.trunc_normal_(module.weight, std=0.02)
            init.zeros_(module.bias)
        init.ones_(self.norm.weight)
        init.zeros_(self.norm.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        H, Dh, P = self.num_heads, self.head_dim, self.length
        q = self.q(self.latent).reshape(1, P, H, Dh).transpose(1, 2).expand(B, H, P, Dh)  # (B, H, P, Dh)
        k, v = self.kv(x).reshape(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, Dh)
        attn_mask, out_mask = None, None
        if mask is not None:
            valid = mask.bool()
            # A sample without any token attends to all (no NaN), and its outputs are masked.
            present = valid.any(1, keepdim=True)  # (B, 1)
            attn_mask = (valid | ~present)[:, None, None, :]  # (B, 1, 1, N)
            out_mask = present.expand(B, P)  # (B, P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, P, Dh)
        y = self.proj(y.transpose(1, 2).reshape(B, P, D))  # (B, P, D)
        y = y + self.mlp(self.norm(y))
        return y, out_mask


POOLS: dict[str, type[nn.Module]] = {
    "none": NoPool,
    "mean": MeanPool,
    "max": MaxPool,
    "attention": AttentionPool,
}


def create_pool(kind: str, dim: int, length: int | None, num_heads: int = 1) -> nn.Module:
    """Builds the pool named ``kind`` (a key of :data:`POOLS`)."""
    try:
        cls = POOLS[kind]
    except KeyError:
        raise ValueError(f"unknown pooling '{kind}' ({', '.join(POOLS)})") from None
    return cls(dim, length, num_heads)
