"""A single self-contained HTML report of one evaluation run.

The page embeds every image as a base64 ``data:`` URI and carries its CSS inline; it needs no
JavaScript, fonts or network, and a Content-Security-Policy forbids the browser to fetch anything,
so it can be mailed, archived next to the checkpoint or opened on an offline workstation and look
the same. All text from configs, file names and metrics is HTML-escaped. In: what
:func:`chexformer.evaluate.evaluate_checkpoint` computed (metrics, PNG paths, data summary, model
card). Out: ``OUT/report.html``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["write_report"]

METRIC_LABELS: dict[str, str] = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "recall": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1 score",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "brier": "Brier score (lower is better)",
    "ece": "ECE (lower is better)",
}
# Table order: threshold metrics, then threshold-independent ones.
BINARY_ROWS = ("accuracy", "balanced_accuracy", "recall", "specificity", "precision", "f1",
               "roc_auc", "pr_auc", "brier", "ece")
THRESHOLD_FREE = {"roc_auc", "pr_auc", "brier", "ece"}
MULTICLASS_COLUMNS = ("precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")

PLOT_CAPTIONS: dict[str, str] = {
    "history": "Training history: loss, accuracy, validation AUC and learning rate per epoch.",
    "confusion_matrix": "Confusion matrix at the chosen threshold; rows are the true class, percentages are "
    "shares of each true class.",
    "confusion_matrix_0.5": "Confusion matrix at threshold 0.5.",
    "roc": "ROC curve with the AUC, its bootstrap 95% CI and the operating point of the chosen threshold.",
    "pr": "Precision-recall curve; the dashed line is the prevalence (a classifier that cannot rank).",
    "reliability_uncalibrated": "Reliability before calibration: the sigmoid of the raw logits (class "
    "weighting shifts them), observed frequency against predicted probability.",
    "reliability": "Reliability after Platt scaling fitted on validation (the probabilities reported): observed "
    "frequency against predicted probability (diagonal = perfectly calibrated), with the distribution of "
    "predictions underneath.",
    "inputs": "Model inputs as the network sees them (resized; normalisation undone for display).",
    "feature_maps": "Most active DenseNet feature channels, upsampled onto the image (bright = strong).",
    "attention": "Class-token attention per encoder layer and head, overlaid on the image (bright = high).",
    "attention_maps": "Class-token attention per encoder layer and head, overlaid on the image (bright = high).",
    "gradcam": "Grad-CAM heatmaps (bright = regions that raised the predicted class score most).",
    "heatmaps": "Explanation heatmaps overlaid on the images (bright = high).",
}

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp", ".svg": "image/svg+xml"}

_CSS = """
:root { --fg: #1d2430; --muted: #5b6473; --line: #d9dee6; --band: #f4f6f9; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 16px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.9rem; margin: 0 0 4px; }
h2 { font-size: 1.35rem; margin: 40px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.1rem; margin: 24px 0 8px; }
.meta { color: var(--muted); margin: 0 0 16px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 12px 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: var(--band); border-bottom: 2px solid var(--line); }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num, th.num { text-align: right; }
td.ci { color: var(--muted); text-align: right; white-space: nowrap; }
td.na { color: var(--muted); font-style: italic; text-align: right; }
.group { border-left: 2px solid var(--line); }
.note { background: #fff8e1; border-left: 4px solid #e0a800; padding: 10px 14px; margin: 12px 0; }
.warning { background: #fdecea; border-left: 6px solid #c62828; padding: 10px 14px; margin: 12px 0; font-size: 1.05em; }
.note ul { margin: 0; padding-left: 20px; }
.errgrid { display: flex; flex-wrap: wrap; gap: 10px; }
figure.err { width: 240px; margin: 0; font-size: 0.85em; }
figure.err img { width: 240px; }
tr.chosen td { font-weight: bold; background: #eef5ff; }
.small { font-size: 0.88rem; color: var(--muted); }
figure { margin: 20px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); display: block; }
figcaption { margin-top: 6px; color: var(--muted); font-size: 0.95rem; }
.missing { color: #a32020; }
.cms { display: flex; gap: 40px; flex-wrap: wrap; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 0.9em; word-break: break-all; }
details summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 48px; color: var(--muted); font-size: 0.85rem; }
"""

# Nothing may be fetched: only inline styles and data: images.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ----------------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if _finite(v):
        return f"{v:.{digits}f}"
    return "n/a"


def _ci_of(entry: Mapping[str, Any]) -> Sequence[Any] | None:
    for k, v in entry.items():
        if k.startswith("ci") and isinstance(v, (list, tuple)):
            return v
    return None


_NA_CELL = '<td class="na" title="undefined on this data">n/a</td>'


def _value_and_interval(entry: Any) -> tuple[Any, str]:
    """A metric entry (a number, or ``{"value", "ci95"}``) -> its value and its interval as
    ``lo&ndash;hi`` ("" unless both ends are finite)."""
    if not isinstance(entry, Mapping):
        entry = {"value": entry}
    v, ci = entry.get("value"), _ci_of(entry)
    interval = f"{_fmt(ci[0])}&ndash;{_fmt(ci[1])}" if ci and all(_finite(c) for c in ci) else ""
    return v, interval


def _value_cells(entry: Any) -> str:
    """Two cells: the value and its interval ("n/a" where undefined)."""
    v, interval = _value_and_interval(entry)
    if not _finite(v):
        return _NA_CELL + '<td class="ci"></td>'
    return f'<td class="num">{_fmt(v)}</td><td class="ci">{interval}</td>'


def _value_ci_inline(entry: Any) -> str:
    """One cell: value with its interval underneath."""
    v, interval = _value_and_interval(entry)
    if not _finite(v):
        return _NA_CELL
    below = f'<br><span class="small">{interval}</span>' if interval else ""
    return f'<td class="num">{_fmt(v)}{below}</td>'


def _ci_label(metrics: Mapping[str, Any]) -> str:
    boot = metrics.get("bootstrap") or {}
    alpha = boot.get("alpha", 0.05)
    level = f"{100 * (1 - alpha):g}%" if _finite(alpha) else "95%"
    return f"{level} CI"


def _facts(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v is not None and v != "")
    return f'<dl class="facts">{rows}</dl>' if rows else ""


def _confusion_table(cm: Sequence[Sequence[Any]], class_names: Sequence[str], caption: str) -> str:
    head = "".join(f'<th class="num">{_e(c)}</th>' for c in class_names)
    body = "".join(
        f"<tr><th>{_e(class_names[i] if i < len(class_names) else i)}</th>"
        + "".join(f'<td class="num">{_fmt(int(v))}</td>' for v in row) + "</tr>"
        for i, row in enumerate(cm)
    )
    return (f"<div><h3>{_e(caption)}</h3><table><thead><tr><th>true \\ predicted</th>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
def _header(title: str, metrics: Mapping[str, Any]) -> str:
    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    names = metrics.get("class_names") or []
    boot = metrics.get("bootstrap") or {}
    threshold = metrics.get("threshold")
    facts = [
        ("Classes", ", ".join(str(c) for c in names)),
        ("Positive class", metrics.get("positive_class")),
        ("Decision threshold", f"P({metrics.get('positive_class')}) \u2265 {threshold:.4g}" if _finite(threshold)
         else ("argmax" if metrics.get("task") == "multiclass" else None)),
        ("Test images", _fmt(metrics["n_images"]) if "n_images" in metrics else None),
        ("Test patients", _fmt(metrics["n_patients"]) if "n_patients" in metrics else None),
        ("Prevalence", _fmt(metrics.get("prevalence")) if _finite(metrics.get("prevalence")) else None),
    ]
    if boot.get("n_boot"):
        facts.append(("Confidence intervals",
                      f"{_ci_label(metrics)}, percentile bootstrap over {boot['n_boot']} resamples of "
                      f"{boot.get('unit', 'image')}s (seed {boot.get('seed')})"))
    return f'<header><h1>{_e(title)}</h1><p class="meta">Generated {_e(when)}</p>{_facts(facts)}</header>'


def _data_section(summary: Mapping[str, Any], class_names: Sequence[str]) -> str:
    parts = ["<h2>Data</h2>"]
    extra = [(k.replace("_", " ").capitalize(), v) for k, v in summary.items()
             if k not in ("splits", "skipped") and not isinstance(v, (Mapping, list, tuple))]
    parts.append(_facts(extra))
    splits = summary.get("splits") or {}
    if splits:
        classes = list(class_names)
        for s in splits.values():
            for c in (s.get("per_class") or {}):
                if c not in classes:
                    classes.append(c)
        has_patients = any(s.get("patients") is not None for s in splits.values())
        head = ('<th>split</th><th class="num">images</th>' + ('<th class="num">patients</th>' if has_patients else "")
                + "".join(f'<th class="num">{_e(c)}</th>' for c in classes))
        rows = []
        for name, s in splits.items():
            per = s.get("per_class") or {}
            images = s.get("images", sum(per.values()) if per else None)
            cells = [f"<th>{_e(name)}</th>", f'<td class="num">{_fmt(images) if images is not None else "n/a"}</td>']
            if has_patients:
                p = s.get("patients")
                cells.append(f'<td class="num">{_fmt(p) if p is not None else "n/a"}</td>')
            for c in classes:
                n = per.get(c)
                share = f' <span class="small">({100 * n / images:.1f}%)</span>' if n is not None and images else ""
                cells.append(f'<td class="num">{_fmt(n) if n is not None else "0"}{share}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    sharp = summary.get("sharpness") or {}
    medians = sharp.get("median") or {}
    if len(medians) >= 2:
        ratio = max(medians.values()) / max(min(medians.values()), 1e-12)
        listing = ", ".join(f"{k} {v:.2e}" for k, v in medians.items())
        matched = ", ".join(sharp.get("match_sigma") or {})
        action = (f"Training blurred {matched} to match (sharpness_match {sharp.get('match_p')})." if matched
                  else "Not matched in training (sharpness_match 0).")
        text = (f"Sharpness of the training images (variance of the Laplacian at {sharp.get('img_size')} px, "
                f"median): {listing}; the sharpest class is {ratio:.2f}x the bluntest. A model trained from "
                f"scratch can learn such an acquisition cue. {action}")
        parts.append(f'<p class="small">{_e(text)}</p>')
    skipped = list(summary.get("skipped") or [])
    if skipped:
        shown = skipped[:500]
        rows = []
        for item in shown:
            if isinstance(item, Mapping):
                path, reason = item.get("path"), item.get("reason")
            else:
                path, reason = (list(item) + [""])[:2]
            rows.append(f'<tr><td class="mono">{_e(path)}</td><td>{_e(reason)}</td></tr>')
        hidden = len(skipped) - len(shown)
        more = f'<p class="small">&hellip; and {hidden:,} more.</p>' if hidden else ""
        parts.append(
            f"<details><summary>{len(skipped):,} file(s) skipped while loading (click to list)</summary>"
            f"<table><thead><tr><th>file</th><th>reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"{more}</details>"
        )
    else:
        parts.append('<p class="small">No files were skipped while loading.</p>')
    return "".join(parts)


def _binary_metrics_section(metrics: Mapping[str, Any]) -> str:
    at_t = metrics.get("at_threshold") or {k: metrics[k] for k in BINARY_ROWS if k in metrics}
    at_half = metrics.get("at_0.5") or {}
    t = metrics.get("threshold")
    ci = _e(_ci_label(metrics))
    t_text = f"threshold {t:.4g} (chosen)" if _finite(t) else "chosen threshold"
    head = (f'<tr><th rowspan="2">metric</th><th colspan="2" class="group">at {_e(t_text)}</th>'
            f'<th colspan="2" class="group">at threshold 0.5</th></tr>'
            f'<tr><th class="num group">value</th><th class="num">{ci}</th>'
            f'<th class="num group">value</th><th class="num">{ci}</th></tr>')
    rows = []
    for k in BINARY_ROWS:
        if k not in at_t and k not in at_half:
            continue
        label = METRIC_LABELS.get(k, k) + (" *" if k in THRESHOLD_FREE else "")
        half = _value_cells(at_half[k]) if k in at_half else '<td class="na">n/a</td><td class="ci"></td>'
        rows.append(f"<tr><th>{_e(label)}</th>{_value_cells(at_t.get(k))}{half}</tr>")
    for k, entry in at_t.items():  # metrics this page does not know yet
        if k not in BINARY_ROWS and k != "confusion_matrix" and isinstance(entry, Mapping):
            half = _value_cells(at_half[k]) if k in at_half else '<td class="na">n/a</td><td class="ci"></td>'
            rows.append(f"<tr><th>{_e(k)}</th>{_value_cells(entry)}{half}</tr>")
    out = [
        "<h2>Metrics</h2>",
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>",
        '<p class="small">* threshold-independent: the same in both columns. n/a: undefined on this data '
        "(e.g. AUC with one class). Sensitivity and precision refer to the positive class "
        f"{_e(metrics.get('positive_class', ''))}.</p>",
    ]
    names = metrics.get("class_names") or ["negative", "positive"]
    cms = []
    if at_t.get("confusion_matrix"):
        cms.append(_confusion_table(at_t["confusion_matrix"], names, f"Confusion matrix at {t_text}"))
    if at_half.get("confusion_matrix"):
        cms.append(_confusion_table(at_half["confusion_matrix"], names, "Confusion matrix at threshold 0.5"))
    if cms:
        out.append(f'<div class="cms">{"".join(cms)}</div>')
    return "".join(out)


def _multiclass_metrics_section(metrics: Mapping[str, Any]) -> str:
    ci = _e(_ci_label(metrics))
    overall = "".join(
        f"<tr><th>{_e(METRIC_LABELS[k])}</th>{_value_cells(metrics[k])}</tr>"
        for k in ("accuracy", "balanced_accuracy") if k in metrics
    )
    out = ["<h2>Metrics</h2>",
           f'<table><thead><tr><th>metric</th><th class="num">value</th><th class="num">{ci}</th></tr></thead>'
           f"<tbody>{overall}</tbody></table>"]
    head = "<th>class (one vs rest)</th>" + "".join(f'<th class="num">{_e(METRIC_LABELS[m])}</th>'
                                                    for m in MULTICLASS_COLUMNS)
    rows = []
    for name, entry in (metrics.get("per_class") or {}).items():
        rows.append(f"<tr><th>{_e(name)}</th>" + "".join(_value_ci_inline(entry.get(m)) for m in MULTICLASS_COLUMNS)
                    + "</tr>")
    if metrics.get("macro"):
        rows.append("<tr><th>macro average</th>"
                    + "".join(_value_ci_inline(metrics["macro"].get(m)) for m in MULTICLASS_COLUMNS) + "</tr>")
    out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    out.append(f'<p class="small">Each cell: value, and its {ci} underneath. Decision: the class with the '
               "highest probability. n/a: undefined on this data.</p>")
    if metrics.get("confusion_matrix"):
        out.append(_confusion_table(metrics["confusion_matrix"], metrics.get("class_names") or [],
                                    "Confusion matrix"))
    return "".join(out)


def _img_tag(path: Path, alt: str) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"cannot embed {path}: unknown image type {path.suffix!r}")
    if not path.is_file():
        log.warning("report: plot %s not found, leaving a placeholder", path)
        return f'<p class="missing">Image not found: <span class="mono">{_e(path)}</span></p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{mime};base64,{data}" alt="{_e(alt)}">'


def _figures_section(plots: Mapping[str, Any]) -> str:
    if not plots:
        return ""
    out = ["<h2>Figures</h2>"]
    for key, value in plots.items():
        paths = [value] if isinstance(value, (str, Path)) else list(value)
        caption = PLOT_CAPTIONS.get(key, str(key).replace("_", " ").capitalize() + ".")
        for i, p in enumerate(paths):
            p = Path(p)
            sub = f" ({i + 1} of {len(paths)}: {p.stem})" if len(paths) > 1 else ""
            out.append(f"<figure>{_img_tag(p, f'{key}{sub}')}<figcaption><strong>{_e(key)}</strong>{_e(sub)}: "
                       f"{_e(caption)}</figcaption></figure>")
    return "".join(out)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def _config_value(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)) or v is None or isinstance(v, bool):
        try:
            return json.dumps(v, default=str)
        except (TypeError, ValueError):
            return str(v)
    return str(v)


def _config_section(config: Mapping[str, Any]) -> str:
    rows = "".join(f'<tr><th class="mono">{_e(k)}</th><td class="mono">{_e(_config_value(v))}</td></tr>'
                   for k, v in _flatten(config))
    return ("<h2>Configuration</h2><p class=\"small\">The resolved configuration of this run.</p>"
            f"<table><thead><tr><th>key</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _threshold_table_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """Sensitivity, specificity, PPV and NPV at several thresholds; the chosen one in bold."""
    body = "".join(
        ("<tr class=\"chosen\">" if r.get("chosen") else "<tr>")
        + f"<td>{_fmt(r['threshold'], 4)}{' (chosen)' if r.get('chosen') else ''}</td>"
        + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in ("sensitivity", "specificity", "ppv", "npv"))
        + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in ("tp", "fp", "fn", "tn")) + "</tr>"
        for r in rows)
    return ("<section><h2>Operating points</h2><p>What other thresholds would have given on these images "
            "(PPV and NPV depend on this set's prevalence).</p><table><thead><tr><th>threshold</th>"
            "<th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th><th>TP</th><th>FP</th><th>FN</th>"
            f"<th>TN</th></tr></thead><tbody>{body}</tbody></table></section>")


def _errors_section(errors: Sequence[Mapping[str, Any]]) -> str:
    """Every reviewed error with its Grad-CAM overlay (evidence for the positive class)."""
    parts = []
    for kind in ("false negative", "false positive"):
        items = [e for e in errors if e.get("kind") == kind]
        if not items:
            continue
        cells = "".join(
            f'<figure class="err">{_img_tag(Path(e["png"]), kind)}<figcaption>{_e(Path(e["path"]).name)}<br>'
            f'true {_e(e["true_label"])}, P = {_fmt(e["probability"])} (threshold {_fmt(e["threshold"], 4)})'
            "</figcaption></figure>"
            for e in items)
        parts.append(f"<h3>{_e(kind.capitalize())}s ({len(items)}, most confident first)</h3>"
                     f'<div class="errgrid">{cells}</div>')
    return ("<section><h2>Errors to review</h2><p>Each image with its Grad-CAM overlay (bright = evidence "
            "for the positive class), on the original image. Raw maps are saved as .npy beside the PNGs.</p>"
            + "".join(parts) + "</section>")


def _model_card_section(card: Mapping[str, Any]) -> str:
    val = card.get("validation") or {}
    op = val.get("operating_point") or {}
    data = card.get("training_data") or {}
    splits = "".join(f"<li>{_e(k)}: {_e(v.get('images'))} images, {_e(v.get('patients'))} patients "
                     f"({_e(', '.join(f'{c} {n}' for c, n in (v.get('per_class') or {}).items()))})</li>"
                     for k, v in (data.get("splits") or {}).items())
    limits = "".join(f"<li>{_e(x)}</li>" for x in card.get("limitations", []))
    return ("<section><h2>Model card</h2>"
            f"<p><strong>{_e(card.get('limitations', [''])[0])}</strong></p>"
            f"<p><strong>Intended use.</strong> {_e(card.get('intended_use'))}</p>"
            f"<p><strong>Training data.</strong></p><ul>{splits}</ul>"
            f"<p><strong>Validation.</strong> ROC AUC {_fmt(val.get('roc_auc'))}; at the stored threshold "
            f"{_fmt(op.get('threshold'), 4)} ({_e(op.get('threshold_rule'))}): sensitivity "
            f"{_fmt(op.get('sensitivity'))}, specificity {_fmt(op.get('specificity'))}.</p>"
            f"<ul>{limits}</ul></section>")


def _shift_suite_section(table: Mapping[str, Any]) -> str:
    """The robustness suite: AUC, sensitivity, specificity per acquisition shift, mean and worst."""
    rows = list(table.get("rows", {}).items()) + [("mean over shifts", table.get("mean", {})),
                                                   ("worst case", table.get("worst", {}))]
    body = "".join(
        f"<tr><td>{_e(k)}</td>" + "".join(f"<td>{_fmt(r.get(m))}</td>" for m in
                                           ("roc_auc", "sensitivity", "specificity", "accuracy")) + "</tr>"
        for k, r in rows)
    return ("<section><h2>Robustness suite (simulated acquisition shift)</h2>"
            f"<p>The same images re-scored under resolution loss, blur, noise, contrast curves, JPEG, crops "
            f"and borders (3 severities each) at threshold {_fmt(table.get('threshold'), 4)}. A proxy for a "
            "new scanner or period, not a substitute for data from one.</p>"
            "<table><thead><tr><th>shift</th><th>ROC AUC</th><th>sensitivity</th><th>specificity</th>"
            f"<th>accuracy</th></tr></thead><tbody>{body}</tbody></table></section>")


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    config: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    metrics: Mapping[str, Any],
    plots: Mapping[str, str | Path | Sequence[str | Path]],
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    errors: Sequence[Mapping[str, Any]] = (),
    model_card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    Sections: header (title, date, classes, threshold, test-set size, how intervals were made),
    notes, data summary, metrics with confidence intervals (binary: at the chosen threshold and at
    0.5 side by side, and both confusion matrices; multiclass: per class and macro), every plot
    with a caption, and the resolved config as a table.

    Args:
        config: the resolved config; nested dicts are flattened to ``a.b`` keys.
        data_summary: ``{"splits": {name: {"images": int, "patients": int | None,
            "per_class": {class_name: int}}}, "skipped": [[path, reason], ...]}``; ``skipped``
            entries may also be ``{"path", "reason"}`` dicts. Any other scalar entries (e.g.
            ``"source": "chest_xray (Kermany et al. 2018)"``, ``"split_method": "by patient"``) are
            listed as facts above the table. Every key is optional.
        metrics: the output of :func:`chexformer.metrics.evaluation_report` (binary or
            multiclass), as returned or re-read from ``metrics.json``.
        plots: caption key -> PNG path, or a list of paths shown one after another. Known keys
            (``history``, ``confusion_matrix``, ``roc``, ``pr``, ``reliability``, ``inputs``,
            ``feature_maps``, ``attention``, ``gradcam``, ...) get a descriptive caption; a missing
            file leaves a visible placeholder and a warning in the log.
        notes: free-text caveats shown prominently under the header.
        warnings: shown first, as a red banner (e.g. a test set largely outside the training
            population, or the synthetic demo data).
        errors: false negatives and false positives to review (``kind``, ``path``, ``true_label``,
            ``probability``, ``threshold``, ``png`` with the Grad-CAM overlay), most confident first.
        model_card: :func:`chexformer.card.model_card`'s dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = [str(c) for c in metrics.get("class_names") or []]
    if metrics.get("task") == "multiclass" or "per_class" in metrics:
        metrics_html = _multiclass_metrics_section(metrics)
    else:
        metrics_html = _binary_metrics_section(metrics)
    notes_html = ""
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        notes_html = f'<section class="note"><strong>Notes</strong><ul>{items}</ul></section>'
    warnings_html = "".join(f'<section class="warning" role="alert"><strong>Warning:</strong> {_e(w)}</section>'
                            for w in warnings)
    suite_html = _shift_suite_section(metrics.get("shift_suite")) if metrics.get("shift_suite") else ""
    table_html = _threshold_table_section(metrics["threshold_table"]) if metrics.get("threshold_table") else ""
    errors_html = _errors_section(errors) if errors else ""
    card_html = _model_card_section(model_card) if model_card else ""
    try:
        generator = f"chexformer {version('chexformer')}"
    except PackageNotFoundError:  # running from a source tree that is not installed
        generator = "chexformer"
    body = "".join([
        _header(title, metrics),
        warnings_html,
        notes_html,
        f"<section>{_data_section(data_summary or {}, class_names)}</section>",
        f"<section>{metrics_html}</section>",
        table_html,
        suite_html,
        errors_html,
        f"<section>{_figures_section(plots or {})}</section>",
        card_html,
        f"<section>{_config_section(config or {})}</section>",
        f"<footer>Generated by {_e(generator)}. Self-contained page: images are embedded, nothing is loaded "
        "from the network.</footer>",
    ])
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>{body}</main></body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f kB)", path, path.stat().st_size / 1024)
    return path
