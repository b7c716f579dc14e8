"""Feature layouts: a timm backbone's `forward_features` output as a (B, C, H, W) grid and back.

Part of timm-oltr, an implementation of OLTR (Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160).

timm families return their last feature map in one of three layouts:
    NCHW  (B, C, H, W)      most CNNs
    NHWC  (B, H, W, C)      Swin, SwinV2, MambaOut, Sequencer, ... (they declare `output_fmt = 'NHWC'`)
    NLC   (B, P + H*W, C)   ViT, DeiT, EVA, CaiT, XCiT, VOLO, Mixer, LeViT, ... with P prefix tokens (cls, dist, reg)
and a few (PiT's cls tokens only, CrossViT/CoaT lists) have no usable spatial map at all ('none').

The layout is found once, by probing the backbone at construction, and kept as plain Python values so the forward
pass has static control flow (torch.compile, export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ['FeatureLayout', 'probe_layout', 'to_grid', 'from_grid']


@dataclass(frozen=True)
class FeatureLayout:
    """How a backbone lays out its `forward_features` output.

    Attributes:
        fmt: 'NCHW', 'NHWC', 'NLC' or 'none' (no spatial map: the attention is skipped).
        channels: C, channels of the map (timm's `num_features`).
        grid: (H, W) of the map at the probed input size.
        num_prefix_tokens: P, tokens before the patch tokens in an NLC sequence (cls, distillation, register).
    """

    fmt: str
    channels: int
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0

    @property
    def has_grid(self) -> bool:
        return self.fmt != 'none'


@torch.no_grad()
def probe_layout(backbone: nn.Module, input_size: tuple[int, int, int]) -> FeatureLayout:
    """Find the layout of `backbone.forward_features` by one dummy forward in eval mode.

    Args:
        backbone: a timm model.
        input_size: (C, H, W) of the probe image.

    Returns:
        The layout. Token grids come from `forward_intermediates`, so the prefix count is right even where the
        model has no `num_prefix_tokens` attribute (VOLO).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        feats = backbone.forward_features(x)
        if not torch.is_tensor(feats) or feats.ndim not in (3, 4):
            channels = int(getattr(backbone, 'num_features', 0))
            return FeatureLayout('none', channels)
        if feats.ndim == 4:
            if getattr(backbone, 'output_fmt', 'NCHW') == 'NHWC':
                return FeatureLayout('NHWC', int(feats.shape[-1]), tuple(feats.shape[1:3]))
            return FeatureLayout('NCHW', int(feats.shape[1]), tuple(feats.shape[2:]))

        # tokens: the grid of the last intermediate (NCHW) tells how many tokens are patches
        try:
            last = backbone.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
        except (AttributeError, NotImplementedError, TypeError, AssertionError, RuntimeError):
            last = None
        if last is None or last.ndim != 4:
            return FeatureLayout('none', int(feats.shape[-1]))
        H, W = (int(s) for s in last.shape[-2:])
        num_prefix = feats.shape[1] - H * W
        if num_prefix < 0 or last.shape[1] != feats.shape[-1]:
            return FeatureLayout('none', int(feats.shape[-1]))  # e.g. PiT: only the cls tokens come out
        return FeatureLayout('NLC', int(feats.shape[-1]), (H, W), int(num_prefix))
    finally:
        backbone.train(was_training)


def to_grid(
    x: torch.Tensor,
    layout: FeatureLayout,
    img_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn a feature output into a (B, C, H, W) grid.

    Args:
        x: `forward_features` output in `layout`.
        layout: the backbone's layout.
        img_size: (H, W) of the input image; used to recover a token grid when the input size differs from the
            probed one (ViT with `dynamic_img_size=True`).

    Returns:
        (grid (B, C, H, W), prefix tokens (B, P, C) or None). The grid may be a non-contiguous view.
    """
    if layout.fmt == 'NCHW':
        return x, None
    if layout.fmt == 'NHWC':
        return x.permute(0, 3, 1, 2), None
    if layout.fmt != 'NLC':
        raise ValueError(f'layout {layout.fmt!r} has no spatial grid.')

    P = layout.num_prefix_tokens
    prefix, tokens = (x[:, :P], x[:, P:]) if P else (None, x)
    B, N, C = tokens.shape
    H, W = _token_grid(N, layout.grid, img_size)
    return tokens.transpose(1, 2).reshape(B, C, H, W), prefix


def from_grid(grid: torch.Tensor, prefix: torch.Tensor | None, layout: FeatureLayout) -> torch.Tensor:
    """Exact inverse of `to_grid`: back to the backbone's own layout."""
    if layout.fmt == 'NCHW':
        return grid
    if layout.fmt == 'NHWC':
        return grid.permute(0, 2, 3, 1)
    tokens = grid.flatten(2).transpose(1, 2)  # (B, H*W, C)
    return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)


def _token_grid(num_tokens: int, probed: tuple[int, int], img_size: tuple[int, int] | None) -> tuple[int, int]:
    if probed[0] * probed[1] == num_tokens:
        return probed
    if img_size is None:
        raise ValueError(f'cannot lay {num_tokens} patch tokens on a grid without the input image size.')
    # NOTE: the patch stride is the same on both axes for every timm token model, so the grid keeps the aspect ratio
    H_img, W_img = img_size
    H = max(1, round(math.sqrt(num_tokens * H_img / W_img)))
    W = num_tokens // H
    if H * W != num_tokens:
        raise ValueError(f'cannot lay {num_tokens} patch tokens on a grid for an input of {H_img}x{W_img}.')
    return H, W
