"""Hub I/O: fresh-process reload parity, config round trip, tampered files, offline cache, push (C04, C20, C21)."""

import base64
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http as hf_http

import timm_oltr
from timm_oltr import OLTRConfig
from timm_oltr.hub import from_pretrained, push_to_hub, save_pretrained
from timm_oltr.metrics import apply_threshold, open_set_scores

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCH = 'test_resnet'
K = 5
LABELS = ['tee', 'trouser', 'pullover', 'dress', 'coat']
COUNTS = torch.tensor([300, 50, 10, 0, 5])

# every field differs from its default in one of the two configs (checked by test_configs_cover_every_field)
CONFIG_A = OLTRConfig(
    neck_dim=24,
    reachability_scale=7.5,
    cosine_scale=12.0,
    squash='square',
    attention_reduction=4,
    attention_spatial='linear',
    attention_grid=(2, 2),
    attention_out_init='official',
    attention_scaled=True,
    distance_eps=1e-5,
    norm_eps=1e-5,
    open_set_score='energy',
    open_set_threshold=2.25,
)
CONFIG_B = CONFIG_A.replace(attention=False, attention_spatial='conv', attention_grid=None, open_set_score='max_logit')


def make_model(config: OLTRConfig = CONFIG_A, seed: int = 0) -> timm_oltr.OLTRModel:
    torch.manual_seed(seed)
    backbone = timm.create_model(ARCH, pretrained=False)
    model = timm_oltr.wrap(backbone, K, config=config, img_size=64, label_names=LABELS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no parameter left at a value a fresh init would also give
    model.head.set_centroids(torch.randn(K, model.head_hidden_size), COUNTS)
    return model.eval()


def decisions(model: timm_oltr.OLTRModel, logits: torch.Tensor, reachability: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    scores = open_set_scores(logits, cfg.open_set_score, reachability=reachability)
    return torch.as_tensor(apply_threshold(logits.argmax(1), scores, cfg.open_set_threshold))


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, timeout=300
    )


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> tuple[timm_oltr.OLTRModel, Path]:
    model = make_model()
    # a threshold at the median score, so the batch has both accepted and rejected samples
    with torch.no_grad():
        logits = model(_inputs())
    scores = open_set_scores(logits, CONFIG_A.open_set_score)
    model.config = model.config.replace(open_set_threshold=float(sorted(scores)[len(scores) // 2]))
    folder = tmp_path_factory.mktemp('ckpt')
    model.train()  # saving in train mode must not matter: reload gives eval mode (C20)
    save_pretrained(model, folder)
    return model.eval(), folder


def _inputs(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(123))


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the saved folder, for tests that tamper with it."""
    return Path(shutil.copytree(saved[1], tmp_path / 'ckpt'))


# ---------------------------------------------------------------------------------------------------------------------
# round trip


def test_folder_holds_exactly_three_files(saved):
    assert sorted(os.listdir(saved[1])) == ['README.md', 'config.json', 'model.safetensors']


def test_fresh_process_reload_is_bitwise_identical(saved, tmp_path):
    """C04 / C20: a new process rebuilds the model from the folder alone and gives the same logits and decisions."""
    model, folder = saved
    x = _inputs()
    safetensors.torch.save_file({'x': x}, tmp_path / 'x.safetensors')
    code = f"""
import json, safetensors.torch, torch
from timm_oltr.hub import from_pretrained
from timm_oltr.metrics import apply_threshold, open_set_scores
model = from_pretrained({str(folder)!r})
x = safetensors.torch.load_file({str(tmp_path / 'x.safetensors')!r})['x']
with torch.no_grad():
    out = model.forward_oltr(x)
cfg = model.config
scores = open_set_scores(out.logits, cfg.open_set_score, reachability=out.reachability)
decided = torch.as_tensor(apply_threshold(out.logits.argmax(1), scores, cfg.open_set_threshold))
safetensors.torch.save_file(
    {{'logits': out.logits, 'reachability': out.reachability, 'decisions': decided}}, {str(tmp_path / 'out.st')!r}
)
print(json.dumps({{'training': any(m.training for m in model.modules()), 'config': cfg.to_dict(),
                  'labels': model.label_names}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    theirs = safetensors.torch.load_file(tmp_path / 'out.st')

    with torch.no_grad():
        out = model.forward_oltr(x)
    ours = decisions(model, out.logits, out.reachability)
    assert torch.equal(theirs['logits'], out.logits)
    assert torch.equal(theirs['reachability'], out.reachability)
    assert torch.equal(theirs['decisions'], ours)
    assert 0 < int((ours == -1).sum()) < len(ours)
    assert info == {'training': False, 'config': model.config.to_dict(), 'labels': LABELS}


def test_reload_matches_when_centroids_are_far_from_any_random_init(saved):
    """The centroids come from the file: a model loaded without them would give different logits."""
    model, folder = saved
    loaded = from_pretrained(folder)
    assert torch.equal(loaded.head.centroids, model.head.centroids)
    assert torch.equal(loaded.head.class_counts, COUNTS)
    assert bool(loaded.head.initialized)
    x = torch.randn(2, 3, 64, 64)
    fresh = make_model(seed=1)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        assert torch.equal(loaded(x), model(x))


def test_configs_cover_every_field():
    default = OLTRConfig()
    for field in dataclasses.fields(OLTRConfig):
        values = {getattr(CONFIG_A, field.name), getattr(CONFIG_B, field.name)}
        assert values - {getattr(default, field.name)}, f'no test config changes {field.name}'


@pytest.mark.parametrize('config', [CONFIG_A, CONFIG_B], ids=['attention', 'no-attention'])
def test_config_label_names_and_data_config_round_trip(config, tmp_path):
    model = make_model(config)
    save_pretrained(model, tmp_path / 'a')
    loaded = from_pretrained(tmp_path / 'a')
    assert loaded.config == model.config
    assert loaded.label_names == LABELS
    assert loaded.training is False
    assert loaded.pretrained_cfg == model.pretrained_cfg
    assert timm.data.resolve_model_data_config(loaded) == timm.data.resolve_model_data_config(model)
    # the reloaded model describes itself exactly as the original did (same constructor arguments)
    save_pretrained(loaded, tmp_path / 'b')
    for name in ('config.json', 'README.md', 'model.safetensors'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes(), name


def test_config_json_layout(saved):
    model, folder = saved
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == ARCH
    assert config['num_classes'] == K
    assert config['num_features'] == model.num_features
    assert config['head_hidden_size'] == CONFIG_A.neck_dim
    assert config['label_names'] == LABELS
    assert config['model_args'] == model.backbone_args
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64]
    oltr = config['oltr']
    assert oltr['config'] == model.config.to_dict()
    assert oltr['config']['open_set_threshold'] == model.config.open_set_threshold != 0.1
    assert oltr['class_counts'] == COUNTS.tolist()
    assert oltr['img_size'] == [64, 64]
    assert oltr['versions']['timm_oltr'] == timm_oltr.__version__
    assert oltr['versions']['timm'] == timm.__version__
    # the weights hold canonical keys only
    keys = safetensors.torch.load_file(folder / 'model.safetensors').keys()
    assert set(keys) == set(model.state_dict())


def test_save_unwraps_and_strips_wrapper_prefixes(saved, tmp_path):
    model, _ = saved

    class Wrapper(torch.nn.Module):  # what DDP looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_pretrained(Wrapper(model), tmp_path / 'w')
    assert set(safetensors.torch.load_file(tmp_path / 'w' / 'model.safetensors')) == set(model.state_dict())

    # a state dict saved with DDP / torch.compile prefixes still loads
    prefixed = {f'module._orig_mod.{k}': v for k, v in model.state_dict().items()}
    safetensors.torch.save_file({k: v.contiguous() for k, v in prefixed.items()}, tmp_path / 'w' / 'model.safetensors')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / 'w')(x), model(x))


def test_save_rejects_plain_timm_model(tmp_path):
    with pytest.raises(TypeError, match='OLTRModel'):
        save_pretrained(timm.create_model(ARCH), tmp_path)


def test_save_is_atomic_and_leaves_no_temp_files(saved, tmp_path, monkeypatch):
    model, _ = saved
    save_pretrained(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr('timm_oltr.hub.ModelCard', killed)  # dies after the weights are written, before any move
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(make_model(seed=3), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o002])
def test_saved_files_get_the_permissions_of_any_new_file(saved, tmp_path, umask):
    model, _ = saved
    previous = os.umask(umask)
    try:
        with open(tmp_path / 'plain.txt', 'w') as f:
            f.write('x')
        save_pretrained(model, tmp_path / 'ckpt', safe_serialization='both')
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / 'plain.txt').stat().st_mode)
    assert expected == 0o666 & ~umask
    names = ['README.md', 'config.json', 'model.safetensors', 'pytorch_model.bin']
    assert {name: stat.S_IMODE((tmp_path / 'ckpt' / name).stat().st_mode) for name in names} == dict.fromkeys(
        names, expected
    )


def test_save_into_an_existing_file_names_save_directory(saved, tmp_path):
    model, _ = saved
    (tmp_path / 'weights').write_text('not a folder')
    with pytest.raises(FileExistsError, match=r"save_directory='.*weights' cannot be used as a folder"):
        save_pretrained(model, tmp_path / 'weights')
    with pytest.raises(FileExistsError, match='save_directory=.* or a folder above it is an existing file'):
        save_pretrained(model, tmp_path / 'weights' / 'inner')
    assert (tmp_path / 'weights').read_text() == 'not a folder'
    with pytest.raises(TypeError, match=r'save_directory must be a folder path \(str or os.PathLike\), got None'):
        save_pretrained(model, None)


@pytest.mark.parametrize('name_or_path', [None, 3, b'some/folder'])
def test_from_pretrained_rejects_non_paths(name_or_path):
    with pytest.raises(TypeError, match=r'name_or_path must be a str or os.PathLike, got .*a Hub repo id'):
        from_pretrained(name_or_path)


def test_bin_weights_load_with_weights_only(saved, tmp_path):
    model, _ = saved
    save_pretrained(model, tmp_path, safe_serialization=False)
    assert not (tmp_path / 'model.safetensors').exists()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path)(x), model(x))


# ---------------------------------------------------------------------------------------------------------------------
# tampered files


def _edit_weights(folder: Path, edit) -> None:
    tensors = safetensors.torch.load_file(folder / 'model.safetensors')
    edit(tensors)
    safetensors.torch.save_file(tensors, folder / 'model.safetensors')


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / 'config.json').read_text())
    edit(config)
    (folder / 'config.json').write_text(json.dumps(config))


def test_wrong_centroid_shape_fails_even_non_strict(ckpt):
    _edit_weights(ckpt, lambda t: t.update({'head.centroids': torch.zeros(K, CONFIG_A.neck_dim + 1)}))
    for strict in (True, False):
        with pytest.raises(ValueError, match=r'shape mismatch for head\.centroids: file \(5, 25\) vs model \(5, 24\)'):
            from_pretrained(ckpt, strict=strict)


def test_missing_key_fails(ckpt):
    _edit_weights(ckpt, lambda t: t.pop('head.centroids'))
    with pytest.raises(ValueError, match=r'missing keys head\.centroids'):
        from_pretrained(ckpt)


def test_extra_key_fails_unless_not_strict(ckpt, caplog):
    _edit_weights(ckpt, lambda t: t.update({'head.memory.weight': torch.zeros(3)}))
    with pytest.raises(ValueError, match=r'unexpected keys head\.memory\.weight'):
        from_pretrained(ckpt)
    # at_level: examples/benchmark.py, run in-process by another test, raises the package logger to ERROR
    with caplog.at_level(logging.WARNING, logger='timm_oltr.hub'):
        model = from_pretrained(ckpt, strict=False)
    assert 'head.memory.weight' in caplog.text
    assert model.training is False


def test_pickle_renamed_to_safetensors_is_never_unpickled(ckpt, tmp_path):
    marker = tmp_path / 'unpickled'

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({'head.centroids': Payload()}, ckpt / 'model.safetensors')
    with pytest.raises(ValueError, match='not a valid safetensors file.*pickle'):
        from_pretrained(ckpt)
    assert not marker.exists()


def test_truncated_weights_fail(ckpt):
    data = (ckpt / 'model.safetensors').read_bytes()
    (ckpt / 'model.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match='truncated or corrupted'):
        from_pretrained(ckpt)


def test_unknown_oltr_config_field_fails(ckpt):
    _edit_config(ckpt, lambda c: c['oltr']['config'].update({'memory_size': 3}))
    with pytest.raises(ValueError, match=r"invalid 'oltr.config'.*memory_size"):
        from_pretrained(ckpt)


def test_unknown_oltr_section_field_fails(ckpt):
    _edit_config(ckpt, lambda c: c['oltr'].update({'temperature': 2.0}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['temperature'\]"):
        from_pretrained(ckpt)


def test_config_from_another_save_fails(ckpt):
    _edit_config(ckpt, lambda c: c['oltr'].update({'class_counts': [1, 1, 1, 1, 1]}))
    with pytest.raises(ValueError, match='class_counts.*different saves'):
        from_pretrained(ckpt)


def test_wrong_num_classes_in_config_names_the_keys(ckpt):
    _edit_config(ckpt, lambda c: c.update({'num_classes': K + 1}))
    with pytest.raises(ValueError, match=r'config.json: cannot build .*label_names must be 6 strings'):
        from_pretrained(ckpt)
    _edit_config(ckpt, lambda c: c.pop('label_names'))
    with pytest.raises(ValueError, match=r'head\.centroids: file \(5, 24\) vs model \(6, 24\)'):
        from_pretrained(ckpt)


def test_bad_names_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match='neither an existing folder nor a Hub repo id'):
        from_pretrained(tmp_path / 'does' / 'not' / 'exist')
    with pytest.raises(FileNotFoundError, match='no config.json'):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Hub cache (offline)


def _fill_cache(cache: Path, repo_id: str, folder: Path, sha: str = 'a' * 40) -> None:
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    shutil.copytree(folder, repo / 'snapshots' / sha)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(sha)


def test_hub_id_loads_offline_from_cache(saved, tmp_path):
    model, folder = saved
    _fill_cache(tmp_path / 'hub', 'someone/oltr-test', folder)
    x = torch.randn(2, 3, 64, 64)
    safetensors.torch.save_file({'x': x}, tmp_path / 'x.st')
    code = f"""
import safetensors.torch, torch
from timm_oltr.hub import from_pretrained
x = safetensors.torch.load_file({str(tmp_path / 'x.st')!r})['x']
outs = {{}}
for i, name in enumerate(['hf-hub:someone/oltr-test', 'someone/oltr-test', 'hf-hub:someone/oltr-test@main']):
    with torch.no_grad():
        outs[str(i)] = from_pretrained(name)(x)
safetensors.torch.save_file(outs, {str(tmp_path / 'out.st')!r})
try:
    from_pretrained('someone/missing')
except FileNotFoundError as e:
    print('MISSING:', e)
"""
    env = {'HF_HUB_CACHE': str(tmp_path / 'hub'), 'HF_HUB_OFFLINE': '1', 'HF_ENDPOINT': 'http://127.0.0.1:9'}
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = model(x)
    for logits in safetensors.torch.load_file(tmp_path / 'out.st').values():
        assert torch.equal(logits, expected)
    assert 'MISSING: config.json of hf-hub:someone/missing is not in the local Hugging Face cache' in result.stdout


def test_hub_cache_dir_and_local_files_only(saved, tmp_path):
    _fill_cache(tmp_path, 'someone/oltr-test', saved[1])
    model = from_pretrained('hf-hub:someone/oltr-test', cache_dir=tmp_path, local_files_only=True)
    assert model.training is False and model.label_names == LABELS
    with pytest.raises(FileNotFoundError, match='not in the local Hugging Face cache'):
        from_pretrained('someone/oltr-test', cache_dir=tmp_path, local_files_only=True, revision='v2')


# ---------------------------------------------------------------------------------------------------------------------
# push (the Hub's HTTP API answered by a local fake)


class FakeHub:
    """The endpoints `create_repo` and `upload_folder` use, answered in memory; records every request."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[httpx2.Request] = []
        self.fail: dict[str, tuple[int, dict]] = {}  # route -> (status, json body)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        parts = path.strip('/').split('/')
        route = next((r for r in ('create', 'preupload', 'commit', 'revision') if r in parts), None)
        if route in self.fail:
            status, body = self.fail[route]
            return httpx2.Response(status, json=body, headers={'X-Error-Message': body.get('error', '')})
        if path == '/api/validate-yaml':  # the model card's metadata is checked before the commit
            return httpx2.Response(200, json={'errors': [], 'warnings': []})
        if route is None:
            return httpx2.Response(404, json={'error': f'not faked: {path}'})
        if route == 'create':
            body = json.loads(request.content)
            repo_id = f'{body["organization"]}/{body["name"]}'
            url = f'https://huggingface.co/{repo_id}'
            if repo_id in self.repos:
                return httpx2.Response(409, json={'error': 'You already created this model repo', 'url': url})
            self.repos[repo_id] = {}
            return httpx2.Response(200, json={'url': url})
        repo_id = '/'.join(parts[2:4])
        files = self.repos.get(repo_id)
        if files is None:
            return httpx2.Response(
                404, json={'error': 'Repository not found'}, headers={'X-Error-Code': 'RepoNotFound'}
            )
        if route == 'preupload':
            wanted = json.loads(request.content)['files']
            return httpx2.Response(200, json={'files': [self._mode(f['path'], files) for f in wanted]})
        if route == 'commit':
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line]
            added = {d['value']['path']: base64.b64decode(d['value']['content']) for d in lines if d['key'] == 'file'}
            summary = next(d['value']['summary'] for d in lines if d['key'] == 'header')
            files.update(added)
            self.commits.append({'repo_id': repo_id, 'summary': summary, 'files': added, 'revision': parts[-1]})
            oid = f'{len(self.commits):040x}'
            return httpx2.Response(
                200, json={'commitUrl': f'https://huggingface.co/{repo_id}/commit/{oid}', 'commitOid': oid}
            )
        if route == 'revision':
            oid = f'{len(self.commits):040x}'
            return httpx2.Response(200, json={'id': repo_id, 'sha': oid, 'siblings': [{'rfilename': f} for f in files]})
        return httpx2.Response(404, json={'error': f'not faked: {path}'})

    @staticmethod
    def _mode(path: str, files: dict[str, bytes]) -> dict:
        info = {'path': path, 'uploadMode': 'regular', 'shouldIgnore': False}
        if path in files:  # the Hub answers the git blob id of the stored file, so unchanged files are skipped
            data = files[path]
            info['oid'] = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
        return info


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    previous = hf_http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    huggingface_hub.set_client_factory(previous)


def test_push_uploads_exactly_the_checkpoint(saved, fake_hub):
    model, _ = saved
    report = _report(top1=0.5, many=0.75, auroc=0.8)
    url = push_to_hub(model, 'someone/oltr-test', private=True, token='hf_fake', report=report)

    assert url.endswith('/someone/oltr-test/commit/' + f'{1:040x}')
    create = json.loads(fake_hub.requests[[r.url.path for r in fake_hub.requests].index('/api/repos/create')].content)
    assert create['name'] == 'oltr-test' and create['organization'] == 'someone'
    assert create.get('private') is True or create.get('visibility') == 'private'
    repo_requests = [r for r in fake_hub.requests if r.url.path.startswith(('/api/repos/', '/api/models/'))]
    assert len(repo_requests) >= 3 and all(r.headers.get('authorization') == 'Bearer hf_fake' for r in repo_requests)
    [commit] = fake_hub.commits
    assert sorted(commit['files']) == ['README.md', 'config.json', 'model.safetensors']
    assert commit['summary'] == f'Upload OLTR model ({ARCH}, {K} classes)'
    assert commit['revision'] == 'main'
    assert json.loads(commit['files']['config.json'])['oltr']['config'] == model.config.to_dict()
    card = commit['files']['README.md'].decode()
    assert "from_pretrained('hf-hub:someone/oltr-test')" in card
    assert '| OLTR | 50.0 | 75.0 | - | - | 80.0 |' in card  # absent columns are left out
    weights = safetensors.torch.load(commit['files']['model.safetensors'])
    assert torch.equal(weights['head.centroids'], model.head.centroids)


def test_second_push_is_fine_and_commits_only_changes(saved, fake_hub):
    """C21: pushing again (repo exists, nothing changed) succeeds without an empty commit."""
    model, _ = saved
    push_to_hub(model, 'someone/oltr-test', private=True, token='hf_fake', commit_message='first')
    url = push_to_hub(model, 'someone/oltr-test', private=True, token='hf_fake', commit_message='again')
    assert [c['summary'] for c in fake_hub.commits] == ['first']
    assert url.endswith(f'/someone/oltr-test/commit/{1:040x}')

    saved_config = model.config
    model.config = saved_config.replace(open_set_threshold=0.5)
    try:
        push_to_hub(model, 'someone/oltr-test', token='hf_fake', commit_message='new threshold')
    finally:
        model.config = saved_config
    assert [c['summary'] for c in fake_hub.commits] == ['first', 'new threshold']
    assert sorted(fake_hub.commits[-1]['files']) == ['README.md', 'config.json']


def test_push_to_branch(saved, fake_hub, monkeypatch):
    branches = []
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_branch', lambda self, repo_id, **kw: branches.append(kw))
    push_to_hub(saved[0], 'hf-hub:someone/oltr-test', token='hf_fake', revision='v2')
    assert branches[0]['branch'] == 'v2' and branches[0]['exist_ok'] is True
    assert fake_hub.commits[0]['revision'] == 'v2'


@pytest.mark.parametrize(
    'route, status, error, match',
    [
        ('create', 401, PermissionError, r'rejected the token .*HTTP 401.*`hf auth login`, set HF_TOKEN'),
        ('commit', 403, PermissionError, r"may not write to namespace 'someone' \(HTTP 403\).*write scope"),
        ('create', 404, FileNotFoundError, r"repo not found \(HTTP 404\).*'someone' is your user name"),
    ],
)
def test_push_errors_say_what_to_fix(saved, fake_hub, route, status, error, match):
    fake_hub.fail[route] = (status, {'error': 'Invalid credentials in Authorization header'})
    with pytest.raises(error, match=match) as info:
        push_to_hub(saved[0], 'someone/oltr-test', token='hf_bad')
    assert '\n' not in str(info.value)
    assert not fake_hub.commits


def test_push_rejects_bad_repo_id(saved):
    with pytest.raises(ValueError, match='repo_id'):
        push_to_hub(saved[0], 'no-namespace')


def _hub_reachable() -> bool:
    if not os.environ.get('HF_TOKEN') or os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0'):
        return False
    try:
        socket.create_connection(('huggingface.co', 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_live_push_and_pull(saved, tmp_path):
    """Runs only with HF_TOKEN set and the Hub reachable; pushes to OLTR_LIVE_REPO or <user>/timm-oltr-test."""
    if not _hub_reachable():
        pytest.skip('live push needs HF_TOKEN and network')
    model, _ = saved
    repo_id = os.environ.get('OLTR_LIVE_REPO') or f'{huggingface_hub.whoami()["name"]}/timm-oltr-test'
    push_to_hub(model, repo_id, private=True)
    push_to_hub(model, repo_id, private=True)  # unchanged: no new commit, no error
    loaded = from_pretrained(repo_id, cache_dir=tmp_path)
    x = _inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------------------------------
# model card


def _report(
    split='test', shot_rule='strict', top1=None, many=None, medium=None, few=None, f=None, auroc=None, fpr=None
):
    """A report dict in OLTRReport.to_dict()'s layout, with chosen headline figures (None = absent)."""
    groups = {name: {'accuracy': value} for name, value in (('many', many), ('medium', medium), ('few', few))}
    return {
        'split': split,
        'conventions': {'shot_rule': shot_rule},
        'closed_set': {'top1': top1, 'groups': groups},
        'open_set': {'f_measure': None if f is None else {'f': f}, 'auroc': auroc, 'fpr_at_95_tpr': fpr},
    }


def test_card_reads_a_side_by_side_metrics_json(saved, tmp_path):
    model, _ = saved
    metrics = {
        'plain': _report(shot_rule='inclusive', top1=0.6, many=0.9, medium=0.5),
        'oltr': _report(shot_rule='inclusive', top1=0.65, many=0.85, medium=0.6, few=0.3, f=0.4, auroc=0.7, fpr=0.8),
        'history': {'stage1': [{'epoch': 1, 'val_macro': 0.99}]},
    }
    (tmp_path / 'metrics.json').write_text(json.dumps(metrics))
    save_pretrained(model, tmp_path, datasets='fashion_mnist')
    card = huggingface_hub.ModelCard.load(tmp_path / 'README.md')
    assert card.data.library_name == 'timm-oltr'
    assert card.data.tags == ['image-classification', 'timm', 'oltr', 'long-tail', 'open-set']
    assert card.data.datasets == ['fashion_mnist']
    assert card.data.license == 'apache-2.0'
    assert '| plain timm model | 60.0 | 90.0 | 50.0 | - | - | - | - |' in card.text
    assert '| OLTR | 65.0 | 85.0 | 60.0 | 30.0 | 40.0 | 70.0 | 80.0 |' in card.text
    assert 'many >= 100, few <= 20' in card.text and 'the `test` split' in card.text
    assert json.loads((tmp_path / 'config.json').read_text())['oltr']['shot_rule'] == 'inclusive'


def test_card_accepts_a_report_object(saved, tmp_path):
    labels = np.array([0, 1, 2, 0, -1])
    logits = np.eye(K)[[0, 1, 1, 0, 2]] * 5.0  # 3 of 4 knowns right, one unknown
    report = timm_oltr.compute_report(logits, labels, split='val')
    save_pretrained(saved[0], tmp_path, report=report)
    text = (tmp_path / 'README.md').read_text()
    assert '| OLTR | 75.0 |' in text and 'the `val` split' in text
    with pytest.raises(TypeError, match='report must be a dict'):
        save_pretrained(saved[0], tmp_path, report=[0.5])
    with pytest.raises(ValueError, match='report must be an OLTRReport'):
        save_pretrained(saved[0], tmp_path, report={'accuracy': 0.5})


def test_card_without_report_has_no_table(saved, tmp_path):
    save_pretrained(saved[0], tmp_path, model_card=True)
    text = (tmp_path / 'README.md').read_text()
    assert '## Evaluation' not in text and 'metrics:' not in text
    assert f'`{ARCH}`' in text


# ---------------------------------------------------------------------------------------------------------------------
# examples/push_to_hub.py


def _example():
    spec = importlib.util.spec_from_file_location('push_example', REPO_ROOT / 'examples' / 'push_to_hub.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_pushes_a_run_folder(saved, fake_hub, tmp_path, capsys):
    shutil.copytree(saved[1], tmp_path / 'run' / 'model')
    (tmp_path / 'run' / 'metrics.json').write_text(json.dumps({'oltr': _report(top1=0.5)}))
    (tmp_path / 'run' / 'model' / 'train.log').write_text('not uploaded')

    assert _example().main([str(tmp_path / 'run'), 'someone/run', '--private', '--token', 'hf_fake']) == 0
    [commit] = fake_hub.commits
    assert sorted(commit['files']) == ['README.md', 'config.json', 'model.safetensors']
    assert '| OLTR | 50.0 |' in commit['files']['README.md'].decode()
    assert capsys.readouterr().out.strip() == commit_url(commit)


def commit_url(commit: dict) -> str:
    return f'https://huggingface.co/{commit["repo_id"]}/commit/{1:040x}'


@pytest.mark.parametrize('case', ['no-run-dir', 'no-checkpoint', 'unauthorised'])
def test_example_bad_input_is_one_line(saved, fake_hub, tmp_path, capsys, case):
    run = tmp_path / 'run'
    if case != 'no-run-dir':
        run.mkdir()
    if case == 'unauthorised':
        shutil.copytree(saved[1], run / 'model')
        fake_hub.fail['create'] = (401, {'error': 'Invalid credentials in Authorization header'})
    assert _example().main([str(run), 'someone/run']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err
    expected = {'no-run-dir': 'is not a folder', 'no-checkpoint': '--model-dir', 'unauthorised': 'hf auth login'}
    assert expected[case] in err
