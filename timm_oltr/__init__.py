"""timm-oltr: Open Long-Tailed Recognition (Liu et al., CVPR 2019) for any timm image model.

https://arxiv.org/abs/1904.05160
"""

from .attention import ModulatedAttention as ModulatedAttention
from .config import OLTRConfig as OLTRConfig
from .head import CosineClassifier as CosineClassifier
from .head import MetaEmbeddingHead as MetaEmbeddingHead
from .head import OLTROutput as OLTROutput
from .model import OLTRModel as OLTRModel
from .model import wrap as wrap

__version__ = '0.1.0'

__all__ = [
    'CosineClassifier',
    'MetaEmbeddingHead',
    'ModulatedAttention',
    'OLTRConfig',
    'OLTRModel',
    'OLTROutput',
    'wrap',
]
