from .base import IBNormBase, project_lambdas
from .batch import IBBatchNorm, IBBatchNorm1d, IBBatchNorm2d, IBBatchNorm3d
from .factory import GROUPING_CHOICES, from_spec, grouping_of, resolve_grouping
from .group import IBGroupNorm
from .rowwise import LEGACY_CLASS_NAMES, IBLayerNorm, IBLayerNorm2d, IBNormRMS, IBNormRMS2d, IBRMSNorm, IBRMSNorm2d

__all__ = [
    "IBNormBase",
    "IBNormRMS",
    "IBNormRMS2d",
    "IBRMSNorm",  # old name of IBNormRMS
    "IBRMSNorm2d",
    "LEGACY_CLASS_NAMES",
    "IBLayerNorm",
    "IBLayerNorm2d",
    "IBBatchNorm",
    "IBBatchNorm1d",
    "IBBatchNorm2d",
    "IBBatchNorm3d",
    "IBGroupNorm",
    "project_lambdas",
    "from_spec",
    "grouping_of",
    "resolve_grouping",
    "GROUPING_CHOICES",
]
