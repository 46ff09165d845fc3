"""Why does a flat patch read as pneumonia? Which property of the patch moves the model.

``bench/shortcut_probe.py`` found that two heatmap cells filled with the image's mean grey move the
recipe's NORMAL images towards pneumonia by 2-3 logits. A flat fill changes several things at once:
the region's brightness (the image's mean, not the region's own), its texture (none left) and its
anatomy (gone). This probe fills the same cells of each validation image (``split.csv``) in ways
that change one of them at a time, and reports per class the mean change of the calibrated logit
and the sensitivity / specificity at the stored cut:

- ``image mean``: the image's mean grey, flat (what shortcut_probe fills);
- ``own mean``: the region's own mean grey, flat (brightness kept, texture and anatomy gone);
- ``blurred S``: the region's pixels Gaussian-blurred with sigma S (``--sigma``, one or more, pixels
  of a 224 px image): brightness and the shapes coarser than S kept, finer detail gone;
- ``noise``: the region's own mean plus white Gaussian noise of the region's own standard deviation
  (brightness and texture energy kept, anatomy gone);
- ``swapped``: the same cells of another image of the same class (anatomy-like texture of another
  patient; a control for "any change of content").

A model that reads a flat patch as pneumonia because it lacks fine detail moves normals for
``own mean`` and ``blurred`` at small S and not for ``noise``; one that reads a brightness mismatch moves them
for ``image mean`` and not for ``own mean``.

With ``--folder FOLDER`` it also measures, on the images of ``FOLDER/<CLASS>/`` (every ``--every``-th,
decoded as every command decodes them, at ``--img-size``, after the intensity rule), the structure each
blur takes away from the same cells: the mean absolute difference between the image and its blur,
per class the median and its ROC AUC as a score of "less structure = the second class". A cue
the training images carry is one a model can learn.

    python bench/patch_cue.py runs/kermany runs/kermany_s4 [--cells top_centre bottom_centre inner]
        [--sigma 4 12 32] [--folder ../shared/data/kermany224/train --every 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from shortcut_probe import (  # bench/ is on sys.path when a script of it runs
    calibrated,
    cell_mask,
    edge_centres,
    folder_images,
    load_run,
)
from sklearn.metrics import roc_auc_score

from chexformer.robustness import suite_table
from chexformer.shifts import blur, fill_masked, standardize_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="*")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--precision", default="32", help="the scoring precision (default fp32)")
    p.add_argument("--cells", nargs="+", default=["top_centre", "bottom_centre", "inner"],
                   choices=("top_centre", "bottom_centre", "inner"))
    p.add_argument("--sigma", type=float, nargs="+", default=[4.0],
                   help="blur(s) of the 'blurred' fill, pixels at 224 px")
    p.add_argument("--seed", type=int, default=0, help="for the noise and the swap partners")
    p.add_argument("--folder", type=Path, help="also measure the structure each blur removes, per class")
    p.add_argument("--every", type=int, default=1, help="with --folder: every n-th image of each class")
    p.add_argument("--img-size", type=int, default=128, help="with --folder: the model size (128 = the recipe's)")
    a = p.parse_args()
    if not a.runs and a.folder is None:
        raise SystemExit("give at least one run folder or --folder")
    if a.folder is not None:
        structure(a.folder, a.img_size, a.every, a.cells, a.sigma)
    if not a.runs:
        return
    print(f"{'run':<20} {'cells':<14} {'fill':<12} {'logit change NORMAL':>19} {'PNEUMONIA':>9} "
          f"{'sens/spec':>11}  (clean sens/spec first)")
    for run in a.runs:
        _one(run, a)


def regions(grid: int) -> dict[str, torch.Tensor]:
    """The probe's cells on a (grid, grid) heatmap: two in the middle of the top row, two in the middle
    of the bottom row (shortcut_probe's ``edge_centres``) and the same two columns in the middle row."""
    top, bottom = edge_centres(grid)
    inner = top.roll(grid // 2, dims=0)
    return {"top_centre": top, "bottom_centre": bottom, "inner": inner}


def structure(folder: Path, img_size: int, every: int, cells: list[str], sigmas: list[float]) -> None:
    """Per cell group and blur, the classes' median structure removed (grey levels) and its ROC AUC."""
    classes, images = folder_images(folder, img_size, every)
    if len(classes) != 2:
        raise SystemExit(f"--folder needs two class folders, found {classes}")
    grid = img_size // 32
    masks = {name: cell_mask(regions(grid)[name], img_size) for name in cells if regions(grid)[name].any()}
    removed = {(name, s): [] for name in masks for s in sigmas}
    labels = []
    for c, imgs in enumerate(images):
        for img in imgs:
            x = standardize_tensor(img)[:1].float()
            labels.append(c)
            for s in sigmas:
                detail = (x - blur(x, s)).abs()[0]
                for name, m in masks.items():
                    removed[name, s].append(float(detail[m].mean()))
    y = np.array(labels)
    print(f"{folder}: {(y == 0).sum()} {classes[0]}, {(y == 1).sum()} {classes[1]} at {img_size} px; "
          "structure a blur removes (mean |image - blur|, grey levels), median per class; "
          f"AUC of less = {classes[1]}")
    for (name, s), v in removed.items():
        v = np.array(v)
        print(f"  {name:<14} sigma {s:>4g}: {np.median(v[y == 0]):6.2f} / {np.median(v[y == 1]):6.2f}  "
              f"AUC {roc_auc_score(y, -v):.3f}")


def fills(images: torch.Tensor, hide: torch.Tensor, y: np.ndarray, sigmas: list[float],
          generator: torch.Generator) -> dict[str, torch.Tensor]:
    """uint8 (N, C, S, S) images with the pixels where ``hide`` is True replaced, one tensor per fill."""
    x = images.float()
    area = hide.float()
    n = area.sum()
    own_mean = (x * area).sum(dim=(-3, -2, -1), keepdim=True) / (n * x.shape[-3])
    own_std = (((x - own_mean) * area) ** 2).sum(dim=(-3, -2, -1), keepdim=True).div(n * x.shape[-3]).sqrt()
    white = torch.randn(len(x), 1, *x.shape[-2:], generator=generator)  # one grey noise per image
    partner = torch.arange(len(x))
    for c in np.unique(y):  # each image's partner: another image of its class (a random derangement)
        idx = np.flatnonzero(y == c)
        if len(idx) > 1:
            shift = torch.randint(1, len(idx), (1,), generator=generator).item()
            partner[idx] = torch.from_numpy(np.roll(idx, shift))
    made = {"image mean": fill_masked(images, hide, "mean"),
            "own mean": own_mean.round(),
            **{f"blurred {s:g}": blur(x, s) for s in sigmas},
            "noise": own_mean + own_std * white,
            "swapped": x[partner]}
    return {k: torch.where(hide, v.round().clamp(0, 255).to(images.dtype), images) for k, v in made.items()}


def _one(run: Path, a: argparse.Namespace) -> None:
    pred, images, y = load_run(run, a.checkpoint, a.precision)
    cut = pred.threshold()
    p0, z0 = calibrated(pred, images)
    r0 = suite_table(y, {"as is": p0}, cut)["rows"]["as is"]
    print(f"{run.name:<20} {'none':<14} {'clean':<12} {0:>+19.2f} {0:>+9.2f} "
          f"{r0['sensitivity']:.3f}/{r0['specificity']:.3f}")
    grid = pred.img_size // 32
    for name in a.cells:
        if not regions(grid)[name].any():
            print(f"{run.name:<20} {name:<14} (none on a {grid} x {grid} grid: the model's images are too small)")
            continue
        hide = cell_mask(regions(grid)[name], pred.img_size)
        generator = torch.Generator().manual_seed(a.seed)
        for fill, x in fills(images, hide, y, a.sigma, generator).items():
            p, z = calibrated(pred, x)
            delta = z - z0
            r = suite_table(y, {fill: p}, cut)["rows"][fill]
            print(f"{run.name:<20} {name:<14} {fill:<12} {delta[y == 0].mean():>+19.2f} "
                  f"{delta[y == 1].mean():>+9.2f} {r['sensitivity']:.3f}/{r['specificity']:.3f}", flush=True)


if __name__ == "__main__":
    main()
