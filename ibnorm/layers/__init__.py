from .base import IBNormBase, project_lambdas
from .batch import IBBatchNorm, IBBatchNorm1d, IBBatchNorm2d, IBBatchNorm3d
from .factory import VARIANTS, from_module, from_spec
from .group import IBGroupNorm
from .rowwise import IBLayerNorm, IBLayerNorm2d, IBRMSNorm, IBRMSNorm2d

__all__ = [
    "IBNormBase",
    "IBRMSNorm",
    "IBRMSNorm2d",
    "IBLayerNorm",
    "IBLayerNorm2d",
    "IBBatchNorm",
    "IBBatchNorm1d",
    "IBBatchNorm2d",
    "IBBatchNorm3d",
    "IBGroupNorm",
    "project_lambdas",
    "from_module",
    "from_spec",
    "VARIANTS",
]
