"""chexformer: a hybrid DenseNet121-Transformer classifier for chest X-rays on small datasets."""

from chexformer.config import Config, ConfigError, load_config
from chexformer.model import ChexFormer, build_model
from chexformer.weights import LoadReport, WeightsError, load_backbone_weights

__version__ = "0.1.0"

__all__ = [
    "ChexFormer",
    "Config",
    "ConfigError",
    "LoadReport",
    "WeightsError",
    "build_model",
    "load_backbone_weights",
    "load_config",
    "__version__",
]
