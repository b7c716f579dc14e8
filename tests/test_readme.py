"""The README's Python snippets run as written (with a tiny model and data in place of ImageNet-sized ones)."""

import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).resolve().parents[1] / 'README.md'
K = 100


class Labelled(TensorDataset):
    """A tensor dataset with `targets`, like the datasets of timm_oltr.data."""

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors[1]


def _snippets() -> list[str]:
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    assert len(blocks) >= 4, 'the README lost its code examples'
    return blocks


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=g)
    labels = torch.arange(200) % K
    train_set = Labelled(torch.randn(200, 3, 64, 64, generator=g), labels)
    unknown = DataLoader(TensorDataset(torch.randn(6, 3, 64, 64, generator=g), torch.full((6,), -1)), batch_size=4)
    namespace = {
        'images': images,
        'train_set': train_set,
        'train_loader_eval': DataLoader(train_set, batch_size=50),
        'val_loader': DataLoader(train_set, batch_size=50),
        'test_loader': DataLoader(train_set, batch_size=50),
        'open_val_loader': unknown,
        'open_loader': unknown,
        'torch': torch,
        'DataLoader': DataLoader,
    }
    for block in _snippets():
        code = block.replace("'resnet50', pretrained=True", "'test_resnet'").replace('batch_size=128', 'batch_size=100')
        code = code.replace("model.push_to_hub('user/my-oltr', private=True)", '')  # no network here
        exec(compile(code, str(README), 'exec'), namespace)  # noqa: S102

    model = namespace['model']
    assert namespace['logits'].shape == (8, K)
    assert model.head.is_initialized and not model.training
    assert (tmp_path / 'per_class.png').stat().st_size > 1000
    assert (tmp_path / 'out' / 'my-oltr' / 'model.safetensors').is_file()
