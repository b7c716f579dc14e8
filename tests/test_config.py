"""OLTRConfig: defaults, validation, JSON round trip (C15)."""

import dataclasses
import json

import pytest

from timm_oltr import OLTRConfig


def test_paper_defaults():
    config = OLTRConfig()
    assert (config.reachability_scale, config.cosine_scale, config.squash) == (10.0, 16.0, 'linear')
    assert (config.attention_reduction, config.open_set_score, config.open_set_threshold) == (2, 'msp', 0.1)


def test_json_round_trip_with_every_field_changed():
    changed = OLTRConfig(
        neck_dim=512,
        reachability_scale=5.0,
        cosine_scale=30.0,
        squash='square',
        attention=False,
        attention_reduction=4,
        attention_spatial='linear',
        attention_grid=(9, 9),
        attention_out_init='official',
        attention_scaled=True,
        distance_eps=1e-4,
        norm_eps=1e-5,
        open_set_score='energy',
        open_set_threshold=-3.5,
    )
    default = OLTRConfig()
    assert all(getattr(changed, f.name) != getattr(default, f.name) for f in dataclasses.fields(OLTRConfig))
    assert OLTRConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed


def test_case_c15_keyword_only_and_unknown_keys_named():
    with pytest.raises(TypeError):
        OLTRConfig(512)  # positional binding is refused
    with pytest.raises(ValueError, match=r"\['reach_scale'\]"):
        OLTRConfig.from_dict({'reach_scale': 3.0})
    with pytest.raises(ValueError, match='neck'):
        OLTRConfig().replace(neck=3)


@pytest.mark.parametrize(
    'field,value',
    [
        ('squash', 'cube'),
        ('neck_dim', 0),
        ('neck_dim', 2.5),
        ('attention_reduction', 0),
        ('attention_grid', (7,)),
        ('reachability_scale', float('nan')),
        ('cosine_scale', -1.0),
        ('distance_eps', 0.0),
        ('open_set_score', 'softmax'),
        ('open_set_threshold', float('inf')),
        ('attention', 1),
    ],
)
def test_invalid_values_are_named(field, value):
    with pytest.raises(ValueError, match=f'OLTRConfig.{field}='):
        OLTRConfig(**{field: value})
