"""Which threshold rule holds on patients and kinds of shift it was not chosen on?

    python bench/threshold_epochs.py --runs runs/recipe_e14-s42 runs/recipe_e14-s1 runs/recipe_e14-s2 \\
        --checkpoints best --save-probs runs/suite_probs
    python bench/threshold_rules.py runs/suite_probs/*.npz

The stored threshold and the robustness suite's worst case are measured on the same validation
images, so the suite flatters whatever rule chose the cut on them. This compares the rules out of
sample, on the probabilities ``bench/threshold_epochs.py --save-probs`` keeps (validation clean and
under the suite's 24 shifts, one file per checkpoint):

- **new patients**: the validation patients are split in two halves at random, stratified by class
  (``--repeats`` times, both ways round); the cut is chosen on one half (clean and all shifted copies) and scored on the
  other: clean sensitivity/specificity and the worst and mean over the shifted copies;
- **new patients and a kind of shift not seen**: the cut is chosen on one half without one shift
  family (its three severities) and scored on the other half under that family only; the worst over
  the eight families stands for an acquisition change the rule was not tuned on.

Rules: ``youden_clean`` (Youden's J on clean validation, middle of its flat top: the per-epoch cut of
``history.csv``), ``shift_robust``
(J averaged over the clean and shifted copies: the stored rule), ``worst`` (the smallest J over
the copies, maximised: a minimax cut), ``bagged`` (the shift-robust cut averaged over bootstrap
resamples of the images, stratified by class: a bagged cut point, cutpointr's ``maximize_boot_metric``;
image-level, as the rules see no patient ids), and the sensitivity floors of ``--sens-rules``
(:func:`sensitivity_cut`; default ``sens_mean0.96``: the highest cut whose sensitivity averaged over
the 25 copies is >= 0.96, a quantile of the pneumonias' probabilities rather than an argmax of J).
Also printed: each rule chosen and scored on all images (``in-sample``, as the suite table in
``validation_shift_suite.json`` does), and that all-image cut scored on the same held-out halves
(``fixed_cut_worst_spec``): a half has half the images, so its worst case over 24 copies is lower
even for a cut that saw it; the gap between this column and ``worst_spec`` is what choosing on the
scored images flatters.

A table of the stored rule's own sampling spread on each model: the shift-robust cut of
``--resamples`` bootstrap resamples of the validation images (:func:`bootstrap_cuts`), as quantiles,
and the range of cuts whose mean J is within 0.005 of its best (:func:`near_best`). Where it is as
wide as the spread between seeds, the seeds' different cuts are mostly this noise of an argmax over a
nearly flat J, not different models. Beside it, each sensitivity rule's cut on all images and its
spread on the same resamples (:func:`bootstrap_sensitivity_cuts`).

Where that curve is flat (:func:`band_shares`): each class's share of the images, pooled over the
copies, in bands of probability. Mean J at one cut minus mean J at a lower one is the normals' share
between them minus the pneumonias' share, so a band where the two shares match adds nothing to J:
the table shows which images make the curve flat between two cuts.

Last, a table of the models themselves (:func:`frontier`): the highest worst-case specificity any cut
reaches while worst-case sensitivity stays >= ``--min-sens`` (0.93, the goal's), so two models (or an
ensemble and its members) are compared at one sensitivity rather than at the cuts their rule chose.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chexformer.robustness import cut_grid, cut_values, middle_of_best, robust_threshold, suite_table

Probs = dict[str, np.ndarray]

RULES: dict[str, Callable[[np.ndarray, Probs], float]] = {
    "youden_clean": lambda y, probs: robust_threshold(y, {"clean": probs["clean"]}),
    "shift_robust": lambda y, probs: robust_threshold(y, probs),
    "worst": lambda y, probs: robust_threshold(y, probs, aggregate="worst"),
    "bagged": lambda y, probs: float(bootstrap_cuts(y, probs, resample_indices(y, 200, seed=0)).mean()),
}
COLUMNS = ("threshold", "clean_sens", "clean_spec", "worst_sens", "worst_spec", "mean_sens", "mean_spec",
           "unseen_kind_worst_sens", "unseen_kind_worst_spec", "fixed_cut_worst_spec")


def load(path: Path) -> tuple[np.ndarray, np.ndarray, Probs]:
    """Labels, patient ids and ``{copy: probabilities}`` of one ``--save-probs`` file."""
    with np.load(path) as f:
        probs = {k[2:]: f[k] for k in f.files if k.startswith("p:")}
        if any(p.ndim != 1 for p in probs.values()) or not set(np.unique(f["y"])) <= {0, 1}:
            raise SystemExit(f"{path}: threshold rules are for binary models (one probability per image)")
        return f["y"].astype(bool), f["patient"], probs


def sens_spec(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    return float((p[y] >= t).mean()), float((p[~y] < t).mean())


def score(y: np.ndarray, probs: Probs, t: float) -> dict[str, float]:
    """The suite's table at cut ``t`` (:func:`chexformer.robustness.suite_table`): clean
    sensitivity/specificity, and their worst and mean over the shifted copies."""
    table = suite_table(y, probs, t)
    clean = table["rows"]["clean"]
    return {"threshold": t, "clean_sens": clean["sensitivity"], "clean_spec": clean["specificity"],
            "worst_sens": table["worst"]["sensitivity"], "worst_spec": table["worst"]["specificity"],
            "mean_sens": table["mean"]["sensitivity"], "mean_spec": table["mean"]["specificity"]}


def family(key: str) -> str:
    """``"blur/severe"`` -> ``"blur"``."""
    return key.split("/")[0]


def cross_fit(y: np.ndarray, patients: np.ndarray, probs: Probs, repeats: int,
              seed: int) -> dict[str, dict[str, float]]:
    """Each rule's scores on held-out patients (and held-out shift families), averaged over
    ``repeats`` random patient halves, each half used once for choosing and once for scoring."""
    out: dict[str, list[dict[str, float]]] = {r: [] for r in RULES}
    fixed = {name: rule(y, probs) for name, rule in RULES.items()}  # chosen on all images
    families = sorted({family(k) for k in probs if k != "clean"})
    for fit in halves(y, patients, repeats, seed):
        held = ~fit
        fit_probs = {k: p[fit] for k, p in probs.items()}
        held_probs = {k: p[held] for k, p in probs.items()}
        for name, rule in RULES.items():
            row = score(y[held], held_probs, rule(y[fit], fit_probs))
            unseen = []
            for fam in families:
                t = rule(y[fit], {k: p for k, p in fit_probs.items() if family(k) != fam})
                unseen += [sens_spec(y[held], p, t) for k, p in held_probs.items() if family(k) == fam]
            row["unseen_kind_worst_sens"] = min(v[0] for v in unseen)
            row["unseen_kind_worst_spec"] = min(v[1] for v in unseen)
            row["fixed_cut_worst_spec"] = score(y[held], held_probs, fixed[name])["worst_spec"]
            out[name].append(row)
    return {name: {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS} for name, rows in out.items()}


def halves(y: np.ndarray, patients: np.ndarray, repeats: int, seed: int):
    """Boolean image masks of the choosing half: ``repeats`` random splits of the patients in two,
    stratified by class, each split yielded both ways round. A patient's images share one label in
    these data sets (a patient with any positive image counts as positive), so both halves hold
    both classes."""
    rng = np.random.default_rng(seed)
    ids = np.unique(patients)
    positive = np.array([y[patients == i].any() for i in ids])
    if min(positive.sum(), (~positive).sum()) < 2:
        raise SystemExit("threshold_rules: need at least two patients of each class to split them in halves")
    for _ in range(repeats):
        chosen = [rng.permutation(ids[m])[: m.sum() // 2] for m in (positive, ~positive)]
        first = np.isin(patients, np.concatenate(chosen))
        yield first
        yield ~first


def frontier(y: np.ndarray, probs: Probs, min_sens: float, grid: int = 999) -> tuple[float, float, float]:
    """The model, not a rule: over every cut of a grid, the highest suite worst-case specificity
    among the cuts whose worst-case sensitivity (over the shifted copies) is at least ``min_sens``,
    as ``(cut, worst_spec, worst_sens)``; NaNs when no cut reaches ``min_sens``. An oracle operating
    point chosen on the scored images: it compares models at one worst-case sensitivity, whatever
    cut their rule stored."""
    ts, sens, spec = cut_grid(y, {k: p for k, p in probs.items() if k != "clean"}, grid)
    sens, spec = sens.min(0), spec.min(0)
    ok = sens >= min_sens
    if not ok.any():
        return float("nan"), float("nan"), float("nan")
    i = int(np.argmax(np.where(ok, spec, -1.0)))
    return float(ts[i]), float(spec[i]), float(sens[i])


def resample_indices(y: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, len(y))`` image indices, each row a bootstrap resample drawn with replacement
    within each class (so every resample keeps the class counts)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).astype(bool)
    rows = np.empty((resamples, len(y)), dtype=np.int64)
    for members in (np.flatnonzero(y), np.flatnonzero(~y)):
        rows[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return rows


def resampled_rates(y: np.ndarray, probs: Probs, indices: np.ndarray, grid: int = 999):
    """Each copy's sensitivity and specificity at every cut of the grid on each resample in
    ``indices`` (rows of :func:`resample_indices`, the same images in every copy), as
    ``(sens, spec)`` pairs of shape ``(resamples, grid)``, one pair per copy in the order of
    ``probs``. Counts, not copies: a resample is a count per image, binned at the grid."""
    y = np.asarray(y).astype(bool)
    cuts = cut_values(grid)
    r = len(indices)
    weights = np.stack([np.bincount(row, minlength=len(y)) for row in indices]).astype(float)
    offsets = (np.arange(r) * (grid + 1))[:, None]
    for p in probs.values():
        above = np.searchsorted(cuts, p, side="right")  # p >= cuts[k] exactly when k < above
        flat = (offsets + above[None, :]).ravel()
        pos, neg = (np.bincount(flat, weights=(weights * m).ravel(), minlength=r * (grid + 1)).reshape(r, grid + 1)
                    for m in (y, ~y))
        sens = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1][:, 1:] / pos.sum(1, keepdims=True)
        spec = np.cumsum(neg, axis=1)[:, :grid] / neg.sum(1, keepdims=True)
        yield sens, spec


def bootstrap_cuts(y: np.ndarray, probs: Probs, indices: np.ndarray, grid: int = 999) -> np.ndarray:
    """The shift-robust cut (:func:`robust_threshold`, mean Youden J over the copies) of each
    resample in ``indices`` (:func:`resampled_rates`)."""
    j = sum(sens + spec - 1 for sens, spec in resampled_rates(y, probs, indices, grid))
    return np.array([middle_of_best(cut_values(grid), row / len(probs)) for row in j])


def highest_cut_reaching(cuts: np.ndarray, sens: np.ndarray, target: float) -> float:
    """The highest of ``cuts`` whose ``sens`` (one value per cut, falling as the cut rises) is at
    least ``target``; the lowest cut where none is."""
    ok = np.flatnonzero(sens >= target - 1e-12)
    return float(cuts[ok[-1]]) if len(ok) else float(cuts[0])


def floor_copies(probs: Probs, aggregate: str) -> Probs:
    """The copies a sensitivity floor reads: all of them for ``"mean"``, the shifted ones for ``"worst"``."""
    if aggregate not in ("mean", "worst"):
        raise ValueError(f"aggregate must be 'mean' or 'worst', got {aggregate!r}")
    return probs if aggregate == "mean" else {k: p for k, p in probs.items() if k != "clean"}


def sensitivity_cut(y: np.ndarray, probs: Probs, target: float, aggregate: str = "mean", grid: int = 999) -> float:
    """The highest cut at which sensitivity still reaches ``target``: averaged over every copy in
    ``probs`` (``aggregate="mean"``, clean and shifted) or its smallest value over the shifted copies
    (``"worst"``). The best specificity that keeps a sensitivity floor under shift; a quantile of
    the pneumonias' probabilities over the copies, not the argmax of a flat J curve."""
    cuts, sens, _ = cut_grid(y, floor_copies(probs, aggregate), grid)
    return highest_cut_reaching(cuts, sens.mean(0) if aggregate == "mean" else sens.min(0), target)


def bootstrap_sensitivity_cuts(y: np.ndarray, probs: Probs, indices: np.ndarray, target: float,
                               aggregate: str = "mean", grid: int = 999) -> np.ndarray:
    """:func:`sensitivity_cut` of each resample in ``indices`` (:func:`resampled_rates`)."""
    copies = floor_copies(probs, aggregate)
    sens = np.stack([s for s, _ in resampled_rates(y, copies, indices, grid)])  # (copies, resamples, grid)
    per_cut = sens.mean(0) if aggregate == "mean" else sens.min(0)
    return np.array([highest_cut_reaching(cut_values(grid), row, target) for row in per_cut])


def sensitivity_rule(spec: str) -> tuple[str, str, float]:
    """``"mean:0.96"`` -> ``("sens_mean0.96", "mean", 0.96)``: a ``--sens-rules`` entry."""
    aggregate, _, target = spec.partition(":")
    try:
        value = float(target)
    except ValueError:
        value = float("nan")
    if aggregate not in ("mean", "worst") or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a sensitivity rule is mean:T or worst:T with T in (0, 1], got {spec!r}")
    return f"sens_{aggregate}{value:g}", aggregate, value


def near_best(y: np.ndarray, probs: Probs, tolerance: float = 0.005) -> tuple[float, float]:
    """The lowest and highest cut whose Youden J averaged over the copies (the stored rule's curve)
    is within ``tolerance`` of its maximum: how flat that curve is around the stored cut."""
    cuts, sens, spec = cut_grid(y, probs)
    j = (sens + spec - 1).mean(0)
    near = np.flatnonzero(j >= j.max() - tolerance - 1e-9)
    return float(cuts[near[0]]), float(cuts[near[-1]])


BANDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def band_shares(y: np.ndarray, probs: Probs, edges=BANDS) -> tuple[np.ndarray, np.ndarray]:
    """Each class's share of the images, pooled over the copies (each copy holds the same images),
    with probability in ``[edges[i], edges[i + 1])`` (the last band closed, numpy's histogram):
    ``(normals, pneumonias)``, the negative and positive class. The mean over the
    copies of Youden's J at ``edges[j]`` minus that at ``edges[i]`` is the sum of
    ``normals - pneumonias`` over the bands between them."""
    y = np.asarray(y).astype(bool)
    p = np.stack(list(probs.values()))
    shares = [np.histogram(p[:, m].ravel(), np.asarray(edges))[0] / p[:, m].size for m in (~y, y)]
    return shares[0], shares[1]


def labels(paths: list[Path]) -> list[str]:
    """A table name for each file: its stem, or ``folder/stem`` where two files share a stem (the
    files of two ``--save-probs`` folders are named alike), so that no row replaces another."""
    stems = [path.stem for path in paths]
    names = [f"{path.parent.name}/{path.stem}" if stems.count(path.stem) > 1 else path.stem for path in paths]
    if len(set(names)) < len(names):
        raise SystemExit(f"threshold_rules: files given twice or not told apart by folder and name: {names}")
    return names


def in_sample(y: np.ndarray, probs: Probs) -> dict[str, dict[str, float]]:
    return {name: score(y, probs, rule(y, probs)) for name, rule in RULES.items()}


def table(title: str, results: dict[str, dict[str, dict[str, float]]], columns: tuple[str, ...]) -> str:
    lines = [f"\n{title}", "| checkpoint | rule | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for ckpt, rules in results.items():
        for name, row in rules.items():
            lines.append(f"| {ckpt} | {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="+", help="npz files of bench/threshold_epochs.py --save-probs")
    p.add_argument("--repeats", type=int, default=10, help="random patient halves per checkpoint (each used both ways)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples for the table of the stored rule's sampling spread")
    p.add_argument("--min-sens", type=float, default=0.93,
                   help="worst-case sensitivity at which the frontier table compares models (the goal's 0.93)")
    p.add_argument("--sens-rules", type=sensitivity_rule, nargs="*", default=[sensitivity_rule("mean:0.96")],
                   metavar="AGG:T", help="sensitivity-floor rules to compare (sensitivity_cut): mean:T, the highest "
                   "cut whose sensitivity averaged over the copies is >= T, or worst:T, over the shifted copies "
                   "its smallest (default mean:0.96)")
    a = p.parse_args()
    for name, aggregate, target in a.sens_rules:
        RULES[name] = lambda y, probs, aggregate=aggregate, target=target: sensitivity_cut(y, probs, target, aggregate)
    inside, held, front, spread, bands = {}, {}, {}, {}, {}
    for path, name in zip(a.files, labels(a.files)):
        y, patients, probs = load(path)
        if "clean" not in probs or len(probs) < 2:
            raise SystemExit(f"{path}: no clean and shifted probabilities "
                             "(write it with threshold_epochs.py --save-probs)")
        inside[name] = in_sample(y, probs)
        held[name] = cross_fit(y, patients, probs, a.repeats, a.seed)
        front[name] = frontier(y, probs, a.min_sens)
        bands[name] = band_shares(y, probs)
        indices = resample_indices(y, a.resamples, a.seed)
        spread[name] = (bootstrap_cuts(y, probs, indices), near_best(y, probs),
                        [bootstrap_sensitivity_cuts(y, probs, indices, t, agg) for _, agg, t in a.sens_rules])
        print(f"{name}: {len(y)} images, {len(np.unique(patients))} patients, {len(probs) - 1} shifted copies",
              flush=True)
    print(table("In-sample (cut chosen and scored on all validation images)", inside, COLUMNS[:7]))
    print(table(f"Held-out patients ({a.repeats} random halves x 2), and a held-out shift family", held, COLUMNS))
    if len(held) > 1:
        print(f"\nMean over the {len(held)} checkpoints (held out)")
        print("| rule | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
        for name in RULES:
            print(f"| {name} | " + " | ".join(f"{np.mean([h[name][c] for h in held.values()]):.3f}" for c in COLUMNS)
                  + " |")
    print(f"\nThe stored rule's cut (shift_robust) on {a.resamples} bootstrap resamples of each checkpoint's "
          "validation images: its sampling spread on one model")
    extra = "".join(f" {name}: cut on all images, q25-q75 (sd) |" for name, _, _ in a.sens_rules)
    print("| checkpoint | cut on all images | q10 | q25 | median | q75 | q90 | sd | cuts within 0.005 of the best "
          f"mean J |{extra}\n|---|---|---|---|---|---|---|---|---|" + "---|" * len(a.sens_rules))
    for ckpt, (cuts, near, sens_cuts) in spread.items():
        qs = " | ".join(f"{q:.3f}" for q in np.quantile(cuts, [0.1, 0.25, 0.5, 0.75, 0.9]))
        others = "".join(f" {inside[ckpt][name]['threshold']:.3f}, {np.quantile(c, 0.25):.3f}-"
                         f"{np.quantile(c, 0.75):.3f} ({c.std():.3f}) |"
                         for (name, _, _), c in zip(a.sens_rules, sens_cuts))
        print(f"| {ckpt} | {inside[ckpt]['shift_robust']['threshold']:.3f} | {qs} | {cuts.std():.3f} | "
              f"{near[0]:.3f}-{near[1]:.3f} |{others}")
    names = [f"{lo:g}-{hi:g}" for lo, hi in zip(BANDS[:-1], BANDS[1:])]
    print(f"\nWhere the mean-J curve is flat: % of each class's images (all copies) per probability band, "
          f"NORMAL / PNEUMONIA; the last column is mean J at {BANDS[-2]:g} minus mean J at {BANDS[1]:g}")
    print("| checkpoint | " + " | ".join(names) + f" | J({BANDS[-2]:g}) - J({BANDS[1]:g}) |\n|---|"
          + "---|" * (len(names) + 1))
    for ckpt, (neg, pos) in bands.items():
        cells = " | ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in zip(neg, pos))
        print(f"| {ckpt} | {cells} | {neg[1:-1].sum() - pos[1:-1].sum():+.4f} |")
    print(f"\nFrontier (in-sample, an oracle cut): the highest suite worst-case specificity at a worst-case "
          f"sensitivity >= {a.min_sens}")
    print("| checkpoint | cut | worst_spec | worst_sens |\n|---|---|---|---|")
    for ckpt, (cut, spec, sens) in front.items():
        print(f"| {ckpt} | {cut:.3f} | {spec:.3f} | {sens:.3f} |")


if __name__ == "__main__":
    main()
