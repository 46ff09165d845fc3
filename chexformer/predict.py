"""Prediction on new images: files or folders in, one CSV row per image out.

Every image is read with :func:`chexformer.data.load_image` (PNG, JPEG, 16-bit PNG, DICOM, ...),
resized and normalised exactly as in training, and scored in batches. An unreadable file gets a
row with its error; the rest are still predicted. Probabilities are calibrated with the
temperature fitted on validation, and labels use the validation-chosen threshold stored in
the checkpoint.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from chexformer.checkpoint import CheckpointMeta, load_checkpoint
from chexformer.runtime import autocast_dtype, default_device, resolve_precision

log = logging.getLogger(__name__)

__all__ = ["collect_images", "predict_paths", "predict_tensors", "tta_views"]


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders (recursively: image and DICOM files, as the data scan finds them) and keep
    files as given, in order."""
    from chexformer.data import find_images

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


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation views of a normalised batch: the image, small shifts and a zoom.

    No flips: a mirrored chest X-ray is anatomically wrong (the heart lies on the left)."""
    import torchvision.transforms.v2.functional as TF

    size = x.shape[-1]
    shift = max(1, round(0.04 * size))
    views = [x]
    for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)):
        views.append(TF.affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0]))
    views.append(TF.affine(x, angle=0.0, translate=[0, 0], scale=1.06, shear=[0.0, 0.0]))
    return views


@torch.no_grad()
def predict_tensors(model: torch.nn.Module, meta: CheckpointMeta, x: torch.Tensor, *, tta: bool = False,
                    precision: str = "32", channels_last: bool = True) -> torch.Tensor:
    """Calibrated probabilities for a normalised batch: (B,) P(positive) or (B, C)."""
    dtype = autocast_dtype(precision)
    device = next(model.parameters()).device
    probs = []
    for view in (tta_views(x) if tta else [x]):
        view = view.to(device)
        if channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(view).float() / meta.temperature
        probs.append(torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1))
    return torch.stack(probs).mean(0).cpu()


def predict_paths(checkpoint: str | Path, paths: Sequence[str | Path], output: str | Path | None = None, *,
                  batch_size: int = 16, tta: bool = False, precision: str | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Predict every image under ``paths``; write ``output`` (CSV) if given; return the rows."""
    from chexformer.data import ImageReadError, build_transforms, load_image, resize_image

    model, meta = load_checkpoint(checkpoint)
    cfg = meta.config
    device = default_device(cfg.accelerator)
    precision = resolve_precision(precision or cfg.precision, cfg.accelerator)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    transform = build_transforms(cfg, train=False, mean=meta.mean, std=meta.std)
    files = collect_images(paths)
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    binary = meta.num_classes == 2
    rows: list[dict[str, Any]] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t in batch])
        probs = predict_tensors(model, meta, x, tta=tta, precision=precision, channels_last=cfg.channels_last)
        for (i, _), p in zip(batch, probs):
            rows[i].update(_label(p, meta, binary))
        batch.clear()

    for path in tqdm(files, desc="predict", unit="img", disable=not progress):
        row: dict[str, Any] = {"path": str(path)}
        rows.append(row)
        try:
            img = load_image(path, size_hint=cfg.img_size)
        except ImageReadError as exc:
            row["error"] = exc.reason if hasattr(exc, "reason") else str(exc)
            continue
        batch.append((len(rows) - 1, transform(resize_image(img, cfg.img_size, cfg.keep_aspect))))
        if len(batch) == batch_size:
            flush()
    flush()
    if output is not None:
        _write_csv(Path(output), rows, meta, binary)
    failed = [r for r in rows if r.get("error")]
    if failed:
        log.warning("%d of %d files could not be read:\n%s", len(failed), len(rows),
                    "\n".join(f"  {r['path']}: {r['error']}" for r in failed[:50]))
    return rows


def _label(p: torch.Tensor, meta: CheckpointMeta, binary: bool) -> dict[str, Any]:
    if binary:
        prob = float(p)
        pred = int(prob >= meta.threshold)
        return {"probability": prob, "predicted_label": meta.class_names[pred], "threshold": meta.threshold}
    pred = int(p.argmax())
    return {**{f"prob_{c}": float(v) for c, v in zip(meta.class_names, p)}, "probability": float(p[pred]),
            "predicted_label": meta.class_names[pred]}


def _write_csv(path: Path, rows: list[dict[str, Any]], meta: CheckpointMeta, binary: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["path", "probability", "predicted_label"]
    cols += ["threshold"] if binary else [f"prob_{c}" for c in meta.class_names]
    cols += ["error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
