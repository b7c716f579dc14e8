"""`OLTRModel`: any timm model with OLTR's modulated attention and dynamic meta-embedding head.

OLTR, Liu et al., CVPR 2019, https://arxiv.org/abs/1904.05160

    images (B, 3, H, W)
      -> backbone.forward_features            map in the backbone's own layout (NCHW, NHWC or tokens)
      -> ModulatedAttention (layout-aware)    same layout and shape; prefix tokens get the residual's mean
      -> backbone.forward_head(pre_logits)    (B, D): the backbone's own pooling, conv_head, norm
      -> neck: Linear(D, E) + ReLU, optional  (B, E) v_direct
      -> MetaEmbeddingHead                    (B, K) logits + reachability, memory, meta-embedding

The wrapper follows timm's model protocol (`forward_features`, `forward_head`, `pretrained_cfg`, ...), so timm's
data config, optimizer factory and training scripts take it like any timm model. It never patches timm modules:
the backbone only loses its classifier, through its own `reset_classifier(0)`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import to_2tuple
from timm.models import group_parameters
from torch import nn

from .attention import ModulatedAttention
from .config import OLTRConfig
from .head import MetaEmbeddingHead, OLTROutput
from .layout import FeatureLayout, from_grid, probe_layout, to_grid

__all__ = ['OLTRModel', 'wrap']

_logger = logging.getLogger(__name__)

_TIMM_METHODS = ('forward_features', 'forward_head', 'reset_classifier')


class OLTRModel(nn.Module):
    """A timm backbone with OLTR's modulated attention and meta-embedding head.

    Build it with `timm_oltr.wrap(backbone, num_classes)`; this constructor takes the same arguments but does not
    seed the hallucinator from a stage-1 classifier.

    Args:
        backbone: a timm model; it is modified in place (its classifier is removed) and owned by this module.
        num_classes: K, number of known classes.
        config: the method's constants; defaults to the paper's.
        img_size: input size the model is built and probed at; defaults to the backbone's
            `pretrained_cfg['input_size']`. Any size the backbone accepts works later unless the attention uses
            the fixed-grid `attention_spatial='linear'` mode.
        label_names: K class names, stored with checkpoints.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        config: OLTRConfig | None = None,
        img_size: int | tuple[int, int] | None = None,
        label_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        _check_timm_model(backbone)
        _check_num_classes(num_classes)
        config = config or OLTRConfig()
        if not isinstance(config, OLTRConfig):
            raise TypeError(f'config must be an OLTRConfig, got {type(config).__name__}.')
        cfg = dict(getattr(backbone, 'pretrained_cfg', None) or {})
        in_chans, *default_hw = cfg.get('input_size', (3, 224, 224))
        input_size = (in_chans, *(_check_img_size(img_size) if img_size is not None else default_hw))
        param = next(backbone.parameters())
        factory = dict(device=param.device, dtype=param.dtype)

        # the backbone keeps pooling, conv_head and norm; only its classifier goes
        backbone.reset_classifier(0)
        pooled_dim = _probe_pooled_dim(backbone, input_size)
        layout = probe_layout(backbone, input_size)

        self.backbone = backbone
        self.layout = layout
        self.attention = None
        if config.attention and layout.has_grid:
            config = self._check_grid(config, layout, input_size)
            self.attention = ModulatedAttention(
                layout.channels,
                reduction=config.attention_reduction,
                spatial=config.attention_spatial,
                grid=config.attention_grid,
                out_init=config.attention_out_init,
                scaled=config.attention_scaled,
                **factory,
            )
        elif config.attention:
            _logger.warning(
                '%s has no spatial map in forward_features; the modulated attention is skipped and the '
                'meta-embedding head works on the pooled feature alone.',
                type(backbone).__name__,
            )

        embed_dim = config.neck_dim or pooled_dim
        self.neck = (
            nn.Sequential(nn.Linear(pooled_dim, embed_dim, **factory), nn.ReLU()) if config.neck_dim else nn.Identity()
        )
        self.head = MetaEmbeddingHead(embed_dim, num_classes, config=config, **factory)

        self.config = config
        self.num_classes = num_classes
        self.num_features = layout.channels or int(getattr(backbone, 'num_features', pooled_dim))
        self.head_hidden_size = embed_dim
        self.label_names = _check_label_names(label_names, num_classes)
        self.architecture = cfg.get('architecture') or type(backbone).__name__.lower()
        self.backbone_args = {
            k: v for k, v in (getattr(backbone, '_model_args', None) or {}).items() if k != 'num_classes'
        }
        first_conv = cfg.get('first_conv')
        self.pretrained_cfg = {
            **cfg,
            'input_size': input_size,
            'num_classes': num_classes,
            'classifier': 'head',
            'first_conv': f'backbone.{first_conv}' if isinstance(first_conv, str) else first_conv,
        }
        self.default_cfg = self.pretrained_cfg
        self._warned_uninitialized = False
        self.train(backbone.training)

    @staticmethod
    def _check_grid(config: OLTRConfig, layout: FeatureLayout, input_size: tuple[int, ...]) -> OLTRConfig:
        if config.attention_spatial != 'linear':
            return config
        if config.attention_grid is None:
            return config.replace(attention_grid=layout.grid)
        if tuple(config.attention_grid) != layout.grid:
            raise ValueError(
                f"attention_spatial='linear' with attention_grid={config.attention_grid}, but the backbone makes a "
                f'{layout.grid[0]}x{layout.grid[1]} map at input size {tuple(input_size[1:])}; pass img_size to match, '
                "leave attention_grid=None, or use attention_spatial='conv' (any size)."
            )
        return config

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> the backbone's last feature map, modulated, in the backbone's own layout."""
        if not torch.is_tensor(x) or x.ndim != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f'x must be a (B, C, H, W) image batch, got {shape}.')
        return self.forward_attention(self.backbone.forward_features(x), img_size=tuple(x.shape[-2:]))

    def forward_attention(self, feats: torch.Tensor, img_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Apply the modulated attention to a `backbone.forward_features` output, keeping its layout.

        Args:
            feats: the backbone's feature output (NCHW, NHWC or tokens).
            img_size: (H, W) of the input images; needed only for token models fed another size than the one
                they were wrapped at.
        """
        if self.attention is None:
            return feats
        grid, prefix = to_grid(feats, self.layout, img_size=img_size)
        residual = self.attention.residual(grid)
        # NOTE: prefix tokens (cls, dist, reg) take the residual's spatial mean, so token-pooled models see the
        # attention too; the residual is zero at init with out_init='zero', so the model starts as the backbone.
        if prefix is not None:
            prefix = prefix + residual.mean(dim=(2, 3)).unsqueeze(1)
        return from_grid(grid + residual, prefix, self.layout)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (B, K), or v_direct (B, E) with `pre_logits=True`."""
        features = self.neck(self.backbone.forward_head(x, pre_logits=True))
        if pre_logits:
            return features
        return self._head(features).logits

    def forward_oltr(self, x: torch.Tensor) -> OLTROutput:
        """(B, 3, H, W) images -> OLTROutput (logits, features, reachability, min_distance, memory, meta)."""
        return self._head(self.forward_head(self.forward_features(x), pre_logits=True))

    def forward_oltr_from_backbone(self, feats: torch.Tensor, img_size: tuple[int, int] | None = None) -> OLTROutput:
        """OLTROutput from a cached `backbone.forward_features` output (training a frozen backbone's top)."""
        return self._head(self.forward_head(self.forward_attention(feats, img_size), pre_logits=True))

    def forward(self, x: torch.Tensor, *, return_oltr: bool = False) -> torch.Tensor | OLTROutput:
        """(B, 3, H, W) images -> (B, K) logits, or the whole OLTROutput with `return_oltr=True`.

        Under DistributedDataParallel only calls through the wrapper's forward synchronise gradients, so train with
        `ddp_model(images, return_oltr=True)` rather than `ddp_model.module.forward_oltr(images)`.
        """
        out = self.forward_oltr(x)
        return out if return_oltr else out.logits

    def _head(self, features: torch.Tensor) -> OLTROutput:
        if not self.head.is_initialized:
            if self.training:
                raise RuntimeError(
                    'The OLTR centroids were never initialised; call timm_oltr.init_centroids(model, train_loader) '
                    'before training (or load a checkpoint that has them).'
                )
            if not self._warned_uninitialized:
                warnings.warn(
                    'Evaluating an OLTR model whose centroids were never initialised: reachability and memory '
                    'features are meaningless. Call timm_oltr.init_centroids(model, train_loader) first.',
                    stacklevel=3,
                )
                self._warned_uninitialized = True
        return self.head(features)

    # Hugging Face Hub (implemented in timm_oltr.hub)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> str:
        """Write model.safetensors, config.json and a README.md model card; see `timm_oltr.hub.save_pretrained`."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save and upload to the Hugging Face Hub; see `timm_oltr.hub.push_to_hub`."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # timm model protocol

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for `num_classes` classes (centroids uninitialised); `global_pool` goes to the backbone."""
        if num_classes == 0:
            raise ValueError(
                'num_classes=0: an OLTR model cannot drop its classifier; for features use '
                'model.forward_head(model.forward_features(x), pre_logits=True), or the backbone itself.'
            )
        _check_num_classes(num_classes)
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool=global_pool)
        self.head.reset(num_classes)
        self.num_classes = num_classes
        self.label_names = None
        self.pretrained_cfg['num_classes'] = num_classes
        self._warned_uninitialized = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        return {f'backbone.{name}' for name in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int, ...]]:
        """Layer groups for layer-wise lr decay: the backbone's own groups, then attention, neck and head last."""
        matcher = getattr(self.backbone, 'group_matcher', None)
        if matcher is None:
            backbone_groups = {name: 0 for name, _ in self.backbone.named_parameters()}
        else:
            backbone_groups = group_parameters(self.backbone, matcher(coarse=coarse), reverse=True)
        last = max(backbone_groups.values(), default=-1) + 1
        prefix = 'backbone.'

        def _group(name: str) -> tuple[int, ...]:
            if name.startswith(prefix):
                return (backbone_groups.get(name[len(prefix) :], last),)
            return (last,)

        return _group


def wrap(
    model: nn.Module,
    num_classes: int | None = None,
    *,
    config: OLTRConfig | None = None,
    img_size: int | tuple[int, int] | None = None,
    label_names: list[str] | None = None,
    **overrides: Any,
) -> OLTRModel:
    """Turn a timm model into an OLTR model.

    If the model's classifier already has `num_classes` outputs (a plain, stage-1 fine-tuned model) and no neck
    is configured, its weights seed the hallucinator, as in the official recipe; otherwise the hallucinator
    starts fresh.

    Args:
        model: a timm model (from `timm.create_model`); modified in place and owned by the result.
        num_classes: K; defaults to the model's own `num_classes`.
        config: the method's constants (`OLTRConfig`); defaults to the paper's.
        img_size: input size to build and probe at (default: the model's `pretrained_cfg['input_size']`).
        label_names: K class names, stored with checkpoints.
        **overrides: `OLTRConfig` fields to change, e.g. `neck_dim=512, attention_spatial='linear'`.

    Returns:
        The OLTR model, on the model's device and dtype, in the model's train/eval mode.

    Example:
        >>> backbone = timm.create_model('resnet50', pretrained=True)
        >>> model = timm_oltr.wrap(backbone, num_classes=100)
        >>> logits = model(images)  # (B, 100)
    """
    _check_timm_model(model)
    config = config or OLTRConfig()
    if not isinstance(config, OLTRConfig):
        raise TypeError(f'config must be an OLTRConfig, got {type(config).__name__}.')
    if overrides:
        config = config.replace(**overrides)
    if num_classes is None:
        num_classes = int(getattr(model, 'num_classes', 0) or 0)
        if num_classes <= 0:
            raise ValueError(f'{type(model).__name__} has no classifier (num_classes=0); pass num_classes=K.')
    _check_num_classes(num_classes)

    stage1 = _linear_classifier(model, num_classes)
    oltr = OLTRModel(model, num_classes, config=config, img_size=img_size, label_names=label_names)
    hallucinator = oltr.head.hallucinator
    if stage1 is not None and config.neck_dim is None and stage1[0].shape == hallucinator.weight.shape:
        with torch.no_grad():
            hallucinator.weight.copy_(stage1[0])
            hallucinator.bias.copy_(stage1[1])
        _logger.info('Hallucinator seeded from the %d-class classifier of %s.', num_classes, oltr.architecture)
    else:
        _logger.info('Hallucinator starts fresh: no %d-class linear classifier matches the head.', num_classes)
    return oltr


def _linear_classifier(model: nn.Module, num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, bias) of the model's classifier if it is one Linear with `num_classes` outputs."""
    try:
        classifier = model.get_classifier()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(classifier, nn.Linear) or classifier.out_features != num_classes:
        return None
    weight = classifier.weight.detach().clone()
    bias = classifier.bias.detach().clone() if classifier.bias is not None else weight.new_zeros(num_classes)
    return weight, bias


@torch.no_grad()
def _probe_pooled_dim(backbone: nn.Module, input_size: tuple[int, ...]) -> int:
    """Width of `forward_head(pre_logits=True)`; forces average pooling on backbones built with global_pool=''."""
    for attempt in range(2):
        was_training = backbone.training
        backbone.eval()
        param = next(backbone.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        try:
            pooled = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        except (RuntimeError, AssertionError, ValueError) as e:
            name = type(backbone).__name__
            raise ValueError(
                f'{name} cannot take input size {tuple(input_size)}: {e}. Pass an img_size the backbone accepts '
                '(fixed-size models such as ViT need dynamic_img_size=True at create_model for other sizes).'
            ) from e
        finally:
            backbone.train(was_training)
        if pooled.ndim == 2:
            return int(pooled.shape[1])
        if attempt == 0:
            _logger.info(
                '%s returns an unpooled map (global_pool=""); switching it to average pooling.', type(backbone).__name__
            )
            backbone.reset_classifier(0, global_pool='avg')
    raise ValueError(
        f'{type(backbone).__name__}.forward_head(pre_logits=True) returns {tuple(pooled.shape)}, not (B, D).'
    )


def _check_timm_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a timm model (torch.nn.Module), got {type(model).__name__}.')
    missing = [name for name in _TIMM_METHODS if not callable(getattr(model, name, None))]
    if missing or isinstance(model, OLTRModel):
        what = 'is already an OLTRModel' if isinstance(model, OLTRModel) else f'lacks {missing}'
        raise TypeError(f'model must be a timm model created with timm.create_model; {type(model).__name__} {what}.')
    if next(model.parameters(), None) is None:
        raise TypeError(f'model {type(model).__name__} has no parameters.')


def _check_num_classes(num_classes: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ValueError(f'num_classes={num_classes!r} must be a positive int.')


def _check_label_names(label_names: list[str] | None, num_classes: int) -> list[str] | None:
    if label_names is None:
        return None
    if isinstance(label_names, str) or not isinstance(label_names, (list, tuple)):
        raise TypeError(f'label_names must be a list of {num_classes} strings, got {type(label_names).__name__}.')
    names = list(label_names)
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise ValueError(f'label_names must be {num_classes} strings, got {len(names)} items.')
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f'label_names must be distinct; {duplicates[:5]} appear more than once.')
    return names


def _check_img_size(img_size: Any) -> tuple[int, int]:
    size = to_2tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f'img_size={img_size!r} must be a positive int or an (H, W) pair of positive ints.')
    return tuple(size)
