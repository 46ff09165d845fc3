"""Does a checkpoint score alike on every device and precision this machine has? One process scores
the same images (a folder, scanned recursively) on the CPU in fp32 (the reference: a default
``predict``), then, where CUDA exists, on the GPU in fp32 and in its autocast precision, and last on
the CPU in bf16 autocast.

    python bench/device_parity.py runs/demo/checkpoints/best.ckpt runs/demo/demo-data

Per setting: images/s, the largest probability difference from the reference, images changing side
of the stored threshold (plain and, where stored, the TTA threshold with TTA views) and the largest
relative difference of the out-of-population guard's scores (its features are computed without
autocast; on CUDA, convolutions may still use TF32).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from chexformer.data import find_images
from chexformer.inference import Predictor


def settings() -> list[tuple[str, str]]:
    """CPU fp32 (the reference) first, the GPU next (the reason to run this on a GPU machine), CPU bf16 last."""
    gpu = [("cuda", "32"), ("cuda", "auto")] if torch.cuda.is_available() else []
    return [("cpu", "32"), *gpu, ("cpu", "bf16-mixed")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("folder", type=Path, help="images (class subfolders or flat), scored as they are")
    p.add_argument("--max-images", type=int, default=256)
    a = p.parse_args()
    paths = find_images(a.folder)
    paths = paths[:: max(1, len(paths) // a.max_images)][: a.max_images]  # spread over the class folders
    if not paths:
        raise SystemExit(f"no images found under {a.folder}")
    ref = Predictor.from_checkpoint(a.checkpoint, device="cpu", precision="32")
    images = [ref.load(q) for q in paths]
    cut, tta_cut = ref.threshold(), ref.threshold(tta=True)
    print(f"{a.checkpoint}: {len(images)} images from {a.folder}; stored threshold {cut}, TTA threshold {tta_cut}, "
          f"guard {'fitted' if ref.guard else 'absent'}")
    print(f"{'device':<6} {'precision':<10} {'img/s':>8} {'max |dp|':>9} {'flips':>6} {'TTA |dp|':>9} "
          f"{'TTA flips':>9} {'guard rel':>9}")
    base = base_tta = base_ood = None
    for device, precision in settings():
        pred = ref if (device, precision) == ("cpu", "32") else \
            Predictor.from_checkpoint(a.checkpoint, device=device, precision=precision)
        pred.predict_images(images[:8])  # warm-up (cuDNN autotuning, oneDNN primitives)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        prob = pred.predict_images(images)
        rate = len(images) / (time.perf_counter() - start)
        tta = pred.predict_images(images, tta=True)
        ood = pred.ood_scores(images)
        if base is None:
            base, base_tta, base_ood = prob, tta, ood
        dp, dtta = np.abs(prob - base).max(), np.abs(tta - base_tta).max()
        flips = int(((prob >= cut) != (base >= cut)).sum()) if cut is not None else -1
        tta_flips = int(((tta >= tta_cut) != (base_tta >= tta_cut)).sum()) if tta_cut is not None else -1
        guard = float(np.max(np.abs(ood - base_ood) / np.abs(base_ood))) if ood is not None else float("nan")
        print(f"{device:<6} {pred.precision:<10} {rate:8.1f} {dp:9.5f} {flips:6d} {dtta:9.5f} {tta_flips:9d} "
              f"{guard:9.2e}")


if __name__ == "__main__":
    main()
