"""Modulated attention: a non-local self-attention block whose output is re-weighted by a spatial map.

OLTR, Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160, Sec. 3.3 ("modulated attention").

Shapes: B batch, C channels of the map, C' = C / reduction, H x W grid, N = H * W positions.

    Q, K, V = 1x1 convs C -> C'                          (B, N, C') each
    A = softmax(Q K^T)                                   (B, N, N), unscaled as in the official block
    M = out(A V)                                         (B, C, H, W), 1x1 conv C' -> C, no bias
    S = softmax over the N positions of a spatial logit  (B, 1, H, W)
    y = x + S * M

The official spatial logit is `Linear(H*W*C, H*W)` on the flattened map: C * (H*W)^2 weights and one fixed grid
(7x7 in the paper). The default here, 'conv', predicts the logit of each position with a 1x1 conv (C weights) and
works at any grid; the official form is kept as `spatial='linear'`, checked against its grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ModulatedAttention']


class ModulatedAttention(nn.Module):
    """Non-local self-attention with spatial modulation and a residual connection.

    Args:
        channels: C, channels of the input map.
        reduction: r; query, key and value have C // r channels (2 in the paper).
        spatial: 'conv' (any grid, default) or 'linear' (the official fixed-grid layer).
        grid: (H, W) for `spatial='linear'`; required there, ignored otherwise.
        out_init: 'zero' makes the block an identity at init (so features, and centroids computed from them,
            equal the backbone's); 'official' draws it from N(0, 2 / C) as the released models were trained.
        scaled: scale the attention logits by 1 / sqrt(C'); the official block does not.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 2,
        spatial: str = 'conv',
        grid: tuple[int, int] | None = None,
        out_init: str = 'zero',
        scaled: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels < reduction:
            raise ValueError(f'channels={channels} must be at least reduction={reduction}.')
        if spatial == 'linear' and grid is None:
            raise ValueError("spatial='linear' needs the grid (H, W) it is built for; pass grid=(H, W).")
        if spatial not in ('conv', 'linear'):
            raise ValueError(f"spatial={spatial!r} must be 'conv' or 'linear'.")
        if out_init not in ('zero', 'official'):
            raise ValueError(f"out_init={out_init!r} must be 'zero' or 'official'.")
        factory = dict(device=device, dtype=dtype)
        inner = channels // reduction
        self.channels = channels
        self.spatial = spatial
        self.grid = tuple(grid) if spatial == 'linear' else None
        self.scale = 1.0 / math.sqrt(inner) if scaled else 1.0

        self.query = nn.Conv2d(channels, inner, 1, **factory)
        self.key = nn.Conv2d(channels, inner, 1, **factory)
        self.value = nn.Conv2d(channels, inner, 1, **factory)
        self.out = nn.Conv2d(inner, channels, 1, bias=False, **factory)
        if spatial == 'conv':
            self.spatial_logits = nn.Conv2d(channels, 1, 1, **factory)
        else:
            H, W = self.grid
            self.spatial_logits = nn.Linear(channels * H * W, H * W, **factory)
        self.reset_parameters(out_init)

    def reset_parameters(self, out_init: str = 'zero') -> None:
        """Kaiming-normal (fan out) query/key/value with zero bias; output projection by `out_init`."""
        for conv in (self.query, self.key, self.value):
            nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
            nn.init.zeros_(conv.bias)
        if out_init == 'zero':
            nn.init.zeros_(self.out.weight)
        else:
            nn.init.normal_(self.out.weight, std=math.sqrt(2.0 / self.channels))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's contribution S * M for a (B, C, H, W) map; `forward` adds it to `x`."""
        B, C, H, W = x.shape
        if C != self.channels:
            raise ValueError(f'x has {C} channels, the attention was built for {self.channels}.')

        # non-local self-attention over the N = H * W positions
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C')
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, 1, N, C')
        y = y.squeeze(1).transpose(1, 2).reshape(B, self.value.out_channels, H, W)
        attended = self.out(y)  # (B, C, H, W)

        # spatial modulation: a distribution over the positions, broadcast over channels
        if self.spatial == 'conv':
            logits = self.spatial_logits(x).flatten(1)  # (B, N)
        else:
            if (H, W) != self.grid:
                raise ValueError(
                    f"the fixed-grid attention (attention_spatial='linear') was built for a {self.grid[0]}x"
                    f"{self.grid[1]} grid, got {H}x{W}; use attention_spatial='conv' (any size) or images of the size "
                    'it was built for.'
                )
            logits = self.spatial_logits(x.flatten(1))  # (B, N), flattened in (channel, row, col) order
        modulation = logits.softmax(dim=1).reshape(B, 1, H, W)
        return modulation * attended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): `x + S * M`."""
        return x + self.residual(x)

    def extra_repr(self) -> str:
        grid = f', grid={self.grid}' if self.grid else ''
        return f'channels={self.channels}, spatial={self.spatial!r}{grid}'
