"""Do the classes differ in how dark their image corners are? An acquisition cue, like sharpness.

Each image of ``FOLDER/<CLASS>/`` is decoded as every command decodes it (the intensity rule, then
the resize to ``--img-size``), and the pixels at grey ``<= --level`` are counted in the two top and
the two bottom corner cells (a quarter of the side each, the heatmap cells of a 128 px model).
Per class: the share of images whose top, or bottom, corner cells are at least ``--share`` dark, and
the mean dark share. A field of view or collimation that differs between the classes shows here.
The two middle cells of the bottom row (the "bottom_centre" control of ``bench/shortcut_probe.py``,
where a black block moves normals towards pneumonia) are counted alike, with their median grey level:
they tell whether a dark bottom edge is something the training images have, and in which class.
``--by-name TOKEN...`` adds a row per class and token for the images whose file name holds it
(Kermany's PNEUMONIA files are named ``..._bacteria_...`` or ``..._virus_...``).

With ``--runs RUN...`` it then asks each trained run whether it reads that cue: on the run's
validation images (``split.csv``) whose bottom corner cells are at least ``--share`` dark, the dark
pixels there are set to the image's mean grey, and the mean change of the calibrated logit is
printed per class, with the specificity / sensitivity of those images at the stored cut before and
after. A model that reads dark corners as normal moves those normals towards pneumonia.

    python bench/corner_darkness.py ../shared/data/kermany224/train [--every 1] [--img-size 128]
        [--by-name bacteria virus] [--runs RUN...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from chexformer.data import find_images, load_image, resize_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder with one sub-folder per class")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--every", type=int, default=1, help="take every k-th image of each class (default: all)")
    p.add_argument("--level", type=int, default=5, help="grey level at or below which a pixel counts as dark")
    p.add_argument("--share", type=float, default=0.25, help="dark share that makes a corner pair dark")
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="runs to ask whether they read dark corners")
    p.add_argument("--by-name", nargs="*", default=[], metavar="TOKEN",
                   help="also a row per class for the files whose name holds each token")
    a = p.parse_args()
    classes = sorted(d for d in a.folder.iterdir() if d.is_dir()) if a.folder.is_dir() else []
    if not classes:
        raise SystemExit(f"{a.folder}: no class sub-folders")
    print(f"{a.img_size} px, corner cells of {a.img_size // 4} px, dark = grey <= {a.level}; "
          f"a corner pair is dark when >= {a.share:.0%} of its pixels are")
    print(f"{'class':<18} {'images':>6} {'top dark':>9} {'top share':>10} {'bottom dark':>12} {'bottom share':>13} "
          f"{'b-centre dark':>14} {'b-centre grey':>14}")
    for folder in classes:
        files = find_images(folder)[:: a.every]
        stats = np.array([dark_shares(g, a.level) + bottom_centre(g, a.level) for g in
                          (resize_image(load_image(f), a.img_size)[0].numpy() for f in files)]).reshape(-1, 4)
        print(class_row(folder.name, stats, a.share))
        for token in a.by_name:
            print(class_row(f"{folder.name}:{token}", stats[np.array([token in f.name for f in files], bool)], a.share))
    if a.runs:
        print("\nvalidation images with dark bottom corners, their dark corner pixels set to the image's mean "
              "grey: mean change of the calibrated logit; spec (class 0) or sens (class 1) at the stored cut, "
              "before -> after")
        for run in a.runs:
            print(reads_dark_corners(run, a.level, a.share))


def class_row(name: str, stats: np.ndarray, share: float) -> str:
    """One line of the table: ``stats`` holds per image the top and bottom corner dark shares and
    the bottom-centre dark share and mean grey."""
    if not len(stats):
        return f"{name:<18} {0:>6}"
    top, bottom, centre, grey = stats.T
    return (f"{name:<18} {len(stats):>6} {np.mean(top >= share):>9.3f} {top.mean():>10.3f} "
            f"{np.mean(bottom >= share):>12.3f} {bottom.mean():>13.3f} {np.mean(centre >= share):>14.3f} "
            f"{np.median(grey):>14.1f}")


def reads_dark_corners(run: Path, level: int, share: float) -> str:
    import torch

    from chexformer.data import XrayDataset, read_split_csv
    from chexformer.inference import Predictor

    pred = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt", device="cpu", precision="32")
    data = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images = torch.stack([data.uint8(i) for i in range(len(data))])
    y = np.asarray(data.labels)
    dark = np.array([dark_shares(img[0].numpy(), level)[1] >= share for img in images])
    picked, labels = images[torch.from_numpy(dark)], y[dark]
    before, after = (calibrated_logits(pred, x) for x in (picked, brighten_bottom_corners(picked, level)))
    cut = np.log(pred.threshold() / (1 - pred.threshold()))  # the stored cut as a calibrated logit
    parts = []
    for c, name in enumerate(pred.meta.class_names):
        m = labels == c
        if not m.any():
            parts.append(f"{name} 0")
            continue
        right_before, right_after = (np.mean((z[m] >= cut) == bool(c)) for z in (before, after))
        parts.append(f"{name} {int(m.sum())} of {int((y == c).sum())}: {np.mean(after[m] - before[m]):+.2f}; "
                     f"{right_before:.3f} -> {right_after:.3f}")
    return f"{run.name:<20} " + "   ".join(parts)


def calibrated_logits(pred, images) -> np.ndarray:
    """Each image's calibrated logit (:meth:`chexformer.inference.Predictor.calibrated_logits`)."""
    return pred.calibrated_logits(pred.image_logits(list(images)))


def brighten_bottom_corners(images, level: int = 5):
    """uint8 images (N, C, S, S) with the pixels ``<= level`` in the two bottom corner cells set to
    each image's mean grey level."""
    import torch

    from chexformer.shifts import fill_masked

    s = images.shape[-1]
    c = s // 4
    cells = torch.zeros(s, s, dtype=torch.bool)
    cells[s - c:, :c] = cells[s - c:, s - c:] = True
    return fill_masked(images, cells & (images <= level))


def dark_shares(grey: np.ndarray, level: int = 5) -> tuple[float, float]:
    """Share of pixels ``<= level`` in the two top, and in the two bottom, corner cells (a quarter of
    the side each) of a square uint8 image."""
    c = grey.shape[0] // 4
    top = np.concatenate([grey[:c, :c].ravel(), grey[:c, -c:].ravel()])
    bottom = np.concatenate([grey[-c:, :c].ravel(), grey[-c:, -c:].ravel()])
    return float((top <= level).mean()), float((bottom <= level).mean())


def bottom_centre(grey: np.ndarray, level: int = 5) -> tuple[float, float]:
    """Share of pixels ``<= level`` in the two middle cells of the bottom row (of four), and their
    mean grey, in a square uint8 image."""
    c = grey.shape[0] // 4
    cells = grey[-c:, c:grey.shape[1] - c]
    return float((cells <= level).mean()), float(cells.mean())


if __name__ == "__main__":
    main()
