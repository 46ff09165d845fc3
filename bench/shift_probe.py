"""Score a run's validation images under one shift at severities of your choice (the suite has three).

    python bench/shift_probe.py runs/recipe_160-s42 --shift resolution --severities 4 5

The robustness suite applies each shift to the image at the model's input size, so for models of
different ``img_size`` some shifts are not the same physical change: resolution loss by a factor 4
leaves 32 px of detail across a 128 px input and 40 px across a 160 px one. This prints, per
severity, the detail left (for ``resolution``: ``img_size / factor`` px) and ROC AUC, sensitivity and
specificity at the run's stored threshold, scored as the suite is (the run's post-training precision,
the suite's seed), so a 160 px model can be compared with a 128 px one at the same absolute detail
(factor 5 at 160 px = factor 4 at 128 px). A severity that is one of the suite's reproduces its row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from threshold_epochs import run_precision  # bench/ is on sys.path when a bench script runs

from chexformer import metrics
from chexformer.data import XrayDataset, read_split_csv
from chexformer.inference import Predictor
from chexformer.shifts import SHIFT_SUITE, apply_shift


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--shift", required=True, choices=[s.name for s in SHIFT_SUITE])
    p.add_argument("--severities", type=float, nargs="+", required=True)
    p.add_argument("--checkpoint", default="best")
    a = p.parse_args()
    precision = run_precision(a.run)
    predictor = Predictor.from_checkpoint(a.run / "checkpoints" / f"{a.checkpoint}.ckpt", device="cpu",
                                          precision=precision)
    dataset = XrayDataset(read_split_csv(a.run / "split.csv", "val"), predictor.img_size,
                          predictor.cfg.keep_aspect, preload=True)
    y = np.array(dataset.labels)
    images = [dataset.uint8(i) for i in range(len(dataset))]
    shift = next(s for s in SHIFT_SUITE if s.name == a.shift)
    cut = predictor.threshold()
    print(f"{a.run.name}: {len(images)} images at {predictor.img_size} px, {precision}, stored threshold {cut:.3f}")
    print("| shift | severity | detail left | ROC AUC | sensitivity | specificity |\n|---|---|---|---|---|---|")
    for severity in a.severities:
        gen = torch.Generator().manual_seed(predictor.cfg.seed)  # noise draws: the suite's first ones only
        prob = predictor.predict_images([apply_shift(img, shift, severity, gen) for img in images])
        m = metrics.binary_metrics(y, prob, cut)
        left = f"{predictor.img_size / severity:.0f} px" if a.shift == "resolution" else "-"
        scores = " | ".join(f"{m[k]:.3f}" for k in ("roc_auc", "recall", "specificity"))
        print(f"| {a.shift} | {severity:g} | {left} | {scores} |")


if __name__ == "__main__":
    main()
