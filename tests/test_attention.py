"""ModulatedAttention against a float64 loop reference, at several grids, and its fixed-grid mode."""

import math

import pytest
import torch

from timm_oltr import ModulatedAttention


def _naive_residual(attn: ModulatedAttention, x: torch.Tensor) -> torch.Tensor:
    """S * M computed position by position in float64."""
    x = x.double()
    B, C, H, W = x.shape
    N = H * W

    def conv(layer, t):  # 1x1 conv as a per-position matrix product
        w = layer.weight.detach().double().flatten(1)
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        return [w @ t[:, n] + b for n in range(N)]

    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        cols = x[b].reshape(C, N)
        q, k, v = conv(attn.query, cols), conv(attn.key, cols), conv(attn.value, cols)
        attended = []
        for i in range(N):
            logits = [float(q[i] @ k[j]) * attn.scale for j in range(N)]
            top = max(logits)
            weights = [math.exp(s - top) for s in logits]
            total = sum(weights)
            attended.append(sum(weights[j] / total * v[j] for j in range(N)))
        mixed = [attn.out.weight.detach().double().flatten(1) @ a for a in attended]
        if attn.spatial == 'conv':
            spatial = [float(attn.spatial_logits.weight.detach().double().flatten() @ cols[:, n]) for n in range(N)]
            spatial = [s + float(attn.spatial_logits.bias.detach()) for s in spatial]
        else:
            spatial = (attn.spatial_logits.weight.detach().double() @ x[b].flatten()).tolist()
            spatial = [
                s + float(bias) for s, bias in zip(spatial, attn.spatial_logits.bias.detach().double(), strict=True)
            ]
        top = max(spatial)
        exps = [math.exp(s - top) for s in spatial]
        for n in range(N):
            out[b, :, n // W, n % W] = exps[n] / sum(exps) * mixed[n]
    return out


@pytest.mark.parametrize('spatial,grid', [('conv', (3, 4)), ('conv', (1, 1)), ('linear', (2, 3))])
@pytest.mark.parametrize('scaled', [False, True])
def test_attention_matches_naive_reference(spatial, grid, scaled):
    torch.manual_seed(0)
    attn = ModulatedAttention(6, spatial=spatial, grid=grid, out_init='official', scaled=scaled)
    x = torch.randn(2, 6, *grid)
    torch.testing.assert_close(attn.residual(x).double(), _naive_residual(attn, x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn(x), x + attn.residual(x))


def test_zero_init_is_identity_and_official_is_not():
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ModulatedAttention(8)(x), x)
    assert not torch.allclose(ModulatedAttention(8, out_init='official')(x), x)


@pytest.mark.parametrize('size', [(7, 7), (9, 9), (1, 1), (4, 12)])
def test_case_c07_conv_mode_works_at_any_grid(size):
    attn = ModulatedAttention(16, out_init='official')
    x = torch.randn(2, 16, *size, requires_grad=True)
    y = attn(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


def test_case_c07_linear_mode_checks_its_grid():
    attn = ModulatedAttention(16, spatial='linear', grid=(7, 7))
    assert attn.spatial_logits.in_features == 16 * 49
    with pytest.raises(ValueError, match='built for a 7x7 grid, got 9x9'):
        attn(torch.randn(1, 16, 9, 9))
    with pytest.raises(ValueError, match='grid'):
        ModulatedAttention(16, spatial='linear')


def test_channels_last_input():
    attn = ModulatedAttention(8, out_init='official')
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(attn(x.contiguous(memory_format=torch.channels_last)), attn(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match='spatial'):
        ModulatedAttention(8, spatial='fc')
    with pytest.raises(ValueError, match='out_init'):
        ModulatedAttention(8, out_init='ones')
    with pytest.raises(ValueError, match='channels'):
        ModulatedAttention(8)(torch.randn(1, 4, 3, 3))
