"""The robustness suite: a labelled set re-scored under acquisition shifts.

Validation from the training period overstates performance on new patients (the official Kermany
test split, from a later period, dropped specificity from 0.96 to 0.52 with the round-1 recipe).
This suite is the project's own proxy for "new hospital, new period": every image of a labelled
set under each shift of :data:`chexformer.shifts.SHIFT_SUITE` at three severities, scored at the
stored threshold; the table has AUC, sensitivity and specificity per shift, their mean and the
worst case. The shifts act on the image at the model's input size, so resolution loss, noise and
JPEG are not the same physical change for two models of different ``img_size`` (a factor 4 leaves
32 px of detail at 128 px, 40 px at 160 px); compare such models at matched severities
(``bench/shift_probe.py``).

It also chooses the **shift-robust threshold** (:func:`robust_threshold`): the cut that
maximises Youden's J averaged over the clean and all shifted copies of validation, so it sits
where new acquisition conditions still find it, and is smooth enough to be stable across epochs
and seeds (one flat J curve of a near-separable validation set has many maxima; 25 averaged do not).

In: a :class:`~chexformer.inference.Predictor` and a labelled :class:`~chexformer.data.XrayDataset`.
Out: logits per shifted copy and the suite's table, for ``finalize_best`` (stored in the checkpoint,
``validation_shift_suite.json``) and ``evaluate --shift-suite`` (``metrics.json``, the report).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from chexformer import data, metrics
from chexformer.inference import Predictor
from chexformer.shifts import SHIFT_SUITE, apply_shift

log = logging.getLogger(__name__)

__all__ = ["shift_suite_logits", "suite_table", "cut_values", "middle_of_best", "cut_grid", "robust_threshold",
           "operating_threshold", "SHIFT_RULES", "SEVERITY_NAMES", "shifted_copies"]

SEVERITY_NAMES = ("mild", "moderate", "severe")


@torch.no_grad()
def shift_suite_logits(predictor: Predictor, dataset: data.XrayDataset, batch_size: int = 64,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Logits of every image of ``dataset`` clean (key ``"clean"``) and under every shift and
    severity (keys ``"blur/moderate"``...), each (N,) for binary or (N, C)."""
    images = [dataset.uint8(i) for i in range(len(dataset))]
    out = {}
    for key, copy in shifted_copies(images, seed):
        out[key] = _logits(predictor, copy, batch_size)
        if key.endswith("/" + SEVERITY_NAMES[-1]):
            log.info("shift suite: %s done", key.split("/")[0])
    return out


def shifted_copies(images: list[torch.Tensor], seed: int = 0,
                   families: Sequence[str] | None = None) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """The suite's copies of ``images`` (uint8), one at a time: ``"clean"`` (the images themselves),
    then every shift and severity (``"blur/moderate"``...), random draws from one generator seeded
    with ``seed``. With ``families`` only those shifts; the draws of a random shift then match the
    full suite's only if no random shift before it was left out."""
    gen = torch.Generator().manual_seed(seed)
    yield "clean", images
    for shift in SHIFT_SUITE:
        if families is None or shift.name in families:
            for name, severity in zip(SEVERITY_NAMES, shift.severities):
                yield f"{shift.name}/{name}", [apply_shift(img, shift, severity, gen) for img in images]


def _logits(predictor: Predictor, images: list[torch.Tensor], batch_size: int) -> np.ndarray:
    lg = predictor.image_logits(images, batch_size).numpy().astype(np.float64)
    return lg[:, 0] if lg.shape[1] == 1 else lg


def suite_table(y: np.ndarray, probs: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """Per shifted copy: ROC AUC, sensitivity, specificity, accuracy at ``threshold`` (binary);
    plus ``mean`` and ``worst`` over the shifted copies (the clean row excluded)."""
    rows = {}
    for key, p in probs.items():
        m = metrics.binary_metrics(y, p, threshold)
        rows[key] = {"roc_auc": float(m["roc_auc"]), "sensitivity": float(m["recall"]),
                     "specificity": float(m["specificity"]), "accuracy": float(m["accuracy"])}
    shifted = [r for k, r in rows.items() if k != "clean"]
    summary = {
        "mean": {k: float(np.mean([r[k] for r in shifted])) for k in shifted[0]},
        "worst": {k: float(np.min([r[k] for r in shifted])) for k in shifted[0]},
    }
    worst_keys = {k: min((key for key in rows if key != "clean"), key=lambda key: rows[key][k]) for k in shifted[0]}
    return {"threshold": float(threshold), "rows": rows, **summary, "worst_shift": worst_keys}


def cut_values(grid: int = 999) -> np.ndarray:
    """The candidate cuts of the threshold rules: ``grid`` evenly spaced in [0.001, 0.999]."""
    return np.linspace(0.001, 0.999, grid)


def middle_of_best(cuts: np.ndarray, j: np.ndarray) -> float:
    """The cut maximising ``j`` (one value per cut); a flat top resolves to the middle of the best range."""
    best = np.flatnonzero(j >= j.max() - 1e-9)
    return float(cuts[best[len(best) // 2]])


def cut_grid(y: np.ndarray, probs: dict[str, np.ndarray],
             grid: int = 999) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate cut of the threshold rules and each copy's sensitivity and specificity at
    it: ``(cuts, sens, spec)``, the last two of shape ``(copies, cuts)`` in the order of ``probs``.
    A cut ``t`` calls a probability ``>= t`` positive."""
    y = np.asarray(y).astype(bool)
    cuts = cut_values(grid)
    ps = [np.asarray(p) for p in probs.values()]
    sens = np.stack([(p[y][:, None] >= cuts).mean(0) for p in ps])
    spec = np.stack([(p[~y][:, None] < cuts).mean(0) for p in ps])
    return cuts, sens, spec


def robust_threshold(y: np.ndarray, probs: dict[str, np.ndarray], grid: int = 999,
                     aggregate: str = "mean") -> float:
    """The threshold maximising Youden's J over every copy in ``probs`` (clean and shifted),
    averaged (``aggregate="mean"``, the stored rule) or its smallest value over the copies
    (``"worst"``, a minimax cut; compared in ``bench/threshold_rules.py``). Ties (a flat top)
    resolve to the middle of the best range."""
    if aggregate not in ("mean", "worst"):
        raise ValueError(f"aggregate must be 'mean' or 'worst', got {aggregate!r}")
    cuts, sens, spec = cut_grid(y, probs, grid)
    js = sens + spec - 1
    return middle_of_best(cuts, js.mean(0) if aggregate == "mean" else js.min(0))


SHIFT_RULES = {"shift_robust": "mean", "shift_worst": "worst"}


def operating_threshold(y: np.ndarray, probs: dict[str, np.ndarray], method: str,
                        target_sensitivity: float = 0.95) -> tuple[float, dict[str, float]]:
    """The operating threshold of ``method`` (a ``Config.threshold_method``) and every candidate
    cut: ``youden_clean`` (sklearn's ROC point on ``probs["clean"]``), ``shift_robust`` and
    ``shift_worst`` (:func:`robust_threshold` over all copies, mean or smallest J). 'youden' and
    'sensitivity' look at the clean copy only."""
    cuts = {"youden_clean": float(metrics.choose_threshold(y, probs["clean"], "youden"))}
    cuts |= {rule: robust_threshold(y, probs, aggregate=agg) for rule, agg in SHIFT_RULES.items()}
    if method in SHIFT_RULES:
        return cuts[method], cuts
    return float(metrics.choose_threshold(y, probs["clean"], method, target_sensitivity)), cuts


def format_table(table: dict[str, Any]) -> str:
    """A plain-text table of :func:`suite_table`'s result."""
    lines = [f"{'shift':<22} {'AUC':>6} {'sens':>6} {'spec':>6} {'acc':>6}"]
    summary = [("MEAN (shifted)", table["mean"]), ("WORST (shifted)", table["worst"])]
    for key, r in list(table["rows"].items()) + summary:
        lines.append(f"{key:<22} {r['roc_auc']:6.3f} {r['sensitivity']:6.3f} {r['specificity']:6.3f} "
                     f"{r['accuracy']:6.3f}")
    return "\n".join(lines)
