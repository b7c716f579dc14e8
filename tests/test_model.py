"""wrap() and OLTRModel on every timm family in the `test_*` set and on real architectures at other sizes."""

import copy
import inspect

import pytest
import timm
import timm.optim
import torch
from torch import nn

import timm_oltr
from timm_oltr import OLTRConfig, OLTRModel
from timm_oltr.layout import from_grid, probe_layout, to_grid

TEST_MODELS = timm.list_models('test_*')


def _batch(model, batch_size=2, img_size=None):
    C, H, W = model.pretrained_cfg['input_size']
    if img_size is not None:
        H, W = img_size
    torch.manual_seed(0)
    return torch.randn(batch_size, C, H, W)


def _with_centroids(model):
    torch.manual_seed(1)
    K, E = model.num_classes, model.head_hidden_size
    model.head.set_centroids(torch.randn(K, E), torch.arange(1, K + 1))
    return model


def _pooled(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize('name', TEST_MODELS)
def test_every_test_family_forward_backward(name):
    backbone = timm.create_model(name, num_classes=5)
    reference = copy.deepcopy(backbone).eval()
    model = _with_centroids(timm_oltr.wrap(backbone))
    x = _batch(model)

    # identity at init: the wrapper's pooled feature is the backbone's own
    model.eval()
    torch.testing.assert_close(_pooled(model, x), _pooled(reference, x))
    # eval determinism
    assert torch.equal(model(x), model(x))

    model.train()
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    for pname, param in model.named_parameters():
        if pname == 'head.centroids':
            assert param.grad is None, 'logits must not reach the centroids'
        else:
            assert param.grad is not None, f'{pname} got no gradient'
            assert torch.isfinite(param.grad).all(), f'{pname} has a non-finite gradient'


@pytest.mark.parametrize('name', TEST_MODELS)
def test_attention_reaches_pooled_feature(name):
    model = timm_oltr.wrap(timm.create_model(name, num_classes=3)).eval()
    assert model.attention is not None
    x = _batch(model)
    before = _pooled(model, x)
    nn.init.normal_(model.attention.out.weight, std=0.5)
    after = _pooled(model, x)
    assert (after - before).abs().max() > 1e-4, 'a non-zero attention must change the pooled feature'


@pytest.mark.parametrize('name', TEST_MODELS)
def test_state_dict_round_trip(name):
    model = _with_centroids(timm_oltr.wrap(timm.create_model(name, num_classes=4))).eval()
    nn.init.normal_(model.attention.out.weight, std=0.1)
    fresh = timm_oltr.wrap(timm.create_model(name, num_classes=4)).eval()
    fresh.load_state_dict(model.state_dict())
    x = _batch(model)
    assert torch.equal(fresh(x), model(x))
    assert fresh.head.is_initialized


@pytest.mark.parametrize(
    'name,kwargs,img_size,grid',
    [
        ('resnet18', {}, 288, (9, 9)),
        ('convnext_atto', {}, 160, (5, 5)),
        ('mobilenetv3_small_100', {}, 192, (6, 6)),
        ('vit_tiny_patch16_224', {'dynamic_img_size': True}, 160, (10, 10)),
        ('swin_tiny_patch4_window7_224', {'img_size': 256, 'window_size': 8}, 256, (8, 8)),
    ],
)
def test_case_c07_real_families_at_non_default_size(name, kwargs, img_size, grid):
    model = _with_centroids(timm_oltr.wrap(timm.create_model(name, num_classes=6, **kwargs), img_size=img_size))
    assert model.layout.grid == grid
    assert model.pretrained_cfg['input_size'][1:] == (img_size, img_size)
    x = _batch(model, img_size=(img_size, img_size))
    model.train()
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (2, 6)
    assert model.backbone.patch_embed.proj.weight.grad is not None if 'vit' in name else True


def test_dynamic_token_grid_follows_input_size():
    backbone = timm.create_model('test_vit', num_classes=3, dynamic_img_size=True)
    model = _with_centroids(timm_oltr.wrap(backbone)).eval()
    nn.init.normal_(model.attention.out.weight, std=0.1)
    for size in [(160, 160), (96, 128), (64, 64)]:
        assert model(_batch(model, img_size=size)).shape == (2, 3)


def test_case_c07_fixed_grid_mode_fails_at_construction_and_first_batch():
    with pytest.raises(ValueError, match='attention_grid'):
        timm_oltr.wrap(
            timm.create_model('test_resnet', num_classes=3), attention_spatial='linear', attention_grid=(7, 7)
        )
    model = timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), attention_spatial='linear')
    assert model.config.attention_grid == (5, 5)
    _with_centroids(model).eval()
    with pytest.raises(ValueError, match=r"attention_spatial='linear'\) was built for a 5x5 grid, got 4x4"):
        model(torch.randn(1, 3, 128, 128))


@pytest.mark.parametrize('name,fmt', [('test_mambaout', 'NHWC'), ('test_vit', 'NLC'), ('test_resnet', 'NCHW')])
def test_case_c08_layout_round_trip_is_exact(name, fmt):
    backbone = timm.create_model(name, num_classes=0).eval()
    layout = probe_layout(backbone, backbone.pretrained_cfg['input_size'])
    assert layout.fmt == fmt
    feats = backbone.forward_features(_batch(backbone))
    grid, prefix = to_grid(feats, layout)
    assert grid.shape == (2, layout.channels, *layout.grid)
    assert torch.equal(from_grid(grid, prefix, layout), feats)
    if fmt == 'NLC':
        # the grid is the raster map timm's own forward_intermediates reports
        spatial = backbone.forward_intermediates(_batch(backbone), indices=1, norm=True, intermediates_only=True)[-1]
        torch.testing.assert_close(grid, spatial, atol=1e-4, rtol=1e-4)


def test_case_c08_prefix_count_without_attribute():
    model = timm_oltr.wrap(timm.create_model('volo_d1_224', num_classes=3))
    assert not hasattr(model.backbone, 'num_prefix_tokens')
    assert model.layout.fmt == 'NLC' and model.layout.num_prefix_tokens == 1 and model.layout.grid == (14, 14)


def test_case_c09_pooled_width_differs_from_num_features():
    model = timm_oltr.wrap(timm.create_model('mobilenetv3_small_100', num_classes=4))
    assert model.num_features == 576 and model.layout.channels == 576
    assert model.head_hidden_size == 1024 and model.head.in_features == 1024


def test_case_c10_timm_modules_are_not_patched():
    backbone = timm.create_model('test_convnext', num_classes=3)
    model = timm_oltr.wrap(backbone)
    for module in model.backbone.modules():
        assert not {'forward', 'forward_head', 'forward_features'} & set(vars(module)), type(module).__name__
    # the backbone's own forward_head still works, with and without pre_logits
    feats = model.backbone.forward_features(_batch(model))
    assert model.backbone.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert model.backbone.forward_head(feats).shape == (2, 64)


def test_no_spatial_map_skips_attention_with_one_warning(caplog):
    with caplog.at_level('WARNING', logger='timm_oltr.model'):
        model = timm_oltr.wrap(timm.create_model('pit_ti_224', num_classes=3))
    assert model.attention is None and model.layout.fmt == 'none'
    assert sum('no spatial map' in r.message for r in caplog.records) == 1
    _with_centroids(model).train()
    model(torch.randn(2, 3, 224, 224)).sum().backward()


def test_global_pool_empty_gets_a_pool():
    model = _with_centroids(timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3, global_pool='')))
    assert model.head_hidden_size == 96
    assert model(_batch(model)).shape == (2, 3)


def test_stage1_classifier_seeds_the_hallucinator():
    backbone = timm.create_model('test_resnet', num_classes=5)
    fc = copy.deepcopy(backbone.fc)
    model = timm_oltr.wrap(backbone)
    assert torch.equal(model.head.hallucinator.weight, fc.weight)
    assert torch.equal(model.head.hallucinator.bias, fc.bias)
    assert isinstance(model.backbone.get_classifier(), nn.Identity), 'the backbone classifier must be removed'

    other = timm_oltr.wrap(timm.create_model('test_resnet', num_classes=5), num_classes=7)
    assert other.head.hallucinator.out_features == 7
    with_neck = timm_oltr.wrap(timm.create_model('test_resnet', num_classes=5), neck_dim=32)
    assert with_neck.head_hidden_size == 32 and not torch.equal(with_neck.head.hallucinator.weight, fc.weight)


def test_neck_feature_is_non_negative():
    model = _with_centroids(timm_oltr.wrap(timm.create_model('test_vit', num_classes=3), neck_dim=16)).eval()
    assert (model.forward_head(model.forward_features(_batch(model)), pre_logits=True) >= 0).all()


def test_case_c05_uninitialised_centroids():
    model = timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3))
    x = _batch(model)
    with pytest.raises(RuntimeError, match=r'timm_oltr.init_centroids\(model'):
        model.train()(x)
    with pytest.warns(UserWarning, match='never initialised'):
        model.eval()(x)
    with pytest.raises(RuntimeError, match='init_centroids'):
        model.train()(x)  # still an error after the evaluation warning


def test_case_c01_forward_takes_only_the_input():
    model = _with_centroids(timm_oltr.wrap(timm.create_model('test_resnet', num_classes=365)))
    assert list(inspect.signature(model.forward).parameters) == ['x', 'return_oltr']
    assert 'head.centroids' in model.state_dict()


def test_forward_returns_the_oltr_output_on_request():
    model = _with_centroids(timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3))).eval()
    x = _batch(model)
    out = model(x, return_oltr=True)
    assert isinstance(out, timm_oltr.OLTROutput) and torch.equal(out.logits, model(x))


def test_empty_batch_gives_empty_outputs():
    for name in ('test_resnet', 'test_mambaout'):  # timm's own ViT cannot take an empty batch
        model = _with_centroids(timm_oltr.wrap(timm.create_model(name, num_classes=3))).eval()
        out = model(_batch(model, batch_size=0), return_oltr=True)
        assert out.logits.shape == (0, 3) and out.reachability.shape == (0,)


def test_device_dtype_mode_are_kept():
    backbone = timm.create_model('test_resnet', num_classes=3).double().eval()
    model = timm_oltr.wrap(backbone)
    assert not model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_channels_last_and_bf16_autocast():
    model = _with_centroids(timm_oltr.wrap(timm.create_model('test_convnext', num_classes=3)))
    model = model.to(memory_format=torch.channels_last).eval()
    nn.init.normal_(model.attention.out.weight, std=0.1)
    x = _batch(model).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.forward_oltr(x)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_timm_protocol():
    model = _with_centroids(timm_oltr.wrap(timm.create_model('test_vit', num_classes=4)))
    data_config = timm.data.resolve_model_data_config(model)
    assert data_config['input_size'] == (3, 160, 160)
    assert model.get_classifier() is model.head
    assert all(name.startswith('backbone.') for name in model.no_weight_decay())
    optimizer = timm.optim.create_optimizer_v2(model, 'sgd', lr=0.1, layer_decay=0.75)
    num_params = sum(p.numel() for group in optimizer.param_groups for p in group['params'])
    assert num_params == sum(p.numel() for p in model.parameters())
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match='cannot drop its classifier'):
        model.reset_classifier(0)
    model.reset_classifier(9)
    assert model.num_classes == 9 and model.head.centroids.shape == (9, 64) and not model.head.is_initialized


def test_bad_input_is_named():
    with pytest.raises(TypeError, match='timm model'):
        timm_oltr.wrap(nn.Linear(3, 3), num_classes=3)
    with pytest.raises(TypeError, match='timm model'):
        timm_oltr.wrap('resnet50', num_classes=3)
    with pytest.raises(ValueError, match='num_classes=0'):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), num_classes=0)
    with pytest.raises(ValueError, match='num_classes=0'):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=0))
    with pytest.raises(ValueError, match="'cosine_scal'"):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), cosine_scal=3)
    with pytest.raises(ValueError, match='label_names'):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), label_names=['a'])
    with pytest.raises(TypeError, match='label_names must be a list'):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), label_names='abc')
    with pytest.raises(ValueError, match=r"distinct; \['a'\]"):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), label_names=['a', 'b', 'a'])
    for bad in (-5, '32', 32.5, (32, 0)):
        with pytest.raises(ValueError, match='img_size='):
            timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), img_size=bad)
    with pytest.raises(ValueError, match='attention_grid=7'):
        timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3), attention_spatial='linear', attention_grid=7)
    with pytest.raises(ValueError, match='cannot take input size'):
        timm_oltr.wrap(timm.create_model('test_vit', num_classes=3), img_size=100)
    model = timm_oltr.wrap(timm.create_model('test_resnet', num_classes=3))
    with pytest.raises(TypeError, match='already an OLTRModel'):
        timm_oltr.wrap(model)
    with pytest.raises(ValueError, match=r'x must be a \(B, C, H, W\)'):
        model(torch.randn(3, 160, 160))


def test_constructor_equals_wrap_without_seeding():
    model = OLTRModel(timm.create_model('test_resnet', num_classes=0), 3, config=OLTRConfig(neck_dim=8))
    assert model.head.in_features == 8 and model.architecture == 'test_resnet'
