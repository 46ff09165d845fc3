"""Where does a trained model look, and can it read the label from outside the lung fields?

The generalisation issue saw round 1's attention rollout sit on image corners and borders, where
laterality markers and collimation edges are: cues of how an image was acquired, not of the lungs.
This probe measures, per run, on its validation images (``split.csv``):

1. **Heatmap mass by region.** Attention rollout and Grad-CAM (:func:`chexformer.explain.explain_batch`,
   what ``chexformer explain`` and the viewer draw), each cell's share of the map's mass, summed over
   the two top corner cells (where laterality markers often sit; not checked on these images), the two bottom ones
   and the inner cells (the grid minus its outer ring), divided by their share of the image's area,
   per class: 1.0 is a uniform map, above 1 concentrates there. Grad-CAM maps the positive-class
   logit, so on NORMAL images it shows the little evidence for pneumonia there is.
2. **Occlusion.** The images re-scored with the outer band of each edge (``--margin``, a fraction of
   the side) hidden, and with everything inside that band hidden, both filled with the image's own
   mean grey level so that no black edge is added (``--fill black`` for the collimation-like fill).
   A model that reads the lungs keeps its ROC AUC when the band goes and loses it when only the band
   is left; a model that reads markers, edges or exposure at the periphery does the opposite. A
   hidden centre makes an image no model has seen, so a low AUC there means the model cannot use the
   periphery alone, while a high one means it can (the asymmetric reading of DeGrave et al. 2021,
   "AI for radiographic COVID-19 detection selects shortcuts over signal").
3. **Corner cells.** The two top, then the two bottom, corner cells of the heatmap grid filled
   with the image's mean grey or with black, and per class the mean change of the logit of the
   calibrated probability, with sensitivity / specificity at the stored cut. Black is what the
   training affine padded with before ``pad_fill: random``; mean grey is no padding the models have
   seen. Both go in before the intensity rule, as the padding does; the images were already
   stretched to 0..255 when decoded, so black barely re-stretches the rest of the image. Controls:
   as many cells in the middle of the top and bottom rows ("top_centre", "bottom_centre"; grids of
   3 and more), filled alike, tell a response to the corners from one to any uniform block at that
   edge; ``--levels`` fills the bottom corners with those constant grey levels too (0 is black,
   255 white), to see whether the response follows the fill's brightness.

4. **The guard** (``--guard``): for each of those images (clean, band hidden, band kept, cells filled),
   the share per class that the run's out-of-population guard (stored in ``best.ckpt``, the rule of
   predict, evaluate and serve: :func:`chexformer.guard.population_verdicts`) flags. It tells whether
   an image the model misreads because part of it is blank would reach a user flagged.

    python bench/shortcut_probe.py runs/r128full-s42 runs/r96-s42 ... [--margin 0.15] [--fill mean]
        [--levels 0 96 255] [--guard]

The centre box is not a lung mask: the kept band can hold the lungs' outer edges, so "periphery
only" bounds the shortcut from above.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from chexformer.data import (
    DatasetLayoutError,
    ImageReadError,
    XrayDataset,
    load_image,
    read_split_csv,
    resize_image,
    scan_folder,
)
from chexformer.explain import explain_batch
from chexformer.guard import population_verdicts
from chexformer.inference import Predictor
from chexformer.robustness import suite_table
from chexformer.shifts import fill_masked as occlude  # (N, C, S, S) images, a (S, S) mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--precision", default="32", help="the scoring precision (default fp32)")
    p.add_argument("--margin", type=float, default=0.15, help="width of the hidden or kept band, per edge")
    p.add_argument("--fill", choices=("mean", "black"), default="mean")
    p.add_argument("--levels", type=int, nargs="*", default=[], metavar="GREY",
                   help="also fill the bottom corner cells with these constant grey levels (0-255)")
    p.add_argument("--guard", action="store_true",
                   help="also the share of each class's images the run's guard flags, per occlusion")
    a = p.parse_args()
    if not 0 < a.margin < 0.5:
        raise SystemExit(f"--margin must lie in (0, 0.5), got {a.margin}")
    if any(not 0 <= g <= 255 for g in a.levels):
        raise SystemExit(f"--levels must lie in 0-255, got {a.levels}")
    print(f"margin {a.margin}, fill {a.fill}; heatmap mass / area share (1.0 = uniform); "
          "AUC and sensitivity / specificity at the stored cut")
    heatmaps, occlusion, corners, guarded = [], [], [], []
    for run in a.runs:
        maps, scores, corner_rows, guard_rows = _one(run, a)
        heatmaps += maps
        occlusion.append(scores)
        corners += corner_rows
        guarded += guard_rows
    print(f"\n{'run':<20} {'grid':>4} {'map':<8} {'images':<9} {'top corners':>11} {'bottom corners':>14} {'inner':>6}")
    print("\n".join(heatmaps))
    print(f"\n{'run':<20} {'clean AUC; sens/spec':>21} {'band hidden':>21} {'only band kept':>21}")
    print("\n".join(occlusion))
    print(f"\n{'run':<20} {'cells':<14} {'fill':<5} {'logit change NORMAL':>19} "
          f"{'PNEUMONIA':>9} {'sens/spec':>11}")
    print("\n".join(corners))
    if a.guard:
        print(f"\n{'run':<20} {'guard':<5} {'images':<20} {'flagged NORMAL':>14} {'PNEUMONIA':>9}  (out of population)")
        print("\n".join(guarded))


def load_run(run: Path, checkpoint: str, precision: str) -> tuple[Predictor, torch.Tensor, np.ndarray]:
    """A run's binary model (``checkpoints/<checkpoint>.ckpt`` on the CPU) with its validation images
    (``split.csv``) as uint8 (N, 3, S, S) at the model's size and their labels."""
    pred = Predictor.from_checkpoint(run / "checkpoints" / f"{checkpoint}.ckpt", device="cpu", precision=precision)
    if not pred.binary:
        raise SystemExit(f"{run}: needs a binary model, got {pred.meta.class_names}")
    dataset = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images = torch.stack([dataset.uint8(i) for i in range(len(dataset))])
    return pred, images, np.asarray(dataset.labels)


def folder_images(folder: Path, img_size: int, every: int = 1) -> tuple[list[str], list[list[torch.Tensor]]]:
    """The class names of ``folder`` (``FOLDER/<CLASS>/``, found by the project's scan,
    :func:`chexformer.data.scan_folder`, nothing decoded there) and, per class, every ``every``-th image
    decoded as every command decodes it, at ``img_size`` (uint8 (3, S, S)). A bad layout or an
    unreadable file ends the script with its reason."""
    try:
        scan = scan_folder(folder, verify=False, hash_groups=False)
        paths = [[s.path for s in scan.samples if s.label == c][::every] for c in range(len(scan.class_names))]
        return scan.class_names, [[resize_image(load_image(p), img_size) for p in ps] for ps in paths]
    except (DatasetLayoutError, ImageReadError) as e:
        raise SystemExit(f"{folder}: {e}") from None


def _one(run: Path, a: argparse.Namespace) -> tuple[list[str], str, list[str], list[str]]:
    pred, images, y = load_run(run, a.checkpoint, a.precision)

    rollout, gradcam = [], []
    for chunk in images.split(64):
        out = explain_batch(pred.model, pred.to_input(chunk).to(pred.device), pred.meta)
        rollout.append(out["rollout"].cpu())
        gradcam.append(out["gradcam"].cpu())
    maps = {"rollout": torch.cat(rollout), "Grad-CAM": torch.cat(gradcam)}
    grid = maps["Grad-CAM"].shape[-1]
    regions = region_masks(grid)
    heatmap_rows = []
    for name, m in maps.items():
        for label, keep in (("NORMAL", y == 0), ("PNEUMONIA", y == 1)):
            ratios = [mass_ratio(m[torch.from_numpy(keep)], r) for r in regions]
            heatmap_rows.append(f"{run.name:<20} {grid:>4} {name:<8} {label:<9} {ratios[0]:>11.2f} "
                                f"{ratios[1]:>14.2f} {ratios[2]:>6.2f}")

    guard_rows = []
    if a.guard and pred.guard is None:
        guard_rows.append(f"{run.name:<20} guard (none in the checkpoint)")

    def guard_row(name: str, x: torch.Tensor) -> None:  # scored where each variant is made, none kept
        if a.guard and pred.guard is not None:
            flagged = flagged_share(pred, x, y)
            guard_rows.append(f"{run.name:<20} guard {name:<20} {flagged[0]:>8.3f} {flagged[1]:>9.3f}")

    centre = band_mask(pred.img_size, a.margin)  # True inside the band's inner edge
    probs = {}
    for name, x in (("clean", images), ("band hidden", occlude(images, ~centre, a.fill)),
                    ("only band kept", occlude(images, centre, a.fill))):
        probs[name] = pred.predict_images(list(x))
        guard_row(name, x)
    rows = suite_table(y, probs, pred.threshold())["rows"]
    scores = " ".join(f"{r['roc_auc']:.3f}; {r['sensitivity']:.3f}/{r['specificity']:.3f}".rjust(21)
                      for r in rows.values())

    corner_rows = []
    _, clean_logit = calibrated(pred, images)
    top_centre, bottom_centre = edge_centres(grid)
    blocks = [("top", regions[0], ("mean", "black")), ("bottom", regions[1], ("mean", "black", *a.levels)),
              ("top_centre", top_centre, ("mean", "black")), ("bottom_centre", bottom_centre, ("mean", "black"))]
    for name, cells, fills in blocks:
        if not cells.any():
            continue
        hide = cell_mask(cells, pred.img_size)
        for fill in fills:
            filled = occlude(images, hide, fill)
            p, z = calibrated(pred, filled)
            guard_row(f"{name} {fill}", filled)
            delta = z - clean_logit
            r = suite_table(y, {"corners": p}, pred.threshold())["rows"]["corners"]
            corner_rows.append(f"{run.name:<20} {name:<14} {fill:<5} {delta[y == 0].mean():>+19.2f} "
                               f"{delta[y == 1].mean():>+9.2f} {r['sensitivity']:.3f}/{r['specificity']:.3f}")
    return heatmap_rows, f"{run.name:<20} {scores}", corner_rows, guard_rows


def flagged_share(pred: Predictor, images: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
    """Per class (0, 1), the share of ``images`` the run's guard calls out of population, by the rule
    predict, evaluate and serve apply (:func:`chexformer.guard.population_verdicts`)."""
    out = list(images)
    verdicts, _ = population_verdicts(out, pred.guard, pred.ood_scores(out))
    flagged = np.array([v is False for v in verdicts])
    return tuple(float(flagged[y == c].mean()) if (y == c).any() else float("nan") for c in (0, 1))


def calibrated(pred: Predictor, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each image's calibrated probability and its calibrated logit (:meth:`Predictor.calibrated_logits`)."""
    raw = pred.image_logits(list(images))
    return pred.probabilities(raw), pred.calibrated_logits(raw)


def cell_mask(cells: torch.Tensor, size: int) -> torch.Tensor:
    """A (grid, grid) boolean mask of heatmap cells as a (size, size) pixel mask (nearest neighbour:
    cell i covers pixels floor(i * size / grid) up to floor((i + 1) * size / grid))."""
    return torch.nn.functional.interpolate(cells[None, None].float(), size=(size, size), mode="nearest")[0, 0].bool()


def region_masks(grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean (grid, grid) masks of the two top corner cells, the two bottom corner cells and the
    inner cells (the grid without its outer ring; empty for a grid under 3)."""
    top = torch.zeros(grid, grid, dtype=torch.bool)
    top[0, 0] = top[0, grid - 1] = True
    bottom = torch.zeros(grid, grid, dtype=torch.bool)
    bottom[grid - 1, 0] = bottom[grid - 1, grid - 1] = True
    inner = torch.zeros(grid, grid, dtype=torch.bool)
    inner[1:grid - 1, 1:grid - 1] = True
    return top, bottom, inner


def edge_centres(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (grid, grid) masks of two cells in the middle of the top row and two in the middle of
    the bottom row (one each for a grid of 3; empty for a grid under 3): as many cells as the corner
    pairs where the grid allows, at the same edge, away from the corners."""
    top = torch.zeros(grid, grid, dtype=torch.bool)
    if grid >= 3:
        middle = [grid // 2] if grid % 2 else [grid // 2 - 1, grid // 2]
        top[0, middle] = True
    return top, top.flip(0)


def mass_ratio(maps: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over images of (the maps' mass inside ``mask``) / (``mask``'s area share); images whose
    map has no positive mass are left out; NaN for an empty mask. ``maps`` is (N, h, w), ``mask`` (h, w)."""
    if not mask.any():
        return float("nan")
    m = maps.clamp_min(0).flatten(1)
    total = m.sum(1)
    keep = total > 0
    share = m[:, mask.flatten()].sum(1)[keep] / total[keep]
    return float(share.mean() / mask.float().mean())


def band_mask(size: int, margin: float) -> torch.Tensor:
    """(size, size) boolean, True inside a band of ``round(margin * size)`` pixels along each edge."""
    b = max(1, round(margin * size))
    centre = torch.zeros(size, size, dtype=torch.bool)
    centre[b:size - b, b:size - b] = True
    return centre


if __name__ == "__main__":
    main()
