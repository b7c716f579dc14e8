"""Dynamic meta-embedding head with a cosine classifier.

OLTR, Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160, Sec. 3.2 ("dynamic meta-embedding").

Shapes: B batch, E feature width (v_direct), K number of known classes.

    d_min       = min_k ||v - c_k||                      (B,)    nearest valid centroid, fp32, >= distance_eps
    reach       = rho / d_min                            (B,)    reachability, rho = 10
    memory      = softmax(hallucinator(v)) @ centroids   (B, E)  convex combination of centroids
    selector    = tanh(W_e v + b_e)                      (B, E)  concept selector
    v_meta      = reach * (v + selector * memory)        (B, E)
    logits      = s * squash(||v_meta||) * cos(v_meta, w_k)      s = 16, squash(n) = n / (1 + n)

The centroids (K, E) belong to the head, so data parallelism never splits them and one state dict restores
everything inference needs. The classifier reads them detached; they learn only through the centroid loss.
Since the cosine classifier divides by the norm, reachability only sets how confident the logits are: a sample
far from every centroid gets small logits, a flat softmax, a low max-probability, and is rejected as unknown.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import OLTRConfig

__all__ = ['CosineClassifier', 'MetaEmbeddingHead', 'OLTROutput']


class OLTROutput(NamedTuple):
    """Everything the meta-embedding head computes for a batch.

    Attributes:
        logits: (B, K) float32 class logits.
        features: (B, E) v_direct, the feature the centroid loss and the centroids see.
        reachability: (B,) float32 reachability_scale / min_distance; higher = nearer a known class.
        min_distance: (B,) float32 Euclidean distance to the nearest valid centroid.
        memory: (B, E) float32 memory feature (hallucinated combination of centroids).
        meta: (B, E) float32 meta-embedding fed to the cosine classifier.
    """

    logits: torch.Tensor
    features: torch.Tensor
    reachability: torch.Tensor
    min_distance: torch.Tensor
    memory: torch.Tensor
    meta: torch.Tensor


class CosineClassifier(nn.Module):
    """Cosine classifier with a norm squash: `logits = s * squash(||x||) * cos(x, w_k)`, computed in fp32.

    Args:
        in_features: E.
        num_classes: K.
        scale: s, logits lie in (-s, s) (16 in the paper).
        squash: 'linear' n / (1 + n) (the official code) or 'square' n^2 / (1 + n^2) (the paper's Eq. 6).
        eps: lower bound of the norms.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        scale: float = 16.0,
        squash: str = 'linear',
        eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if squash not in ('linear', 'square'):
            raise ValueError(f"squash={squash!r} must be 'linear' or 'square'.")
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = scale
        self.squash = squash
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, K) float32 logits."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            norm = x.norm(dim=1, keepdim=True).clamp_min(self.eps)  # (B, 1)
            squashed = norm / (1 + norm) if self.squash == 'linear' else norm.square() / (1 + norm.square())
            weight = self.weight.float()
            # NOTE: dividing the (B, K) logits by the class norms, rather than normalising the (K, E) weight,
            # keeps (K, E) temporaries out of forward and backward: they dominate the head's memory at large K
            weight_norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(self.eps)  # (K,)
            return (self.scale * squashed / norm * x) @ weight.t() / weight_norm

    def extra_repr(self) -> str:
        return f'{self.in_features} -> {self.num_classes}, scale={self.scale}, squash={self.squash}'


class MetaEmbeddingHead(nn.Module):
    """OLTR's dynamic meta-embedding classifier.

    Args:
        in_features: E, width of v_direct.
        num_classes: K.
        config: the method's constants (reachability and cosine scales, squash, epsilons).

    Attributes:
        centroids: (K, E) parameter, the visual memory; set from data with `set_centroids` (usually through
            `timm_oltr.init_centroids`) and learned through the centroid loss only.
        class_counts: (K,) long buffer, training images per class recorded with the centroids.
        initialized: bool buffer, whether the centroids were set from data.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        config: OLTRConfig | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (('in_features', in_features), ('num_classes', num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'{name}={value!r} must be a positive int.')
        self.config = config or OLTRConfig()
        self.in_features = in_features
        self.selector = nn.Linear(in_features, in_features, device=device, dtype=dtype)
        self._build_class_parts(num_classes, device=device, dtype=dtype)
        self.register_load_state_dict_post_hook(_forget_ready)

    def _build_class_parts(self, num_classes: int, **factory) -> None:
        config = self.config
        E = self.in_features
        self.num_classes = num_classes
        self.hallucinator = nn.Linear(E, num_classes, **factory)
        self.classifier = CosineClassifier(
            E, num_classes, scale=config.cosine_scale, squash=config.squash, eps=config.norm_eps, **factory
        )
        self.centroids = nn.Parameter(torch.zeros(num_classes, E, **factory))
        self.register_buffer('class_counts', torch.zeros(num_classes, dtype=torch.long, device=factory['device']))
        self.register_buffer('initialized', torch.zeros((), dtype=torch.bool, device=factory['device']))
        self._ready: bool | None = False  # host-side copy of `initialized`; None = read it again

    @property
    def is_initialized(self) -> bool:
        """Whether the centroids were set from data (read from the device once, then cached)."""
        if self._ready is None:
            self._ready = bool(self.initialized)
        return self._ready

    @property
    def valid_classes(self) -> torch.Tensor:
        """(K,) bool: classes that take part in the nearest-centroid search and the memory.

        Every class until the centroids are initialised; afterwards the classes with training images.
        """
        return ~self.initialized | (self.class_counts > 0)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor, class_counts: torch.Tensor) -> None:
        """Store class centroids and the training counts they came from.

        Args:
            centroids: (K, E) class means; rows of classes with count 0 are kept out of the search and memory.
            class_counts: (K,) training images per class.
        """
        if centroids.shape != self.centroids.shape:
            raise ValueError(f'centroids has shape {tuple(centroids.shape)}, expected {tuple(self.centroids.shape)}.')
        if class_counts.shape != (self.num_classes,):
            raise ValueError(f'class_counts has shape {tuple(class_counts.shape)}, expected ({self.num_classes},).')
        if not torch.isfinite(centroids).all():
            raise ValueError('centroids contain NaN or inf.')
        if (class_counts < 0).any() or not (class_counts > 0).any():
            raise ValueError('class_counts must be non-negative with at least one class above zero.')
        self.centroids.copy_(centroids)
        self.class_counts.copy_(class_counts)
        self.initialized.fill_(True)
        self._ready = True

    def reset(self, num_classes: int) -> None:
        """Rebuild every class-dependent part for `num_classes` classes; the centroids become uninitialised."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
            raise ValueError(f'num_classes={num_classes!r} must be a positive int.')
        ref = self.selector.weight
        self._build_class_parts(num_classes, device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor) -> OLTROutput:
        """(B, E) v_direct -> OLTROutput."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f'x must have shape (B, {self.in_features}), got {tuple(x.shape)}.')
        valid = self.valid_classes
        hallucinated = self.hallucinator(x).masked_fill(~valid, float('-inf'))  # (B, K)
        selector = torch.tanh(self.selector(x))  # (B, E)

        with torch.autocast(x.device.type, enabled=False):
            v = x.float()
            centroids = self.centroids.detach().float()

            # reachability: the search uses the expanded form (O(B*K) memory), the distance itself is exact
            with torch.no_grad():
                centroid_sq = torch.linalg.vector_norm(centroids, dim=1).square()  # (K,), no (K, E) temporary
                sq_dist = v.square().sum(1, keepdim=True) - 2 * v @ centroids.t() + centroid_sq
                nearest = sq_dist.masked_fill(~valid, float('inf')).argmin(dim=1)  # (B,)
            sq_min = (v - centroids[nearest]).square().sum(1)
            min_distance = sq_min.clamp_min(self.config.distance_eps**2).sqrt()  # (B,)
            reachability = self.config.reachability_scale / min_distance

            memory = hallucinated.float().softmax(dim=1) @ centroids  # (B, E)
            meta = reachability[:, None] * (v + selector.float() * memory)
            logits = self.classifier(meta)

        return OLTROutput(logits, x, reachability, min_distance, memory, meta)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, num_classes={self.num_classes}'


def _forget_ready(module: MetaEmbeddingHead, incompatible_keys: Any) -> None:
    module._ready = None
