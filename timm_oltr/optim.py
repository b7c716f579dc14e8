"""Optimizer parameter groups and backbone freezing for OLTR fine-tuning.

From "Large-Scale Long-Tailed Recognition in an Open World" (OLTR), Liu et al., CVPR 2019,
https://arxiv.org/abs/1904.05160. The official second stage trains the feature model, the classifier and the
centroids with their own learning rates (the centroids in a separate SGD with lr 0.01, momentum 0.9 and weight
decay 5e-4, stepped by the same schedule). One optimizer over the groups built here is equivalent: the groups
hold disjoint parameters and a scheduler scales every group's lr alike.

With the centroid loss's official update rule (``DiscriminativeCentroidLoss(centroid_grad='official')``,
the default), an SGD step moves centroid j by ``centroid_lr * g_j`` (plus weight decay and momentum), whatever
the centroid loss weight.
"""

import logging

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .centroids import _unwrap

__all__ = ['freeze_backbone', 'param_groups']

_logger = logging.getLogger(__name__)


def _check_rate(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f'{name} must be a non-negative number, got {value!r}.')


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    backbone_lr: float | None = None,
    attention_lr: float | None = None,
    centroid_lr: float | None = None,
    weight_decay: float = 5e-4,
    centroid_weight_decay: float = 5e-4,
) -> list[dict]:
    """Optimizer parameter groups for an ``OLTRModel``, each named by its ``'name'`` key.

    Groups (a group without trainable parameters is left out; frozen parameters are skipped):

    * ``'backbone'``: the timm backbone, lr ``backbone_lr`` (default ``lr``);
    * ``'attention'``: the modulated attention and the optional neck, lr ``attention_lr`` (default
      ``backbone_lr``, then ``lr``: the official recipe trains them with the feature model);
    * ``'head'``: the meta-embedding head without the centroids (hallucinator, selector, cosine classifier),
      lr ``lr``;
    * ``'centroids'``: the centroids, lr ``centroid_lr`` (default ``lr``), weight decay
      ``centroid_weight_decay``. The official 5e-4 shrinks rarely seen classes' centroids towards 0 over a
      long schedule (spec 5.4.3); pass 0 to keep them at the scale of the features.

    Official ImageNet-LT stage 2: ``lr=0.1`` (classifier), ``backbone_lr=0.01``, ``centroid_lr=0.01``, SGD with
    momentum 0.9, weight decay 5e-4 everywhere.

    Args:
        model: an ``OLTRModel`` (or DistributedDataParallel around one).
        lr: learning rate of the head, and the default of the others.
        backbone_lr: learning rate of the backbone.
        attention_lr: learning rate of the attention and neck.
        centroid_lr: learning rate of the centroids.
        weight_decay: weight decay of every group but the centroids.
        centroid_weight_decay: weight decay of the centroids.

    Returns:
        A list of dicts with keys ``name``, ``params``, ``lr`` and ``weight_decay``, for any
        ``torch.optim`` optimizer. No parameter is in two groups.

    Raises:
        TypeError: if model is not an OLTRModel.
        ValueError: on a negative or non-numeric rate.

    Example:
        >>> optimizer = torch.optim.SGD(param_groups(model, lr=0.1, backbone_lr=0.01, centroid_lr=0.01),
        ...                             momentum=0.9)  # doctest: +SKIP
    """
    _check_rate('lr', lr, allow_none=False)
    for name, value in (
        ('backbone_lr', backbone_lr),
        ('attention_lr', attention_lr),
        ('centroid_lr', centroid_lr),
        ('weight_decay', weight_decay),
        ('centroid_weight_decay', centroid_weight_decay),
    ):
        _check_rate(name, value)
    model = _unwrap(model)
    backbone_lr = lr if backbone_lr is None else backbone_lr
    attention_lr = backbone_lr if attention_lr is None else attention_lr
    centroid_lr = lr if centroid_lr is None else centroid_lr

    centroids = model.head.centroids
    attention_modules = [m for m in (getattr(model, 'attention', None), getattr(model, 'neck', None)) if m is not None]
    members = [
        ('centroids', [centroids], centroid_lr, centroid_weight_decay),
        ('backbone', list(model.backbone.parameters()), backbone_lr, weight_decay),
        ('attention', [p for m in attention_modules for p in m.parameters()], attention_lr, weight_decay),
        ('head', list(model.head.parameters()), lr, weight_decay),
        ('other', list(model.parameters()), lr, weight_decay),
    ]

    # first group wins (by identity), so the centroids never reach 'head' and 'other' takes only leftovers
    seen: set[int] = set()
    groups = []
    for name, params, group_lr, group_wd in members:
        unique = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        trainable = [p for p in unique if p.requires_grad]
        if trainable:
            groups.append({'name': name, 'params': trainable, 'lr': group_lr, 'weight_decay': group_wd})
    if any(group['name'] == 'other' for group in groups):
        _logger.warning('Parameters outside backbone, attention, neck and head were put in an "other" group.')
    return groups


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.train(False)


def freeze_backbone(model: nn.Module, *, keep_norm_eval: bool = True) -> list[RemovableHandle]:
    """Freeze every parameter of the backbone; the attention, neck and head stay trainable.

    Parameters are selected by module identity (everything under ``model.backbone``), never by name
    substrings, which froze the attention by accident in the official code (spec bug #4).

    With ``keep_norm_eval`` every backbone layer with running statistics (BatchNorm and the like, found by its
    ``running_mean`` buffer) is put in eval mode and gets a forward pre-hook that puts it back in eval mode
    before each forward, so ``model.train()`` does not make frozen BatchNorm update its running statistics on
    (class-aware) training batches. The official code leaves them in train mode (spec 7.1): pass
    ``keep_norm_eval=False`` for that.

    Args:
        model: an ``OLTRModel`` (or DistributedDataParallel around one).
        keep_norm_eval: keep the backbone's normalisation layers in eval mode.

    Returns:
        The hook handles; ``handle.remove()`` on each lets the layers follow ``model.train()`` again.

    Raises:
        TypeError: if model is not an OLTRModel.
    """
    model = _unwrap(model)
    for p in model.backbone.parameters():
        p.requires_grad_(False)

    handles = []
    if keep_norm_eval:
        for module in model.backbone.modules():
            if isinstance(getattr(module, 'running_mean', None), torch.Tensor):
                module.train(False)
                handles.append(module.register_forward_pre_hook(_stay_in_eval))
    _logger.info('Froze the backbone; %d normalisation layers kept in eval mode.', len(handles))
    return handles
