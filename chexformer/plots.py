"""Figures for training curves, evaluation and explanations, written as PNG files.

Every ``plot_*`` function takes plain arrays (numpy or torch), writes one PNG and returns its
path. In: history.csv, evaluation results and explanation maps (from :mod:`chexformer.evaluate`,
:mod:`chexformer.explain`, the web service). Out: PNG files for ``report.html`` and panels.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``,
so nothing here touches the global backend or leaves figures open, and the module works headless.

Heatmaps use the perceptually uniform ``"inferno"`` colormap: bright yellow = high (most attention,
strongest evidence), black/purple = low; its lightness rises monotonically, so it reads correctly
in grey and for colour-blind viewers (jet does neither). By default each map is min-max normalised
to 0..1 on its own (colours compare regions *within* a map); with ``vmax`` the map is divided by a
common scale instead, so a faint map stays faint next to a strong one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from sklearn import metrics as skm

from chexformer.history import read_history
from chexformer.metrics import expected_calibration_error, reliability_curve

__all__ = [
    "denormalize",
    "normalise01",
    "overlay_heatmap",
    "plot_history",
    "plot_confusion_matrix",
    "plot_roc",
    "plot_pr",
    "plot_reliability",
    "plot_feature_maps",
    "plot_attention_maps",
    "plot_heatmap_panel",
    "plot_inputs",
]

DPI = 130
HEATMAP_CMAP = "inferno"
_HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "train_acc", "val_acc", "train_auc", "val_auc", "lr")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _np(x: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if dtype is not None else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    return out


def _new_figure(w: float, h: float) -> Figure:
    return Figure(figsize=(w, h), layout="constrained")


def _fmt_ci(value: float | None, ci: Sequence[float | None] | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:.3f}"
    if ci is not None and len(ci) == 2 and all(c is not None and math.isfinite(c) for c in ci):
        text += f" (95% CI {ci[0]:.3f}\u2013{ci[1]:.3f})"
    return text


def _binary(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _np(y_true).reshape(-1).astype(int)
    p = _np(prob, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] in (1, 2):
        p = p[:, -1]
    if p.ndim != 1:
        raise ValueError(
            f"binary plots need positive-class probabilities (N,) or (N, 2), got {p.shape}; "
            "for several classes plot each one against the rest: (y == c, prob[:, c])"
        )
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries but prob has {len(p)}")
    return y, p


def _as_rgb(image: Any) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] from (H, W), (H, W, 1|3), (1|3, H, W), uint8 or float."""
    img = _np(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # channels first -> last
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W), (H, W, 3) or (3, H, W), got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    img = img.astype(np.float64)
    if img.max(initial=0.0) > 1.0 + 1e-6:
        raise ValueError("float images must be in [0, 1]; denormalize them first (see denormalize)")
    return np.clip(img, 0.0, 1.0)


def _resize(map2d: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to (H, W)."""
    H, W = hw
    if map2d.shape == (H, W):
        return map2d.astype(np.float64)
    im = Image.fromarray(np.ascontiguousarray(map2d, dtype=np.float32), mode="F")
    return np.asarray(im.resize((W, H), Image.BILINEAR), dtype=np.float64)


def normalise01(m: Any, axes: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Min-max scaling to 0..1 over ``axes`` (default: the whole array; ``(-2, -1)``: each map of a
    stack on its own), for display. NaN counts as 0; a flat map becomes all zeros. float64."""
    m = np.nan_to_num(_np(m, dtype=np.float64))
    lo, hi = m.min(axis=axes, keepdims=True), m.max(axis=axes, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)


def _image_axis(ax, title: str | None = None, fontsize: float = 9) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _unit_square_axes(ax, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """The frame of a ROC or PR curve: both axes 0..1 (a hair wider), equal aspect, grid, legend."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=9)


def _heatmap_colorbar(fig: Figure, axes, cmap: str, label: str = "relative importance (per map, 0-1)") -> None:
    sm = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
    cb = fig.colorbar(sm, ax=axes, shrink=0.8, fraction=0.05, pad=0.02)
    cb.set_label(label, fontsize=9)
    cb.set_ticks([0, 0.5, 1])
    cb.set_ticklabels(["0 low", "0.5", "1 high"])


# ----------------------------------------------------------------------------------------------
# Images and overlays
# ----------------------------------------------------------------------------------------------
def denormalize(x: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Undo ``Normalize(mean, std)``: ``x * std + mean`` clipped to [0, 1], channels first.

    ``x`` is (B, 3, H, W) or (3, H, W), a torch tensor or a numpy array; the result has the same
    type and shape.
    """
    shape = (-1, 1, 1)
    if hasattr(x, "detach"):
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
        return (x.detach() * s + m).clamp(0.0, 1.0)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (3, 4):
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got {x.shape}")
    m = np.asarray(mean, dtype=np.float64).reshape(shape)
    s = np.asarray(std, dtype=np.float64).reshape(shape)
    return np.clip(x * s + m, 0.0, 1.0)


def overlay_heatmap(image: Any, heatmap: Any, alpha: float = 0.45, cmap: str = HEATMAP_CMAP,
                    vmax: float | None = None) -> np.ndarray:
    """The heatmap bilinearly upsampled to the image size, coloured with ``cmap`` (inferno:
    bright = high) and alpha-blended onto the image. Without ``vmax`` the map is min-max
    normalised to 0..1 on its own; with ``vmax`` it is divided by that common scale (clipped to
    0..1), so maps of several images compare. Returns (H, W, 3) floats in [0, 1]. ``image`` may
    be grey or RGB, uint8 or float in [0, 1], channels first or last, at any resolution."""
    img = _as_rgb(image)
    hm = _np(heatmap, dtype=np.float64)
    hm = np.squeeze(hm)
    if hm.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {hm.shape}")
    if vmax is None:
        hm = normalise01(_resize(normalise01(hm), img.shape[:2]))
    else:
        hm = np.clip(_resize(hm, img.shape[:2]) / max(float(vmax), 1e-12), 0.0, 1.0)
    coloured = colormaps[cmap](hm)[..., :3]
    return np.clip((1 - alpha) * img + alpha * coloured, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------
def _history_columns(history: Any) -> dict[str, np.ndarray]:
    """Numeric columns (NaN where empty or not a number) of a history file or a list of row dicts."""
    if isinstance(history, (str, Path)):
        if not Path(history).is_file():
            raise FileNotFoundError(f"history file not found: {history}")
        rows = read_history(history)
    else:
        rows = [dict(r) for r in history]
    cols: dict[str, np.ndarray] = {}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        vals = []
        for r in rows:
            v = r.get(k)
            try:
                vals.append(float(v) if v not in (None, "") else math.nan)
            except (TypeError, ValueError):
                vals.append(math.nan)
        cols[k] = np.asarray(vals)
    if "epoch" not in cols or not np.isfinite(cols["epoch"]).any():
        cols["epoch"] = np.arange(1, len(rows) + 1, dtype=np.float64)
    return cols


def _plot_series(ax, x: np.ndarray, y: np.ndarray, label: str, **kw) -> bool:
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return False
    ax.plot(x[ok], y[ok], marker="o" if ok.sum() <= 30 else None, markersize=3, label=label, **kw)
    return True


def plot_history(history: Any, out: str | Path, title: str = "Training history") -> Path:
    """Loss, accuracy, AUC and learning-rate panels over epochs.

    ``history``: a list of dicts or a path to ``history.csv`` with columns among ``epoch,
    train_loss, val_loss, train_acc, val_acc, train_auc, val_auc, lr``; missing columns and empty
    cells are skipped (a panel without data is left out). The best validation loss and AUC are
    marked.
    """
    h = _history_columns(history)
    x = h["epoch"]
    panels = [
        ("Loss", [("train_loss", "train"), ("val_loss", "validation")], False),
        ("Accuracy", [("train_acc", "train"), ("val_acc", "validation")], False),
        ("ROC AUC", [("train_auc", "train"), ("val_auc", "validation")], False),
        ("Learning rate", [("lr", "lr")], True),
    ]
    panels = [p for p in panels if any(k in h and np.isfinite(h[k]).any() for k, _ in p[1])]
    if not panels:
        raise ValueError(f"history has none of the columns {_HISTORY_COLUMNS[1:]}")
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(5.2 * ncols, 3.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colours = {"train": "tab:blue", "validation": "tab:orange", "lr": "tab:green"}
    for ax, (name, series, log_y) in zip(axes, panels):
        for key, label in series:
            if key in h:
                _plot_series(ax, x, h[key], label, color=colours[label])
        best_mode = {"Loss": np.nanargmin, "ROC AUC": np.nanargmax}.get(name)
        val_key = series[1][0] if len(series) > 1 else None
        if best_mode and val_key in h and np.isfinite(h[val_key]).any():
            i = int(best_mode(h[val_key]))
            ax.axvline(x[i], color="grey", ls="--", lw=1, label=f"best val (epoch {x[i]:g})")
        if log_y:
            ax.set_yscale("log")
        if name in ("Accuracy", "ROC AUC"):
            lo = min(np.nanmin([np.nanmin(h[k]) for k, _ in series if k in h and np.isfinite(h[k]).any()]), 0.5)
            ax.set_ylim(max(0.0, lo - 0.02), 1.005)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower() if name != "ROC AUC" else "AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str], out: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Counts and row percentages (share of each true class) in every cell; rows = true class,
    columns = predicted. Cells are shaded by the row percentage so that class imbalance does not
    hide the errors of the small class."""
    cm = _np(cm).astype(np.int64)
    C = len(class_names)
    if cm.shape != (C, C):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({C}, {C})")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = max(4.6, 1.3 * C + 2.2)
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fs = 13 if C <= 4 else 10 if C <= 8 else 8
    for i in range(C):
        for j in range(C):
            colour = "white" if frac[i, j] > 0.55 else "black"
            ax.text(j, i, f"{cm[i, j]:,}\n({100 * frac[i, j]:.1f}%)", ha="center", va="center",
                    color=colour, fontsize=fs)
    ax.set_xticks(range(C), [str(c) for c in class_names], rotation=30 if C > 3 else 0,
                  ha="right" if C > 3 else "center")
    ax.set_yticks(range(C), [str(c) for c in class_names])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(f"{title}\n(n = {cm.sum():,}; % of each true class)", fontsize=11)
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("share of true class")
    return _save(fig, out)


def plot_roc(
    y_true: Any,
    prob: Any,
    out: str | Path,
    auc: float | None = None,
    auc_ci: Sequence[float] | None = None,
    threshold: float | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve with the chance diagonal, AUC [95% CI] in the legend and the operating point
    (``prob >= threshold``) marked with its sensitivity and specificity."""
    y, p = _binary(y_true, prob)
    fig = _new_figure(5.2, 5.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = skm.roc_curve(y, p)
        if auc is None:
            auc = float(skm.roc_auc_score(y, p))
        ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"AUC = {_fmt_ci(auc, auc_ci)}")
        if threshold is not None:
            pred = p >= threshold
            sens, fp_rate = pred[y == 1].mean(), pred[y == 0].mean()
            ax.plot([fp_rate], [sens], "o", color="tab:red", ms=8, zorder=5,
                    label=f"threshold {threshold:.3g}\n(sens {sens:.2f}, spec {1 - fp_rate:.2f})")
    else:
        ax.text(0.5, 0.5, "ROC undefined: only one class present", ha="center", transform=ax.transAxes)
    _unit_square_axes(ax, "False positive rate (1 - specificity)", "True positive rate (sensitivity)", title,
                      legend_loc="lower right")
    return _save(fig, out)


def plot_pr(
    y_true: Any,
    prob: Any,
    out: str | Path,
    ap: float | None = None,
    ap_ci: Sequence[float] | None = None,
    title: str = "Precision-recall curve",
) -> Path:
    """Precision-recall curve (step-wise, as average precision integrates it) with the prevalence
    baseline (the precision of a classifier that cannot rank)."""
    y, p = _binary(y_true, prob)
    prevalence = float(y.mean())
    fig = _new_figure(5.2, 5.0)
    ax = fig.subplots()
    ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"prevalence = {prevalence:.3f}")
    if y.any():
        precision, recall, _ = skm.precision_recall_curve(y, p)
        if ap is None:
            ap = float(skm.average_precision_score(y, p))
        ax.step(recall, precision, where="post", color="tab:blue", lw=2, label=f"AP = {_fmt_ci(ap, ap_ci)}")
    else:
        ax.text(0.5, 0.5, "PR curve undefined: no positives", ha="center", transform=ax.transAxes)
    _unit_square_axes(ax, "Recall (sensitivity)", "Precision (positive predictive value)", title,
                      legend_loc="lower left")
    return _save(fig, out)


def plot_reliability(
    y_true: Any,
    prob: Any,
    out: str | Path,
    ece: float | None = None,
    n_bins: int = 15,
    title: str = "Reliability diagram",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Observed frequency of the positive class against the mean predicted probability per
    equal-width bin (bars, with the diagonal of perfect calibration), and underneath the histogram
    of predicted probabilities per true class (log count axis)."""
    y, p = _binary(y_true, prob)
    mean_pred, frac_pos, counts = reliability_curve(y, p, n_bins=n_bins)
    if ece is None:
        ece = expected_calibration_error(y, p, n_bins=n_bins)
    names = list(class_names) if class_names is not None else ["negative", "positive"]
    edges = np.linspace(0, 1, n_bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    ok = counts > 0

    fig = _new_figure(5.4, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.bar(centres[ok], frac_pos[ok], width=width * 0.92, color="tab:blue", alpha=0.75,
            edgecolor="navy", label="observed frequency")
    top.plot(mean_pred[ok], frac_pos[ok], "o", color="tab:red", ms=4, label="(mean prediction, frequency) per bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.01)
    top.set_ylabel(f"Observed frequency of {names[1]}")
    top.set_title(f"{title} (ECE = {ece:.3f}, {n_bins} bins)" if ece is not None else title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    for lab, colour in ((0, "tab:green"), (1, "tab:purple")):
        if (y == lab).any():
            bottom.hist(p[y == lab], bins=edges, color=colour, alpha=0.55, label=f"true {names[lab]}")
    bottom.set_yscale("log")
    bottom.set_xlabel(f"Predicted probability of {names[1]}")
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="best", framealpha=0.9)
    return _save(fig, out)


# ----------------------------------------------------------------------------------------------
# Explanations
# ----------------------------------------------------------------------------------------------
def plot_feature_maps(
    image: Any,
    feats: Any,
    out: str | Path,
    k: int = 16,
    cmap: str = HEATMAP_CMAP,
    title: str = "Most active backbone channels",
) -> Path:
    """The input and the ``k`` channels of ``feats`` (C, h, w) with the highest mean activation,
    each upsampled and overlaid on the image (``cmap``: red = strong), titled with its index."""
    img = _as_rgb(image)
    f = _np(feats, dtype=np.float64)
    if f.ndim == 4 and f.shape[0] == 1:
        f = f[0]
    if f.ndim != 3:
        raise ValueError(f"feats must be (C, h, w) for one image, got {f.shape}")
    means = f.mean(axis=(1, 2))
    top = np.argsort(-means, kind="stable")[: min(k, len(f))]
    n = len(top) + 1
    ncols = min(6, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(2.1 * ncols + 0.9, 2.3 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].imshow(img)
    _image_axis(axes[0], "input")
    for ax, c in zip(axes[1:], top):
        ax.imshow(overlay_heatmap(img, f[c], cmap=cmap))
        _image_axis(ax, f"channel {c} (mean {means[c]:.2f})", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    _heatmap_colorbar(fig, axes[:n].tolist(), cmap, "activation (per channel, 0-1)")
    fig.suptitle(f"{title}: top {len(top)} of {len(f)} by mean activation ({f.shape[1]}x{f.shape[2]} grid)")
    return _save(fig, out)


def plot_attention_maps(
    image: Any,
    attentions: Sequence[Any],
    grid: tuple[int, int],
    out: str | Path,
    alpha: float = 0.45,
    cmap: str = HEATMAP_CMAP,
    title: str = "Class-token attention",
) -> Path:
    """Where the class token looks: rows = encoder layers, columns = heads plus their mean.

    ``attentions``: one array per layer, (heads, 1 + N, 1 + N) for ONE image (a leading batch
    dimension of 1 is dropped), as returned by ``ChexFormer.attention_maps``; token 0 is the class
    token and ``N = h * w`` spatial tokens in row-major order. Each cell shows row 0 (class token
    -> spatial tokens), reshaped to ``grid``, upsampled and overlaid on the X-ray; layers and heads
    are numbered from 1.
    """
    img = _as_rgb(image)
    gh, gw = grid
    maps = []
    for li, a in enumerate(attentions):
        a = _np(a, dtype=np.float64)
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[1] != 1 + gh * gw:
            raise ValueError(f"layer {li + 1}: attention of shape {a.shape} does not match 1 + {gh}*{gw} tokens")
        cls = a[:, 0, 1:].reshape(-1, gh, gw)  # (heads, h, w)
        maps.append(np.concatenate([cls, cls.mean(axis=0, keepdims=True)]))
    if not maps:
        raise ValueError("no attention maps given")
    L, ncols = len(maps), max(m.shape[0] for m in maps)
    fig = _new_figure(1.9 * ncols + 1.0, 2.05 * L + 0.5)
    axes = fig.subplots(L, ncols, squeeze=False)
    for li, m in enumerate(maps):
        heads = m.shape[0] - 1
        for hi in range(ncols):
            ax = axes[li, hi]
            if hi >= m.shape[0]:
                ax.set_visible(False)
                continue
            ax.imshow(overlay_heatmap(img, m[hi], alpha=alpha, cmap=cmap))
            name = f"layer {li + 1} head {hi + 1}" if hi < heads else f"layer {li + 1} mean"
            _image_axis(ax, name, fontsize=8)
    _heatmap_colorbar(fig, axes.ravel().tolist(), cmap, "attention (per map, 0-1)")
    fig.suptitle(f"{title} to the {gh}x{gw} image grid (bright = high)")
    return _save(fig, out)


def plot_heatmap_panel(
    image: Any,
    heatmaps: Mapping[str, Any],
    out: str | Path,
    title: str = "Explanations",
    alpha: float = 0.45,
    cmap: str = HEATMAP_CMAP,
) -> Path:
    """The input next to each named heatmap (e.g. Grad-CAM, attention rollout) overlaid on it,
    with a shared 0-1 colorbar (``cmap``: bright = high)."""
    img = _as_rgb(image)
    n = len(heatmaps) + 1
    fig = _new_figure(3.0 * n + 0.9, 3.6)
    axes = fig.subplots(1, n, squeeze=False).ravel()
    axes[0].imshow(img)
    _image_axis(axes[0], "input", fontsize=11)
    for ax, (name, hm) in zip(axes[1:], heatmaps.items()):
        ax.imshow(overlay_heatmap(img, hm, alpha=alpha, cmap=cmap))
        _image_axis(ax, str(name), fontsize=11)
    _heatmap_colorbar(fig, axes.tolist(), cmap)
    fig.suptitle(title, fontsize=12)
    return _save(fig, out)


def plot_inputs(
    images: Any,
    mean: Sequence[float],
    std: Sequence[float],
    out: str | Path,
    *,
    labels: Any | None = None,
    class_names: Sequence[str] | None = None,
    probs: Any | None = None,
    max_images: int = 16,
    title: str = "Model inputs (after augmentation)",
) -> Path:
    """A grid of normalised input tensors (B, 3, H, W), denormalised for display, titled with the
    label and, with ``probs``, the prediction (green if right, red if wrong at argmax / 0.5).

    ``probs``: (B,) positive-class probabilities or (B, C) class probabilities.
    """
    x = _np(denormalize(images, mean, std), dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    x = x[:max_images]
    B = len(x)
    lab = None if labels is None else _np(labels).reshape(-1).astype(int)[:B]
    pr = None if probs is None else _np(probs, dtype=np.float64)[:B]
    name = lambda i: str(class_names[i]) if class_names is not None and 0 <= i < len(class_names) else str(i)
    ncols = min(4, B)
    nrows = math.ceil(B / ncols)
    fig = _new_figure(2.6 * ncols, 2.8 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= B:
            ax.set_visible(False)
            continue
        ax.imshow(np.moveaxis(x[i], 0, -1))
        lines, colour = [], "black"
        if lab is not None:
            lines.append(f"label: {name(lab[i])}")
        if pr is not None:
            if pr.ndim == 1:
                pred, conf = int(pr[i] >= 0.5), float(pr[i])
                lines.append(f"P({name(1)}) = {conf:.2f}")
            else:
                pred, conf = int(pr[i].argmax()), float(pr[i].max())
                lines.append(f"pred: {name(pred)} ({conf:.2f})")
            if lab is not None:
                colour = "darkgreen" if pred == lab[i] else "firebrick"
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("\n".join(lines) or f"#{i}", fontsize=9, color=colour)
    if lab is not None and pr is not None:
        rule = "P >= 0.5" if pr.ndim == 1 else "argmax"
        title = f"{title}\ngreen = predicted class ({rule}) matches the label, red = it does not"
    fig.suptitle(title)
    return _save(fig, out)


def plot_explanation(
    image: Any,
    heatmaps: Mapping[str, Any],
    feats: Any,
    out: str | Path,
    title: str,
    k: int = 6,
    alpha: float = 0.45,
    cmap: str = HEATMAP_CMAP,
    vmax: Mapping[str, float] | None = None,
) -> Path:
    """One panel per image: the input and each heatmap overlay on top, the ``k`` most active
    backbone channels below, the prediction in the title (``cmap``: bright = high). ``vmax``:
    a common scale per heatmap name (see :func:`overlay_heatmap`); default per-map 0..1."""
    img = _as_rgb(image)
    f = _np(feats, np.float32)
    order = np.argsort(-f.mean(axis=(1, 2)))[:k]
    n_top = len(heatmaps) + 1
    fig = _new_figure(max(3.0 * n_top, 1.9 * k) + 0.9, 3.3 + 2.2)
    grid = fig.add_gridspec(2, max(n_top, k) * 2, height_ratios=[3.0, 1.6])
    span = max(n_top, k) * 2 // n_top
    top_axes = [fig.add_subplot(grid[0, i * span:(i + 1) * span]) for i in range(n_top)]
    top_axes[0].imshow(img)
    _image_axis(top_axes[0], "input", fontsize=11)
    for ax, (name, hm) in zip(top_axes[1:], heatmaps.items()):
        ax.imshow(overlay_heatmap(img, hm, alpha=alpha, cmap=cmap, vmax=(vmax or {}).get(name)))
        _image_axis(ax, str(name) + (" (common scale)" if vmax and name in vmax else ""), fontsize=11)
    span_b = max(n_top, k) * 2 // k
    for j, c in enumerate(order):
        ax = fig.add_subplot(grid[1, j * span_b:(j + 1) * span_b])
        ax.imshow(overlay_heatmap(img, f[c], alpha=0.6, cmap=cmap))
        _image_axis(ax, f"channel {int(c)}", fontsize=8)
    _heatmap_colorbar(fig, top_axes, cmap)
    fig.suptitle(title, fontsize=12)
    return _save(fig, out)
