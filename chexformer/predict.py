"""Prediction on new images: files or folders in, one CSV row per image out.

Every file goes through the one inference path (:class:`chexformer.inference.Predictor`): the
intensity rule for any format, the training resize and normalisation, calibrated probabilities
and the threshold stored in the checkpoint. Decoding of the next batch overlaps the model's work
on this one. An unreadable file gets a row with its error; the rest are still predicted.

The CSV schema (shared with ``evaluate``'s ``predictions.csv`` and ``explain.csv``):
``path, prob_<class> for every class, predicted_label, threshold, error`` (+ the guard's
``ood_score, in_distribution`` when the checkpoint has a guard).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from chexformer.data import find_images
from chexformer.inference import Prediction, Predictor
from chexformer.runtime import check_output_file

log = logging.getLogger(__name__)

__all__ = ["collect_images", "predict_paths", "prediction_columns", "prediction_row"]


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively: image and DICOM files, as the data scan finds them) and keep
    files as given, in order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)
            if not found:
                log.warning("no images found in folder %s", p)
            out += found
        else:
            out.append(p)  # named explicitly: tried whatever its extension, errors become rows
    return out


def prediction_columns(class_names: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The shared CSV columns: path, prob_<class>..., predicted_label, threshold, *extra, error."""
    return ["path", *[f"prob_{c}" for c in class_names], "predicted_label", "threshold", *extra, "error"]


def prediction_row(p: Prediction, class_names: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": p.path, "error": p.error or ""}
    if p.error is None:
        row.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(class_names, p.probabilities)})
        row["predicted_label"] = p.label
        row["threshold"] = "" if p.threshold is None else f"{p.threshold:.6f}"
    for k, v in p.extra.items():
        row[k] = f"{v:.6f}" if isinstance(v, float) else v
    return row


def predict_paths(checkpoint: str | Path, paths: Sequence[str | Path], output: str | Path | None = None, *,
                  batch_size: int = 32, tta: bool = False, device: str = "auto", precision: str = "32",
                  backend: str = "eager", progress: bool = True) -> list[Prediction]:
    """Predict every image under ``paths``; write ``output`` (CSV) if given; return the predictions."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision, backend=backend,
                                          batch_size=batch_size)
    files = collect_images(paths)
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    if output is not None:
        output = check_output_file(output, protect=[checkpoint, *files])
    results = predictor.predict_files(files, batch_size=batch_size, tta=tta, progress=progress)
    if output is not None:
        write_predictions(Path(output), results, predictor.meta.class_names)
    flagged = [r for r in results if r.extra.get("warning")]
    if flagged:
        log.warning("%d of %d images fail the pixel check (blank, a drawing, a large uniform patch); their labels are "
                    "not to be trusted (column 'warning'):\n%s",
                    len(flagged), len(results), "\n".join(f"  {r.path}: {r.extra['warning']}" for r in flagged[:50]))
    failed = [r for r in results if r.error]
    if failed:
        log.warning("%d of %d files could not be read:\n%s", len(failed), len(results),
                    "\n".join(f"  {r.path}: {r.error}" for r in failed[:50]))
    return results


def write_predictions(path: Path, results: Sequence[Prediction], class_names: Sequence[str]) -> None:
    extra = list(dict.fromkeys(k for r in results for k in r.extra))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=prediction_columns(class_names, extra))
        writer.writeheader()
        writer.writerows(prediction_row(r, class_names) for r in results)
