"""Smoke tests of the benchmark scripts: each runs a few steps on tiny inputs in a subprocess."""

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest

from chexformer.synthetic import make_synthetic_dataset

from .conftest import REPO


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def test_speed_quick_writes_every_section(tmp_path):
    out = tmp_path / "speed.json"
    proc = _run(["bench/speed.py", "--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    for key in ("env", "config", "inference", "training", "cached_epoch", "transformer_share", "data_loading",
                "bf16_accuracy", "summary"):
        assert key in result, key
    assert result["config"]["img_size"] == 64 and result["config"]["batch_size"] == 4
    assert result["env"]["torch"] and result["env"]["cpu"]
    for section in ("inference", "training"):
        rows = result[section]["rows"]
        assert rows[0]["name"].startswith("eager fp32 NCHW") and rows[0]["img_s"] > 0
        assert result[section]["fastest"] in {r["name"] for r in rows}
    assert result["inference"]["rows"][0]["max_abs_logit_diff"] == 0.0
    cached = result["cached_epoch"]
    assert cached["uncached_epoch_s"] > 0 and cached["cached_epoch_s"] > 0 and cached["build_s"] > 0
    assert result["transformer_share"]["transformer_pct_of_backbone"] > 0
    assert result["data_loading"]["decode_resize_img_s"] > 0 and result["data_loading"]["augment_img_s"] > 0
    assert [r["key"] for r in result["summary"]] == ["inference", "training", "cached_epoch", "transformer_share"]
    for row in result["summary"]:
        assert {"measurement", "baseline_img_s", "fast_img_s", "ratio", "goal", "goal_met"} <= set(row)
        assert row["ratio"] is not None and row["ratio"] > 0
    assert "| measurement | baseline img/s | fast img/s | ratio | goal |" in proc.stdout


def test_speed_runs_only_the_named_sections_and_forces_cpu_bf16(tmp_path):
    out = tmp_path / "speed.json"
    _run(["bench/speed.py", "--quick", "--sections", "training", "--cpu-bf16", "--json", str(out)])
    result = json.loads(out.read_text())
    assert "training" in result
    for skipped in ("inference", "cached_epoch", "transformer_share", "data_loading", "bf16_accuracy"):
        assert skipped not in result, skipped
    assert [r["key"] for r in result["summary"]] == ["training"]
    names = [r["name"] for r in result["training"]["rows"]]
    assert names[0].startswith("eager fp32 NCHW") and "channels_last + bfloat16 autocast" in names, names


def test_speed_rejects_bad_size():
    proc = subprocess.run([sys.executable, "bench/speed.py", "--img-size", "50"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "multiple of 32" in proc.stderr


@pytest.fixture(scope="module")
def tiny_xrays(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    make_synthetic_dataset(root, n_per_class=8, img_size=64, seed=0, splits=("train",))
    return root


def test_ablation_tiny_writes_rows_and_skips_them_on_restart(tiny_xrays, tmp_path):
    out = tmp_path / "ablation"
    args = ["bench/ablation.py", "--data-dir", str(tiny_xrays), "--out-dir", str(out), "--img-size", "64",
            "--epochs", "1", "--seeds", "0", "--variants", "linear", "hybrid1", "--batch-size", "8"]
    _run(args)
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [("linear", "0"), ("hybrid1", "0")]
    for r in rows:
        assert 0.0 <= float(r["val_auc"]) <= 1.0 and r["auc_source"].startswith("best.ckpt")
        assert float(r["minutes"]) > 0 and r["resumed"] == "0" and r["train_images"] == rows[0]["train_images"]
    assert rows[0]["layers"] == "" and rows[1]["layers"] == "1"
    # the fixed split is a folder of symlinks, never copies
    links = [p for p in (out / "data").rglob("*") if not p.is_dir()]
    assert links and all(p.is_symlink() for p in links) and (out / "data" / "val").is_dir()
    table = (out / "ablation.md").read_text()
    assert "| model | layers | AUC seed0 | mean ± std | minutes/run |" in table
    # a restart skips the finished rows and trains nothing
    proc = _run(args)
    assert "skip linear seed 0" in proc.stderr and "skip hybrid1 seed 0" in proc.stderr
    with (out / "ablation.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2


def test_generalisation_report_and_threshold_epochs_on_two_tiny_seeds(tmp_path):
    """The seed-spread report reads real run folders, and threshold_epochs re-derives exactly the
    shift-robust cut that training stored in best.ckpt (same rule, same images, same shifts)."""
    from chexformer import Config
    from chexformer.train import train

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_per_class=16, img_size=64, seed=0, splits=("train",))
    runs = tmp_path / "runs"
    tiny = dict(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, batch_size=16, epochs=1,
                backbone_weights="none", num_workers=0, precision="32", log_images_every=0)
    for seed, rule in ((0, "shift_robust"), (1, "shift_worst")):
        train(Config(**tiny, data_dir=str(data), out_dir=str(runs / f"tiny-s{seed}"), seed=seed,
                     threshold_method=rule))
    proc = _run(["bench/generalisation.py", "--report", "--out-dir", str(runs)])
    assert "| tiny-s0 |" in proc.stdout and "| tiny-s1 |" in proc.stdout
    assert "tiny: 2 seeds (mean, sd, min-max)" in proc.stdout
    # each run names the CPU it trained on (from summary.json), the last column
    env = json.loads((runs / "tiny-s0" / "summary.json").read_text())["environment"]
    cpu = re.fullmatch(r"cpu family (\d+) model (\d+) stepping (\d+)", env["cpu_id"] or "")
    host = env.get("gpu") or ("/".join(cpu.groups()) if cpu else "?")  # '?' without /proc/cpuinfo
    assert next(line for line in proc.stdout.splitlines() if "| tiny-s0 |" in line).endswith(f"| {host} |")
    stored = [json.loads((runs / f"tiny-s{s}" / "validation_shift_suite.json").read_text())["threshold"]
              for s in (0, 1)]
    spread_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("threshold "))
    assert f"{min(stored):.3f}-{max(stored):.3f}" in spread_line
    out = tmp_path / "cuts.json"
    _run(["bench/threshold_epochs.py", "--runs", str(runs / "tiny-s0"), "--checkpoints", "best", "final",
          "--output", str(out)])
    rows = json.loads(out.read_text())
    assert [r["checkpoint"] for r in rows] == ["best.ckpt", "final.ckpt"] and rows[0]["epoch"] == 0
    assert rows[0]["shift_robust"] == pytest.approx(stored[0], abs=1e-9)
    # the kept probabilities give threshold_rules the cut each run stored (in-sample, its own rule)
    probs = tmp_path / "probs"
    _run(["bench/threshold_epochs.py", "--runs", str(runs / "tiny-s0"), str(runs / "tiny-s1"), "--checkpoints",
          "best", "--save-probs", str(probs)])
    rules = _threshold_rules()
    y, patients, p = rules.load(probs / "tiny-s0-best.npz")
    assert len(p) == 25 and len(y) == len(patients) == len(p["clean"]) and "resolution/severe" in p
    assert rules.in_sample(y, p)["shift_robust"]["threshold"] == pytest.approx(stored[0], abs=1e-9)
    y, _, p = rules.load(probs / "tiny-s1-best.npz")
    assert rules.in_sample(y, p)["worst"]["threshold"] == pytest.approx(stored[1], abs=1e-9)
    suite1 = json.loads((runs / "tiny-s1" / "validation_shift_suite.json").read_text())
    assert suite1["method"] == "shift_worst" and suite1["shift_worst"] == pytest.approx(stored[1])
    proc = _run(["bench/threshold_rules.py", str(probs / "tiny-s0-best.npz"), "--repeats", "1"])
    assert "| tiny-s0-best | worst |" in proc.stdout and "Held-out patients" in proc.stdout
    assert re.search(r"^\| tiny-s0-best \| (\d\.\d{3}|nan) \|", proc.stdout.split("Frontier (in-sample")[1], re.M)
    # one shift at severities of one's choosing: the suite's own severity reproduces its row
    proc = _run(["bench/shift_probe.py", str(runs / "tiny-s0"), "--shift", "resolution", "--severities", "4", "6.4"])
    suite0 = json.loads((runs / "tiny-s0" / "validation_shift_suite.json").read_text())["rows"]["resolution/severe"]
    assert (f"| resolution | 4 | 16 px | {suite0['roc_auc']:.3f} | {suite0['sensitivity']:.3f} | "
            f"{suite0['specificity']:.3f} |") in proc.stdout
    assert "| resolution | 6.4 | 10 px |" in proc.stdout
    proc = _run(["bench/suite_precision.py", str(runs / "tiny-s0"), "--families", "blur"])
    assert "blur/severe" in proc.stdout and "crop/mild" not in proc.stdout
    assert f"stored threshold {stored[0]:.3f}" in proc.stdout
    assert "shift-robust cut on these copies: fp32" in proc.stdout
    tta_stored = json.loads((runs / "tiny-s0" / "validation_shift_suite.json").read_text())["tta_threshold"]
    assert "clean, TTA" in proc.stdout and f"TTA cut (stored {tta_stored:.3f}): fp32" in proc.stdout
    # every device and precision this machine has scores the checkpoint; CPU fp32 is the reference row
    proc = _run(["bench/device_parity.py", str(runs / "tiny-s0" / "checkpoints" / "best.ckpt"), str(data),
                 "--max-images", "8"])
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("cpu ", "cuda "))]
    assert rows[0][:2] == ["cpu", "32"] and rows[0][3:7] == ["0.00000", "0", "0.00000", "0"]
    assert ["cpu", "bf16-mixed"] == rows[-1][:2] and len(rows) == (4 if __import__("torch").cuda.is_available() else 2)
    _check_sharpness_reliance(runs / "tiny-s0")
    _check_shortcut_probe(runs / "tiny-s0")
    _check_corner_darkness(runs / "tiny-s0", data / "train")


def _check_corner_darkness(run, folder):
    """bench/corner_darkness.py --runs: with --share 0 every validation image counts as dark-cornered,
    and the printed logit change is the run's own scoring of the images with dark corner pixels lifted."""
    import numpy as np
    import torch

    from chexformer.data import XrayDataset, read_split_csv
    from chexformer.inference import Predictor

    module = _bench_module("corner_darkness")
    proc = _run(["bench/corner_darkness.py", str(folder), "--img-size", "64", "--share", "0", "--level", "60",
                 "--runs", str(run)])
    line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{run.name} "))
    pred = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt", device="cpu")
    ds = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images, y = torch.stack([ds.uint8(i) for i in range(len(ds))]), np.array(ds.labels)
    lifted = module.brighten_bottom_corners(images, 60)
    assert not torch.equal(lifted, images)  # synthetic images have pixels <= 60 in their bottom corners
    delta = module.calibrated_logits(pred, lifted) - module.calibrated_logits(pred, images)
    for c, name in enumerate(pred.meta.class_names):
        n, change = re.search(rf"{name} (\d+) of (\d+): ([+-]\d\.\d\d);", line).group(1, 3)
        assert int(n) == (y == c).sum() and float(change) == pytest.approx(delta[y == c].mean(), abs=0.006)


def _bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _threshold_rules():
    return _bench_module("threshold_rules")


def test_threshold_rules_scores_a_shift_family_the_cut_was_not_chosen_on():
    """A family that pushes normals up is harmless to the shift-robust cut when it is among the
    copies the cut is chosen on, and not when it is held out: the held-out score must show it."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 400
    y = np.arange(n) % 2 == 1
    patients = np.array([f"p{i}" for i in range(n)])

    def copy(neg_lo, neg_hi):
        return np.where(y, rng.uniform(0.75, 1.0, n), rng.uniform(neg_lo, neg_hi, n))

    probs = {"clean": copy(0.0, 0.4)}
    for sev in ("mild", "moderate", "severe"):
        probs[f"harmless/{sev}"] = copy(0.0, 0.4)
        probs[f"drift/{sev}"] = copy(0.3, 0.7)  # normals drift up: a cut near 0.5 calls half of them positive
    rules = _threshold_rules()
    held = rules.cross_fit(y, patients, probs, repeats=2, seed=0)
    robust, clean = held["shift_robust"], held["youden_clean"]
    assert robust["threshold"] > 0.7 and robust["worst_spec"] > 0.95  # drift seen: the cut sits above it
    assert robust["unseen_kind_worst_spec"] < 0.8  # drift unseen: chosen on clean + harmless only
    assert clean["threshold"] < 0.75 and clean["worst_spec"] < 0.8  # clean Youden never sees the drift
    assert all(h["clean_sens"] == 1.0 for h in held.values())


def test_threshold_rules_frontier_is_the_best_worst_case_specificity_at_the_sensitivity_floor():
    import numpy as np

    rng = np.random.default_rng(1)
    n = 2000
    y = np.arange(n) % 2 == 1
    pos = rng.uniform(0.5, 1.0, n)  # sensitivity at cut t: (1 - t) / 0.5, >= 0.93 up to t = 0.535
    probs = {"clean": np.where(y, pos, rng.uniform(0.0, 0.4, n)),
             "drift/severe": np.where(y, pos, rng.uniform(0.0, 0.6, n))}  # specificity t / 0.6
    rules = _threshold_rules()
    cut, spec, sens = rules.frontier(y, probs, min_sens=0.93)
    assert sens >= 0.93 and cut == pytest.approx(0.535, abs=0.02) and spec == pytest.approx(0.535 / 0.6, abs=0.03)
    for t in np.linspace(0.3, 0.7, 41):  # no cut that keeps the sensitivity floor does better
        row = rules.score(y, probs, t)
        assert row["worst_sens"] < 0.93 or row["worst_spec"] <= spec + 1e-12
    assert rules.score(y, probs, cut)["worst_spec"] == pytest.approx(spec)
    assert all(np.isnan(rules.frontier(y, probs, min_sens=1.01)))


def test_ensemble_probs_averages_members_scored_on_the_same_images(tmp_path):
    """The ensemble file holds each copy's mean member probability, reads back in threshold_rules,
    and members of another split or with other copies are refused by name."""
    import numpy as np

    rng = np.random.default_rng(0)
    y, patient = np.arange(12) % 2, np.array([f"p{i // 2}" for i in range(12)])
    copies = ("clean", "blur/mild", "crop/severe")
    members = [{f"p:{c}": rng.uniform(size=12) for c in copies} for _ in range(3)]
    paths = []
    for i, m in enumerate(members):
        paths.append(tmp_path / f"m{i}.npz")
        np.savez_compressed(paths[-1], y=y, patient=patient, **m)
    proc = _run(["bench/ensemble_probs.py", str(tmp_path / "ens.npz"), *map(str, paths)])
    assert "mean of 3 members, 12 images, 3 copies" in proc.stdout
    ens_y, ens_patient, ens = _threshold_rules().load(tmp_path / "ens.npz")
    assert (ens_y == y.astype(bool)).all() and (ens_patient == patient).all() and set(ens) == set(copies)
    for c in copies:
        assert np.allclose(ens[c], np.mean([m[f"p:{c}"] for m in members], axis=0))
        assert not np.allclose(ens[c], members[0][f"p:{c}"])
    ensemble = _bench_module("ensemble_probs")
    np.savez_compressed(tmp_path / "other_split.npz", y=y, patient=np.roll(patient, 2), **members[1])
    with pytest.raises(SystemExit, match=r"other_split.npz: other validation images .*patient differs"):
        ensemble.average([paths[0], tmp_path / "other_split.npz"])
    np.savez_compressed(tmp_path / "fewer.npz", y=y, patient=patient, **{"p:clean": members[1]["p:clean"]})
    with pytest.raises(SystemExit, match=r"fewer.npz: other copies .*p:blur/mild"):
        ensemble.average([paths[0], tmp_path / "fewer.npz"])


def test_threshold_rules_bootstrap_cuts_are_the_shift_robust_cut_of_each_resample():
    """The counting shortcut must give, for every resample, exactly the cut robust_threshold finds
    on the resampled images themselves; resamples keep the class counts."""
    import numpy as np

    from chexformer.robustness import robust_threshold

    rng = np.random.default_rng(2)
    n = 120
    y = np.arange(n) % 3 == 0
    on_grid = np.linspace(0.001, 0.999, 999)  # values on the rules' cut grid: ties at a cut must count as positive

    def draw(a, b):
        return on_grid[np.minimum((rng.beta(a, b, n) * 999).astype(int), 998)]

    probs = {"clean": np.where(y, draw(5, 2), draw(2, 5)), "drift/severe": np.where(y, draw(5, 2), draw(3, 4))}
    rules = _threshold_rules()
    indices = rules.resample_indices(y, 25, seed=4)
    assert indices.shape == (25, n) and all(y[row].sum() == y.sum() for row in indices)
    assert len({row.tobytes() for row in indices}) == 25
    cuts = rules.bootstrap_cuts(y, probs, indices)
    expected = [robust_threshold(y[row], {k: p[row] for k, p in probs.items()}) for row in indices]
    assert cuts == pytest.approx(expected, abs=1e-12)
    assert np.ptp(cuts) > 0.01  # resampling moves the argmax of this overlapping set
    identity = np.arange(n)[None, :]
    assert rules.bootstrap_cuts(y, probs, identity)[0] == pytest.approx(robust_threshold(y, probs), abs=1e-12)


def test_threshold_rules_sensitivity_cut_is_the_highest_cut_keeping_the_floor_on_all_copies_or_the_worst():
    """Mean: sensitivity averaged over clean and shifted copies; worst: the smallest over the shifted
    copies only. Checked against the sensitivities the suite scores at the cut and one grid step above."""
    import numpy as np

    from chexformer.robustness import cut_values

    rng = np.random.default_rng(3)
    n = 600
    y = np.arange(n) % 2 == 1
    # the clean copy's pneumonias spread lowest, so a worst case that counted it would cut lower;
    # of the shifted copies the dark one drops its pneumonias, so worst and mean differ
    probs = {"clean": np.where(y, rng.uniform(0.1, 1.0, n), rng.uniform(0.0, 0.5, n)),
             "dark/severe": np.where(y, rng.uniform(0.2, 0.9, n), rng.uniform(0.0, 0.5, n)),
             "bright/severe": np.where(y, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.6, n))}
    rules = _threshold_rules()
    step = cut_values()[1] - cut_values()[0]
    for aggregate, target in (("mean", 0.9), ("worst", 0.9), ("mean", 0.8)):
        t = rules.sensitivity_cut(y, probs, target, aggregate)

        def sens_at(cut, aggregate=aggregate):
            row = rules.score(y, probs, cut)
            if aggregate == "worst":
                return row["worst_sens"]  # over the shifted copies
            return (row["clean_sens"] + (len(probs) - 1) * row["mean_sens"]) / len(probs)

        assert sens_at(t) >= target > sens_at(t + step)
    # the worst case follows the dark copy, whose pneumonias sit lower than on average: a lower cut
    assert rules.sensitivity_cut(y, probs, 0.9, "worst") < rules.sensitivity_cut(y, probs, 0.9, "mean")
    lowest = min(p[y].min() for p in probs.values())  # a floor of 1.0 keeps every pneumonia of every copy
    assert rules.sensitivity_cut(y, probs, 1.0, "mean") == cut_values()[cut_values() <= lowest][-1]
    with pytest.raises(ValueError, match="aggregate"):
        rules.sensitivity_cut(y, probs, 0.9, "median")
    # on resamples, the counting shortcut gives the cut sensitivity_cut finds on the resampled images
    indices = rules.resample_indices(y, 20, seed=5)
    for aggregate in ("mean", "worst"):
        cuts = rules.bootstrap_sensitivity_cuts(y, probs, indices, 0.9, aggregate)
        expected = [rules.sensitivity_cut(y[row], {k: p[row] for k, p in probs.items()}, 0.9, aggregate)
                    for row in indices]
        assert cuts == pytest.approx(expected, abs=1e-12) and np.ptp(cuts) > 0.005
    assert rules.sensitivity_rule("worst:0.95") == ("sens_worst0.95", "worst", 0.95)
    for bad in ("mean", "median:0.9", "mean:1.5", "mean:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            rules.sensitivity_rule(bad)


def test_threshold_rules_band_shares_add_up_to_the_change_of_mean_j_between_two_cuts():
    """Each class's share per band, pooled over the copies, is the mean-J change between cuts."""
    import numpy as np

    from chexformer.robustness import cut_grid

    rng = np.random.default_rng(5)
    n = 300
    y = np.arange(n) % 4 == 0
    probs = {"clean": np.where(y, rng.beta(6, 2, n), rng.beta(2, 6, n)),
             "blur/severe": np.where(y, rng.beta(4, 2, n), rng.beta(3, 3, n))}
    rules = _threshold_rules()
    neg, pos = rules.band_shares(y, probs)
    assert len(neg) == len(pos) == len(rules.BANDS) - 1
    assert neg.sum() == pytest.approx(np.mean([(p[~y] >= 0.5) & (p[~y] <= 0.98) for p in probs.values()]))
    assert pos.sum() == pytest.approx(np.mean([(p[y] >= 0.5) & (p[y] <= 0.98) for p in probs.values()]))
    cuts, sens, spec = cut_grid(y, probs)
    j = (sens + spec - 1).mean(0)
    at = {t: int(np.argmin(np.abs(cuts - t))) for t in (0.6, 0.8, 0.95)}
    assert neg[1:6].sum() - pos[1:6].sum() == pytest.approx(j[at[0.95]] - j[at[0.6]], abs=1e-12)
    assert neg[1:3].sum() - pos[1:3].sum() == pytest.approx(j[at[0.8]] - j[at[0.6]], abs=1e-12)
    assert abs(neg[1:6].sum() - pos[1:6].sum()) > 0.01  # not trivially zero on these data


def test_threshold_rules_names_files_of_two_folders_apart():
    """Two --save-probs folders name their files alike; no table row may replace another."""
    from pathlib import Path

    rules = _threshold_rules()
    paths = [Path("a/probs/s42-best.npz"), Path("b/probs2/s42-best.npz"), Path("b/probs2/s1-best.npz")]
    assert rules.labels(paths) == ["probs/s42-best", "probs2/s42-best", "s1-best"]
    with pytest.raises(SystemExit, match="given twice"):
        rules.labels([Path("a/probs/s1-best.npz"), Path("b/probs/s1-best.npz")])


def test_threshold_rules_halves_keep_patients_whole_and_both_classes_on_each_side():
    import numpy as np

    rules = _threshold_rules()
    patients = np.repeat([f"p{i}" for i in range(40)], 3)  # three images a patient
    y = np.repeat(np.arange(40) < 10, 3)  # 10 positive patients, 30 negative
    masks = list(rules.halves(y, patients, repeats=3, seed=1))
    assert len(masks) == 6 and all((a == ~b).all() for a, b in zip(masks[::2], masks[1::2]))
    assert len({m.tobytes() for m in masks[::2]}) == 3  # three different splits
    for fit in masks:
        assert set(patients[fit]).isdisjoint(patients[~fit])
        assert y[fit].sum() == 5 * 3 and (~y[fit]).sum() == 15 * 3  # stratified: half of each class
    with pytest.raises(SystemExit, match="two patients of each class"):
        next(rules.halves(y[:6], patients[:6], repeats=1, seed=0))


def test_resume_check_finds_the_resumed_recipe_identical(tiny_xrays, tmp_path):
    """The recipe's config (acquisition augmentation, EMA, plateau schedule, shift-robust threshold)
    at toy size: stopped after one epoch and resumed, it must retrace the uninterrupted run."""
    out = tmp_path / "resume"
    _run(["bench/resume_check.py", "--data-dir", str(tiny_xrays), "--out-dir", str(out), "--seed", "3",
          "--stop-after", "1", "--overrides", "--img-size", "64", "--d-model", "32", "--num-heads", "4",
          "--ffn-dim", "64", "--num-layers", "1", "--batch-size", "8", "--epochs", "3", "--lr-patience", "0",
          "--num-workers", "0", "--precision", "32"], timeout=600)
    result = json.loads((out / "resume_check.json").read_text())
    assert result["identical"] is True and result["epochs"] == [3, 3], result

    import shutil

    module = _bench_module("resume_check")
    other = tmp_path / "other"
    shutil.copytree(out / "resumed", other)
    lines = (other / "history.csv").read_text().splitlines()
    head, row = lines[0].split(","), lines[2].split(",")
    row[head.index("val_loss")] = "0.5"  # one digit of one epoch is enough to fail the check
    (other / "history.csv").write_text("\n".join([lines[0], lines[1], ",".join(row), *lines[3:]]) + "\n")
    assert module.compare(out / "fresh", other)["history_rows_differing"] == [1]
    assert module.compare(out / "fresh", other)["identical"] is False


def _check_shortcut_probe(run):
    """bench/shortcut_probe.py: the clean row is the run's own (stored threshold, its validation split),
    and the occluded rows score exactly the images its occlusion makes."""
    import numpy as np
    import torch

    from chexformer.data import XrayDataset, read_split_csv
    from chexformer.inference import Predictor
    from chexformer.robustness import suite_table

    probe = _bench_module("shortcut_probe")
    proc = _run(["bench/shortcut_probe.py", str(run), "--margin", "0.2", "--fill", "black", "--levels", "255",
                 "--guard"])
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{run.name} ")]
    guarded = [line for line in lines if line.split()[1] == "guard"]
    lines = [line for line in lines if line not in guarded]
    maps = [line.split() for line in lines if "rollout" in line or "Grad-CAM" in line]
    corners = [line.split() for line in lines if line.split()[1] in ("top", "bottom")]
    assert [m[2:4] for m in maps] == [["rollout", "NORMAL"], ["rollout", "PNEUMONIA"],
                                      ["Grad-CAM", "NORMAL"], ["Grad-CAM", "PNEUMONIA"]]
    # 64 px: a 2 x 2 grid, its top and bottom corners all of it (mass / area share 1.0), no inner cells
    for m in maps:
        assert m[1] == "2" and float(m[4]) + float(m[5]) == pytest.approx(2.0, abs=0.011) and m[6] == "nan"
    row = next(line for line in lines if "; " in line)
    printed = [float(v) for t in re.findall(r"(\d\.\d{3}); (\d\.\d{3})/(\d\.\d{3})", row) for v in t]
    assert len(printed) == 9

    pred = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt", device="cpu")
    ds = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images, y = torch.stack([ds.uint8(i) for i in range(len(ds))]), np.array(ds.labels)
    centre = probe.band_mask(pred.img_size, 0.2)
    copies = {"clean": images, "band": probe.occlude(images, ~centre, "black"),
              "only band": probe.occlude(images, centre, "black")}
    probs = {k: pred.predict_images(list(v)) for k, v in copies.items()}
    rows = suite_table(y, probs, pred.threshold())["rows"]
    expected = [r[m] for r in rows.values() for m in ("roc_auc", "sensitivity", "specificity")]
    assert printed == pytest.approx(expected, abs=5e-4)

    # corner cells: at 64 px the 2 x 2 grid's top "corners" are the top half, filled mean, then black
    # (a 2 x 2 grid has no centre cells: no top_centre / bottom_centre rows)
    assert [c[1:3] for c in corners] == [["top", "mean"], ["top", "black"], ["bottom", "mean"], ["bottom", "black"],
                                         ["bottom", "255"]]
    top_half = probe.cell_mask(probe.region_masks(2)[0], pred.img_size)
    assert top_half[:32].all() and not top_half[32:].any()
    black = pred.predict_images(list(probe.occlude(images, top_half, "black")))
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731  (the tiny model's probabilities are far from 0 and 1)
    delta = logit(black) - logit(probs["clean"])
    sens_spec = suite_table(y, {"clean": probs["clean"], "top": black}, pred.threshold())["rows"]["top"]
    assert float(corners[1][3]) == pytest.approx(delta[y == 0].mean(), abs=0.006)
    assert float(corners[1][4]) == pytest.approx(delta[y == 1].mean(), abs=0.006)
    assert corners[1][5] == f"{sens_spec['sensitivity']:.3f}/{sens_spec['specificity']:.3f}"
    # --levels 255: the bottom half filled white
    white = pred.predict_images(list(images.masked_fill(~top_half, 255)))
    delta = logit(white) - logit(probs["clean"])
    assert float(corners[4][3]) == pytest.approx(delta[y == 0].mean(), abs=0.006)
    assert float(corners[4][4]) == pytest.approx(delta[y == 1].mean(), abs=0.006)

    # --guard: the tiny run holds no guard (too few images to fit one) and the probe says so, once;
    # the shares themselves: test_shortcut_probe_flagged_share_counts_guard_and_pixel_verdicts_per_class
    assert pred.guard is None and [g.split()[1:] for g in guarded] == [["guard", "(none", "in", "the", "checkpoint)"]]


def test_shortcut_probe_flagged_share_counts_guard_and_pixel_verdicts_per_class():
    """bench/shortcut_probe.py --guard: an image counts as flagged where the guard's score passes its
    threshold or its pixels are no radiograph (a blank frame), the rule of predict and serve, per class."""
    import types

    import numpy as np
    import torch

    probe = _bench_module("shortcut_probe")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[4] = 90  # a blank frame: flagged by its pixels whatever its score
    scores = np.array([0.5, 2.0, 0.5, 0.5, 0.5])  # the second image lies beyond the guard's threshold of 1
    pred = types.SimpleNamespace(guard=types.SimpleNamespace(flag=lambda s: ~(np.asarray(s) <= 1.0)),
                                 ood_scores=lambda x: scores[: len(x)])
    y = np.array([0, 0, 0, 1, 1])
    assert probe.flagged_share(pred, images, y) == pytest.approx((1 / 3, 1 / 2))
    assert math.isnan(probe.flagged_share(pred, images[:3], y[:3])[1])  # no image of class 1


def test_shortcut_probe_regions_masses_and_occlusion():
    import torch

    probe = _bench_module("shortcut_probe")
    top, bottom, inner = probe.region_masks(4)
    corner = top | bottom
    assert top.sum() == bottom.sum() == 2 and inner.sum() == 4 and not (corner & inner).any()
    assert top[0, 0] and top[0, 3] and bottom[3, 0] and bottom[3, 3] and inner[1, 1] and inner[2, 2]
    # the controls: as many cells in the middle of the top and bottom rows, away from the corners
    top_centre, bottom_centre = probe.edge_centres(4)
    assert top_centre.sum() == bottom_centre.sum() == 2 and top_centre[0, 1] and top_centre[0, 2]
    assert bottom_centre[3, 1] and bottom_centre[3, 2] and not ((top_centre | bottom_centre) & (corner | inner)).any()
    assert [m.nonzero().tolist() for m in probe.edge_centres(3)] == [[[0, 1]], [[2, 1]]]
    assert not any(m.any() for m in probe.edge_centres(2))
    assert probe.region_masks(3)[2].sum() == 1 and probe.region_masks(2)[2].sum() == 0
    uniform = torch.ones(2, 4, 4)
    assert probe.mass_ratio(uniform, corner) == pytest.approx(1.0)
    in_corners = corner.float()[None]
    assert probe.mass_ratio(in_corners, corner) == pytest.approx(4.0)  # all the mass on a quarter of the area
    assert probe.mass_ratio(in_corners, inner) == 0.0
    # a map without positive mass is left out, not counted as zero; an empty region has no ratio
    assert probe.mass_ratio(torch.stack([corner.float(), -torch.ones(4, 4)]), corner) == pytest.approx(4.0)
    assert probe.mass_ratio(in_corners, top) == pytest.approx(4.0)
    assert math.isnan(probe.mass_ratio(uniform, probe.region_masks(2)[2]))

    cells = probe.cell_mask(probe.region_masks(3)[1], 9)  # the two bottom corner cells of a 3 x 3 grid, 3 px each
    assert cells.sum() == 18 and cells[6:, :3].all() and cells[6:, 6:].all() and not cells[:6].any()

    centre = probe.band_mask(20, 0.15)  # 3 px along each edge
    assert centre.sum() == 14 * 14 and not centre[2].any() and not centre[:, 17].any() and centre[3, 3]
    ramp = torch.arange(400, dtype=torch.int64).reshape(20, 20).expand(3, 20, 20).clone().to(torch.uint8)
    images = torch.stack([torch.full((3, 20, 20), 10, dtype=torch.uint8), ramp])
    mean1 = round(float(images[1].float().mean()))
    band_hidden = probe.occlude(images, ~centre, "mean")
    assert torch.equal(band_hidden[0], images[0])  # a flat image's mean is itself
    assert (band_hidden[1][:, ~centre] == mean1).all() and torch.equal(band_hidden[1][:, centre], images[1][:, centre])
    kept = probe.occlude(images, centre, "black")
    assert (kept[:, :, centre] == 0).all() and torch.equal(kept[:, :, ~centre], images[:, :, ~centre])


def _check_sharpness_reliance(run):
    """bench/sharpness_reliance.py: the clean specificity and AUC it prints are the run's own (stored
    threshold, its validation split), and its blur is the one SharpnessMatch fits on those images
    after the intensity rule (as the datamodule measures the training images)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from chexformer.data import XrayDataset, read_split_csv
    from chexformer.inference import Predictor
    from chexformer.shifts import SharpnessMatch, blur, standardize_tensor

    proc = _run(["bench/sharpness_reliance.py", str(run), "--precision", "32"])
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"{run.name} "))
    numbers = re.findall(r"[-+]?\d+\.\d+(?:e[-+]\d+)?", row)
    sigma, spec_clean, spec_matched, auc_clean = (float(numbers[i]) for i in (3, 5, 6, 8))

    pred = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt", device="cpu")
    ds = XrayDataset(read_split_csv(run / "split.csv", "val"), pred.img_size, pred.cfg.keep_aspect, preload=True)
    images, y = torch.stack([ds.uint8(i) for i in range(len(ds))]), np.array(ds.labels)
    p = pred.predict_images(list(images))
    assert spec_clean == pytest.approx((p[y == 0] < pred.threshold()).mean(), abs=5e-4)
    assert auc_clean == pytest.approx(roc_auc_score(y, p), abs=5e-5)
    matcher, medians = SharpnessMatch.fit(torch.stack([standardize_tensor(i) for i in images]), torch.from_numpy(y))
    assert sigma == pytest.approx(matcher.sigmas.get(0, 0.0), abs=5e-3)
    if medians[0] > medians[1] * 1.01:  # normals sharper: the matched copy differs from the clean one
        assert sigma > 0 and not torch.equal(blur(images[y == 0], sigma), images[y == 0])
    assert 0.0 <= spec_matched <= 1.0

    # fine detail: the finest Haar diagonal band, computed here by a reshape instead of strides
    def fine(batch):
        g = torch.stack([standardize_tensor(i) for i in batch])[:, 0].double().numpy()
        g = g[:, : g.shape[1] // 2 * 2, : g.shape[2] // 2 * 2].reshape(len(g), g.shape[1] // 2, 2, g.shape[2] // 2, 2)
        hh = (g[:, :, 0, :, 0] - g[:, :, 0, :, 1] - g[:, :, 1, :, 0] + g[:, :, 1, :, 1]) / 2
        values = np.sort(np.abs(hh).mean(axis=(1, 2)))
        return values[(len(values) - 1) // 2]  # the lower middle value, as torch.median

    fine_n, fine_p, fine_matched = (float(v) for v in numbers[-3:])
    assert fine_n == pytest.approx(fine(images[y == 0]), abs=5e-4)
    assert fine_p == pytest.approx(fine(images[y == 1]), abs=5e-4)
    assert fine_matched == pytest.approx(fine(blur(images[y == 0], matcher.sigmas.get(0, 0.0))), abs=5e-4)


def test_ssl_pretrain_writes_a_backbone_the_recipe_loads_from_training_patients_only(tiny_xrays, tmp_path):
    """bench/ssl_pretrain.py: a few SimSiam steps on the training split's images (the validation
    patients of chexformer train's split are left out), then a file that load_backbone_weights reads
    in full; the loss is the symmetric negative cosine with the stop-gradient on z."""
    import torch

    from chexformer.config import load_config
    from chexformer.data.datamodule import XrayDataModule
    from chexformer.model import build_model
    from chexformer.weights import load_backbone_weights

    out = tmp_path / "ssl" / "backbone.pt"
    _run(["bench/ssl_pretrain.py", "--data-dir", str(tiny_xrays), "--seed", "3", "--max-steps", "2",
          "--batch-size", "4", "--log-every", "1", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    dm = XrayDataModule(load_config(REPO / "configs" / "kermany.yaml", {"data_dir": str(tiny_xrays), "seed": 3}))
    dm.scan()
    assert record["steps"] == 2 and [t["step"] for t in record["trace"]] == [1, 2]
    assert record["images"] == len(dm.train_samples) and 0 < len(dm.val_samples)
    assert all(math.isfinite(t["loss"]) and t["z_std"] > 0 for t in record["trace"])
    model = build_model(load_config(REPO / "configs" / "kermany.yaml"))
    report = load_backbone_weights(model, out)
    assert report.format == "torchvision-densenet121" and report.loaded == 725 and not report.missing

    ssl = _bench_module("ssl_pretrain")
    p = torch.randn(6, 8, requires_grad=True)
    z = torch.randn(6, 8, requires_grad=True)
    assert ssl.simsiam_loss(p, p, p, p).item() == pytest.approx(-1.0, abs=1e-6)
    ssl.simsiam_loss(p, z, p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None  # no gradient through z


def test_corner_darkness_counts_the_images_with_dark_corners_per_class(tmp_path):
    """bench/corner_darkness.py: two of four A images have black bottom corner cells, no B image has;
    one B image has a black bottom centre; --by-name picks the files whose name holds a token."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("A", 4), ("B", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            img = rng.integers(100, 200, (64, 64), dtype=np.uint8)
            if cls == "A" and i < 2:
                img[48:, :16] = img[48:, 48:] = 0
            if cls == "B" and i == 0:
                img[48:, 16:48] = 0
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    out = _run(["bench/corner_darkness.py", str(tmp_path), "--img-size", "64", "--by-name", "0"]).stdout.splitlines()
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out if line[:1] in ("A", "B")}
    # the noise's darkest pixels go to 0 under the intensity rule: a few percent dark everywhere
    assert rows["A"][:2] == [4, 0.0] and rows["A"][3] == 0.5 and 0.5 <= rows["A"][4] < 0.55
    assert rows["B"][0] == 3 and rows["B"][1] == rows["B"][3] == 0.0 and rows["B"][4] < 0.05
    assert rows["A"][5] == 0.0 and rows["B"][5] == pytest.approx(1 / 3, abs=1e-3)  # bottom centre dark
    assert rows["B"][6] > 100 and rows["A"][6] > 100  # the median image's bottom centre is grey noise
    assert rows["B:0"][:1] == [1] and rows["B:0"][5] == 1.0 and rows["B:0"][6] == 0.0  # 0.png alone
    assert rows["A:0"][:1] == [1] and rows["A:0"][3] == 1.0 and rows["A:0"][5] == 0.0
    probe = _bench_module("corner_darkness")
    grey = np.full((8, 8), 200, np.uint8)
    grey[:2, :2] = 3
    assert probe.dark_shares(grey) == (0.5, 0.0)
    import torch

    flipped = np.ascontiguousarray(grey[::-1])  # dark in the bottom left cell, lifted to the mean grey
    images = torch.from_numpy(np.stack([flipped, flipped]))[:, None].expand(2, 3, 8, 8).contiguous()
    lifted = probe.brighten_bottom_corners(images, 5)
    mean = round(float(images[0].float().mean()))
    assert (lifted[:, :, 6:, :2] == mean).all() and torch.equal(lifted[:, :, :6], images[:, :, :6])
    assert torch.equal(lifted[:, :, 6:, 2:], images[:, :, 6:, 2:])


@pytest.mark.parametrize("variant, epochs, expect", [
    # the record's variants keep the single-view, black-padded recipe they were measured against
    ("recipe", 0, {"consistency": 0.0, "pad_fill": "black", "region_blur": 0.0, "epochs": 14}),
    ("recipe_e7", 0, {"consistency": 0.0, "pad_fill": "black", "region_blur": 0.0, "epochs": 7}),
    ("recipe_160", 4, {"consistency": 0.0, "pad_fill": "black", "region_blur": 0.0, "epochs": 4, "img_size": 160}),
    # the config as it stands: its own schedule and settings
    ("current", 0, None),
])
def test_generalisation_variants_resolve_to_the_recipe_they_were_measured_against(
        variant, epochs, expect, tmp_path, capsys):
    import argparse

    import yaml

    from chexformer import cli
    from chexformer.config import load_config

    module = _bench_module("generalisation")
    config = REPO / "configs" / "kermany.yaml"
    args = argparse.Namespace(config=config, data_dir=tmp_path, out_dir=tmp_path / "runs", img_size=96,
                              epochs=epochs)
    assert cli.main([*module.train_command(args, variant, 0), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    recipe = load_config(str(config))
    if expect is None:
        expect = {"consistency": recipe.consistency, "pad_fill": recipe.pad_fill, "epochs": recipe.epochs,
                  "region_blur": recipe.region_blur}
    assert {k: resolved[k] for k in expect} == expect
    assert resolved["img_size"] == expect.get("img_size", 96) and resolved["seed"] == 0


def test_uniform_area_names_the_probe_patch_and_no_clean_image(tmp_path):
    """bench/uniform_area.py: on synthetic radiographs no clean or shifted copy is named but under JPEG
    at quality 10 (flat 8 px blocks, as on real ones), and every copy with the probe's two-cell mean-grey
    patch is (1/8 of the image, over the 1/16 rule)."""
    make_synthetic_dataset(tmp_path, n_per_class=6, img_size=64, seed=0, splits=("train",))
    proc = _run(["bench/uniform_area.py", str(tmp_path / "train"), "--img-size", "64", "--suite"])
    rows = {line[:28].strip(): line[28:].split() for line in proc.stdout.splitlines()[3:]}
    assert len(rows) == 2 + 24
    assert rows["top-centre cells mean grey"] == ["0.1250", "/", "1.0000"] * 2
    for name, cells in rows.items():
        if name not in ("top-centre cells mean grey", "jpeg/10"):
            assert cells[2::3] == ["0.0000", "0.0000"], name


def test_patch_cue_fills_change_only_the_cells_each_in_its_own_way(monkeypatch):
    """bench/patch_cue.py's fills at 128 px (a 4 x 4 grid): outside the top-centre cells every fill
    leaves the image as it was; inside, 'own mean' is flat at the region's mean, 'image mean' at the
    image's, 'blurred' keeps the region's mean but not its texture, 'noise' keeps mean and spread, and
    'swapped' is the same cells of another image of the same class."""
    import numpy as np
    import torch

    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as when the script runs: it imports shortcut_probe
    module = _bench_module("patch_cue")
    probe = _bench_module("shortcut_probe")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 1, 128, 128), dtype=np.uint8)).expand(6, 3, 128, 128)
    images = images.contiguous()
    y = np.array([0, 0, 0, 1, 1, 1])
    regions = module.regions(4)
    assert [int(regions[k].sum()) for k in ("top_centre", "bottom_centre", "inner")] == [2, 2, 2]
    assert regions["inner"][2, 1:3].all() and not module.regions(2)["top_centre"].any()
    hide = probe.cell_mask(regions["top_centre"], 128)
    out = module.fills(images, hide, y, [4.0, 32.0], torch.Generator().manual_seed(0))
    assert list(out) == ["image mean", "own mean", "blurred 4", "blurred 32", "noise", "swapped"]
    inside = images[:, 0][:, hide].float()
    for name, x in out.items():
        assert torch.equal(x[:, :, ~hide], images[:, :, ~hide]), name
        assert torch.equal(x[:, 0], x[:, 2]), name  # still grey
    region = {k: v[:, 0][:, hide].float() for k, v in out.items()}
    assert torch.equal(region["own mean"], inside.mean(1, keepdim=True).round().expand_as(inside))
    assert torch.equal(region["image mean"][:, 0], images.float().mean(dim=(1, 2, 3)).round())
    for name in ("blurred 4", "blurred 32", "noise"):
        assert torch.allclose(region[name].mean(1), inside.mean(1), atol=6), name
    assert (region["blurred 32"].std(1) < region["blurred 4"].std(1)).all()
    assert (region["blurred 4"].std(1) < 0.5 * inside.std(1)).all()
    assert torch.allclose(region["noise"].std(1), inside.std(1), rtol=0.1)
    for i in range(6):  # each image's cells come from another image of its class
        sources = [j for j in range(6) if torch.equal(region["swapped"][i], inside[j])]
        assert sources and sources[0] != i and y[sources[0]] == y[i]
