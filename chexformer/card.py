"""The model card: what a checkpoint is, what it was trained and validated on, what it is for.

One JSON-able dict (:func:`model_card`) shown by the web page, served at ``/api/model`` and
written into evaluation reports; :func:`operating_point` says what the stored threshold meant on
validation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from chexformer.guard import Guard
from chexformer.inference import Predictor

__all__ = ["INTENDED_USE", "NOT_A_DEVICE", "model_card", "operating_point"]

INTENDED_USE = (
    "Research and teaching: scoring frontal chest radiographs like those of the training data for the "
    "positive class, and showing which regions drove the score."
)
NOT_A_DEVICE = "Research use only. Not a medical device; not for diagnosis or treatment decisions."


def operating_point(predictor: Predictor) -> dict[str, Any] | None:
    """Sensitivity and specificity at the stored threshold on the validation predictions stored in
    the checkpoint (``meta.extra["val_predictions"]``), calibrated as at inference; None when the
    checkpoint has none or the model is not binary."""
    stored = predictor.meta.extra.get("val_predictions") or {}
    logits, labels = stored.get("logits"), stored.get("labels")
    if not predictor.binary or not logits or not labels or len(logits) != len(labels):
        return None
    y = np.asarray(labels).astype(int).ravel() == 1
    p = predictor.probabilities(np.asarray(logits, dtype=np.float64).reshape(len(labels), -1))
    t = float(predictor.threshold())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "threshold": t,
        "threshold_rule": predictor.meta.extra.get("threshold_rule"),
        "n_images": int(len(y)),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "sensitivity": float((p[y] >= t).mean()) if n_pos else None,
        "specificity": float((p[~y] < t).mean()) if n_neg else None,
    }


def model_card(predictor: Predictor, guard: Guard | None = None, checkpoint: str | os.PathLike | None = None) -> dict:
    """What the model is, what it was trained and validated on, and what it is for, as JSON."""
    meta = predictor.meta
    cfg = meta.config
    extra = meta.extra
    shift = extra.get("validation_shift_suite") or {}
    return {
        "checkpoint": Path(checkpoint).name if checkpoint else None,
        "class_names": list(meta.class_names),
        "positive_class": meta.positive_class,
        "architecture": {"arch": getattr(cfg, "arch", None), "img_size": cfg.img_size, "d_model": cfg.d_model,
                         "num_layers": cfg.num_layers, "num_heads": cfg.num_heads},
        "epoch": meta.epoch,
        "training_data": _training_data(extra.get("data")),
        "validation": {
            "roc_auc": extra.get("val_auc"),
            "operating_point": operating_point(predictor),
            "calibration": {"method": "Platt scaling on validation logits", "temperature": meta.temperature,
                            "bias": meta.bias},
            "shift_suite": {k: shift[k] for k in ("mean", "worst", "worst_shift", "threshold") if k in shift} or None,
        },
        "guard": None if guard is None else {
            "threshold": guard.threshold, "quantile": guard.quantile, **guard.info,
            "meaning": f"images scoring above {guard.threshold:.3g} are further from the training images' "
                       f"features than {guard.quantile:.0%} of validation images",
        },
        "intended_use": INTENDED_USE,
        "limitations": [
            NOT_A_DEVICE,
            "Valid only for the population of the training data (see training_data): other ages, views, "
            "scanners or hospitals can shift the probabilities and the operating point.",
            "The out-of-population guard catches images unlike the training images (photos, documents, "
            "blank frames, large uniform patches); it does not certify that an X-ray is within the model's competence.",
            "Heatmaps show where the evidence for the positive class lies, not a segmentation of disease.",
        ],
    }


def _training_data(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The stored data summary without file paths (skipped files become a count)."""
    if not summary:
        return None
    out = {k: v for k, v in summary.items() if k != "skipped"}
    if "skipped" in summary:
        out["skipped_files"] = len(summary["skipped"] or [])
    return out


