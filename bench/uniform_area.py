"""How often does the pixel check's uniform-patch rule fire on real radiographs, shifted or not?

``chexformer.guard.pixel_problems`` names an image whose largest uniform mid-grey area
(:func:`chexformer.guard.uniform_area`) covers at least ``UNIFORM_AREA_SHARE`` of it: a mask, a label
box or a pasted patch, which the feature guard misses and the models read towards pneumonia
(``bench/shortcut_probe.py``). This prints, per class of ``FOLDER/<CLASS>/`` (every ``--every``-th
image, decoded as every command decodes it, at ``--img-size``), the largest share seen and the share
of images the rule names: clean, under each of the robustness suite's 24 shifts (``--suite``), and
with the probe's patch (the image's mean grey over the two top-centre cells of a 4 x 4 grid), which
it should name every time.

    python bench/uniform_area.py ../shared/data/kermany224/train [--every 4] [--suite]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from shortcut_probe import cell_mask, edge_centres, folder_images  # bench/ is on sys.path when a script of it runs

from chexformer import shifts
from chexformer.guard import UNIFORM_AREA_SHARE, uniform_area


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder with one sub-folder per class")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--every", type=int, default=1, help="take every k-th image of each class (default: all)")
    p.add_argument("--suite", action="store_true", help="also under each of the suite's 24 shifts")
    a = p.parse_args()
    images = dict(zip(*folder_images(a.folder, a.img_size, a.every)))
    patch = cell_mask(edge_centres(4)[0], a.img_size)  # the probe's "top_centre" cells of a 4 x 4 grid
    variants: list[tuple[str, object]] = [("clean", lambda x, g: x),
                                          ("top-centre cells mean grey", lambda x, g: shifts.fill_masked(x, patch))]
    if a.suite:
        variants += [(f"{sh.name}/{sev:g}", lambda x, g, sh=sh, sev=sev: shifts.apply_shift(x, sh, sev, g))
                     for sh in shifts.SHIFT_SUITE for sev in sh.severities]
    print(f"{a.img_size} px, every {a.every}. image; named at a uniform area >= {UNIFORM_AREA_SHARE:.4f} of the image")
    print(f"{'variant':<28}" + "".join(f" {c + ' n=' + str(len(v)):>22}" for c, v in images.items()))
    print(f"{'':<28}" + " {:>22}".format("largest / named") * len(images))
    for name, op in variants:
        cells = []
        for imgs in images.values():
            g = torch.Generator().manual_seed(0)
            share = np.array([uniform_area(op(x, g)) for x in imgs])
            cells.append(f"{share.max():.4f} / {(share >= UNIFORM_AREA_SHARE).mean():.4f}")
        print(f"{name:<28}" + "".join(f" {c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
