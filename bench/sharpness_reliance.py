"""Does a trained model lean on sharpness? In the Kermany training period NORMAL images are
sharper than PNEUMONIA ones, so "sharp means normal" is a cheap cue. For each run this scores its
validation images as they are, then with every NORMAL image blurred to the PNEUMONIA median
sharpness (:class:`chexformer.shifts.SharpnessMatch` fitted on those validation images), and, as a
control, with every PNEUMONIA image blurred by the same sigma.

    python bench/sharpness_reliance.py runs/recipe_e14-s42 runs/recipe_sharp-s42 ...

Per run: the validation medians and how well sharpness alone separates the classes (ROC AUC of
"blunter = pneumonia"); the NORMAL images' mean logit shift when blurred to match and the
specificity at the stored threshold before and after; the same shift for the blurred PNEUMONIA
images. A model that ignores the cue moves normals no more than it moves pneumonias.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from chexformer.data import XrayDataset, read_split_csv
from chexformer.inference import Predictor
from chexformer.shifts import SharpnessMatch, blur, sharpness


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--precision", default="bf16-mixed", help="as the run's post-training steps (default)")
    a = p.parse_args()
    print(f"{'run':<22} {'median N / P':>15} {'sharp AUC':>9} {'sigma':>5} {'N dlogit':>8} "
          f"{'spec clean->matched':>19} {'P dlogit':>8} {'AUC clean->matched':>18}")
    for run in a.runs:
        _one(run, a.checkpoint, a.precision)


def _one(run: Path, checkpoint: str, precision: str) -> None:
    pred = Predictor.from_checkpoint(run / "checkpoints" / f"{checkpoint}.ckpt", device="cpu", precision=precision)
    if not pred.binary or list(pred.meta.class_names) != ["NORMAL", "PNEUMONIA"]:
        raise SystemExit(f"{run}: needs a binary NORMAL/PNEUMONIA model, got {pred.meta.class_names}")
    dataset = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images = torch.stack([dataset.uint8(i) for i in range(len(dataset))])
    y = torch.tensor(dataset.labels)
    matcher, medians = SharpnessMatch.fit(images, y)
    sigma = matcher.sigmas.get(0, 0.0)
    sharp_auc = roc_auc_score(y.numpy(), -sharpness(images).numpy())
    normal, pneumonia = (y == 0).numpy(), (y == 1).numpy()
    clean = _logits(pred, images)
    matched_imgs = images.clone()
    matched_imgs[y == 0] = blur(images[y == 0], sigma)
    matched = _logits(pred, matched_imgs)
    control = _logits(pred, torch.where((y == 1)[:, None, None, None], blur(images, sigma), images))
    cut = pred.threshold()
    prob = pred.probabilities
    p_clean, p_matched = prob(clean), prob(matched)
    spec = (p_clean[normal] < cut).mean(), (p_matched[normal] < cut).mean()
    aucs = roc_auc_score(y.numpy(), p_clean), roc_auc_score(y.numpy(), p_matched)
    print(f"{run.name:<22} {medians[0]:.2e}/{medians[1]:.2e} {sharp_auc:9.3f} {sigma:5.2f} "
          f"{(matched - clean)[normal].mean():+8.3f} {spec[0]:9.3f} -> {spec[1]:.3f} "
          f"{(control - clean)[pneumonia].mean():+8.3f} {aucs[0]:8.4f} -> {aucs[1]:.4f}")


def _logits(pred: Predictor, images: torch.Tensor) -> np.ndarray:
    return pred.image_logits(list(images)).float().numpy()[:, 0].astype(np.float64)


if __name__ == "__main__":
    main()
