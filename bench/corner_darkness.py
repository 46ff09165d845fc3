"""Do the classes differ in how dark their image corners are? An acquisition cue, like sharpness.

Each image of ``FOLDER/<CLASS>/`` is decoded as every command decodes it (the intensity rule, then
the resize to ``--img-size``), and the pixels at grey ``<= --level`` are counted in the two top and
the two bottom corner cells (a quarter of the side each, the heatmap cells of a 128 px model).
Per class: the share of images whose top, or bottom, corner cells are at least ``--share`` dark, and
the mean dark share. A field of view or collimation that differs between the classes shows here;
``bench/shortcut_probe.py`` asks whether the models read the corners.

    python bench/corner_darkness.py ../shared/data/kermany224/train [--every 1] [--img-size 128]
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
    a = p.parse_args()
    classes = sorted(d for d in a.folder.iterdir() if d.is_dir()) if a.folder.is_dir() else []
    if not classes:
        raise SystemExit(f"{a.folder}: no class sub-folders")
    print(f"{a.img_size} px, corner cells of {a.img_size // 4} px, dark = grey <= {a.level}; "
          f"a corner pair is dark when >= {a.share:.0%} of its pixels are")
    print(f"{'class':<12} {'images':>6} {'top dark':>9} {'top share':>10} {'bottom dark':>12} {'bottom share':>13}")
    for folder in classes:
        files = find_images(folder)[:: a.every]
        shares = np.array([dark_shares(resize_image(load_image(f), a.img_size)[0].numpy(), a.level) for f in files])
        if not len(shares):
            print(f"{folder.name:<12} {0:>6}")
            continue
        top, bottom = shares[:, 0], shares[:, 1]
        print(f"{folder.name:<12} {len(files):>6} {np.mean(top >= a.share):>9.3f} {top.mean():>10.3f} "
              f"{np.mean(bottom >= a.share):>12.3f} {bottom.mean():>13.3f}")


def dark_shares(grey: np.ndarray, level: int = 5) -> tuple[float, float]:
    """Share of pixels ``<= level`` in the two top, and in the two bottom, corner cells (a quarter of
    the side each) of a square uint8 image."""
    c = grey.shape[0] // 4
    top = np.concatenate([grey[:c, :c].ravel(), grey[:c, -c:].ravel()])
    bottom = np.concatenate([grey[-c:, :c].ravel(), grey[-c:, -c:].ravel()])
    return float((top <= level).mean()), float((bottom <= level).mean())


if __name__ == "__main__":
    main()
