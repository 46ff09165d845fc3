"""Do the post-training steps give the same answer in bf16? Scores a run's validation images clean
and under the suite's shifts (all 24, or some families) in fp32 (a default ``predict``) and with bf16
autocast (what ``finalize_best`` uses for a run trained in bf16; ``predict --precision bf16-mixed``),
in one process, and prints the time ratio and what changes; then the same for the TTA pass.

    python bench/suite_precision.py runs/recipe_e14-s42                      # all 25 copies + TTA
    python bench/suite_precision.py runs/acq_zoom-s1 --families resolution crop --no-tta

Per copy: images/s in each precision and their ratio, the largest probability difference, and how
many images change side of the run's stored threshold; then the shift-robust cut (the recipe's rule)
chosen on the scored copies in each precision. TTA (6 views of each clean image): the same columns
at the stored TTA threshold, and the TTA cut chosen in each precision.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from chexformer.data import XrayDataset, read_split_csv
from chexformer.inference import Predictor
from chexformer.robustness import robust_threshold, shifted_copies
from chexformer.runtime import cpu_supports_bf16
from chexformer.shifts import SHIFT_SUITE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--families", nargs="*", default=None, choices=[s.name for s in SHIFT_SUITE],
                   help="shift families to score (default: all, as finalize_best)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="skip the TTA pass")
    a = p.parse_args()
    ckpt = a.run / "checkpoints" / f"{a.checkpoint}.ckpt"
    predictors = {prec: Predictor.from_checkpoint(ckpt, device="cpu", precision=prec) for prec in ("32", "bf16-mixed")}
    fp32 = predictors["32"]
    dataset = XrayDataset(read_split_csv(a.run / "split.csv", "val"), fp32.img_size, fp32.cfg.keep_aspect, preload=True)
    y = np.array(dataset.labels)
    images = [dataset.uint8(i) for i in range(len(dataset))]
    copies = dict(shifted_copies(images, fp32.cfg.seed, a.families))
    cut = fp32.threshold()
    print(f"{ckpt}: {len(images)} images, stored threshold {cut:.3f}, bf16 autocast "
          f"({'native' if cpu_supports_bf16() else 'emulated: this CPU has no bf16 instructions'})")
    print(f"{'copy':<22} {'fp32 img/s':>10} {'bf16 img/s':>10} {'ratio':>6} {'max |dp|':>9} {'flips':>6}")
    probs: dict[str, dict[str, np.ndarray]] = {"32": {}, "bf16-mixed": {}}
    totals = {"32": 0.0, "bf16-mixed": 0.0}
    for key, imgs in copies.items():
        for prec, seconds in _compare(key, predictors, imgs, cut, probs).items():
            totals[prec] += seconds
    ratio = totals["32"] / totals["bf16-mixed"]
    print(f"all copies: fp32 {totals['32']:.1f} s, bf16 {totals['bf16-mixed']:.1f} s, ratio {ratio:.2f}x")
    print("shift-robust cut on these copies: fp32 {:.3f}, bf16 {:.3f}".format(
        robust_threshold(y, probs["32"]), robust_threshold(y, probs["bf16-mixed"])))
    if a.tta:
        tta: dict[str, dict[str, np.ndarray]] = {"32": {}, "bf16-mixed": {}}
        stored = fp32.threshold(tta=True)
        seconds = _compare("clean, TTA", predictors, images, stored, tta, tta=True)
        print(f"TTA: fp32 {seconds['32']:.1f} s, bf16 {seconds['bf16-mixed']:.1f} s; TTA cut (stored {stored:.3f}): "
              f"fp32 {robust_threshold(y, {'clean': tta['32']['clean, TTA']}):.3f}, "
              f"bf16 {robust_threshold(y, {'clean': tta['bf16-mixed']['clean, TTA']}):.3f}")


def _compare(key: str, predictors: dict[str, Predictor], imgs: list, cut: float,
             probs: dict[str, dict[str, np.ndarray]], tta: bool = False) -> dict[str, float]:
    """Score ``imgs`` in each precision into ``probs[prec][key]``, print one row; the seconds of each."""
    seconds = {}
    for prec, pred in predictors.items():
        start = time.perf_counter()
        if tta:  # in chunks of 32 images, as finalize_best (6 views each)
            probs[prec][key] = np.concatenate([pred.predict_images(imgs[i:i + 32], tta=True)
                                               for i in range(0, len(imgs), 32)])
        else:
            probs[prec][key] = pred.predict_images(imgs)
        seconds[prec] = time.perf_counter() - start
    rate = {prec: len(imgs) / s for prec, s in seconds.items()}
    d = np.abs(probs["32"][key] - probs["bf16-mixed"][key])
    flips = int(((probs["32"][key] >= cut) != (probs["bf16-mixed"][key] >= cut)).sum())
    print(f"{key:<22} {rate['32']:10.1f} {rate['bf16-mixed']:10.1f} {rate['bf16-mixed'] / rate['32']:5.2f}x "
          f"{d.max():9.4f} {flips:6d}")
    return seconds


if __name__ == "__main__":
    main()
