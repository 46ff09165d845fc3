"""Does ``--resume`` retrace the uninterrupted run? Stop a run after K epochs, resume it, compare.

    python bench/resume_check.py --config configs/kermany.yaml --data-dir ../shared/data/kermany224 \\
        --out-dir runs/resume_check --seed 1 --stop-after 5 --fresh runs/recipe_e14-s1

Trains ``OUT/resumed`` for ``--stop-after`` K epochs (a complete run: its post-training steps run
too), then continues it with ``chexformer train --out-dir OUT/resumed --resume --epochs E`` up to
the config's E epochs. The uninterrupted run is ``--fresh RUN`` (a finished run of the same
config, seed and data) or, without it, trained into ``OUT/fresh``. Compared: every column of
``history.csv`` but the seconds, ``final.ckpt``'s weights, optimiser and scheduler state, and the
stored threshold and rows of ``validation_shift_suite.json`` (timings aside). Writes
``OUT/resume_check.json``; exits 1 when the two runs differ. Exact only with ``num_workers: 0``
(loader workers' generators are not checkpointed) and on one machine (kernels differ across CPUs).
Both runs train with ``--epoch-budget-minutes 0``: a resume restarts the time budget's clock, so
with a budget the two could stop after different epochs; a ``--fresh`` run must be trained so too
(a recipe run trained with the budget is refused as another config). The first K epochs train
without the final anneal (``final_anneal_epochs``), which would take the emulated interruption for
the run's end; the uninterrupted run trains them so too as long as K leaves it its annealed epochs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from chexformer.config import load_config
from chexformer.history import read_history
from chexformer.weights import read_checkpoint_file

REPO = Path(__file__).resolve().parent.parent


def _train(out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "chexformer", "train", "--out-dir", str(out), "--log-images-every", "0", *extra]
    print(" ".join(cmd), flush=True)
    with (out.parent / f"{out.name}.log").open("a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _config(run: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return {k: v for k, v in cfg.items() if k not in ("out_dir", "data_dir", "cache_dir")}


def _tensors_differ(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths at which two nested checkpoint structures differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [p for k in keys for p in _tensors_differ(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _tensors_differ(x, y, f"{path}/{i}")]
    return [] if a == b else [path]


def _without_seconds(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if k not in ("seconds", "seconds_per_step")}
    if isinstance(x, list):
        return [_without_seconds(v) for v in x]
    return x


def compare(fresh: Path, resumed: Path) -> dict[str, Any]:
    """What differs between two finished runs that should be the same training."""
    hist = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_history(run / "history.csv")]
            for run in (fresh, resumed)]
    rows = [i for i, (a, b) in enumerate(zip(*hist)) if a != b]
    ckpts = [read_checkpoint_file(run / "checkpoints" / "final.ckpt") for run in (fresh, resumed)]
    parts = {k: _tensors_differ(ckpts[0].get(k), ckpts[1].get(k), k)
             for k in ("state_dict", "optimizer_states", "lr_schedulers")}
    suites = [_without_seconds(json.loads((run / "validation_shift_suite.json").read_text()))
              for run in (fresh, resumed)]
    result = {
        "fresh": str(fresh), "resumed": str(resumed),
        "epochs": [len(h) for h in hist],
        "history_rows_differing": rows if len(hist[0]) == len(hist[1]) else "different number of epochs",
        "final_ckpt_differing": {k: v[:10] for k, v in parts.items() if v},
        "suite_identical": suites[0] == suites[1],
        "thresholds": [s.get("threshold") for s in suites],
    }
    result["identical"] = (result["history_rows_differing"] == [] and not result["final_ckpt_differing"]
                           and result["suite_identical"])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "kermany.yaml")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stop-after", type=int, required=True, help="epochs before the interruption (K)")
    p.add_argument("--fresh", type=Path, help="a finished uninterrupted run of the same config and seed")
    p.add_argument("--overrides", nargs=argparse.REMAINDER, default=[],
                   help="further `chexformer train` options for both runs (last on the line)")
    a = p.parse_args()
    a.out_dir = a.out_dir.resolve()  # the trainings run from the repository root
    # no epoch time budget: a resumed run restarts its clock, so on a slow machine it could train more
    # epochs than the uninterrupted one
    base = ["--config", str(a.config.resolve()), "--data-dir", str(a.data_dir.resolve()), "--seed", str(a.seed),
            "--epoch-budget-minutes", "0", *a.overrides]
    cfg = load_config(a.config)  # defaults apply where the file is silent

    def setting(flag: str, default: int) -> int:  # the config's value unless an override sets it
        return int(a.overrides[a.overrides.index(flag) + 1]) if flag in a.overrides else default

    epochs, anneal = setting("--epochs", cfg.epochs), setting("--final-anneal-epochs", cfg.final_anneal_epochs)
    if not 0 < a.stop_after < epochs:
        p.error(f"--stop-after must lie between 0 and the run's {epochs} epochs")
    # the interruption is emulated by a run of K epochs, whose end the final anneal would see as the
    # run's end: that leg trains without it, as the uninterrupted run does before its last epochs
    if anneal and a.stop_after > epochs - anneal:
        p.error(f"--stop-after must leave the final anneal's last {anneal} of {epochs} epochs to the resumed run")
    fresh = a.fresh.resolve() if a.fresh else a.out_dir / "fresh"
    if a.fresh and not (fresh / "summary.json").is_file():
        p.error(f"--fresh {fresh} is not a finished run (no summary.json)")
    resumed = a.out_dir / "resumed"
    if resumed.exists():
        p.error(f"{resumed} exists (an earlier check?): remove it or choose another --out-dir")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not (fresh / "summary.json").is_file():
            _train(fresh, *base)
        _train(resumed, *base, "--epochs", str(a.stop_after), "--final-anneal-epochs", "0")
        _train(resumed, *base, "--epochs", str(epochs), "--resume")
    except subprocess.CalledProcessError as e:
        print(f"training failed (exit {e.returncode}); its output is in {a.out_dir}/*.log", file=sys.stderr)
        return 2
    configs = _config(fresh), _config(resumed)
    if configs[0] != configs[1]:
        diff = sorted(k for k in configs[0].keys() | configs[1].keys() if configs[0].get(k) != configs[1].get(k))
        p.error(f"the runs were not trained with the same config (differ in {diff}): nothing to compare")
    result = compare(fresh, resumed)
    (a.out_dir / "resume_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    verdict = "retraces" if result["identical"] else "DEPARTS from"
    print(f"resume {verdict} the uninterrupted run")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
