"""Model-level explanations: attention rollout, Grad-CAM and feature-map helpers.

* Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020):
  per layer the heads are fused, the identity is added for the residual connection, rows are
  renormalised, and the layers are multiplied together; the class token's row over the spatial
  tokens says how much each grid cell reached the classifier through attention.
* Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", ICCV 2017) on the backbone's final feature map (after
  denseblock4, norm5 and the final ReLU): channel weights are the spatially averaged gradients
  of the class score, the map is ``relu(sum_c w_c * A_c)``.

Every function leaves the model as it found it: train/eval mode of every submodule,
``requires_grad`` flags and ``.grad`` fields. Attention weights come only from the explicit
attention path (``need_weights=True``), which gives the same logits as the fused one.
Plotting lives elsewhere; these functions return tensors on the model's device.

In: a model and normalised images from :class:`~chexformer.inference.Predictor`. Out: maps for
:mod:`chexformer.plots`, the evaluation report and the web page; :func:`explain_files` (the
``chexformer explain`` command) writes one PNG panel, raw ``.npy`` maps and ``explain.csv``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexformer import plots
from chexformer.data import ImageReadError, load_image
from chexformer.guard import pixel_problems
from chexformer.inference import Prediction, Predictor
from chexformer.model import evaluating
from chexformer.predict import collect_images, prediction_columns, prediction_row

log = logging.getLogger(__name__)

__all__ = [
    "attention_rollout",
    "grad_cam",
    "grad_cam_from_features",
    "explain_batch",
    "top_feature_channels",
    "upsample_heatmap",
    "heatmap_mass_in_mask",
    "has_attention",
    "evaluating",  # defined in chexformer.model, kept importable from here
]

_HEAD_FUSIONS = ("mean", "max", "min")


def has_attention(model: nn.Module) -> bool:
    """True for models with a Transformer encoder that can report attention (ChexFormer)."""
    if not (hasattr(model, "tokens_from_features") and hasattr(model, "forward_head")):
        return False
    return len(getattr(model, "layers", ())) > 0


# ----------------------------------------------------------------------------------------------
# Attention rollout
# ----------------------------------------------------------------------------------------------
def attention_rollout(
    attentions: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> Tensor:
    """Attention rollout of the class token over the spatial tokens.

    Args:
        attentions: one tensor per layer, each (B, heads, 1 + N, 1 + N), rows summing to 1
            (as returned by ``ChexFormer.attention_maps`` / ``forward_explain``); token 0 is the
            class token.
        head_fusion: how heads are combined per layer: 'mean' (Abnar & Zuidema), 'max' or 'min'.
        discard_ratio: fraction of the lowest fused attention entries per image and layer set
            to zero before the residual identity is added (0 keeps everything); the class
            token's attention to itself is never discarded.

    Returns:
        (B, N) float tensor, non-negative, divided by its per-image maximum so the largest
        cell is 1 (relative scale: mass fractions are preserved). An image whose class token
        receives nothing from the spatial tokens (e.g. identity attention) gives all zeros.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one layer of attention weights")
    if head_fusion not in _HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {_HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")

    first = attentions[0]
    if first.ndim != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"expected attention of shape (B, heads, T, T), got {tuple(first.shape)}")
    B, _, T, _ = first.shape
    eye = torch.eye(T, device=first.device, dtype=torch.float32)
    result = eye.expand(B, T, T).clone()  # (B, T, T)
    for i, attn in enumerate(attentions):
        if attn.shape[0] != B or attn.shape[-2:] != (T, T):
            raise ValueError(
                f"layer {i}: attention shape {tuple(attn.shape)} differs from layer 0's {tuple(first.shape)}"
            )
        attn = attn.detach().float()
        if head_fusion == "mean":
            fused = attn.mean(dim=1)  # (B, T, T)
        elif head_fusion == "max":
            fused = attn.amax(dim=1)
        else:
            fused = attn.amin(dim=1)
        if discard_ratio > 0:
            flat = fused.reshape(B, T * T).clone()
            n_drop = int(T * T * discard_ratio)
            if n_drop:
                low = flat.topk(n_drop, dim=-1, largest=False).indices  # (B, n_drop)
                keep_cls = flat[:, 0].clone()
                flat.scatter_(1, low, 0.0)
                flat[:, 0] = keep_cls
            fused = flat.reshape(B, T, T)
        a = fused + eye  # residual connection
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result  # (B, T, T)
    return _scale_to_peak(result[:, 0, 1:].clamp_min(0))  # (B, N)


# ----------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------
def _class_scores(logits: Tensor, target: int | None) -> Tensor:
    """The score Grad-CAM differentiates, one per image: (B,)."""
    if logits.shape[-1] == 1:
        if target not in (None, 0, 1):
            raise ValueError(f"binary model: target must be None, 0 or 1, got {target}")
        # Positive-class logit: evidence FOR the positive class (for target 0 as well — the map
        # of evidence against it would be the negated gradient, which Grad-CAM's ReLU discards).
        return logits[:, 0]
    if target is None:
        idx = logits.argmax(dim=-1)
    else:
        if not 0 <= target < logits.shape[-1]:
            raise ValueError(f"target {target} out of range for {logits.shape[-1]} classes")
        idx = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return logits.gather(1, idx[:, None])[:, 0]


def _scale_to_peak(maps: Tensor) -> Tensor:
    """Divide each map (everything after the batch dimension) by its maximum; maps without a
    positive value become zeros. Not min-max: 0 keeps meaning "no evidence", and the ratios
    between cells (mass fractions) are preserved."""
    peak = maps.flatten(1).amax(dim=1).view(-1, *([1] * (maps.ndim - 1)))
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def grad_cam_from_features(model: nn.Module, feats: Tensor, target: int | None = None) -> Tensor:
    """Grad-CAM for a precomputed backbone map (B, C, h, w); see :func:`grad_cam`.

    The model must already be in the mode wanted (``grad_cam`` puts it in eval mode). The
    gradient is taken with respect to a detached copy of ``feats`` only, so no parameter's
    ``.grad`` is touched and frozen parameters need no gradient.
    """
    # Works inside torch.no_grad() and torch.inference_mode() too: the clone is a normal tensor.
    with torch.inference_mode(False), torch.enable_grad():
        feats = feats.detach().clone().requires_grad_(True)
        logits = model.forward_from_features(feats)
        score = _class_scores(logits, target)
        (grads,) = torch.autograd.grad(score.sum(), feats)  # images are independent in eval mode
    weights = grads.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * feats.detach().float()).sum(dim=1))  # (B, h, w)
    return _scale_to_peak(cam)


def grad_cam(model: nn.Module, x: Tensor, target: int | None = None) -> Tensor:
    """Grad-CAM on the backbone's final feature map.

    Args:
        model: a ChexFormer or LinearHeadDenseNet (anything with ``forward_features`` and
            ``forward_from_features``); frozen backbones work, the model is left as found.
        x: normalised images (B, 3, H, W) on the model's device.
        target: for a binary model (one logit) ignored except for validation — the map is of
            the positive-class logit (evidence for the positive class); for a multiclass model
            the class whose logit is explained (default: each image's predicted class).

    Returns:
        (B, h, w) with h = H/32, w = W/32, values in [0, 1] (divided by the per-image maximum;
        all zeros where no cell has positive evidence).
    """
    with evaluating(model):
        with torch.no_grad():
            feats = model.forward_features(x)  # (B, 1024, h, w)
        return grad_cam_from_features(model, feats, target)


# ----------------------------------------------------------------------------------------------
# Everything for a batch
# ----------------------------------------------------------------------------------------------
def explain_batch(model: nn.Module, x: Tensor, meta: Any = None, target: int | None = None) -> dict[str, Any]:
    """Logits, calibrated probabilities, attention rollout, Grad-CAM and the backbone map.

    Args:
        model: ChexFormer (with attention) or LinearHeadDenseNet (rollout is then None).
        x: normalised images (B, 3, H, W) on the model's device.
        meta: a :class:`~chexformer.checkpoint.CheckpointMeta` (``temperature`` and ``bias``
            are used); None means uncalibrated logits.
        target: Grad-CAM target for multiclass models (default: predicted class).

    Returns:
        dict with ``logits`` (B, K); ``probs`` (B, K): ``sigmoid(logits / T)`` for a binary
        model (K = 1, probability of the positive class), ``softmax(logits / T)`` otherwise;
        ``rollout`` (B, h, w) or None; ``gradcam`` (B, h, w); ``feats`` (B, 1024, h, w); and
        ``attentions``: per-layer (B, heads, 1 + h*w, 1 + h*w) ([] without attention).
    """
    temperature = float(getattr(meta, "temperature", 1.0)) if meta is not None else 1.0
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with evaluating(model):
        with torch.no_grad():
            feats = model.forward_features(x)  # (B, 1024, h, w)
            B, _, h, w = feats.shape
            if has_attention(model):
                tokens, attentions = model.tokens_from_features(feats, need_weights=True)
                logits = model.forward_head(tokens)
                rollout = attention_rollout(attentions).reshape(B, h, w)
            else:
                attentions = []
                logits = model.forward_from_features(feats)
                rollout = None
        gradcam = grad_cam_from_features(model, feats, target)
    scaled = logits.float() / temperature
    if logits.shape[-1] == 1:  # Platt scaling: temperature and bias
        scaled = scaled + float(getattr(meta, "bias", 0.0) if meta is not None else 0.0)
    probs = torch.sigmoid(scaled) if logits.shape[-1] == 1 else torch.softmax(scaled, dim=-1)
    return {
        "logits": logits,
        "probs": probs,
        "rollout": rollout,
        "gradcam": gradcam,
        "feats": feats,
        "attentions": attentions,
    }


# ----------------------------------------------------------------------------------------------
# Feature maps and heatmap checks
# ----------------------------------------------------------------------------------------------
def top_feature_channels(feats: Tensor, k: int = 16) -> Tensor:
    """Indices of the ``k`` channels with the highest mean activation, highest first.

    ``feats`` is (C, h, w) -> (k,), or (B, C, h, w) -> (B, k); ``k`` is capped at C.
    """
    if feats.ndim not in (3, 4):
        raise ValueError(f"expected feats of shape (C, h, w) or (B, C, h, w), got {tuple(feats.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    means = feats.detach().float().mean(dim=(-2, -1))  # (C,) or (B, C)
    return means.topk(min(k, means.shape[-1]), dim=-1).indices


def upsample_heatmap(heatmap: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize a (h, w) or (B, h, w) heatmap to ``size`` (H, W) for overlays."""
    if heatmap.ndim not in (2, 3):
        raise ValueError(f"expected a heatmap of shape (h, w) or (B, h, w), got {tuple(heatmap.shape)}")
    batched = heatmap.ndim == 3
    hm = heatmap.detach().float()
    hm = hm[:, None] if batched else hm[None, None]
    if tuple(hm.shape[-2:]) != tuple(size):
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        hm = F.interpolate(hm, size=tuple(size), mode=mode, **kwargs)
    return hm[:, 0] if batched else hm[0, 0]


def heatmap_mass_in_mask(heatmap: Tensor, mask: Tensor, mode: str = "bilinear") -> float:
    """Fraction of a heatmap's mass that falls inside ``mask``.

    The (h, w) heatmap is upsampled to the mask's (H, W) (``mode``: 'bilinear' as displayed, or
    'nearest' for exact per-cell mass) and clamped at zero. Compare the result with
    ``mask.float().mean()`` (the mask's area fraction): more means the map concentrates inside.
    Returns NaN for a heatmap without positive mass.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {tuple(mask.shape)}")
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got {tuple(heatmap.shape)}")
    hm = upsample_heatmap(heatmap, tuple(mask.shape), mode=mode).clamp_min(0).cpu()
    total = float(hm.sum())
    if not total > 0 or not math.isfinite(total):
        return float("nan")
    return float(hm[mask.bool().cpu()].sum()) / total


# ----------------------------------------------------------------------------------------------
# Files in, one panel per image out (``chexformer explain``)
# ----------------------------------------------------------------------------------------------
def explain_files(checkpoint, images: Sequence, out_dir, k: int = 6, device: str = "auto",
                  common_scale: bool = False, max_side: int = 1024) -> list[dict[str, Any]]:
    """For each image file: the original image (at up to ``max_side`` px) with attention rollout
    and Grad-CAM overlays, the most active feature maps and the calibrated prediction in one PNG;
    the raw heatmaps (model resolution, float32) next to it as ``.npy``; a row per image in
    ``explain.csv`` (predict's schema plus ``panel`` and ``warning``, set for an image whose pixels
    fail :func:`chexformer.guard.pixel_problems`: blank, a drawing, a large uniform patch).

    The heatmaps show the evidence for the positive class (binary) or the predicted class. With
    ``common_scale`` every image's maps share one scale (the largest value of each map kind over
    all images), so a faint map stays faint; otherwise each map is stretched to 0..1 on its own."""
    predictor = Predictor.from_checkpoint(checkpoint, device=device, precision="32")
    model, meta = predictor.model, predictor.meta
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    done: list[tuple[int, Path, Any, dict, Tensor, str]] = []
    for path in collect_images(images):
        try:
            img = predictor.load(path)
        except ImageReadError as exc:
            log.warning("cannot explain %s: %s", path, exc.reason)
            rows.append(prediction_row(Prediction(str(path), error=exc.reason), meta.class_names))
            continue
        res = explain_batch(model, predictor.to_input([img]).to(predictor.device), meta)
        probs = res["probs"][0].float().cpu()
        if probs.numel() == 1:
            p = float(probs)
            label = predictor.label(np.array([p]))[0]
            pred = Prediction(str(path), [1 - p, p], label, meta.threshold)
            title = (f"{path.name}: P({meta.class_names[1]}) = {p:.3f} -> {label} "
                     f"(threshold {meta.threshold:.3f}); heatmaps: evidence for {meta.class_names[1]}")
        else:
            c = int(probs.argmax())
            label = meta.class_names[c]
            pred = Prediction(str(path), [float(v) for v in probs], label, None)
            title = f"{path.name}: {label} (P = {float(probs[c]):.3f}); heatmaps: evidence for {label}"
        problem = pixel_problems([img])[0]
        if problem is not None:
            log.warning("%s fails the pixel check (%s): its label and heatmaps are not to be trusted", path, problem)
            pred.extra["warning"] = problem
            title += f"\nWARNING: {problem}"
        heat = {}
        if res["rollout"] is not None:
            heat["attention rollout"] = res["rollout"][0].float().cpu().numpy()
        heat["Grad-CAM (denseblock4)"] = res["gradcam"][0].float().cpu().numpy()
        rows.append(prediction_row(pred, meta.class_names))
        done.append((len(rows) - 1, path, heat, res, res["feats"][0].float().cpu(), title))
    vmax = None
    if common_scale and done:
        vmax = {name: max(float(h[name].max()) for _, _, h, _, _, _ in done) for name in done[0][2]}
    for n, (row_index, path, heat, _res, feats, title) in enumerate(done):
        original = load_image(path)  # the intensity rule at full resolution
        original.thumbnail((max_side, max_side))
        png = out / f"{n:03d}_{path.stem}.png"
        for name, hm in heat.items():
            np.save(out / f"{n:03d}_{path.stem}_{'rollout' if 'rollout' in name else 'gradcam'}.npy",
                    hm.astype(np.float32))
        plots.plot_explanation(np.asarray(original), heat, feats, png, title, k=k, vmax=vmax)
        rows[row_index]["panel"] = str(png)
    with (out / "explain.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=prediction_columns(meta.class_names, ["panel", "warning"]))
        writer.writeheader()
        writer.writerows(rows)
    log.info("explained %d images into %s%s", len(done), out, " (common heatmap scale)" if vmax else "")
    return rows
