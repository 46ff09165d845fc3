"""Evaluation a paper can cite: metrics with bootstrap CIs, plots, explanations and an HTML report.

``evaluate_checkpoint`` reads a trained checkpoint (which carries its config, class names,
normalisation, the validation-chosen threshold and temperature) and a folder with one
sub-folder per class, and writes into ``OUT/``:

- ``metrics.json``: every metric with a 95% bootstrap CI (patients resampled where the file names
  carry patient ids), at the validation threshold and at 0.5;
- ``predictions.csv``: one row per image;
- ``plots/*.png`` and ``report.html`` (self-contained).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from chexformer import data, metrics, plots, report
from chexformer.card import model_card
from chexformer.checkpoint import CheckpointMeta
from chexformer.explain import explain_batch
from chexformer.guard import population_verdicts
from chexformer.inference import Predictor
from chexformer.predict import prediction_columns
from chexformer.robustness import format_table, shift_suite_logits, suite_table
from chexformer.synthetic import is_synthetic

log = logging.getLogger(__name__)

GUARD_WARN_FRACTION = 0.2
"""The report warns when more than this share of the evaluated images is out of population."""

__all__ = ["evaluate_checkpoint", "threshold_for"]


def threshold_for(meta: CheckpointMeta, target_sensitivity: float | None) -> tuple[float, str]:
    """The decision threshold to report: the stored one, or one re-chosen on the stored
    validation predictions so that validation sensitivity reaches ``target_sensitivity``."""
    if target_sensitivity is None:
        rule = meta.extra.get("threshold_rule", meta.config.threshold_method)
        return meta.threshold, f"{rule} on validation (epoch {meta.epoch})"
    val = meta.extra.get("val_predictions")
    if not val:
        raise ValueError("this checkpoint stores no validation predictions, so --target-sensitivity cannot "
                         "choose a threshold on validation")
    prob = metrics.apply_platt(np.asarray(val["logits"], dtype=np.float64), meta.temperature, meta.bias)
    t = metrics.choose_threshold(np.asarray(val["labels"]), prob, "sensitivity", target_sensitivity)
    return float(t), f"validation sensitivity >= {target_sensitivity}"


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    target_sensitivity: float | None = None,
    n_boot: int = 1000,
    history_path: str | Path | None = None,
    data_summary: dict | None = None,
    strict: bool = False,
    batch_size: int = 32,
    n_explain: int = 2,
    n_errors: int = 12,
    device: str = "auto",
    precision: str = "32",
    backend: str = "eager",
    shift_suite: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data_dir`` (one sub-folder per class); return metrics.json's content.

    With ``shift_suite`` the set is also re-scored under every acquisition shift of the robustness
    suite (:mod:`chexformer.robustness`) at the same threshold; the table goes into
    ``metrics.json["shift_suite"]`` and the report."""
    if n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0 (0: no confidence intervals), got {n_boot}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision, backend=backend,
                                          batch_size=batch_size)
    model, meta = predictor.model, predictor.meta
    cfg = meta.config
    try:
        scan = data.scan_folder(Path(data_dir), meta.class_names, strict=strict, patient_regex=cfg.patient_regex)
    except data.DatasetLayoutError as exc:  # the hint is one labelled folder, not a training layout
        raise data.DatasetLayoutError(exc.args[0], layout=data.EVAL_LAYOUT) from None
    samples = scan.samples
    # decoded once, here: the logits, the guard, the shift suite and the explanation panels reuse it
    dataset = data.XrayDataset(samples, cfg.img_size, cfg.keep_aspect, predictor.transform, preload=True)
    suite_logits = None
    if shift_suite:
        suite_logits = shift_suite_logits(predictor, dataset, batch_size=batch_size, seed=cfg.seed)
        logits = torch.from_numpy(suite_logits["clean"]).reshape(len(dataset), -1)
    else:
        logits = predictor.dataset_logits(dataset, batch_size=batch_size)
    failed = dataset.failed_indices
    keep = [i for i in range(len(samples)) if i not in failed]
    skipped = [[str(p), r] for p, r in scan.skipped] + [[str(p), r] for p, r in dataset.failed]
    y = np.array([samples[i].label for i in keep])
    groups = np.array([samples[i].group for i in keep])
    lg = logits[keep].numpy().astype(np.float64)
    binary = meta.num_classes == 2
    threshold, threshold_source = threshold_for(meta, target_sensitivity) if binary else (None, "argmax")
    prob = predictor.probabilities(lg)
    raw = 1 / (1 + np.exp(-lg[:, 0])) if binary else None  # sigmoid of the raw logit, before Platt scaling
    results = metrics.evaluation_report(y, prob, meta.class_names, threshold, groups=groups, n_boot=n_boot,
                                        seed=cfg.seed)
    if suite_logits is not None and binary:
        table = suite_table(y, {k: predictor.probabilities(v[keep]) for k, v in suite_logits.items()}, threshold)
        results["shift_suite"] = table
        log.info("robustness suite at threshold %.4f:\n%s", threshold, format_table(table))
    warnings: list[str] = []
    images = [dataset.uint8(i) for i in keep]
    ood = predictor.ood_scores(images) if predictor.guard is not None else None
    verdicts, problems = population_verdicts(images, predictor.guard, ood)
    del images
    if any(problems):
        blank = [(samples[i].path, p) for i, p in zip(keep, problems) if p is not None]
        warnings.append(f"{len(blank)} of {len(keep)} images fail the pixel check (column 'warning' of "
                        f"predictions.csv), e.g. {blank[0][0]}: {blank[0][1]}")
        log.warning("%d of %d images fail the pixel check; they are scored with the rest (column 'warning' of "
                    "predictions.csv):\n%s", len(blank), len(keep), "\n".join(f"  {p}: {why}" for p, why in blank[:50]))
    if ood is not None:
        flagged = predictor.guard.flag(ood)
        results["guard"] = {"threshold": predictor.guard.threshold, "n_flagged": int(flagged.sum()),
                            "flagged_fraction": float(flagged.mean()) if len(flagged) else 0.0,
                            "expected_fraction": 1 - predictor.guard.quantile}
        if flagged.mean() > GUARD_WARN_FRACTION:
            warnings.append(
                f"{100 * flagged.mean():.0f} % of these images lie outside the training population "
                f"(guard score above {predictor.guard.threshold:.2f}; about "
                f"{100 * (1 - predictor.guard.quantile):.0f} % "
                "of images like the validation set are). The metrics below may not describe this model's "
                "behaviour on such data.")
    if meta.extra.get("data", {}).get("synthetic") or is_synthetic(data_dir):
        warnings.append("This is the synthetic demo data set: a pipeline check, not a medical result.")
    if binary:
        results["ece_uncalibrated"] = metrics.expected_calibration_error(y, raw)
        results["threshold_table"] = threshold_table(y, prob, threshold)
    results["threshold_source"] = threshold_source
    results["temperature"] = meta.temperature
    results["calibration_bias"] = meta.bias
    results["device"] = str(predictor.device)
    results["inference_precision"] = predictor.precision
    results["checkpoint"] = str(checkpoint)
    results["data_dir"] = str(data_dir)
    results["skipped"] = skipped
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    _write_predictions(out / "predictions.csv", [samples[i] for i in keep], prob, threshold, meta, ood, verdicts,
                       problems)

    # --- plots --------------------------------------------------------------------------------------
    figs: dict[str, Any] = {}
    history_path = Path(history_path) if history_path else Path(checkpoint).resolve().parent.parent / "history.csv"
    if history_path.is_file():
        figs["history"] = plots.plot_history(history_path, plot_dir / "history.png")
    if binary:
        at = results["at_threshold"]
        figs["confusion_matrix"] = plots.plot_confusion_matrix(
            at["confusion_matrix"], meta.class_names, plot_dir / "confusion_matrix.png",
            title=f"Confusion matrix at threshold {threshold:.3f}")
        if len(np.unique(y)) == 2:
            figs["roc"] = plots.plot_roc(y, prob, plot_dir / "roc.png", auc=at["roc_auc"]["value"],
                                         auc_ci=at["roc_auc"]["ci95"], threshold=threshold)
            figs["pr"] = plots.plot_pr(y, prob, plot_dir / "pr.png", ap=at["pr_auc"]["value"],
                                       ap_ci=at["pr_auc"]["ci95"])
        figs["reliability_uncalibrated"] = plots.plot_reliability(
            y, raw, plot_dir / "reliability_uncalibrated.png", ece=results["ece_uncalibrated"],
            title="Reliability before calibration (sigmoid of raw logits)")
        figs["reliability"] = plots.plot_reliability(y, prob, plot_dir / "reliability.png", ece=at["ece"]["value"],
                                                     title="Reliability after Platt scaling (as reported)")
    else:
        figs["confusion_matrix"] = plots.plot_confusion_matrix(
            results["confusion_matrix"], meta.class_names, plot_dir / "confusion_matrix.png")
    figs.update(_explanation_plots(model, meta, dataset, keep, y, prob, plot_dir, n_explain))
    errors = _error_review(predictor, dataset, keep, y, prob, threshold, out / "errors",
                           n_errors) if binary else []

    summary = dict(data_summary or meta.extra.get("data") or {})
    summary.setdefault("splits", {})
    summary["splits"] = {**summary["splits"], "evaluated": data.describe([samples[i] for i in keep],
                                                                          meta.class_names)}
    summary["skipped"] = list(summary.get("skipped", [])) + skipped
    notes = [f"Threshold {threshold:.4f} chosen by {threshold_source}; probabilities calibrated with "
             f"Platt scaling (temperature {meta.temperature:.3f}, bias {meta.bias:+.3f}) fitted on validation."
             ] if binary else []
    if cfg.backbone_weights != "file" or not Path(cfg.pretrained_path).is_file():
        notes.append(f"Backbone initialisation: {cfg.backbone_weights} (pretrained_path {cfg.pretrained_path}).")
    report.write_report(out, title=f"chexformer evaluation: {Path(data_dir)}", config=cfg.to_dict(),
                        data_summary=summary, metrics=results, plots=figs, notes=notes, warnings=warnings,
                        errors=errors, model_card=model_card(predictor, predictor.guard, checkpoint))
    log.info("evaluation of %s on %s (%d images): %s; report %s", checkpoint, data_dir, len(keep),
             _headline(results), out / "report.html")
    return results


REVIEW_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def threshold_table(y: np.ndarray, prob: np.ndarray, chosen: float) -> list[dict[str, Any]]:
    """Sensitivity, specificity, PPV and NPV at several thresholds and at the chosen one (marked)."""
    y = np.asarray(y).astype(bool)
    rows = []
    for t in sorted({*REVIEW_THRESHOLDS, round(float(chosen), 6)}):
        pred = prob >= t
        tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
        fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
        rows.append({"threshold": t, "chosen": abs(t - chosen) < 1e-6,
                     "sensitivity": tp / (tp + fn) if tp + fn else None,
                     "specificity": tn / (tn + fp) if tn + fp else None,
                     "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None,
                     "tp": tp, "fp": fp, "fn": fn, "tn": tn})
    return rows


def _error_review(predictor: Predictor, dataset: data.XrayDataset, keep: list[int], y: np.ndarray, prob: np.ndarray,
                  threshold: float, out: Path, limit: int) -> list[dict[str, Any]]:
    """Every false negative and false positive (up to ``limit`` each, most confident first) with its
    Grad-CAM overlay on the original image (``out/*.png``) and the raw map (``out/*.npy``). The model
    sees the evaluated (preloaded) pixels; only the full-resolution display image is decoded again."""
    names = predictor.meta.class_names
    pred = prob >= threshold
    fn = [i for i in np.argsort(prob) if y[i] == 1 and not pred[i]][:limit]  # lowest P first
    fp = [i for i in np.argsort(-prob) if y[i] == 0 and pred[i]][:limit]  # highest P first
    if not fn and not fp:
        return []
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, picks in (("false negative", fn), ("false positive", fp)):
        for rank, i in enumerate(picks):
            s = dataset.samples[keep[i]]
            img = dataset.uint8(keep[i])
            res = explain_batch(predictor.model, predictor.to_input([img]).to(predictor.device), predictor.meta)
            cam = res["gradcam"][0].float().cpu().numpy()
            original = data.load_image(s.path)
            original.thumbnail((512, 512))
            stem = f"{kind.split()[1][:3]}_{rank:02d}_{Path(s.path).stem}"
            np.save(out / f"{stem}_gradcam.npy", cam.astype(np.float32))
            overlay = plots.overlay_heatmap(np.asarray(original), cam, alpha=0.4)
            png = out / f"{stem}.png"
            Image.fromarray((overlay * 255).round().astype(np.uint8)).save(png)
            rows.append({"kind": kind, "path": str(s.path), "patient": s.group, "true_label": names[int(y[i])],
                         "probability": float(prob[i]), "threshold": float(threshold), "png": str(png)})
    return rows


def _headline(results: dict[str, Any]) -> str:
    parts = []
    for k in ("roc_auc", "accuracy", "recall", "specificity", "f1"):
        v = results.get(k)
        if isinstance(v, dict) and v.get("value") is not None:
            parts.append(f"{k} {v['value']:.3f}")
    return ", ".join(parts)


def _write_predictions(path: Path, samples, prob: np.ndarray, threshold: float | None, meta: CheckpointMeta,
                       ood: np.ndarray | None, verdicts: list[bool | None], problems: list[str | None]) -> None:
    """predict's CSV schema plus the truth: path, patient, true_label, prob_<class>..., predicted_label,
    threshold (+ ood_score, in_distribution with a guard; + warning where an image looks like no
    radiograph, :func:`chexformer.guard.population_verdicts`)."""
    names = meta.class_names
    extra = ["ood_score"] if ood is not None else []
    extra += ["in_distribution"] if ood is not None or any(problems) else []  # as predict's CSV
    extra += ["warning"] if any(problems) else []
    cols = prediction_columns(names, extra)
    cols = cols[:1] + ["patient", "true_label"] + [c for c in cols[1:] if c != "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for k, (s, p) in enumerate(zip(samples, prob)):
            probs = [1 - float(p), float(p)] if np.ndim(p) == 0 else [float(v) for v in p]
            pred = int(probs[1] >= threshold) if np.ndim(p) == 0 else int(np.argmax(probs))
            row = {"path": str(s.path), "patient": s.group, "true_label": names[s.label],
                   **{f"prob_{c}": f"{v:.6f}" for c, v in zip(names, probs)},
                   "predicted_label": names[pred],
                   "threshold": "" if threshold is None else f"{threshold:.6f}"}
            if ood is not None:
                row["ood_score"] = f"{ood[k]:.6f}"
            if "in_distribution" in extra:
                row["in_distribution"] = "" if verdicts[k] is None else verdicts[k]
            if problems[k] is not None:
                row["warning"] = problems[k]
            writer.writerow(row)


def _explanation_plots(model, meta: CheckpointMeta, dataset, keep, y, prob, plot_dir: Path, n: int) -> dict:
    """Inputs, feature maps, attention per layer and head, rollout and Grad-CAM for a few images:
    the most confident positives first, then the most confident negatives."""
    if not keep:
        return {}
    score = prob if prob.ndim == 1 else prob.max(1)
    order = np.argsort(-score)
    picks = [int(order[0])] + ([int(order[-1])] if len(order) > 1 else [])
    picks = picks[:max(1, n)]
    x = torch.stack([dataset[keep[i]][0] for i in picks])
    device = next(model.parameters()).device
    out = explain_batch(model, x.to(device), meta)
    out = {k: (v.cpu() if isinstance(v, torch.Tensor) else [a.cpu() for a in v] if isinstance(v, list) else v)
           for k, v in out.items()}
    figs: dict[str, Any] = {}
    images = plots.denormalize(x, meta.mean, meta.std).permute(0, 2, 3, 1).numpy()
    p = out["probs"].squeeze(-1).numpy() if out["probs"].shape[-1] == 1 else out["probs"].max(-1).values.numpy()
    figs["inputs"] = plots.plot_inputs(x, meta.mean, meta.std, plot_dir / "inputs.png",
                                       labels=[int(y[i]) for i in picks], class_names=meta.class_names, probs=p)
    h, w = out["feats"].shape[-2:]
    figs["feature_maps"], figs["attention"], figs["gradcam"] = [], [], []
    for j, i in enumerate(picks):
        tag = f"{j}_{meta.class_names[int(y[i])]}"
        figs["feature_maps"].append(
            plots.plot_feature_maps(images[j], out["feats"][j], plot_dir / f"feature_maps_{tag}.png"))
        if out["attentions"]:
            figs["attention"].append(plots.plot_attention_maps(
                images[j], [a[j].float().numpy() for a in out["attentions"]], (h, w),
                plot_dir / f"attention_{tag}.png"))
        heat = {"Grad-CAM (last dense block)": out["gradcam"][j].numpy()}
        if out["rollout"] is not None:
            heat["Attention rollout"] = out["rollout"][j].numpy()
        figs["gradcam"].append(plots.plot_heatmap_panel(
            images[j], heat, plot_dir / f"heatmaps_{tag}.png",
            title=f"true {meta.class_names[int(y[i])]}, P({meta.class_names[-1]}) = {float(p[j]):.3f}"))
    return {k: v for k, v in figs.items() if v}
