"""How stable is the shift-robust threshold across epochs? Re-derive it for other checkpoints of a run.

    python bench/threshold_epochs.py --runs runs/recipe-s42 runs/recipe-s1 runs/recipe-s2

Training stores the shift-robust threshold of the best checkpoint only. For each run this
re-scores the run's own validation images (``RUN/split.csv``) clean and under the 24 shifts of the
robustness suite with ``best.ckpt`` and ``final.ckpt`` (the last epoch; ``--checkpoints`` names
others, e.g. ``lowest_val_loss`` of a run with ``checkpoint_selection: last``), and prints, per
checkpoint, the threshold the shift-robust rule would store, the clean-Youden cut, and the
suite's worst-case specificity at the shift-robust cut. The epoch each checkpoint comes from is
read from the checkpoint (0-based, as in ``history.csv``). On the CPU, in the precision the run's
post-training steps used (``validation_shift_suite.json``; bf16 for the recipe since f16c54a, fp32
before and for runs trained in fp32), so the best checkpoint's cut is the stored one; ``--precision``
overrides it (``32``: as a default ``chexformer predict`` scores).
``--save-probs DIR`` also keeps every copy's probabilities (``DIR/<run>-<checkpoint>.npz``, with
labels and patient ids) for ``bench/threshold_rules.py``, which compares threshold rules on them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def run_precision(run: Path) -> str:
    """The precision the run's post-training steps scored in ('32' for runs that predate the record)."""
    suite = run / "validation_shift_suite.json"
    return json.loads(suite.read_text()).get("precision", "32") if suite.is_file() else "32"


def measure_run(run: Path, checkpoints: list[str], save_probs: Path | None = None,
                precision: str | None = None) -> Iterator[dict]:
    """One row per checkpoint of ``run``; the validation images are decoded once for all of them."""
    from chexformer.data import XrayDataset, read_split_csv
    from chexformer.inference import Predictor
    from chexformer.robustness import operating_threshold, shift_suite_logits, suite_table

    dataset = None
    precision = precision or run_precision(run)
    for name in checkpoints:
        predictor = Predictor.from_checkpoint(run / "checkpoints" / f"{name}.ckpt", device="cpu", precision=precision)
        if dataset is None:  # every checkpoint of a run shares its config (image size, aspect)
            dataset = XrayDataset(read_split_csv(run / "split.csv", "val"), predictor.img_size,
                                  predictor.cfg.keep_aspect, preload=True)
        y = np.array(dataset.labels)
        logits = shift_suite_logits(predictor, dataset, seed=predictor.cfg.seed)
        probs = {k: predictor.probabilities(v) for k, v in logits.items()}
        if save_probs is not None:
            save_probs.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(save_probs / f"{run.name}-{name}.npz", y=y,  # group: split.csv's patient id
                                patient=np.array([s.group for s in dataset.samples]),
                                **{f"p:{k}": v for k, v in probs.items()})
        robust, cuts = operating_threshold(y, probs, "shift_robust")
        table = suite_table(y, probs, robust)
        yield {"run": run.name, "checkpoint": f"{name}.ckpt",
               "epoch": predictor.meta.epoch,  # the epoch whose validation the weights and calibration come from
               "precision": predictor.precision,
               "shift_robust": robust,
               "youden_clean": cuts["youden_clean"],
               "val_auc": table["rows"]["clean"]["roc_auc"], "worst_spec": table["worst"]["specificity"],
               "worst_auc": table["worst"]["roc_auc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True)
    p.add_argument("--checkpoints", nargs="+", default=["best", "final"])
    p.add_argument("--output", type=Path, help="also write the rows as JSON here")
    p.add_argument("--save-probs", type=Path, help="keep every copy's probabilities here (npz per checkpoint)")
    p.add_argument("--precision", choices=["32", "bf16-mixed"],
                   help="score in this precision (default: the one each run's post-training steps used)")
    a = p.parse_args()
    print("| run | checkpoint | epoch | shift-robust cut | clean-Youden cut | val AUC | suite worst AUC "
          "| suite worst spec |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for run in a.runs:
        for r in measure_run(run, a.checkpoints, a.save_probs, a.precision):
            rows.append(r)
            print(f"| {r['run']} | {r['checkpoint']} | {r['epoch']} | {r['shift_robust']:.3f} | "
                  f"{r['youden_clean']:.3f} | {r['val_auc']:.3f} | {r['worst_auc']:.3f} | {r['worst_spec']:.3f} |",
                  flush=True)
    cuts = [r["shift_robust"] for r in rows]
    youden = [r["youden_clean"] for r in rows]
    if len(rows) > 1:
        print(f"shift-robust cut over {len(cuts)} checkpoints: {min(cuts):.3f}-{max(cuts):.3f} "
              f"(sd {np.std(cuts, ddof=1):.3f}); clean Youden: {min(youden):.3f}-{max(youden):.3f} "
              f"(sd {np.std(youden, ddof=1):.3f})")
    if a.output:
        a.output.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
