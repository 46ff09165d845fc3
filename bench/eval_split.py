"""Evaluate a run's best checkpoint on one side of its own split (e.g. the validation images).

    python bench/eval_split.py --run runs/kermany [--split val] [--out-dir RUN/val-eval] [--shift-suite]

Reads ``RUN/split.csv``, links (never copies) the rows of ``--split`` into a temporary
``CLASS/`` folder layout and runs ``chexformer evaluate`` on it with ``RUN/checkpoints/best.ckpt``:
metrics with patient-bootstrap CIs, calibration, the operating-point table, the errors to review
and, with ``--shift-suite``, the robustness suite. The validation split is where the threshold and
the calibration were chosen, so its numbers are optimistic by construction.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--shift-suite", action="store_true")
    p.add_argument("--n-boot", type=int, default=1000)
    a = p.parse_args()
    from chexformer.cli import main as cli

    out = a.out_dir or a.run / f"{a.split}-eval"
    with (a.run / "split.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == a.split]
    if not rows:
        raise SystemExit(f"no {a.split} rows in {a.run / 'split.csv'}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            src = Path(r["path"]).resolve()
            dest = Path(tmp) / r["class_name"] / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(src)
        args = ["evaluate", "--checkpoint", str(a.run / "checkpoints" / "best.ckpt"), "--data-dir", tmp,
                "--out-dir", str(out), "--n-boot", str(a.n_boot)] + (["--shift-suite"] if a.shift_suite else [])
        raise SystemExit(cli(args))


if __name__ == "__main__":
    main()
