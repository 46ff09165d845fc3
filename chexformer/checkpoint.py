"""Self-describing checkpoints: any command that takes one rebuilds the model from it alone.

A chexformer checkpoint is a Lightning ``.ckpt`` (a dict with ``state_dict`` whose keys start
with ``model.``) plus a ``chexformer`` entry holding only plain Python values, so it loads with
``torch.load(weights_only=True)``::

    {"version": 1, "config": {...resolved Config...}, "class_names": [...],
     "normalization": {"mean": [...], "std": [...]}, "threshold": 0.43, "temperature": 1.2,
     "bias": -0.8, "epoch": 7}

Written during training (the metadata comes from :meth:`ChexFormerModule.meta
<chexformer.module.ChexFormerModule.meta>`, completed by ``train.finalize_best``); read by
:class:`~chexformer.inference.Predictor`, ``export`` and the command line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chexformer.config import Config
from chexformer.model import build_model, num_logits
from chexformer.weights import WeightsError, read_checkpoint_file

log = logging.getLogger(__name__)

__all__ = ["CheckpointMeta", "load_checkpoint", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_VERSION = 1


@dataclass
class CheckpointMeta:
    """Everything beyond the weights that a trained model needs."""

    config: Config
    class_names: list[str]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = 0.5
    """Decision threshold on the positive-class probability, chosen on validation."""
    temperature: float = 1.0
    """Logit temperature fitted on validation (probabilities = sigmoid(logit / temperature + bias))."""
    bias: float = 0.0
    """Logit shift fitted with the temperature on validation (Platt scaling; binary models)."""
    epoch: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """Logits the model returns: 1 for two classes, else one per class (:func:`~chexformer.model.num_logits`)."""
        return num_logits(self.num_classes)

    @property
    def positive_class(self) -> str | None:
        return self.class_names[-1] if self.num_classes == 2 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": META_VERSION,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "threshold": float(self.threshold),
            "temperature": float(self.temperature),
            "bias": float(self.bias),
            "epoch": int(self.epoch),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> CheckpointMeta:
        try:
            cfg = Config.from_dict(d["config"], source=f"{source} (stored config)")
            meta = cls(
                config=cfg,
                class_names=[str(c) for c in d["class_names"]],
                mean=tuple(float(v) for v in d["normalization"]["mean"]),
                std=tuple(float(v) for v in d["normalization"]["std"]),
                threshold=float(d.get("threshold", 0.5)),
                temperature=float(d.get("temperature", 1.0)),
                bias=float(d.get("bias", 0.0)),
                epoch=int(d.get("epoch", -1)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
            raise WeightsError(f"{source}: chexformer metadata is incomplete or invalid: {exc}") from None
        problems = [name for name, ok in (
            ("threshold", 0.0 <= meta.threshold <= 1.0),
            ("temperature", math.isfinite(meta.temperature) and meta.temperature > 0),
            ("bias", math.isfinite(meta.bias)),
            ("normalization", all(math.isfinite(v) for v in (*meta.mean, *meta.std)) and min(meta.std) > 0),
        ) if not ok]
        if problems:
            raise WeightsError(f"{source}: chexformer metadata is invalid: {', '.join(problems)} out of range "
                               f"(threshold {meta.threshold}, temperature {meta.temperature}, bias {meta.bias}, "
                               f"mean {meta.mean}, std {meta.std})")
        return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the trained model (in eval mode) and its metadata from a chexformer checkpoint."""
    obj = read_checkpoint_file(path)
    if not isinstance(obj, dict) or "chexformer" not in obj:
        raise WeightsError(
            f"{path} is not a chexformer checkpoint (no 'chexformer' metadata). Use the best.ckpt or "
            "final.ckpt written by 'chexformer train'; to load backbone weights use --pretrained-path."
        )
    meta = CheckpointMeta.from_dict(obj["chexformer"], source=str(path))
    model = build_model(meta.config, num_classes=meta.num_classes)
    state = obj.get("state_dict", {})
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing, unexpected or wrongly shaped tensors
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{path}: weights do not match the stored config: "
                           f"{' '.join(line.strip() for line in first[:4])}") from None
    model.to(map_location).eval()
    return model, meta
