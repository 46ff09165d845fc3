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
from torch.utils.data import DataLoader

from chexformer.checkpoint import CheckpointMeta, load_checkpoint

log = logging.getLogger(__name__)

__all__ = ["evaluate_checkpoint", "predict_logits", "threshold_for"]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, dataset, batch_size: int = 32, device: str | torch.device = "cpu",
                   channels_last: bool = True) -> torch.Tensor:
    """Logits of ``model`` (eval mode, fp32) for every item of an ``XrayDataset``."""
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = []
    for x, _, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 1)


def threshold_for(meta: CheckpointMeta, target_sensitivity: float | None) -> tuple[float, str]:
    """The decision threshold to report: the stored one, or one re-chosen on the stored
    validation predictions so that validation sensitivity reaches ``target_sensitivity``."""
    if target_sensitivity is None:
        return meta.threshold, f"{meta.config.threshold_method} on validation (epoch {meta.epoch})"
    from chexformer import metrics

    val = meta.extra.get("val_predictions")
    if not val:
        raise ValueError("this checkpoint stores no validation predictions, so --target-sensitivity cannot "
                         "choose a threshold on validation")
    prob = metrics.apply_temperature(np.asarray(val["logits"], dtype=np.float64), meta.temperature)
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
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data_dir`` (one sub-folder per class); return metrics.json's content."""
    from chexformer import data, metrics, plots, report

    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    model, meta = load_checkpoint(checkpoint)
    cfg = meta.config
    scan = data.scan_folder(Path(data_dir), meta.class_names, strict=strict, patient_regex=cfg.patient_regex)
    samples = scan.samples
    transform = data.build_transforms(cfg, train=False, mean=meta.mean, std=meta.std)
    dataset = data.XrayDataset(samples, cfg.img_size, cfg.keep_aspect, transform)
    logits = predict_logits(model, dataset, batch_size=batch_size, channels_last=cfg.channels_last)
    failed = dataset.failed_indices
    keep = [i for i in range(len(samples)) if i not in failed]
    skipped = [[str(p), r] for p, r in scan.skipped] + [[str(p), r] for p, r in dataset.failed]
    y = np.array([samples[i].label for i in keep])
    groups = np.array([samples[i].group for i in keep])
    lg = logits[keep].numpy().astype(np.float64)
    binary = meta.num_classes == 2
    threshold, threshold_source = threshold_for(meta, target_sensitivity) if binary else (None, "argmax")
    if binary:
        prob = metrics.apply_temperature(lg[:, 0], meta.temperature)
    else:
        prob = metrics.apply_temperature(lg, meta.temperature, multiclass=True)
    results = metrics.evaluation_report(y, prob, meta.class_names, threshold, groups=groups, n_boot=n_boot,
                                        seed=cfg.seed)
    results["threshold_source"] = threshold_source
    results["temperature"] = meta.temperature
    results["checkpoint"] = str(checkpoint)
    results["data_dir"] = str(data_dir)
    results["skipped"] = skipped
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    _write_predictions(out / "predictions.csv", [samples[i] for i in keep], prob, threshold, meta)

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
        figs["reliability"] = plots.plot_reliability(y, prob, plot_dir / "reliability.png", ece=at["ece"]["value"])
    else:
        figs["confusion_matrix"] = plots.plot_confusion_matrix(
            results["confusion_matrix"], meta.class_names, plot_dir / "confusion_matrix.png")
    figs.update(_explanation_plots(model, meta, dataset, keep, y, prob, plot_dir, n_explain))

    summary = dict(data_summary or meta.extra.get("data") or {})
    summary.setdefault("splits", {})
    summary["splits"] = {**summary["splits"], "evaluated": data.describe([samples[i] for i in keep],
                                                                          meta.class_names)}
    summary["skipped"] = list(summary.get("skipped", [])) + skipped
    notes = [f"Threshold {threshold:.4f} chosen by {threshold_source}; probabilities calibrated with "
             f"temperature {meta.temperature:.3f} fitted on validation."] if binary else []
    if cfg.backbone_weights != "file" or not Path(cfg.pretrained_path).is_file():
        notes.append(f"Backbone initialisation: {cfg.backbone_weights} (pretrained_path {cfg.pretrained_path}).")
    report.write_report(out, title=f"chexformer evaluation: {Path(data_dir)}", config=cfg.to_dict(),
                        data_summary=summary, metrics=results, plots=figs, notes=notes)
    log.info("evaluation of %s on %s (%d images): %s; report %s", checkpoint, data_dir, len(keep),
             _headline(results), out / "report.html")
    return results


def _headline(results: dict[str, Any]) -> str:
    parts = []
    for k in ("roc_auc", "accuracy", "recall", "specificity", "f1"):
        v = results.get(k)
        if isinstance(v, dict) and v.get("value") is not None:
            parts.append(f"{k} {v['value']:.3f}")
    return ", ".join(parts)


def _write_predictions(path: Path, samples, prob: np.ndarray, threshold: float | None, meta: CheckpointMeta) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        if prob.ndim == 1:
            writer.writerow(["path", "patient", "label", "true_class", f"prob_{meta.class_names[1]}", "predicted",
                             "predicted_class"])
            for s, p in zip(samples, prob):
                pred = int(p >= threshold)
                writer.writerow([s.path, s.group, s.label, meta.class_names[s.label], f"{p:.6f}", pred,
                                 meta.class_names[pred]])
        else:
            writer.writerow(["path", "patient", "label", "true_class", *[f"prob_{c}" for c in meta.class_names],
                             "predicted", "predicted_class"])
            for s, p in zip(samples, prob):
                pred = int(np.argmax(p))
                writer.writerow([s.path, s.group, s.label, meta.class_names[s.label], *[f"{v:.6f}" for v in p],
                                 pred, meta.class_names[pred]])


def _explanation_plots(model, meta: CheckpointMeta, dataset, keep, y, prob, plot_dir: Path, n: int) -> dict:
    """Inputs, feature maps, attention per layer and head, rollout and Grad-CAM for a few images:
    the most confident positives first, then the most confident negatives."""
    from chexformer import plots
    from chexformer.explain import explain_batch

    if not keep:
        return {}
    score = prob if prob.ndim == 1 else prob.max(1)
    order = np.argsort(-score)
    picks = [int(order[0])] + ([int(order[-1])] if len(order) > 1 else [])
    picks = picks[:max(1, n)]
    x = torch.stack([dataset[keep[i]][0] for i in picks])
    out = explain_batch(model, x, meta)
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
