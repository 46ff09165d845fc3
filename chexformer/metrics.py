"""Evaluation metrics with bootstrap confidence intervals, threshold choice and calibration.

Pure functions over numpy arrays (torch tensors are accepted and converted); nothing here knows
about training. In: labels and logits or probabilities from evaluation, validation (the
LightningModule, ``finalize_best``) and the robustness suite. Out: thresholds, calibration
parameters and the JSON-ready dict written as ``metrics.json``.

Point estimates come from :mod:`sklearn.metrics`; the bootstrap re-derives the same
quantities from per-resample sample weights so that 1000 resamples of 1000 images take well under
a second (tests check the two paths agree).

Conventions
-----------
* Binary problems: ``y_true`` in {0, 1}, ``prob`` = probability of the positive class (index 1 of
  ``class_names``); an image is called positive when ``prob >= threshold`` (the convention of
  :func:`sklearn.metrics.roc_curve`, so thresholds it returns reproduce its operating points).
* Undefined metrics are NaN, not an error and not a silent 0: recall (sensitivity), ROC AUC and
  PR AUC without positives, specificity without negatives. Precision with no positive prediction
  is 0.0 (sklearn's ``zero_division=0``). JSON output turns NaN into ``null``.
* Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani, "An Introduction to
  the Bootstrap", 1993). With ``groups`` (patient ids) whole patients are resampled (cluster
  bootstrap), which is the honest choice when a patient contributes several images. Resamples in
  which a metric is undefined (e.g. AUC of a resample with one class) are skipped for that metric.
* Calibration: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
  ICML 2017) and the expected calibration error over equal-width bins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, logsumexp, softmax
from sklearn import metrics as skm

log = logging.getLogger(__name__)

__all__ = [
    "BINARY_METRICS",
    "MULTICLASS_METRICS",
    "choose_threshold",
    "fit_temperature",
    "apply_temperature",
    "fit_platt",
    "apply_platt",
    "roc_auc",
    "expected_calibration_error",
    "reliability_curve",
    "binary_metrics",
    "bootstrap_ci",
    "multiclass_metrics",
    "evaluation_report",
    "to_jsonable",
]

# Order in which metrics appear in dicts, metrics.json and the report.
BINARY_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)
MULTICLASS_METRICS: tuple[str, ...] = ("precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")

TEMPERATURE_BOUNDS = (0.05, 20.0)


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------
def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of an array, a list or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _binary_inputs(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y, p)``: 1-D int labels in {0, 1} and 1-D float probabilities of the positive
    class. ``prob`` of shape (N, 2) is reduced to its second column, (N, 1) is squeezed."""
    y = _to_numpy(y_true).reshape(-1)
    p = _to_numpy(prob, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    elif p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 1:
        raise ValueError(f"prob must have shape (N,), (N, 1) or (N, 2) for a binary problem, got {p.shape}")
    _check_lengths(y, p)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"binary y_true must contain only 0 and 1, got values {np.unique(y)[:10].tolist()}")
    _check_probabilities(p, "sigmoid")
    return y.astype(np.int64), p


def _multiclass_inputs(y_true: Any, prob: Any, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = _to_numpy(y_true).reshape(-1).astype(np.int64)
    p = _to_numpy(prob, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"multiclass prob must have shape (N, C), got {p.shape}")
    _check_lengths(y, p)
    C = p.shape[1]
    if num_classes is not None and C != num_classes:
        raise ValueError(f"prob has {C} columns but there are {num_classes} class names")
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"labels must be in 0..{C - 1}, got values {np.unique(y)[:10].tolist()}")
    _check_probabilities(p, "softmax")
    return y, p


def _check_lengths(y: np.ndarray, p: np.ndarray) -> None:
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries but prob has {len(p)}")
    if len(y) == 0:
        raise ValueError("y_true and prob are empty")


def _check_probabilities(p: np.ndarray, link: str) -> None:
    """Finite and within [0, 1]; ``link`` names what turns logits into them (sigmoid, softmax)."""
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError(f"prob must be finite probabilities in [0, 1] (apply a {link} to logits first)")


# ----------------------------------------------------------------------------------------------
# Threshold choice
# ----------------------------------------------------------------------------------------------
def choose_threshold(y_true: Any, prob: Any, method: str = "youden", target_sensitivity: float = 0.95) -> float:
    """Decision threshold on the positive-class probability, chosen on validation data.

    ``method="youden"``: the ROC threshold maximising Youden's J = sensitivity + specificity - 1
    (= TPR - FPR); among ties the highest threshold. ``method="sensitivity"``: the highest threshold
    whose sensitivity is at least ``target_sensitivity`` (i.e. the best specificity that still meets
    the target). Either way the result is one of the observed probabilities (or 1.0) and an image is
    positive when ``prob >= threshold``.
    """
    y, p = _binary_inputs(y_true, prob)
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"choose_threshold needs both classes in y_true, got only class {int(y[0])} "
            f"({len(y)} images); choose the threshold on a split that contains positives and negatives"
        )
    # drop_intermediate=False: keep every threshold, or the first one reaching a sensitivity
    # target may be dropped as collinear.
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # the first threshold is +inf ("call nothing positive")
    if method == "youden":
        i = int(np.argmax(tpr - fpr))  # thresholds decrease, so argmax picks the highest tie
    elif method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        # Guard against float noise in tpr (e.g. 19/20 computed as 0.9499999).
        i = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    else:
        raise ValueError(f"unknown threshold method {method!r}; use 'youden' or 'sensitivity'")
    return float(thr[i])


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------
def _logit_inputs(logits: Any, labels: Any, multiclass: bool) -> tuple[np.ndarray, np.ndarray]:
    z = _to_numpy(logits, dtype=np.float64)
    y = _to_numpy(labels).reshape(-1).astype(np.int64)
    if multiclass:
        if z.ndim != 2:
            raise ValueError(f"multiclass logits must have shape (N, C), got {z.shape}")
    else:
        if z.ndim == 2 and z.shape[1] == 1:
            z = z[:, 0]
        if z.ndim != 1:
            raise ValueError(f"binary logits must have shape (N,) or (N, 1), got {z.shape}")
    if len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need the same non-zero number of logits and labels, got {len(z)} and {len(y)}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    return z, y


def _nll(z: np.ndarray, y: np.ndarray, multiclass: bool) -> float:
    """Mean negative log-likelihood of labels under logits (numerically stable)."""
    if multiclass:
        return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))
    return float(np.mean(np.logaddexp(0.0, z) - y * z))  # softplus(z) - y z


def fit_temperature(logits: Any, labels: Any, multiclass: bool = False) -> float:
    """Temperature ``T`` minimising the NLL of ``sigmoid(logits / T)`` (``softmax`` if multiclass).

    Fit on validation logits; ``T > 1`` softens an overconfident model, ``T < 1`` sharpens it.
    Searched on ``log T`` within ``TEMPERATURE_BOUNDS`` (0.05 to 20); a result at a bound is
    logged as a warning (the logits are probably degenerate, e.g. perfectly separable).
    """
    z, y = _logit_inputs(logits, labels, multiclass)
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    res = minimize_scalar(
        lambda log_t: _nll(z / math.exp(log_t), y, multiclass),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    T = float(math.exp(res.x))
    if min(res.x - lo, hi - res.x) < 1e-3:
        log.warning("fitted temperature %.3g is at the search bound %s; check the logits", T, TEMPERATURE_BOUNDS)
    log.info("temperature %.4f: NLL %.4f -> %.4f", T, _nll(z, y, multiclass), _nll(z / T, y, multiclass))
    return T


def fit_platt(logits: Any, labels: Any) -> tuple[float, float]:
    """Platt scaling of binary logits: ``(T, b)`` minimising the NLL of ``sigmoid(z / T + b)``.

    Unlike a temperature alone it can shift as well as scale, so it undoes the offset that class
    weighting (``pos_weight``) puts into the logits. ``T`` stays within ``TEMPERATURE_BOUNDS``;
    a tiny L2 penalty on ``b`` (1e-4) keeps perfectly separable validation data finite.
    """
    z, y = _logit_inputs(logits, labels, multiclass=False)
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)

    def loss(v: np.ndarray) -> float:
        a, b = math.exp(-v[0]), v[1]
        return _nll(a * z + b, y, False) + 1e-4 * b * b

    res = minimize(loss, x0=np.zeros(2), method="L-BFGS-B", bounds=[(lo, hi), (-20.0, 20.0)])
    T, b = float(math.exp(res.x[0])), float(res.x[1])
    log.info("Platt scaling T=%.4f b=%+.4f: NLL %.4f -> %.4f", T, b, _nll(z, y, False), _nll(z / T + b, y, False))
    return T, b


def apply_platt(logits: Any, T: float, b: float = 0.0) -> np.ndarray:
    """Calibrated binary probabilities ``sigmoid(logits / T + b)``, shape (N,)."""
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T}")
    z = _to_numpy(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    return expit(z / T + b)


def apply_temperature(logits: Any, T: float, multiclass: bool = False) -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(logits / T)`` of shape (N,) for binary logits (N,) or
    (N, 1); ``softmax(logits / T)`` of shape (N, C) if ``multiclass``."""
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T}")
    z = _to_numpy(logits, dtype=np.float64) / T
    if multiclass:
        return softmax(z, axis=-1)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    return expit(z)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability: bin b holds [b/n, (b+1)/n), the last one includes 1."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p, side="right")


def _confidence_and_correct(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Binary: (positive-class probability, label). Multiclass (N, C) with C > 2: (top-label
    confidence, whether the top label is right)."""
    p = _to_numpy(prob, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] > 2:
        y, p = _multiclass_inputs(y_true, p)
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    y, p = _binary_inputs(y_true, p)
    return p, y.astype(np.float64)


def reliability_curve(y_true: Any, prob: Any, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: mean predicted probability, observed frequency of the positive class
    and number of images, each of length ``n_bins``. Empty bins hold NaN (and count 0).

    Binary: bins over the positive-class probability (a reliability diagram of ``P(positive)``).
    Multiclass (N, C): bins over the top-label confidence against top-label accuracy.
    """
    conf, hit = _confidence_and_correct(y_true, prob)
    b = _bin_index(conf, n_bins)
    counts = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(b, weights=conf, minlength=n_bins) / counts
        frac_pos = np.bincount(b, weights=hit, minlength=n_bins) / counts
    return mean_pred, frac_pos, counts


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = 15) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |frequency_b - mean probability_b|``.

    Binary problems use the positive-class probability against the observed frequency of the
    positive class, i.e. the gap in the reliability diagram of ``P(positive)``; this differs from
    the "top-label" ECE of Guo et al. (confidence of the predicted class vs accuracy), which
    multiclass input (N, C) uses. Equal-width bins; 0 is perfect.
    """
    conf, hit = _confidence_and_correct(y_true, prob)
    b = _bin_index(conf, n_bins)
    gap = np.bincount(b, weights=hit - conf, minlength=n_bins)  # per bin: sum(y) - sum(p)
    return float(np.abs(gap).sum() / len(conf))


# ----------------------------------------------------------------------------------------------
# Point estimates
# ----------------------------------------------------------------------------------------------
def binary_metrics(y_true: Any, prob: Any, threshold: float, n_bins: int = 15) -> dict[str, float]:
    """Threshold and ranking metrics of a binary classifier, keys in :data:`BINARY_METRICS` order.

    accuracy, balanced_accuracy (mean of sensitivity and specificity), precision (PPV), recall
    (sensitivity, TPR), specificity (TNR), f1, roc_auc, pr_auc (average precision, the step-wise
    area of sklearn's ``average_precision_score``), brier (mean squared error of ``prob``), ece.
    NaN where undefined (see the module docstring); precision is 0.0 without positive predictions.
    """
    y, p = _binary_inputs(y_true, prob)
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    has_pos, has_neg = tp + fn > 0, tn + fp > 0
    recall = tp / (tp + fn) if has_pos else math.nan
    specificity = tn / (tn + fp) if has_neg else math.nan
    both = has_pos and has_neg
    out = {
        "accuracy": skm.accuracy_score(y, pred),
        # sklearn's balanced accuracy averages over the classes present; we call it undefined instead.
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred) if both else math.nan,
        "precision": skm.precision_score(y, pred, zero_division=0),
        "recall": recall,
        "specificity": specificity,
        "f1": skm.f1_score(y, pred, zero_division=0) if has_pos else math.nan,
        "roc_auc": skm.roc_auc_score(y, p) if both else math.nan,
        "pr_auc": skm.average_precision_score(y, p) if has_pos else math.nan,
        "brier": skm.brier_score_loss(y, p, pos_label=1),
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
    }
    return {k: float(v) for k, v in out.items()}


def roc_auc(y_true: Any, score: Any) -> float:
    """ROC AUC of one score per image (N,) or (N, 1) (binary: logit or probability of the positive
    class), or of class probabilities (N, C): one-vs-rest, macro over the classes present in
    ``y_true``, each row renormalised over those classes. NaN where undefined: a binary score with
    fewer than two classes present, class probabilities with fewer than three."""
    y = _to_numpy(y_true).reshape(-1)
    s = _to_numpy(score)
    present = np.unique(y)
    if s.ndim == 1 or s.shape[1] == 1:
        return float(skm.roc_auc_score(y, s.reshape(-1))) if len(present) == 2 else math.nan
    if len(present) < 3:
        return math.nan
    p = s[:, present]
    return float(skm.roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", labels=present))


def _confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> list[list[int]]:
    cm = skm.confusion_matrix(y, pred, labels=list(range(num_classes)))
    return [[int(v) for v in row] for row in cm]


# ----------------------------------------------------------------------------------------------
# Vectorised metrics over bootstrap resamples
# ----------------------------------------------------------------------------------------------
def _resample_weights(
    n: int, groups: Any | None, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, str]:
    """(n_boot, n) multiplicity of every image in every resample, the number of resampled units
    and their name. With groups, whole groups are drawn with replacement and every image of a
    drawn group comes along (as often as the group was drawn)."""
    if groups is None:
        inv, n_units, unit = np.arange(n), n, "image"
    else:
        g = _to_numpy(groups).reshape(-1)
        if len(g) != n:
            raise ValueError(f"groups has {len(g)} entries but there are {n} images")
        _, inv = np.unique(g, return_inverse=True)
        inv = inv.reshape(-1)
        n_units, unit = int(inv.max()) + 1, "patient"
    draws = rng.integers(0, n_units, size=(n_boot, n_units))
    flat = (draws + n_units * np.arange(n_boot)[:, None]).ravel()
    unit_counts = np.bincount(flat, minlength=n_boot * n_units).reshape(n_boot, n_units)
    return unit_counts[:, inv].astype(np.float64), n_units, unit


def _grouped_sums(W: np.ndarray, index: np.ndarray, n_index: int) -> np.ndarray:
    """``out[b, k] = sum_i W[b, i] * [index[i] == k]`` without a dense one-hot matrix."""
    B = W.shape[0]
    flat = (index[None, :] + n_index * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, weights=W.ravel(), minlength=B * n_index).reshape(B, n_index)


def _div(a: np.ndarray, b: np.ndarray, fill: float = math.nan) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), fill)


def _weighted_binary_metrics(
    W: np.ndarray, y: np.ndarray, score: np.ndarray, pred: np.ndarray, n_bins: int | None = 15
) -> dict[str, np.ndarray]:
    """Binary metrics for each row of sample weights ``W`` (n_boot, N), as arrays (n_boot,).

    Integer weights give exactly what sklearn gives on the data with every image repeated that
    many times (the tests check this). ``pred`` is the boolean positive call of every image,
    ``score`` the positive-class probability. ``n_bins=None`` skips brier and ece (one-vs-rest
    use in multiclass problems).
    """
    yb, pb = y.astype(bool), pred.astype(bool)
    tp = W @ (yb & pb)
    fp = W @ (~yb & pb)
    fn = W @ (yb & ~pb)
    tn = W @ (~yb & ~pb)
    n, pos, neg = tp + fp + fn + tn, tp + fn, tn + fp
    recall, specificity = _div(tp, pos), _div(tn, neg)
    out = {
        "accuracy": _div(tp + tn, n),
        "balanced_accuracy": (recall + specificity) / 2,  # NaN unless both classes drawn
        "precision": _div(tp, tp + fp, fill=0.0),
        "recall": recall,
        "specificity": specificity,
        "f1": np.where(pos > 0, _div(2 * tp, 2 * tp + fp + fn, fill=0.0), math.nan),
    }

    # Ranking metrics from per-resample weights of positives / negatives at each distinct score.
    uniq, inv = np.unique(score, return_inverse=True)  # ascending
    inv = inv.reshape(-1)
    U = len(uniq)
    w_pos = _grouped_sums(W * yb, inv, U)  # (n_boot, U)
    w_neg = _grouped_sums(W * ~yb, inv, U)
    # ROC AUC = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney; equals the trapezoidal area).
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    out["roc_auc"] = _div((w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1), pos * neg)
    # Average precision = sum over thresholds (descending) of delta-recall * precision.
    tp_at = np.cumsum(w_pos[:, ::-1], axis=1)  # positives with score >= threshold
    fp_at = np.cumsum(w_neg[:, ::-1], axis=1)
    precision_at = _div(tp_at, tp_at + fp_at, fill=0.0)
    out["pr_auc"] = _div((w_pos[:, ::-1] * precision_at).sum(axis=1), pos)

    if n_bins is not None:
        out["brier"] = _div(W @ (score - y) ** 2, n)
        gap = _grouped_sums(W * (y - score), _bin_index(score, n_bins), n_bins)
        out["ece"] = _div(np.abs(gap).sum(axis=1), n)
    return out


def _interval(samples: np.ndarray, alpha: float) -> list[float]:
    """Percentile interval over the finite entries (resamples where the metric is defined)."""
    ok = samples[np.isfinite(samples)]
    if len(ok) == 0:
        return [math.nan, math.nan]
    lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def ci_key(alpha: float = 0.05) -> str:
    """Name of the interval entry: ``"ci95"`` for ``alpha=0.05``."""
    return f"ci{100 * (1 - alpha):g}"


def _with_ci(values: dict[str, float], samples: dict[str, np.ndarray] | None, alpha: float) -> dict[str, dict]:
    key = ci_key(alpha)
    return {
        k: {"value": float(v), key: _interval(samples[k], alpha) if samples is not None else [math.nan, math.nan]}
        for k, v in values.items()
    }


def bootstrap_ci(
    y_true: Any,
    prob: Any,
    threshold: float,
    groups: Any | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 15,
) -> dict[str, dict[str, Any]]:
    """Every metric of :func:`binary_metrics` with a percentile bootstrap interval.

    Returns ``{metric: {"value": v, "ci95": [lo, hi]}}`` (the key is ``ci90`` for ``alpha=0.1``,
    see :func:`ci_key`). ``value`` is the point estimate on all the data, not the bootstrap mean.
    With ``groups`` (one patient id per image) patients are resampled with replacement and carry
    all their images along; otherwise images are. Resamples in which a metric is undefined (a single
    class for AUC, no positives for recall, ...) are left out of that metric's interval; the interval
    is ``[nan, nan]`` if no resample defines it or ``n_boot == 0``. Deterministic for a given seed.
    """
    y, p = _binary_inputs(y_true, prob)
    values = binary_metrics(y, p, threshold, n_bins=n_bins)
    if n_boot <= 0:
        return _with_ci(values, None, alpha)
    W, _, _ = _resample_weights(len(y), groups, n_boot, np.random.default_rng(seed))
    samples = _weighted_binary_metrics(W, y, p, p >= threshold, n_bins=n_bins)
    return _with_ci(values, samples, alpha)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; NaN where none is."""
    ok = np.isfinite(x)
    return _div(np.where(ok, x, 0.0).sum(axis=-1), ok.sum(axis=-1).astype(np.float64))


def multiclass_metrics(
    y_true: Any,
    prob: Any,
    class_names: Sequence[str],
    groups: Any | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """One-vs-rest metrics per class, their macro averages, accuracy and balanced accuracy, each as
    ``{"value", "ci95"}`` (bootstrap as in :func:`bootstrap_ci`), plus the confusion matrix.

    The predicted class is the argmax of ``prob`` (N, C). Per class: precision, recall,
    specificity, f1, roc_auc and pr_auc of "this class vs the rest". Macro averages are taken over
    the classes for which a metric is defined (a class absent from ``y_true`` has no recall or
    AUC); balanced accuracy is the macro recall. Returns ``{"accuracy", "balanced_accuracy",
    "macro": {metric: ...}, "per_class": {name: {metric: ...}}, "confusion_matrix"}``.
    """
    names = [str(c) for c in class_names]
    y, p = _multiclass_inputs(y_true, prob, num_classes=len(names))
    C = len(names)
    pred = p.argmax(axis=1)

    # Point estimates (sklearn).
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=list(range(C)), zero_division=0
    )
    mcm = skm.multilabel_confusion_matrix(y, pred, labels=list(range(C)))  # (C, 2, 2): [[tn, fp], [fn, tp]]
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(names):
        yc = (y == c).astype(np.int64)
        has_pos, has_neg = support[c] > 0, support[c] < len(y)
        tn, fp = mcm[c, 0]
        per_class[name] = {
            "precision": float(prec[c]),
            "recall": float(rec[c]) if has_pos else math.nan,
            "specificity": float(tn / (tn + fp)) if has_neg else math.nan,
            "f1": float(f1[c]) if has_pos else math.nan,
            "roc_auc": float(skm.roc_auc_score(yc, p[:, c])) if has_pos and has_neg else math.nan,
            "pr_auc": float(skm.average_precision_score(yc, p[:, c])) if has_pos else math.nan,
        }
    table = np.array([[per_class[n][m] for n in names] for m in MULTICLASS_METRICS])  # (M, C)
    macro = dict(zip(MULTICLASS_METRICS, _nanmean_rows(table).tolist()))
    overall = {"accuracy": float(skm.accuracy_score(y, pred)), "balanced_accuracy": macro["recall"]}

    # Bootstrap.
    boot_pc: dict[str, dict[str, np.ndarray]] | None = None
    boot_macro = boot_overall = None
    if n_boot > 0:
        W, _, _ = _resample_weights(len(y), groups, n_boot, np.random.default_rng(seed))
        boot_pc = {
            name: _weighted_binary_metrics(W, y == c, p[:, c], pred == c, n_bins=None)
            for c, name in enumerate(names)
        }
        boot_macro = {
            m: _nanmean_rows(np.stack([boot_pc[n][m] for n in names], axis=1)) for m in MULTICLASS_METRICS
        }
        boot_overall = {"accuracy": _div(W @ (pred == y), W.sum(axis=1)), "balanced_accuracy": boot_macro["recall"]}

    result: dict[str, Any] = _with_ci(overall, boot_overall, alpha)
    result["macro"] = _with_ci(macro, boot_macro, alpha)
    result["per_class"] = {
        n: _with_ci(per_class[n], None if boot_pc is None else boot_pc[n], alpha) for n in names
    }
    result["confusion_matrix"] = _confusion(y, pred, C)
    return result


# ----------------------------------------------------------------------------------------------
# The report that goes into metrics.json
# ----------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Plain Python containers and numbers, NaN and inf -> None, so ``json.dumps`` works."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def evaluation_report(
    y_true: Any,
    prob: Any,
    class_names: Sequence[str],
    threshold: float | None = 0.5,
    groups: Any | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Everything ``metrics.json`` needs, JSON-ready (plain types, NaN -> None).

    Binary (two class names; ``prob`` = P(``class_names[1]``), or (N, 2)):

    ``{"task": "binary", "class_names", "positive_class", "n_images", "n_patients" (with groups),
    "prevalence", "threshold", "bootstrap": {"n_boot", "seed", "alpha", "unit"},
    "at_threshold": {metric: {"value", "ci95"}, ..., "confusion_matrix": [[tn, fp], [fn, tp]]},
    "at_0.5": {the same at threshold 0.5}}`` plus top-level copies of everything in
    ``at_threshold`` (``accuracy``, ..., ``ece``, ``confusion_matrix``).

    Multiclass (``prob`` (N, C), argmax decision, ``threshold`` ignored and stored as None): the
    output of :func:`multiclass_metrics` at the top level plus ``task``, ``class_names``,
    ``n_images``, ``n_patients``, ``bootstrap``.
    """
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise ValueError(f"need at least two class names, got {names}")
    n_patients = None if groups is None else len(np.unique(_to_numpy(groups).reshape(-1)))
    unit = "image" if groups is None else "patient"
    boot = {"n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha), "unit": unit}
    out: dict[str, Any] = {"task": "binary" if len(names) == 2 else "multiclass", "class_names": names}

    if len(names) == 2:
        if threshold is None:
            raise ValueError("a binary evaluation needs a decision threshold")
        y, p = _binary_inputs(y_true, prob)
        out.update(
            positive_class=names[1],
            n_images=len(y),
            **({"n_patients": n_patients} if groups is not None else {}),
            prevalence=float(y.mean()),
            threshold=float(threshold),
            bootstrap=boot,
        )
        for key, t in (("at_threshold", float(threshold)), ("at_0.5", 0.5)):
            block: dict[str, Any] = bootstrap_ci(y, p, t, groups, n_boot, seed, alpha, n_bins)
            block["confusion_matrix"] = _confusion(y, (p >= t).astype(np.int64), 2)
            out[key] = block
        out.update(out["at_threshold"])
    else:
        y, p = _multiclass_inputs(y_true, prob, num_classes=len(names))
        out.update(
            n_images=len(y),
            **({"n_patients": n_patients} if groups is not None else {}),
            threshold=None,
            bootstrap=boot,
        )
        out.update(multiclass_metrics(y, p, names, groups, n_boot, seed, alpha))
    return to_jsonable(out)
