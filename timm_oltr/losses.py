"""Discriminative centroid loss and the full OLTR training loss.

From "Large-Scale Long-Tailed Recognition in an Open World" (OLTR), Liu et al., CVPR 2019,
https://arxiv.org/abs/1904.05160. The default follows the authors' released code rather than the paper's
Eq. 9 (squared distances, one mean-based repulsion hinge, margin 10, an internal 0.01 repulsion weight), and
reproduces its centroid update rule; the paper's form is an option.

Dimensions: B batch, K number of known classes, E width of the direct feature v_direct.

Targets are either hard labels (B,) long, or soft targets (B, K) float with rows summing to 1 (mixup, cutmix,
label smoothing). Every term is linear in the targets, so a soft target means "the target-weighted mixture
of the hard-label losses": with ``t_ij`` the weight of class j for sample i,

* attraction pulls ``f_i`` towards every centroid in proportion to ``t_ij``,
* repulsion counts the distance to ``c_j`` with weight ``1 - t_ij`` (a hard label zeroes the target column).

No (B, K, E) tensor is ever built: squared distances use ``|f|^2 + |c|^2 - 2 f.c`` through one (B, E) x (E, K)
matrix product.
"""

import logging
import math
import numbers
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .centroids import _unwrap
from .head import OLTROutput

__all__ = ['CentroidLossBreakdown', 'DiscriminativeCentroidLoss', 'OLTRLoss', 'OLTRLossBreakdown']

_logger = logging.getLogger(__name__)

_SOFT_TARGET_ATOL = 1e-3


class CentroidLossBreakdown(NamedTuple):
    """Value and components of the discriminative centroid loss.

    Attributes:
        loss: () the loss, differentiable.
        attract: () attraction term (detached). Official form: ``(1/(2B)) sum_i |f_i - c_{y_i}|^2``;
            paper form: mean distance to the target centroid.
        repel: () repulsion term (detached). Official form: the clamped hinge ``max(0, margin - mean Dsq)``;
            paper form: mean distance to the non-target centroids.
        repel_active: () float fraction of hinge terms that are active (official form: 0.0 or 1.0). The
            official hinge is usually inactive with realistic feature norms (spec 5.4.1); log it to check.
    """

    loss: torch.Tensor
    attract: torch.Tensor
    repel: torch.Tensor
    repel_active: torch.Tensor


class OLTRLossBreakdown(NamedTuple):
    """Value and components of the OLTR training loss.

    Attributes:
        loss: () total loss ``ce + centroid_weight * centroid``, differentiable.
        ce: () cross-entropy on the logits (detached).
        centroid: () discriminative centroid loss before weighting (detached).
        attract: () attraction term of the centroid loss (detached).
        repel: () repulsion term of the centroid loss (detached).
        repel_active: () fraction of active repulsion hinge terms.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    centroid: torch.Tensor
    attract: torch.Tensor
    repel: torch.Tensor
    repel_active: torch.Tensor


def _check_number(
    name: str, value: Any, *, minimum: float, above: bool = False, below: float = math.inf, hint: str
) -> float:
    """``value`` as a float after checking that it is a finite real number in ``[minimum, below)``.

    ``above=True`` excludes ``minimum`` itself. Raises TypeError for a non-number (bool included) and ValueError for
    NaN, inf or a value out of range, naming ``name``, the value, the expected range and ``hint`` (how to fix).
    """
    low = f'> {minimum:g}' if above else f'>= {minimum:g}'
    expected = low if below == math.inf else f'in {"(" if above else "["}{minimum:g}, {below:g})'
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a real number {expected}, got {value!r} ({type(value).__name__}); {hint}.')
    if not math.isfinite(value):
        raise ValueError(f'{name} must be a finite number {expected}, got {value!r}; {hint}.')
    if value < minimum or (above and value == minimum) or value >= below:
        raise ValueError(f'{name} must be {expected}, got {value!r}; {hint}.')
    return float(value)


def _check_inputs(features: torch.Tensor, centroids: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f'features must be a (B, E) tensor, got {shape}.')
    if not isinstance(centroids, torch.Tensor) or centroids.ndim != 2:
        shape = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        raise ValueError(f'centroids must be a (K, E) tensor, got {shape}.')
    B, E = features.shape
    K = centroids.shape[0]
    if centroids.shape[1] != E:
        raise ValueError(
            f'centroids has width {centroids.shape[1]} but features has width {E}; both must be E '
            '(the head consumes v_direct of width model.head_hidden_size).'
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(
            f'targets must be a tensor of labels (B,) or soft targets (B, K), got {type(targets).__name__}.'
        )

    if targets.ndim == 1:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f'targets of shape (B,) must be integer class ids, got dtype {targets.dtype}.')
        if targets.shape[0] != B:
            raise ValueError(f'targets has {targets.shape[0]} labels but features has batch size {B}.')
        if B and bool(((targets < 0) | (targets >= K)).any()):
            bad = targets[(targets < 0) | (targets >= K)].unique().tolist()
            raise ValueError(f'targets contains labels {bad[:10]} outside [0, {K}) (K = number of centroids).')
    elif targets.ndim == 2:
        if not targets.dtype.is_floating_point:
            raise ValueError(f'soft targets of shape (B, K) must be floating point, got dtype {targets.dtype}.')
        if tuple(targets.shape) != (B, K):
            raise ValueError(f'soft targets must have shape (B, K) = {(B, K)}, got {tuple(targets.shape)}.')
        # one device sync on the training path; the diagnosis below runs only for bad targets
        row_sums = targets.float().sum(dim=1)
        finite = torch.isfinite(targets)
        if B and bool(~finite.all() | ((row_sums - 1).abs() > _SOFT_TARGET_ATOL).any() | (targets < 0).any()):
            if not bool(finite.all()):
                rows = (~finite).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(
                    f'targets must be finite soft targets, got NaN or inf in rows {rows[:10]}'
                    + (f' ({len(rows)} rows in all)' if len(rows) > 10 else '')
                    + '; check the mixup / cutmix / label smoothing step (or the data) that produced them.'
                )
            raise ValueError(
                'soft targets must be non-negative with rows summing to 1 (mixup / cutmix / label smoothing), '
                f'got row sums in [{row_sums.min().item():.4g}, {row_sums.max().item():.4g}] '
                f'and minimum {targets.min().item():.4g}.'
            )
    else:
        raise ValueError(f'targets must be (B,) labels or (B, K) soft targets, got shape {tuple(targets.shape)}.')


def _target_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K) float32 target weights: one-hot for hard labels, the soft targets otherwise."""
    if targets.ndim == 1:
        return F.one_hot(targets.long(), num_classes).float()
    return targets.float()


def _squared_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, K) squared Euclidean distances via the expanded form, without a (B, K, E) intermediate."""
    f_sq = features.pow(2).sum(dim=1, keepdim=True)  # (B, 1)
    c_sq = torch.linalg.vector_norm(centroids, dim=1).square()  # (K,), no (K, E) temporary
    return f_sq + c_sq - 2.0 * features @ centroids.t()  # (B, K)


def _attract_sum(features: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_ij w_ij |f_i - c_j|^2 (scalar) without (B, K, E).

    With the target mixture ``m_i = sum_j w_ij c_j`` and ``s_i = sum_j w_ij`` this equals
    ``|f_i - m_i|^2 + (sum_j w_ij |c_j|^2 - |m_i|^2) + (s_i - 1) |f_i|^2``: the feature enters through a direct
    difference (no cancellation for one-hot rows, where the middle term is exactly 0), the middle term is the
    spread of the mixed centroids.
    """
    mixture = weights @ centroids  # (B, E)
    spread = weights @ centroids.pow(2).sum(dim=1) - mixture.pow(2).sum(dim=1)  # (B,)
    excess = (weights.sum(dim=1) - 1.0) * features.pow(2).sum(dim=1)  # (B,) 0 up to rounding
    return ((features - mixture).pow(2).sum(dim=1) + spread + excess).sum()


def _official_centroid_grad(features: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K, E) centroid gradient of the official code: ``(1/B) sum_i t_ij (c_j - f_i) / (1 + n_j)``.

    ``n_j = sum_i t_ij`` is the (soft) count of class j in the batch; rows of absent classes are 0.
    """
    B = features.shape[0]
    counts = weights.sum(dim=0)  # (K,)
    pulled = weights.t() @ features  # (K, E) sum_i t_ij f_i
    return (counts[:, None] * centroids - pulled) / ((1.0 + counts[:, None]) * B)


class DiscriminativeCentroidLoss(nn.Module):
    """Discriminative centroid loss on the direct feature (OLTR's modulated large-margin loss).

    ``form='official'`` (default, the released code, spec 5.2), with ``Dsq_ij = |f_i - c_j|^2``::

        attract = (1 / (2B)) * sum_ij t_ij Dsq_ij                 # = (1/(2B)) sum_i |f_i - c_{y_i}|^2
        repel   = clamp(margin - sum_ij (1 - t_ij) Dsq_ij / (B K), 0, 1e6)
        loss    = attract + repel_weight * repel

    The mean in ``repel`` runs over all B*K entries, target entries included as zeros, as in the code.

    ``form='paper'`` (our reading of Eq. 9: one hinge per sample on plain Euclidean distances
    ``d_ij = sqrt(Dsq_ij)``; the non-target distances are averaged over the K - 1 other classes so the margin
    does not scale with K, and ``repel_weight`` is not used)::

        pos_i = sum_j t_ij d_ij
        neg_i = sum_j (1 - t_ij) d_ij / sum_j (1 - t_ij)
        loss  = (1/B) sum_i max(0, pos_i - neg_i + margin)

    Centroid gradient (``centroid_grad``):

    * ``'official'`` (default for the official form, spec 5.3): the attraction gives centroid row j
      ``g_j = (1/B) sum_i t_ij (c_j - f_i) / (1 + n_j)`` with ``n_j = sum_i t_ij`` (the count of class j in the
      batch for hard labels), the classic center-loss step. It is not the derivative of the loss and does not
      scale with the loss weight: the caller passes that weight as ``loss_weight`` and the centroid gradient is
      ``g_j * upstream / loss_weight``. With plain training ``upstream == loss_weight``, so an SGD step with
      learning rate lr moves ``c_j`` by exactly ``-lr * g_j``, whatever the weight. Any further factor
      (a GradScaler's scale, which ``unscale_`` removes again; gradient-accumulation averaging) passes
      through like for every other parameter. Features always receive the exact gradient; the repulsion
      term uses plain autograd for both features and centroids.
    * ``'autograd'``: the exact derivative everywhere (default, and the only choice, for the paper form).

    Args:
        margin: repulsion margin, in squared distance units for the official form (official 10.0) and in
            distance units for the paper form.
        repel_weight: weight of the repulsion term inside the official form (official 0.01).
        form: ``'official'`` or ``'paper'``, see above.
        centroid_grad: ``'official'``, ``'autograd'``, or None for the form's default.

    Raises:
        TypeError: if ``margin`` or ``repel_weight`` is not a real number.
        ValueError: on an unknown ``form`` or ``centroid_grad``, or a ``margin`` or ``repel_weight`` that is NaN,
            inf or negative.

    Example:
        >>> loss_fn = DiscriminativeCentroidLoss()
        >>> loss = loss_fn(torch.randn(8, 16), torch.randn(5, 16, requires_grad=True), torch.randint(5, (8,)))
    """

    def __init__(
        self,
        *,
        margin: float = 10.0,
        repel_weight: float = 0.01,
        form: Literal['official', 'paper'] = 'official',
        centroid_grad: Literal['official', 'autograd'] | None = None,
    ) -> None:
        super().__init__()
        if form not in ('official', 'paper'):
            raise ValueError(f"form must be 'official' or 'paper', got {form!r}.")
        if centroid_grad is None:
            centroid_grad = 'official' if form == 'official' else 'autograd'
        if centroid_grad not in ('official', 'autograd'):
            raise ValueError(f"centroid_grad must be 'official', 'autograd' or None, got {centroid_grad!r}.")
        if form == 'paper' and centroid_grad == 'official':
            raise ValueError(
                "centroid_grad='official' is the update rule of the official form's attraction term; "
                "use centroid_grad='autograd' (or None) with form='paper'."
            )
        self.margin = _check_number('margin', margin, minimum=0.0, hint='the official form uses 10.0')
        self.repel_weight = _check_number(
            'repel_weight', repel_weight, minimum=0.0, hint='the official value is 0.01; 0 turns the repulsion off'
        )
        self.form = form
        self.centroid_grad = centroid_grad

    def forward(
        self,
        features: torch.Tensor,
        centroids: torch.Tensor,
        targets: torch.Tensor,
        *,
        loss_weight: float = 1.0,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            features: (B, E) direct features v_direct; computed in float32 whatever their dtype.
            centroids: (K, E) class centroids (the head's parameter).
            targets: (B,) integer labels in [0, K) or (B, K) soft targets with rows summing to 1.
            loss_weight: the factor the caller multiplies this loss by (only used by
                ``centroid_grad='official'``, see the class docstring).

        Returns:
            () the loss.

        Raises:
            ValueError: on wrong shapes, labels out of range, soft targets that are not finite distributions, or a
                ``loss_weight`` that is not a finite number > 0.
        """
        return self.breakdown(features, centroids, targets, loss_weight=loss_weight).loss

    def breakdown(
        self,
        features: torch.Tensor,
        centroids: torch.Tensor,
        targets: torch.Tensor,
        *,
        loss_weight: float = 1.0,
    ) -> CentroidLossBreakdown:
        """Compute the loss and its components, for logging. Arguments as in ``forward``."""
        _check_inputs(features, centroids, targets)
        loss_weight = _check_number(
            'loss_weight',
            loss_weight,
            minimum=0.0,
            above=True,
            hint='pass the factor this loss is multiplied by (e.g. OLTRLoss.centroid_weight), or 1.0',
        )
        B, K = features.shape[0], centroids.shape[0]
        if B == 0:
            zero = features.float().sum() * 0 + centroids.float().sum() * 0
            return CentroidLossBreakdown(zero, zero.detach(), zero.detach(), zero.detach())

        # float32 throughout: autocast would run the distance matmul in half precision
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            centroids = centroids.float()
            weights = _target_weights(targets, K)  # (B, K)
            if self.form == 'official':
                return self._official(features, centroids, weights, loss_weight)
            return self._paper(features, centroids, weights)

    def _official(
        self, features: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor, loss_weight: float
    ) -> CentroidLossBreakdown:
        B, K = weights.shape

        # attraction: exact gradient to the features; centroids per the selected rule
        if self.centroid_grad == 'official':
            attract = _attract_sum(features, centroids.detach(), weights) / (2 * B)
            grad = _official_centroid_grad(features.detach(), centroids.detach(), weights) / loss_weight
            # NOTE: adds exactly zero to the value; its only effect is d(attract)/d(centroids) = grad.
            surrogate = (centroids * grad).sum()
            attract = attract + (surrogate - surrogate.detach())
        else:
            attract = _attract_sum(features, centroids, weights) / (2 * B)

        # repulsion: hinge on the mean squared distance to the non-target centroids
        dist_sq = _squared_distances(features, centroids) * (1.0 - weights)  # (B, K)
        gap = self.margin - dist_sq.sum() / (B * K)
        repel = gap.clamp(0.0, 1e6)

        loss = attract + self.repel_weight * repel
        active = (gap > 0).float()
        return CentroidLossBreakdown(loss, attract.detach(), repel.detach(), active.detach())

    def _paper(self, features: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor) -> CentroidLossBreakdown:
        K = weights.shape[1]
        if K < 2:
            raise ValueError(f"form='paper' needs at least 2 centroids to repel from, got K = {K}.")

        # sqrt needs a floor: its derivative is infinite at 0 (a feature on its centroid)
        dist = _squared_distances(features, centroids).clamp_min(1e-12).sqrt()  # (B, K)
        pos = (weights * dist).sum(dim=1)  # (B,)
        neg_weights = 1.0 - weights
        neg = (neg_weights * dist).sum(dim=1) / neg_weights.sum(dim=1).clamp_min(1e-12)  # (B,)
        hinge = (pos - neg + self.margin).clamp_min(0.0)

        loss = hinge.mean()
        active = (pos - neg + self.margin > 0).float().mean()
        return CentroidLossBreakdown(loss, pos.mean().detach(), neg.mean().detach(), active.detach())

    def extra_repr(self) -> str:
        return (
            f'form={self.form!r}, margin={self.margin}, repel_weight={self.repel_weight}, '
            f'centroid_grad={self.centroid_grad!r}'
        )


class OLTRLoss(nn.Module):
    """OLTR training loss: cross-entropy on the logits plus the weighted centroid loss on v_direct.

    ``loss = CE(logits, targets) + centroid_weight * centroid_loss(features, head.centroids, targets)``
    (official weight 0.01). The centroid loss sees the direct feature, as in the code (the paper's Eq. 7 puts
    it on v_meta, spec 9.12). Hard labels (B,) and soft targets (B, K) both work; see this module's docstring
    for what a soft target means to the centroid loss. ``label_smoothing`` applies to the cross-entropy only.

    ``forward`` returns the total loss (a drop-in criterion); ``breakdown`` returns it with its components for
    logging, so nothing is kept on the module between calls.

    ``model`` may be wrapped (DistributedDataParallel, or any module holding it as ``.module``). Under DDP the
    forward that produced ``out`` must run through the DDP wrapper, whose forward arms the gradient
    all-reduce; calling ``ddp.module.forward_oltr(x)`` skips it and the ranks' weights and centroids drift
    apart.

    Args:
        centroid_weight: weight of the centroid loss (official 0.01). With the official centroid rule this
            does not change the centroid step size, only the pull on the features.
        label_smoothing: label smoothing of the cross-entropy (0 in the official recipe).
        centroid_loss: the centroid loss; default ``DiscriminativeCentroidLoss()`` (official form and rule).

    Raises:
        TypeError: if ``centroid_weight`` or ``label_smoothing`` is not a real number.
        ValueError: if ``centroid_weight`` is NaN, inf or negative, or ``label_smoothing`` is not in [0, 1).

    Example:
        >>> criterion = OLTRLoss(centroid_weight=0.01)
        >>> out = model.forward_oltr(images)  # doctest: +SKIP
        >>> loss = criterion(out, targets, model)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        centroid_weight: float = 0.01,
        label_smoothing: float = 0.0,
        centroid_loss: DiscriminativeCentroidLoss | None = None,
    ) -> None:
        super().__init__()
        self.centroid_weight = _check_number(
            'centroid_weight', centroid_weight, minimum=0.0, hint='the official value is 0.01; 0 trains with CE only'
        )
        self.label_smoothing = _check_number(
            'label_smoothing', label_smoothing, minimum=0.0, below=1.0, hint='0 (the official recipe) turns it off'
        )
        self.centroid_loss = centroid_loss if centroid_loss is not None else DiscriminativeCentroidLoss()

    def forward(self, out: OLTROutput, targets: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Compute the total loss.

        Args:
            out: the ``OLTROutput`` of ``model.forward_oltr(x)`` (uses ``logits`` (B, K) and ``features`` (B, E)).
            targets: (B,) integer labels or (B, K) soft targets.
            model: the ``OLTRModel`` (or a DistributedDataParallel wrapping it) that produced ``out``.

        Returns:
            () the total loss.

        Raises:
            TypeError: if ``out`` is not an ``OLTROutput`` (e.g. plain logits) or ``model`` is not an OLTR model.
            RuntimeError: if the model is training and its centroids were never initialised.
            ValueError: on mismatched shapes or invalid targets (labels out of range, soft targets that are not
                finite distributions).
        """
        return self.breakdown(out, targets, model).loss

    def breakdown(self, out: OLTROutput, targets: torch.Tensor, model: nn.Module) -> OLTRLossBreakdown:
        """Compute the total loss and its components. Arguments as in ``forward``."""
        if not (hasattr(out, 'logits') and hasattr(out, 'features')):
            raise TypeError(
                f'out must be the OLTROutput of model.forward_oltr(x), got {type(out).__name__}; model(x) returns '
                'only the logits, while the loss also needs the features: pass out = model.forward_oltr(x).'
            )
        model = _unwrap(model)
        head = model.head
        if model.training and not head.is_initialized:
            raise RuntimeError(
                'The centroids of this model were never initialised; call '
                '`timm_oltr.init_centroids(model, loader)` on the training set before training.'
            )
        logits, features = out.logits, out.features
        if logits.ndim != 2 or logits.shape[0] != features.shape[0]:
            raise ValueError(
                f'out.logits must be (B, K) for features (B, E) {tuple(features.shape)}, got {tuple(logits.shape)}.'
            )

        # the centroid loss validates the targets, so a bad label fails here with a clear message
        parts = self.centroid_loss.breakdown(
            features, head.centroids, targets, loss_weight=self.centroid_weight if self.centroid_weight > 0 else 1.0
        )
        target_ce = targets.long() if targets.ndim == 1 else targets.float()
        ce = F.cross_entropy(logits.float(), target_ce, label_smoothing=self.label_smoothing)

        loss = ce + self.centroid_weight * parts.loss
        return OLTRLossBreakdown(loss, ce.detach(), parts.loss.detach(), parts.attract, parts.repel, parts.repel_active)

    def extra_repr(self) -> str:
        return f'centroid_weight={self.centroid_weight}, label_smoothing={self.label_smoothing}'
