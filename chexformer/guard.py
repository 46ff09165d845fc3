"""Out-of-population guard: how far an image's backbone features lie from the training images'.

A classifier trained on chest X-rays returns a confident probability for anything it is shown (a
photo, a scanned letter, a blank frame). The guard scores each image by the Mahalanobis distance of
its pooled DenseNet features from those of the training images, at several depths, the feature
ensemble of Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018:

1. **features**: the backbone's output after ``denseblock1``, ``denseblock2``, ``denseblock3`` and
   the final ``norm5`` + ReLU, each global-average-pooled: (N, 256), (N, 512), (N, 1024), (N, 1024).
   Early layers see texture and grey-level statistics (a photo or a page of text differs there
   even when its global layout resembles a radiograph), the last layer sees what the classifier sees.
2. **per layer**, fitted on the training images: standardise each channel, keep the first
   ``n_components`` principal components, estimate their covariance with Ledoit-Wolf shrinkage
   (stable with a few hundred images) and whiten: ``d^2 = ||A (x - mean)||^2`` with one stored
   projection ``A`` (n_components x C). ``d^2 / n_components`` is divided by its median on the
   validation images, so every layer counts alike and an ordinary image scores about 1.
3. **score**: the mean of the layer scores (higher = further from the training population).
   **threshold**: the 99th percentile of the validation images' scores, so about 1 % of images
   like the validation set are flagged.

Everything fitted is stored by :func:`fit_guard` as plain lists and floats, small enough for the
checkpoint metadata (about 47k numbers at 16 components) and readable with
``torch.load(weights_only=True)``; :meth:`Guard.from_dict` rebuilds it. The scores are only
meaningful with the model the guard was fitted with (same weights, same image size): the guard
stores the image size and a fingerprint of the backbone and warns when they differ.

Fitted by ``train.finalize_best`` on the training and validation images and stored in
``best.ckpt``; scored by :class:`~chexformer.inference.Predictor` for every prediction.

:func:`pixel_problems` is a cheap check on the pixels themselves, with a reason for the user: a blank
or constant frame, a drawing, or a large uniform mid-grey patch (a mask, a label box), which the pooled
features miss (record, "A uniform patch check"). An image it names is out of population whatever its
feature score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

log = logging.getLogger(__name__)

__all__ = ["Guard", "fit_guard", "pooled_features", "pixel_problems", "population_verdicts", "uniform_area",
           "GUARD_LAYERS"]

GUARD_VERSION = 1
GUARD_LAYERS = ("denseblock1", "denseblock2", "denseblock3", "norm5")
"""Backbone stages whose pooled outputs the guard models (children of ``model.backbone``)."""
_MIN_TRAIN = 20
_MIN_VAL = 20


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(predictor: Any, images: Sequence[torch.Tensor], layers: Sequence[str] = GUARD_LAYERS,
                    batch_size: int = 32) -> dict[str, np.ndarray]:
    """Global-average-pooled backbone outputs of uint8 images (3, S, S), per layer: (N, C) float64.

    Runs the predictor's own preprocessing (:meth:`~chexformer.inference.Predictor.to_input`) on
    its device in float32 (no autocast, so a guard fitted on a GPU scores alike on a CPU). The
    model must be in eval mode, as a :class:`~chexformer.inference.Predictor` keeps it; nothing on
    the model is changed, so concurrent calls are safe.
    """
    model = predictor.model
    if model.training:
        raise RuntimeError("the guard needs the model in eval mode (BatchNorm running statistics)")
    stages = dict(model.backbone.named_children())
    missing = [name for name in layers if name not in stages]
    if missing:
        raise ValueError(f"the model's backbone has no stage(s) {missing}; it has {list(stages)}")
    last = max(list(stages).index(name) for name in layers)
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for start in range(0, len(images), batch_size):
        x = predictor.to_input(images[start:start + batch_size]).to(predictor.device)
        if getattr(predictor, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        for i, (name, stage) in enumerate(stages.items()):
            if i > last:
                break
            x = stage(x)
            if name in out:
                f = torch.relu(x) if name == "norm5" else x  # norm5 + ReLU is forward_features' output
                out[name].append(f.float().mean(dim=(2, 3)).double().cpu().numpy())  # (B, C)
    return {name: np.concatenate(v) if v else np.empty((0, 0)) for name, v in out.items()}


def pixel_problems(images: Sequence[torch.Tensor]) -> list[str | None]:
    """A reason per image whose pixels alone show the model cannot be trusted on it (None otherwise).

    After the intensity rule a constant frame (blank, all black or all white) is all zeros; an
    image with fewer than 8 grey levels is a drawing or a binary mask, not an exposure; an image
    whose largest uniform mid-grey area (:func:`uniform_area`) covers at least ``UNIFORM_AREA_SHARE``
    of it holds a mask, a label box or a pasted patch, which the backbone-feature guard does not
    see and the models read unreliably (normals with one read towards pneumonia:
    ``bench/shortcut_probe.py``)."""
    reasons: list[str | None] = []
    for img in images:
        levels = torch.unique(img[0]).numel()
        if levels <= 1:
            reasons.append("blank image (a single grey value)")
        elif levels < 8:
            reasons.append(f"only {levels} grey levels (a drawing or mask, not a radiograph)")
        elif (share := uniform_area(img)) >= UNIFORM_AREA_SHARE:
            reasons.append(f"a uniform grey area covers {share:.0%} of the image (a mask, label box or pasted "
                           f"patch?); the prediction is not reliable")
        else:
            reasons.append(None)
    return reasons


UNIFORM_GRID = 16
"""Tiles per side for :func:`uniform_area` (8 px tiles at 128 px)."""
UNIFORM_AREA_SHARE = 1 / 16
"""The uniform-area share at which :func:`pixel_problems` gives a reason. Measured at 128 px
(``bench/uniform_area.py``; record, "A uniform patch check"): no Kermany training image reaches it (the
largest 0.039, 10 tiles), nor does a copy of every 4th under the suite's shifts, but for JPEG at quality
25 (0.1 % of the pneumonias) and 10 (0.3 % of the normals, 4.5 % of the pneumonias), whose 8 px blocks at
model size are flat; the probe's two-cell patch covers 0.125."""


def uniform_area(img: torch.Tensor, grid: int = UNIFORM_GRID) -> float:
    """Share of a uint8 image (C, H, W) covered by its largest uniform mid-grey area.

    The image is cut into ``grid`` x ``grid`` tiles; a tile is uniform when its grey levels span at
    most 2 and its mean lies in 11..244 (black collimation and white saturation are ordinary in
    radiographs and do not count). Uniform tiles of one level (means within 1) that touch side by side
    form an area; real exposures carry noise, so a large one is a mask, a box or a pasted patch."""
    g = img[0].numpy().astype(np.int16)
    th, tw = g.shape[0] // grid, g.shape[1] // grid
    if th == 0 or tw == 0:
        return 0.0
    tiles = g[:th * grid, :tw * grid].reshape(grid, th, grid, tw).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    level = np.rint(tiles.mean(axis=-1)).astype(np.int16)
    uniform = (tiles.max(axis=-1) - tiles.min(axis=-1) <= 2) & (level > 10) & (level < 245)
    largest = 0
    for v in np.unique(level[uniform]):
        labels, n = ndimage.label(uniform & (np.abs(level - v) <= 1))
        if n:
            largest = max(largest, int(np.bincount(labels.ravel())[1:].max()))
    return largest / (grid * grid)


def population_verdicts(images: Sequence[torch.Tensor], guard: Guard | None = None,
                        ood: np.ndarray | Sequence[float] | None = None) -> tuple[list[bool | None], list[str | None]]:
    """Whether each uint8 image belongs to the training population, and why not when its pixels say so.

    ``in_distribution`` is False where :func:`pixel_problems` finds a reason (guard or not: no
    radiograph, whatever the score) or the guard flags the image's ``ood`` score, True where the
    guard passes it, None without a guard (or without scores) and with clean pixels. The reasons
    are :func:`pixel_problems`' (the ``warning`` of predict, explain and the API). The one rule of
    predict, evaluate and serve."""
    problems = pixel_problems(images)
    flags = guard.flag(ood) if guard is not None and ood is not None else [None] * len(problems)
    verdicts = [False if p is not None else (None if f is None else not bool(f)) for p, f in zip(problems, flags)]
    return verdicts, problems


def _model_fingerprint(model: torch.nn.Module) -> float:
    """A number that changes when the backbone's final layers change: the sum of the last
    BatchNorm's parameters and running statistics, in float64 on the CPU."""
    norm5 = dict(model.backbone.named_children()).get("norm5")
    if norm5 is None:
        return float("nan")
    tensors = [t for t in (*norm5.parameters(), *norm5.buffers()) if t.is_floating_point()]
    return float(sum(t.detach().double().cpu().sum() for t in tensors))


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------
def _fit_layer(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit one layer's whitening on training features (N, C): returns ``mean`` (C,),
    ``projection`` A (k, C) and ``offset`` (k,) with ``d^2 = ||A x - offset||^2`` the Ledoit-Wolf
    Mahalanobis distance in the first k principal components of the standardised features."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-8 * max(float(scale.max()), 1e-30), scale, np.inf)  # dead channels drop out
    z = (x - mean) / scale
    k = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    pca = PCA(n_components=k, svd_solver="full").fit(z)
    p = pca.transform(z)  # (N, k)
    lw = LedoitWolf().fit(p)
    chol = np.linalg.cholesky(lw.precision_)  # precision = L L^T, so d^2 = ||L^T (p - loc)||^2
    projection = chol.T @ pca.components_ / scale  # (k, C)
    offset = chol.T @ (pca.components_ @ pca.mean_ + lw.location_)  # (k,)
    return mean, projection, offset


def _squared_distance(x: np.ndarray, mean: np.ndarray, projection: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(N, C) features -> (N,) squared whitened distances."""
    return (((x - mean) @ projection.T - offset) ** 2).sum(axis=1)


def fit_guard(predictor: Any, train_images: Sequence[torch.Tensor], val_images: Sequence[torch.Tensor], *,
              n_components: int = 16, quantile: float = 0.99, batch_size: int = 32) -> dict[str, Any]:
    """Fit the guard on training images and set its threshold on validation images.

    Args:
        predictor: the :class:`~chexformer.inference.Predictor` of the trained model (the guard
            is tied to these weights and this image size).
        train_images, val_images: uint8 images (3, S, S) as :meth:`Predictor.load` returns them,
            un-augmented. A few hundred training images suffice; validation sets the threshold,
            so it must not overlap the training images.
        n_components: principal components kept per layer (capped at ``len(train_images) - 1``).
        quantile: the share of validation images that pass; the threshold is that quantile of
            their scores.

    Returns:
        plain JSON-able values (lists, floats, ints, strings) for :meth:`Guard.from_dict`, to be
        stored in the checkpoint metadata, e.g. ``meta.extra["guard"]``.
    """
    if len(train_images) < _MIN_TRAIN:
        raise ValueError(f"fit_guard needs at least {_MIN_TRAIN} training images, got {len(train_images)}")
    if len(val_images) < _MIN_VAL:
        raise ValueError(f"fit_guard needs at least {_MIN_VAL} validation images, got {len(val_images)}")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must lie in [0.5, 1), got {quantile}")
    if len(val_images) < 1 / (1 - quantile):
        log.info("guard: %d validation images; the %.3g quantile of their scores is close to their maximum",
                 len(val_images), quantile)
    train_f = pooled_features(predictor, train_images, batch_size=batch_size)
    val_f = pooled_features(predictor, val_images, batch_size=batch_size)
    layers = []
    val_scores = np.zeros(len(val_images))
    for name in GUARD_LAYERS:
        mean, projection, offset = _fit_layer(train_f[name], n_components)
        k = projection.shape[0]
        val_d2 = _squared_distance(val_f[name], mean, projection, offset) / k
        scale = float(np.median(val_d2))
        if not scale > 0:
            raise ValueError(f"guard: layer {name} gives zero distances on validation; are the images all alike?")
        val_scores += val_d2 / scale
        layers.append({
            "name": name,
            "mean": _floats(mean),
            "projection": [_floats(row) for row in projection],
            "offset": _floats(offset),
            "scale": scale,
        })
    val_scores /= len(GUARD_LAYERS)
    threshold = float(np.quantile(val_scores, quantile))
    log.info("guard: fitted on %d training images, threshold %.3f (%.3g quantile of %d validation scores, "
             "median %.3f)", len(train_images), threshold, quantile, len(val_images), float(np.median(val_scores)))
    return {
        "version": GUARD_VERSION,
        "method": "mahalanobis_pooled_backbone_features",
        "layers": layers,
        "threshold": threshold,
        "quantile": float(quantile),
        "img_size": int(predictor.img_size),
        "n_train": len(train_images),
        "n_val": len(val_images),
        "val_score_median": float(np.median(val_scores)),
        "model_fingerprint": _model_fingerprint(predictor.model),
    }


def _floats(a: np.ndarray) -> list[float]:
    """float32-rounded Python floats: enough precision for distances, half the digits in the file."""
    return [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
class Guard:
    """A fitted guard; build it from :func:`fit_guard`'s dict with :meth:`from_dict`."""

    def __init__(self, layers: Sequence[Mapping[str, Any]], threshold: float, *, img_size: int,
                 quantile: float = 0.99, model_fingerprint: float = float("nan"),
                 info: Mapping[str, Any] | None = None) -> None:
        self.layers = [
            {
                "name": str(layer["name"]),
                "mean": np.asarray(layer["mean"], dtype=np.float64),
                "projection": np.asarray(layer["projection"], dtype=np.float64),
                "offset": np.asarray(layer["offset"], dtype=np.float64),
                "scale": float(layer["scale"]),
            }
            for layer in layers
        ]
        if not self.layers:
            raise ValueError("a guard needs at least one layer")
        for layer in self.layers:
            k, c = layer["projection"].shape
            if layer["mean"].shape != (c,) or layer["offset"].shape != (k,) or not layer["scale"] > 0:
                raise ValueError(f"guard layer {layer['name']}: inconsistent shapes or scale")
        self.threshold = float(threshold)
        self.img_size = int(img_size)
        self.quantile = float(quantile)
        self.model_fingerprint = float(model_fingerprint)
        self.info = dict(info or {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Guard:
        """Rebuild a guard from :func:`fit_guard`'s output; a malformed dict is a ValueError."""
        if not isinstance(d, Mapping) or d.get("version") != GUARD_VERSION:
            version = d.get("version") if isinstance(d, Mapping) else None
            raise ValueError(f"not a chexformer guard of version {GUARD_VERSION} (got version {version!r})")
        try:
            info = {k: v for k, v in d.items() if k in ("method", "n_train", "n_val", "val_score_median")}
            return cls(d["layers"], d["threshold"], img_size=d["img_size"], quantile=d.get("quantile", 0.99),
                       model_fingerprint=d.get("model_fingerprint", float("nan")), info=info)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed guard: {exc}") from None

    def check_model(self, predictor: Any) -> None:
        """Raise if the predictor's image size differs from the guard's; warn if its weights do."""
        if int(predictor.img_size) != self.img_size:
            raise ValueError(f"the guard was fitted at {self.img_size} px, the model runs at {predictor.img_size} px")
        fingerprint = _model_fingerprint(predictor.model)
        if math.isfinite(self.model_fingerprint) and not math.isclose(fingerprint, self.model_fingerprint,
                                                                      rel_tol=1e-6, abs_tol=1e-6):
            log.warning("the guard was fitted with other model weights (fingerprint %.6g, model %.6g); "
                        "its scores are not calibrated for this model", self.model_fingerprint, fingerprint)

    def score(self, predictor: Any, images: Sequence[torch.Tensor], batch_size: int = 32) -> np.ndarray:
        """Out-of-population scores (N,) of uint8 images (3, S, S): about 1 for images like the
        validation set, above :attr:`threshold` for the least typical 1 % of them and beyond."""
        if len(images) == 0:
            return np.empty(0)
        self.check_model(predictor)
        feats = pooled_features(predictor, images, [layer["name"] for layer in self.layers], batch_size)
        total = np.zeros(len(images))
        for layer in self.layers:
            k = layer["projection"].shape[0]
            d2 = _squared_distance(feats[layer["name"]], layer["mean"], layer["projection"], layer["offset"])
            total += d2 / k / layer["scale"]
        return total / len(self.layers)

    def flag(self, scores: np.ndarray | Sequence[float]) -> np.ndarray:
        """True where a score lies beyond the threshold (out of the training population)."""
        s = np.asarray(scores, dtype=np.float64)
        return ~(s <= self.threshold)  # NaN counts as out of population

    def __repr__(self) -> str:
        return (f"Guard(layers={[layer['name'] for layer in self.layers]}, threshold={self.threshold:.3f}, "
                f"img_size={self.img_size})")
