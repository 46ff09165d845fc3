"""Backbone weights: one loader for CheXNet, torchvision, torchxrayvision-style and chexformer files.

Accepted files (``torch.load(weights_only=True)``):

a. CheXNet ``model.pth.tar`` as published with the widely used PyTorch reproduction: a dict with
   ``state_dict`` whose keys look like ``module.densenet121.features.denseblock1.denselayer1.norm.1.weight``
   (old DenseNet key style) plus a 14-class classifier that is dropped;
b. torchvision DenseNet121 state dicts, old (``norm.1``) or new (``norm1``) key style;
c. state dicts whose ``features.conv0.weight`` is single-channel [64, 1, 7, 7] (torchxrayvision),
   adapted to 3 channels by spreading the kernel over the replicated grey channels;
d. chexformer's own checkpoints (Lightning ``.ckpt`` or exported state dicts).

Every load reports how many tensors loaded and lists missing and unexpected keys; a partial
backbone is an error, never a silent ``strict=False``. In: a weights file (``cfg.pretrained_path``)
or torchvision's download. Out: the DenseNet121 backbone of a freshly built model, before training.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import DenseNet121_Weights

log = logging.getLogger(__name__)

__all__ = ["WeightsError", "LoadReport", "load_backbone_weights", "load_backbone_state", "init_backbone",
           "read_checkpoint_file"]

# Old DenseNet layer names: 'denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'.
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_PREFIXES = ("module.", "model.", "densenet121.", "_orig_mod.")


class WeightsError(ValueError):
    """A weights file that cannot be used, with the reason and what to do."""


@dataclass
class LoadReport:
    """What a weights load did."""

    path: str
    format: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    adapted_conv0: bool = False

    def __str__(self) -> str:
        parts = [f"{self.path} ({self.format}): loaded {self.loaded} backbone tensors"]
        if self.adapted_conv0:
            parts.append("single-channel conv0 adapted to 3 channels")
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} non-backbone tensors ({_preview(self.dropped)})")
        parts.append(f"missing {len(self.missing)}" + (f" ({_preview(self.missing)})" if self.missing else ""))
        unexpected = f" ({_preview(self.unexpected)})" if self.unexpected else ""
        parts.append(f"unexpected {len(self.unexpected)}{unexpected}")
        return "; ".join(parts)


def _preview(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def read_checkpoint_file(path: str | Path, trusted: bool = False) -> Any:
    """``torch.load`` with clear errors: missing, truncated, not a checkpoint, needs unpickling."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        if not _looks_like_torch_save(path):
            raise WeightsError(f"{path} is not a PyTorch checkpoint (neither the zip archive torch.save writes "
                               "nor a pickle): another file type, or damaged") from None
        if trusted:
            raise WeightsError(f"{path} could not be unpickled: {exc}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path} holds Python objects beyond tensors and plain containers, so it is not loaded safely "
            f"({first}). If the file comes from a source you trust, pass --trust-checkpoint true "
            "(config field trust_checkpoint) to unpickle it fully."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError, IndexError) as exc:
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or another file type): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from None


def _looks_like_torch_save(path: Path) -> bool:
    """Whether the file starts as ``torch.save`` output does: a zip archive, or (the legacy format)
    a pickle, whose first opcode is PROTO (0x80)."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _extract_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensor mapping inside a checkpoint object, and whether it is a chexformer checkpoint."""
    is_chexformer = isinstance(obj, dict) and "chexformer" in obj
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path} is not a model checkpoint: no state dict of tensors found")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} is not a model checkpoint: no tensors found")
    return tensors, is_chexformer


def _normalise_key(key: str) -> str:
    """Map any accepted key style to torchvision's ``features.*`` / ``classifier.*``."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    if key.startswith("backbone."):
        key = "features." + key[len("backbone."):]
    m = _OLD_KEY.match(key)
    if m:
        key = m.group(1) + m.group(2)
    return key


def _backbone_of(model: nn.Module) -> nn.Module:
    if hasattr(model, "backbone"):
        return model.backbone
    if hasattr(model, "features"):  # a torchvision DenseNet
        return model.features
    raise TypeError(f"{type(model).__name__} has no DenseNet backbone ('backbone' or 'features')")


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "<state dict>",
                        fmt: str | None = None) -> LoadReport:
    """Load a DenseNet121 state dict (any accepted key style) into ``model``'s backbone."""
    backbone = _backbone_of(model)
    target = backbone.state_dict()
    original_keys = list(state)
    if fmt is None:
        if any(k.startswith("module.densenet121.") for k in original_keys):
            fmt = "chexnet"
        elif any(_normalise_key(k).startswith("features.") and "backbone." in k for k in original_keys):
            fmt = "chexformer"
        else:
            fmt = "torchvision-densenet121"
    report = LoadReport(path=source, format=fmt)
    features: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _normalise_key(key)
        if new.startswith("features."):
            features[new[len("features."):]] = value
        else:
            report.dropped.append(key)

    conv0 = features.get("conv0.weight")
    if conv0 is not None and conv0.ndim == 4 and conv0.shape[1] == 1 and target["conv0.weight"].shape[1] == 3:
        # A grey image replicated to 3 channels through w/3 per channel equals the 1-channel conv.
        features["conv0.weight"] = conv0.repeat(1, 3, 1, 1) / 3.0
        report.adapted_conv0 = True
        report.format += " (1-channel conv0)"

    report.unexpected = sorted(k for k in features if k not in target)
    report.missing = sorted(k for k in target if k not in features and not k.endswith("num_batches_tracked"))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in features.items() if k in target and v.shape != target[k].shape
    ]
    if mismatched:
        raise WeightsError(
            f"{source}: {len(mismatched)} tensors do not fit DenseNet121 ({_preview(mismatched)}). "
            "Is this a DenseNet121 checkpoint?"
        )
    usable = {k: v for k, v in features.items() if k in target}
    report.loaded = len(usable)
    if not usable:
        raise WeightsError(
            f"{source}: no DenseNet121 backbone tensors found among {len(state)} tensors "
            f"(first keys: {_preview(original_keys)}). Expected CheXNet, torchvision DenseNet121 or chexformer keys."
        )
    if report.missing:
        raise WeightsError(
            f"{source}: the file lacks {len(report.missing)} of the backbone's tensors "
            f"({_preview(report.missing)}); refusing a partial load."
        )
    for k in target:  # checkpoints from old PyTorch versions have no num_batches_tracked
        if k.endswith("num_batches_tracked") and k not in usable:
            usable[k] = target[k]
    with torch.no_grad():
        backbone.load_state_dict(usable, strict=True)  # keys and shapes were checked above
    log.info("backbone weights: %s", report)
    if report.unexpected:
        log.warning("backbone weights: %d unexpected tensors ignored: %s", len(report.unexpected),
                    _preview(report.unexpected, 10))
    return report


def load_backbone_weights(model: nn.Module, path: str | Path, trusted: bool = False) -> LoadReport:
    """Load backbone weights from a file in any accepted format; return the report."""
    obj = read_checkpoint_file(path, trusted=trusted)
    state, is_chexformer = _extract_state_dict(obj, str(path))
    return load_backbone_state(model, state, source=str(path), fmt="chexformer" if is_chexformer else None)


_LOUD = "!" * 78


def init_backbone(model: nn.Module, cfg) -> LoadReport | None:
    """Initialise the backbone as ``cfg.backbone_weights`` says; warn loudly when it stays random."""
    if cfg.backbone_weights == "none":
        log.warning("%s\nbackbone_weights=none: DenseNet121 starts from random weights. On a small dataset "
                    "expect far lower accuracy than with CheXNet weights.\n%s", _LOUD, _LOUD)
        return None
    if cfg.backbone_weights == "imagenet":
        return load_imagenet_weights(model)
    path = Path(cfg.pretrained_path)
    if not path.is_file():
        log.warning(
            "%s\nNo pretrained backbone at pretrained_path=%s: DenseNet121 starts from RANDOM weights.\n"
            "On a small dataset this costs a lot of accuracy. Put CheXNet's model.pth.tar there, set\n"
            "--pretrained-path, or use --backbone-weights imagenet (needs internet once).\n%s",
            _LOUD, path, _LOUD,
        )
        if cfg.freeze_cnn and cfg.fine_tune_layers < 5:
            log.warning("freeze_cnn=true with a random backbone: the frozen stages will never learn.")
        return None
    return load_backbone_weights(model, path, trusted=cfg.trust_checkpoint)


def load_imagenet_weights(model: nn.Module) -> LoadReport:
    """torchvision's ImageNet DenseNet121 weights (downloaded once into the torch hub cache)."""
    weights = DenseNet121_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # network errors come in many types (URLError, SSL, timeouts)
        raise WeightsError(
            f"could not obtain torchvision's ImageNet DenseNet121 weights ({type(exc).__name__}: {exc}). "
            f"Without internet, download {weights.url} elsewhere and pass it as --pretrained-path "
            "with --backbone-weights file."
        ) from None
    return load_backbone_state(model, state, source=weights.url, fmt="torchvision-imagenet")
