"""OLTR configuration: every constant of the method, with the paper's default.

Open Long-Tailed Recognition (OLTR), Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160

The official code scatters these values as literals through its forward passes. Here they live in one validated,
JSON-serialisable dataclass, so a checkpoint's `config.json` rebuilds exactly the same module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ['OLTRConfig']

_CHOICES = {
    'squash': ('linear', 'square'),
    'attention_spatial': ('conv', 'linear'),
    'attention_out_init': ('zero', 'official'),
    'open_set_score': ('msp', 'max_logit', 'energy', 'reachability'),
}


@dataclass(frozen=True, kw_only=True)
class OLTRConfig:
    """Constants of the OLTR model.

    Attributes:
        neck_dim: width E of the optional `Linear(D, E) + ReLU` neck between the backbone's pooled feature (width D)
            and the head (the official `fc_add`, 512 in the paper's stage 2). None (default) feeds the pooled
            feature straight to the head, so centroids computed before fine-tuning are the backbone's own class
            means and a stage-1 classifier can seed the hallucinator.
        reachability_scale: rho in `reachability = rho / min_distance` (10 in the official code).
        cosine_scale: scale s of the cosine classifier; logits lie in (-s, s) (16 in the official code).
        squash: norm squash before the cosine classifier: 'linear' n/(1+n) (the official code) or 'square'
            n^2/(1+n^2) (the paper's Eq. 6).
        attention: apply the modulated attention to the backbone's last feature map.
        attention_reduction: channel reduction r of the non-local block's query/key/value (2 in the paper).
        attention_spatial: spatial modulation: 'conv' (default) predicts one logit per position with a 1x1 conv and
            works at any grid; 'linear' is the official `Linear(H*W*C, H*W)` and works at one grid only.
        attention_grid: (H, W) of the 'linear' mode; None takes the grid the backbone produces at wrap time.
        attention_out_init: init of the output projection: 'zero' (the stated intent; the wrapped model starts
            equal to the backbone) or 'official' (normal, std sqrt(2 / C), as the released weights were trained).
        attention_scaled: scale the query-key products by 1/sqrt(C / r); the official block does not.
        distance_eps: lower bound of the nearest-centroid distance, so reachability stays finite.
        norm_eps: lower bound of vector norms in the cosine classifier.
        open_set_score: score used for open-set decisions, higher = more likely known: 'msp' (max softmax
            probability, the paper's), 'max_logit', 'energy' or 'reachability'.
        open_set_threshold: samples scoring below this are rejected as unknown (0.1 on 'msp' in the paper);
            usually re-chosen on validation data and stored with the checkpoint.
    """

    neck_dim: int | None = None
    reachability_scale: float = 10.0
    cosine_scale: float = 16.0
    squash: str = 'linear'
    attention: bool = True
    attention_reduction: int = 2
    attention_spatial: str = 'conv'
    attention_grid: tuple[int, int] | None = None
    attention_out_init: str = 'zero'
    attention_scaled: bool = False
    distance_eps: float = 1e-6
    norm_eps: float = 1e-6
    open_set_score: str = 'msp'
    open_set_threshold: float = 0.1

    def __post_init__(self) -> None:
        if self.attention_grid is not None:
            if not isinstance(self.attention_grid, (tuple, list)):
                raise ValueError(f'OLTRConfig.attention_grid={self.attention_grid!r} must be (H, W) or None.')
            object.__setattr__(self, 'attention_grid', tuple(self.attention_grid))
        self._validate()

    def _validate(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f'OLTRConfig.{name}={value!r} is not one of {choices}.')
        if self.neck_dim is not None and (not _is_int(self.neck_dim) or self.neck_dim <= 0):
            raise ValueError(f'OLTRConfig.neck_dim={self.neck_dim!r} must be a positive int or None.')
        if not _is_int(self.attention_reduction) or self.attention_reduction <= 0:
            raise ValueError(f'OLTRConfig.attention_reduction={self.attention_reduction!r} must be a positive int.')
        if self.attention_grid is not None and (
            len(self.attention_grid) != 2 or not all(_is_int(s) and s > 0 for s in self.attention_grid)
        ):
            raise ValueError(f'OLTRConfig.attention_grid={self.attention_grid!r} must be (H, W) positive ints or None.')
        for name in ('reachability_scale', 'cosine_scale', 'distance_eps', 'norm_eps'):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f'OLTRConfig.{name}={value!r} must be a positive finite number.')
        if not _is_real(self.open_set_threshold):
            raise ValueError(f'OLTRConfig.open_set_threshold={self.open_set_threshold!r} must be a finite number.')
        for name in ('attention', 'attention_scaled'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'OLTRConfig.{name}={getattr(self, name)!r} must be a bool.')

    def replace(self, **changes: Any) -> OLTRConfig:
        """A copy with `changes` applied (validated; unknown names raise ValueError)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        if out['attention_grid'] is not None:
            out['attention_grid'] = list(out['attention_grid'])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OLTRConfig:
        """Build from a dict such as `to_dict()` wrote; unknown keys raise ValueError naming them."""
        if not isinstance(values, dict):
            raise TypeError(f'OLTRConfig.from_dict expects a dict, got {type(values).__name__}.')
        _check_names(values)
        return cls(**values)


def _check_names(values: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(OLTRConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f'Unknown OLTRConfig field(s) {unknown}; known fields are {sorted(known)}.')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
