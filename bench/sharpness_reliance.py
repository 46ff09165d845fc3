"""Does a trained model lean on sharpness? In the Kermany training period NORMAL images are
sharper than PNEUMONIA ones, so "sharp means normal" is a cheap cue. For each run this scores its
validation images as they are, then with every NORMAL image blurred to the PNEUMONIA median
sharpness (:class:`chexformer.shifts.SharpnessMatch` fitted on those validation images after the
intensity rule, as the datamodule measures the training images), and, as a control, with every
PNEUMONIA image blurred by the same sigma.

    python bench/sharpness_reliance.py runs/recipe_e14-s42 runs/recipe_sharp-s42 ...

Per run: the validation medians and how well sharpness alone separates the classes (ROC AUC of
"blunter = pneumonia"); the NORMAL images' mean logit shift when blurred to match and the
specificity at the stored threshold before and after; the same shift for the blurred PNEUMONIA
images. A model that ignores the cue moves normals no more than it moves pneumonias. Last, the
classes' median fine detail (:func:`fine_detail`: mean magnitude of the finest Haar diagonal
coefficients, in grey levels, after the intensity rule) with the normals as they are and blurred to
match: one blur matches the variance of the Laplacian, not every scale of detail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from chexformer.data import XrayDataset, read_split_csv
from chexformer.inference import Predictor
from chexformer.robustness import suite_table
from chexformer.shifts import SharpnessMatch, blur, sharpness, standardize_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--precision", default="bf16-mixed", help="as the run's post-training steps (default)")
    a = p.parse_args()
    print(f"{'run':<22} {'median N / P':>15} {'sharp AUC':>9} {'sigma':>5} {'N dlogit':>8} "
          f"{'spec clean->matched':>19} {'P dlogit':>8} {'AUC clean->matched':>18} {'fine N/P clean -> N matched':>27}")
    for run in a.runs:
        _one(run, a.checkpoint, a.precision)


def _one(run: Path, checkpoint: str, precision: str) -> None:
    pred = Predictor.from_checkpoint(run / "checkpoints" / f"{checkpoint}.ckpt", device="cpu", precision=precision)
    if not pred.binary or list(pred.meta.class_names) != ["NORMAL", "PNEUMONIA"]:
        raise SystemExit(f"{run}: needs a binary NORMAL/PNEUMONIA model, got {pred.meta.class_names}")
    dataset = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images = torch.stack([dataset.uint8(i) for i in range(len(dataset))])
    y = torch.tensor(dataset.labels)
    measured = torch.stack([standardize_tensor(img) for img in images])  # as the datamodule measures
    matcher, medians = SharpnessMatch.fit(measured, y)
    sigma = matcher.sigmas.get(0, 0.0)
    sharp_auc = roc_auc_score(y.numpy(), -sharpness(measured).numpy())
    normal, pneumonia = (y == 0)[:, None, None, None], (y == 1)[:, None, None, None]
    blurred = blur(images, sigma)  # the raw images, as training blurs them before the intensity rule
    clean = _logits(pred, images)
    matched = _logits(pred, torch.where(normal, blurred, images))
    control = _logits(pred, torch.where(pneumonia, blurred, images))
    table = suite_table(y.numpy(), {"clean": pred.probabilities(clean), "matched": pred.probabilities(matched)},
                        pred.threshold())["rows"]
    spec, aucs = [[table[k][m] for k in ("clean", "matched")] for m in ("specificity", "roc_auc")]
    n, p = normal.flatten().numpy(), pneumonia.flatten().numpy()
    fine = fine_detail(measured)
    fine_matched = fine_detail(torch.stack([standardize_tensor(img) for img in blurred[n]]))
    print(f"{run.name:<22} {medians[0]:.2e}/{medians[1]:.2e} {sharp_auc:9.3f} {sigma:5.2f} "
          f"{(matched - clean)[n].mean():+8.3f} {spec[0]:9.3f} -> {spec[1]:.3f} "
          f"{(control - clean)[p].mean():+8.3f} {aucs[0]:8.4f} -> {aucs[1]:.4f} "
          f"{fine[n].median():10.3f}/{fine[p].median():.3f} -> {fine_matched.median():.3f}")


def fine_detail(images: torch.Tensor) -> torch.Tensor:
    """Mean magnitude of the finest-scale Haar diagonal coefficients of each uint8 image ``(N, C, H, W)``
    (first channel, grey levels): the detail at the pixel scale, where sensor noise lives."""
    x = images[:, :1].float()
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    d = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return d.flatten(1).abs().mean(dim=1)


def _logits(pred: Predictor, images: torch.Tensor) -> np.ndarray:
    return pred.image_logits(list(images)).float().numpy()[:, 0].astype(np.float64)


if __name__ == "__main__":
    main()
