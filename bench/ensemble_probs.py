"""Would an ensemble hold up better under shift? Average the suite's probabilities of several models
scored on the same validation images, and compare the result with its members in
``bench/threshold_rules.py``.

    python bench/threshold_epochs.py --runs runs/recipe_e14-s42 runs/recipe_swa-s42 runs/recipe_mixup-s42 \\
        --checkpoints best --save-probs runs/suite_probs
    python bench/ensemble_probs.py runs/suite_probs/ens-s42.npz runs/suite_probs/recipe_e14-s42-best.npz \\
        runs/suite_probs/recipe_swa-s42-best.npz runs/suite_probs/recipe_mixup-s42-best.npz
    python bench/threshold_rules.py runs/suite_probs/*s42*.npz

An ensemble's probability of an image in a copy (clean or shifted) is the mean of its members'
calibrated probabilities (each member's own Platt calibration): the deep-ensemble average
(Lakshminarayanan et al. 2017). ``threshold_rules.py`` then chooses the ensemble's cut with the
recipe's rule on those averages and scores it in-sample and on held-out patients, beside its members.
Members must have scored the same images in the same order (the same ``split.csv``: the same labels
and patient ids) under the same copies; anything else stops with an error naming the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def average(paths: list[Path]) -> dict[str, np.ndarray]:
    """``{"y", "patient", "p:<copy>"...}`` of the ensemble of the ``--save-probs`` files ``paths``."""
    members = []
    for path in paths:
        with np.load(path) as f:
            members.append({k: f[k] for k in f.files})
    first = members[0]
    for path, member in zip(paths[1:], members[1:]):
        for key in ("y", "patient"):
            if not np.array_equal(member[key], first[key]):
                raise SystemExit(f"{path}: other validation images than {paths[0]} ({key} differs); an "
                                 "ensemble's members must have scored the same split.csv")
        if set(member) != set(first):
            raise SystemExit(f"{path}: other copies than {paths[0]}: "
                             f"{sorted(set(member) ^ set(first))}")
    copies = [k for k in first if k.startswith("p:")]
    return {"y": first["y"], "patient": first["patient"],
            **{k: np.mean([m[k] for m in members], axis=0) for k in copies}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the ensemble's npz file (for bench/threshold_rules.py)")
    p.add_argument("members", type=Path, nargs="+", help="npz files of bench/threshold_epochs.py --save-probs")
    a = p.parse_args()
    if len(a.members) < 2:
        raise SystemExit("an ensemble needs at least two members")
    ensemble = average(a.members)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **ensemble)
    print(f"{a.out}: mean of {len(a.members)} members, {len(ensemble['y'])} images, "
          f"{sum(k.startswith('p:') for k in ensemble)} copies")


if __name__ == "__main__":
    main()
