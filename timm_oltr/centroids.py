"""Class centroids (OLTR's visual memory): initialisation from data and drift measurement.

From "Large-Scale Long-Tailed Recognition in an Open World" (OLTR), Liu et al., CVPR 2019,
https://arxiv.org/abs/1904.05160. Before the second stage the centroids are set to the class means of the
direct feature v_direct over the training set, computed in eval mode (spec section 6).

Update policy: after initialisation the centroids move only through the centroid loss, in their own optimizer
parameter group (`timm_oltr.param_groups`), as in the official code; the class means are never recomputed
automatically (the paper's "propagation" step is not part of the released code). `centroid_drift` measures how
far the centroids have moved from the current class means; calling `init_centroids` again re-estimates them in
place (an optional re-initialisation, e.g. every few epochs; the optimizer keeps its momentum for them).

Dimensions: K number of known classes, E width of v_direct.
"""

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

__all__ = ['CentroidDrift', 'ClassMeans', 'centroid_drift', 'class_means', 'init_centroids']

_logger = logging.getLogger(__name__)

_IMAGE_KEYS = ('image', 'pixel_values')
_LABEL_KEYS = ('label', 'labels')


class ClassMeans(NamedTuple):
    """Per-class means of v_direct.

    Attributes:
        means: (K, E) float32 class means; rows of classes without samples are 0.
        counts: (K,) long number of samples per class.
    """

    means: torch.Tensor
    counts: torch.Tensor


class CentroidDrift(NamedTuple):
    """Distance between the stored centroids and fresh class means.

    Attributes:
        distance: (K,) float32 Euclidean distance ``|c_j - mean_j|``; 0 for classes without samples in the loader.
        relative: (K,) float32 ``distance / |mean_j|``; 0 for classes without samples in the loader.
        counts: (K,) long number of samples per class in the loader.
    """

    distance: torch.Tensor
    relative: torch.Tensor
    counts: torch.Tensor


def _unwrap(model: nn.Module) -> nn.Module:
    """The OLTRModel inside DistributedDataParallel and similar wrappers (followed through ``.module``)."""
    inner = model
    while not hasattr(inner, 'head') and isinstance(getattr(inner, 'module', None), nn.Module):
        inner = inner.module
    head = getattr(inner, 'head', None)
    if not (hasattr(head, 'centroids') and hasattr(head, 'set_centroids') and hasattr(inner, 'backbone')):
        raise TypeError(f'model must be an OLTRModel (from timm_oltr.wrap), got {type(model).__name__}.')
    return inner


def _check_loader_and_dtype(loader: Any, autocast_dtype: Any) -> None:
    """Reject a ``loader`` that cannot be iterated and an ``autocast_dtype`` that is not a floating torch.dtype."""
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes, torch.Tensor)):
        raise TypeError(
            'loader must be an iterable of (images, labels) batches, such as a torch DataLoader or a list of tuples, '
            f'got {type(loader).__name__}; pass a loader over the data set (the training set for init_centroids).'
        )
    if autocast_dtype is None:
        return
    fix = 'pass e.g. torch.bfloat16 or torch.float16, or None to run in the model dtype'
    if not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(
            f'autocast_dtype must be a torch.dtype or None, got {autocast_dtype!r} ({type(autocast_dtype).__name__}); '
            f'{fix}.'
        )
    if not autocast_dtype.is_floating_point:
        raise ValueError(f'autocast_dtype must be a floating-point torch.dtype, got {autocast_dtype}; {fix}.')


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode and restore each module's own previous mode afterwards, even on error."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, dict):
        image_key = next((k for k in _IMAGE_KEYS if k in batch), None)
        label_key = next((k for k in _LABEL_KEYS if k in batch), None)
        if image_key is None or label_key is None:
            raise ValueError(
                f'a dict batch needs one of the keys {_IMAGE_KEYS} and one of {_LABEL_KEYS}, got {sorted(batch)}.'
            )
        return batch[image_key], batch[label_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f'loader must yield (images, labels) tuples or dicts with image/label keys, got {type(batch)}.')


def _as_labels(labels: Any, num_classes: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f'labels must be (B,) integer class ids, got shape {tuple(labels.shape)} and dtype {labels.dtype}; '
            'use a loader without mixup/cutmix for centroid initialisation.'
        )
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        bad = labels[out_of_range].unique().tolist()
        raise ValueError(f'labels contains {bad[:10]} outside [0, {num_classes}) (num_classes of the model).')
    return labels.to(device=device, dtype=torch.long, non_blocking=True)


@torch.no_grad()
def _feature_sums(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    desc: str,
    inputs: str = 'images',
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming per-class float32 sums (K, E) and long counts (K,) of v_direct, all-reduced across ranks."""
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    K, E = model.head.num_classes, model.head.in_features
    sums = torch.zeros(K, E, dtype=torch.float32, device=device)
    counts = torch.zeros(K, dtype=torch.long, device=device)

    distributed = dist.is_available() and dist.is_initialized()
    show = progress and (not distributed or dist.get_rank() == 0)
    with _eval_mode(model):
        for batch in tqdm(loader, desc=desc, disable=not show, leave=False):
            images, labels = _split_batch(batch)
            labels = _as_labels(labels, K, device)
            images = images.to(device=device, non_blocking=True)
            if images.is_floating_point() and autocast_dtype is None:
                images = images.to(param.dtype)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                feats = model.forward_features(images) if inputs == 'images' else model.forward_attention(images)
                features = model.forward_head(feats, pre_logits=True)  # (B, E)
            if features.shape != (labels.shape[0], E):
                raise ValueError(
                    f'the model produced features of shape {tuple(features.shape)} for {labels.shape[0]} labels; '
                    f'expected ({labels.shape[0]}, {E}).'
                )
            sums.index_add_(0, labels, features.float())
            counts += torch.bincount(labels, minlength=K)

    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums, counts


def class_means(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> ClassMeans:
    """Per-class means of v_direct over a loader, in eval mode and O(K * E) memory.

    Args:
        model: an ``OLTRModel`` (or DistributedDataParallel around one).
        loader: yields ``(images, labels, ...)`` tuples or dicts with ``'image'``/``'pixel_values'`` and
            ``'label'``/``'labels'``; labels are (B,) integer class ids.
        device: where to run; default the model's device.
        autocast_dtype: run the model under autocast with this dtype (e.g. ``torch.bfloat16``); sums stay float32.
        progress: show a tqdm bar (rank 0 only under ``torch.distributed``).

    Returns:
        ``ClassMeans(means (K, E) float32, counts (K,) long)``; empty classes have mean 0 and count 0.
        Under an initialised ``torch.distributed`` process group the sums and counts are all-reduced, so each
        rank should iterate over its own shard; every rank gets the same result.

    Raises:
        TypeError: if ``loader`` is not iterable or ``autocast_dtype`` is neither a ``torch.dtype`` nor None.
        ValueError: on labels out of range or not (B,) integers, an unrecognised batch format, or a non-floating
            ``autocast_dtype``.
    """
    model = _unwrap(model)
    _check_loader_and_dtype(loader, autocast_dtype)
    sums, counts = _feature_sums(
        model, loader, device=device, autocast_dtype=autocast_dtype, progress=progress, desc='class means'
    )
    return ClassMeans(sums / counts.clamp_min(1)[:, None], counts)


def init_centroids(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    missing: Literal['error', 'exclude'] = 'error',
    inputs: Literal['images', 'backbone_features'] = 'images',
    progress: bool = True,
) -> torch.Tensor:
    """Set the model's centroids to the class means of v_direct (OLTR's memory initialisation, spec 6).

    Runs the model in eval mode without gradients (BatchNorm uses its running statistics and is not
    updated) and restores every module's previous mode afterwards. Features are
    ``model.forward_head(model.forward_features(x), pre_logits=True)``, summed per class in float32 with
    ``index_add_``: memory is O(K * E) whatever the data set size. The official recipe uses the training set
    with the evaluation transform and no class-aware sampler.

    Under ``torch.distributed`` (process group initialised) sums and counts are all-reduced, so give each rank
    its own shard of the data; every rank ends with identical centroids. A ``DistributedSampler`` pads the
    last shard with repeated samples unless the data set size divides evenly, which counts those samples twice.

    Classes with no samples (``missing``):

    * ``'error'`` (default): raise a ValueError listing their ids;
    * ``'exclude'``: their centroid rows are set to 0 and their count to 0, so ``head.valid_classes`` is False
      for them: they are left out of the nearest-centroid search (reachability) and of the memory feature.
      They still get logits from the cosine classifier and can be predicted; nothing becomes NaN or inf.

    Args:
        model: an ``OLTRModel`` (or DistributedDataParallel around one).
        loader: yields ``(images, labels, ...)`` tuples or dicts with ``'image'``/``'pixel_values'`` and
            ``'label'``/``'labels'``; labels are (B,) integer class ids in [0, K).
        device: where to run; default the model's device.
        autocast_dtype: run the model under autocast with this dtype (e.g. ``torch.bfloat16``); sums stay float32.
        missing: policy for classes without samples, see above.
        inputs: what the loader yields: ``'images'``, or ``'backbone_features'``, outputs of
            ``model.backbone.forward_features`` cached once (training only the top of a frozen backbone).
        progress: show a tqdm bar (rank 0 only under ``torch.distributed``).

    Returns:
        (K,) long CPU tensor, the number of samples per class (also stored as ``model.head.class_counts``).

    Raises:
        TypeError: if ``loader`` is not iterable or ``autocast_dtype`` is neither a ``torch.dtype`` nor None.
        ValueError: on labels out of range, an empty loader, classes without samples with ``missing='error'``, or a
            non-floating ``autocast_dtype``.

    Example:
        >>> counts = timm_oltr.init_centroids(model, train_loader_eval_transform)  # doctest: +SKIP
    """
    if missing not in ('error', 'exclude'):
        raise ValueError(f"missing must be 'error' or 'exclude', got {missing!r}.")
    if inputs not in ('images', 'backbone_features'):
        raise ValueError(f"inputs must be 'images' or 'backbone_features', got {inputs!r}.")
    model = _unwrap(model)
    _check_loader_and_dtype(loader, autocast_dtype)
    sums, counts = _feature_sums(
        model,
        loader,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=progress,
        desc='init centroids',
        inputs=inputs,
    )

    empty = (counts == 0).nonzero().flatten().tolist()
    if len(empty) == counts.numel():
        raise ValueError('loader yielded no samples; init_centroids needs the training set.')
    if empty and missing == 'error':
        shown = ', '.join(map(str, empty[:20])) + (f', ... ({len(empty)} in all)' if len(empty) > 20 else '')
        raise ValueError(
            f'classes [{shown}] have no samples in loader, so they have no centroid. Use a loader over the whole '
            "training set, or pass missing='exclude' to keep them out of the nearest-centroid search and memory."
        )
    if empty:
        _logger.warning('%d classes have no samples and are excluded from the memory: %s', len(empty), empty[:20])

    head = model.head
    centroids = sums / counts.clamp_min(1)[:, None]  # (K, E); empty rows stay 0
    head.set_centroids(centroids.to(head.centroids), counts.to(head.class_counts.device))
    return counts.cpu()


def centroid_drift(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> CentroidDrift:
    """How far the stored centroids are from fresh class means of v_direct (a drift figure, CASES C06).

    Arguments as in ``class_means``. The model is not modified.

    Returns:
        ``CentroidDrift(distance (K,), relative (K,), counts (K,))``; classes absent from the loader report 0.

    Raises:
        TypeError: if ``loader`` is not iterable or ``autocast_dtype`` is neither a ``torch.dtype`` nor None.
        RuntimeError: if the centroids were never initialised.
    """
    model = _unwrap(model)
    _check_loader_and_dtype(loader, autocast_dtype)
    if not bool(model.head.initialized):
        raise RuntimeError('the centroids were never initialised; call `timm_oltr.init_centroids(model, loader)`.')
    means, counts = class_means(model, loader, device=device, autocast_dtype=autocast_dtype, progress=progress)
    centroids = model.head.centroids.detach().float().to(means.device)
    present = counts > 0
    distance = torch.linalg.vector_norm(centroids - means, dim=1) * present
    relative = distance / torch.linalg.vector_norm(means, dim=1).clamp_min(1e-12) * present
    return CentroidDrift(distance, relative, counts)
