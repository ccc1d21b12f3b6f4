"""fuse: a T5 encoder-decoder whose encoder admits each modality at a chosen layer.

Public API::

    from fuse import FusionT5Config, FusionT5ForConditionalGeneration, FusionSpec, PoolSpec
"""

from .config import T5_PRESETS, FusionT5Config
from .encoder import FusionEncoderOutput, FusionT5Encoder
from .flops import FlopCount, encoder_lengths, train_step_flops
from .modality import ModalityAdapter
from .model import FusionT5ForConditionalGeneration
from .pooling import POOLS, AttentionPool, MaxPool, MeanPool, NoPool, create_pool
from .spec import (
    POOL_TYPES,
    DecoderDepthError,
    FusionConfigError,
    FusionInputError,
    FusionSpec,
    FusionSpecError,
    PoolSpec,
    PoolSpecError,
    coerce_pools,
    parse_pools,
)

__all__ = [
    "POOLS",
    "POOL_TYPES",
    "T5_PRESETS",
    "AttentionPool",
    "DecoderDepthError",
    "FlopCount",
    "FusionConfigError",
    "FusionEncoderOutput",
    "FusionInputError",
    "FusionSpec",
    "FusionSpecError",
    "FusionT5Config",
    "FusionT5Encoder",
    "FusionT5ForConditionalGeneration",
    "MaxPool",
    "MeanPool",
    "ModalityAdapter",
    "NoPool",
    "PoolSpec",
    "PoolSpecError",
    "coerce_pools",
    "create_pool",
    "encoder_lengths",
    "parse_pools",
    "train_step_flops",
]
