"""timm-oltr: Open Long-Tailed Recognition (Liu et al., CVPR 2019) for any timm image model.

https://arxiv.org/abs/1904.05160

    model = timm_oltr.wrap(timm.create_model('resnet50', pretrained=True), num_classes=100)
    timm_oltr.init_centroids(model, train_loader)
    loss = timm_oltr.OLTRLoss()(model.forward_oltr(images), targets, model)
    report = timm_oltr.evaluate(model, test_loader, open_loader=open_loader)
"""

from . import metrics as metrics
from . import plots as plots
from .attention import ModulatedAttention as ModulatedAttention
from .centroids import CentroidDrift as CentroidDrift
from .centroids import ClassMeans as ClassMeans
from .centroids import centroid_drift as centroid_drift
from .centroids import class_means as class_means
from .centroids import init_centroids as init_centroids
from .config import OLTRConfig as OLTRConfig
from .data import ImageListDataset as ImageListDataset
from .data import OpenLongTailData as OpenLongTailData
from .data import class_counts as class_counts
from .data import create_transforms as create_transforms
from .data import fashion_mnist_lt as fashion_mnist_lt
from .data import image_folder_splits as image_folder_splits
from .data import long_tail_split as long_tail_split
from .data import open_set_split as open_set_split
from .evaluation import Calibration as Calibration
from .evaluation import OLTRReport as OLTRReport
from .evaluation import calibrate_threshold as calibrate_threshold
from .evaluation import compute_report as compute_report
from .evaluation import evaluate as evaluate
from .head import CosineClassifier as CosineClassifier
from .head import MetaEmbeddingHead as MetaEmbeddingHead
from .head import OLTROutput as OLTROutput
from .hub import from_pretrained as from_pretrained
from .hub import push_to_hub as push_to_hub
from .hub import save_pretrained as save_pretrained
from .losses import DiscriminativeCentroidLoss as DiscriminativeCentroidLoss
from .losses import OLTRLoss as OLTRLoss
from .metrics import choose_threshold as choose_threshold
from .metrics import open_set_scores as open_set_scores
from .model import OLTRModel as OLTRModel
from .model import wrap as wrap
from .optim import freeze_backbone as freeze_backbone
from .optim import param_groups as param_groups
from .sampler import ClassAwareSampler as ClassAwareSampler

__version__ = '0.1.0'

__all__ = [
    'Calibration',
    'CentroidDrift',
    'ClassAwareSampler',
    'ClassMeans',
    'CosineClassifier',
    'DiscriminativeCentroidLoss',
    'ImageListDataset',
    'MetaEmbeddingHead',
    'ModulatedAttention',
    'OLTRConfig',
    'OLTRLoss',
    'OLTRModel',
    'OLTROutput',
    'OLTRReport',
    'OpenLongTailData',
    'calibrate_threshold',
    'centroid_drift',
    'choose_threshold',
    'class_counts',
    'class_means',
    'compute_report',
    'create_transforms',
    'evaluate',
    'fashion_mnist_lt',
    'from_pretrained',
    'image_folder_splits',
    'init_centroids',
    'long_tail_split',
    'metrics',
    'open_set_scores',
    'open_set_split',
    'param_groups',
    'plots',
    'push_to_hub',
    'save_pretrained',
    'wrap',
]
