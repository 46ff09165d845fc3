"""chexformer: a hybrid DenseNet121-Transformer classifier for chest X-rays on small datasets.

The public names are imported on first use, so ``import chexformer`` (and ``chexformer --help``)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ChexFormer": "chexformer.model",
    "build_model": "chexformer.model",
    "Config": "chexformer.config",
    "ConfigError": "chexformer.config",
    "load_config": "chexformer.config",
    "LoadReport": "chexformer.weights",
    "WeightsError": "chexformer.weights",
    "load_backbone_weights": "chexformer.weights",
    "Predictor": "chexformer.inference",
}

__all__ = [
    "ChexFormer",
    "Config",
    "ConfigError",
    "LoadReport",
    "Predictor",
    "WeightsError",
    "build_model",
    "load_backbone_weights",
    "load_config",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs
    from chexformer.config import Config, ConfigError, load_config
    from chexformer.inference import Predictor
    from chexformer.model import ChexFormer, build_model
    from chexformer.weights import LoadReport, WeightsError, load_backbone_weights


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chexformer' has no attribute {name!r}")
