"""Metrics against values computed by hand, bootstrap and calibration contracts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from chexformer import metrics as M

# A hand example, sorted by label. Decision rule: positive when prob >= threshold.
#   label: 0    0    0    0    0    0    1     1     1    1
#   prob : 0.1  0.2  0.3  0.4  0.6  0.7  0.45  0.55  0.8  0.9
# At threshold 0.5: TN = 4 (0.1..0.4), FP = 2 (0.6, 0.7), FN = 1 (0.45), TP = 3 (0.55, 0.8, 0.9).
Y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
P = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.45, 0.55, 0.8, 0.9])


def test_binary_metrics_by_hand():
    m = M.binary_metrics(Y, P, 0.5)
    assert list(m) == list(M.BINARY_METRICS)
    assert m["accuracy"] == pytest.approx(7 / 10)  # (TP + TN) / N
    assert m["precision"] == pytest.approx(3 / 5)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(3 / 4)  # TP / (TP + FN)
    assert m["specificity"] == pytest.approx(4 / 6)  # TN / (TN + FP)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 2TP / (2TP + FP + FN) = 2/3
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # Brier: negatives 0.01+0.04+0.09+0.16+0.36+0.49 = 1.15; positives 0.55^2+0.45^2+0.2^2+0.1^2 = 0.555
    assert m["brier"] == pytest.approx((1.15 + 0.555) / 10)
    # AUC: negatives below each positive: 0.45 -> 4, 0.55 -> 4, 0.8 -> 6, 0.9 -> 6; of 4 * 6 pairs.
    assert m["roc_auc"] == pytest.approx(20 / 24)
    # AP, descending: 0.9 (R .25, P 1), 0.8 (R .5, P 1), 0.7 N, 0.6 N, 0.55 (R .75, P 3/5), 0.45 (R 1, P 4/6)
    assert m["pr_auc"] == pytest.approx(0.25 * (1 + 1 + 3 / 5 + 4 / 6))
    assert all(isinstance(v, float) for v in m.values())


def test_auc_with_ties_by_hand():
    # Positive 0.5 ties with negative 0.5 (counts 1/2), beats negative 0.2; positive 0.9 beats both.
    assert M.binary_metrics([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9], 0.5)["roc_auc"] == pytest.approx(3.5 / 4)


def test_undefined_metrics():
    # No positive predictions: precision is 0 (not NaN); only negatives: recall and AUC are NaN.
    m = M.binary_metrics([0, 0, 1], [0.1, 0.2, 0.3], 0.9)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["specificity"] == 1.0
    m = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.7], 0.5)
    assert math.isnan(m["recall"]) and math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["specificity"] == pytest.approx(2 / 3) and m["precision"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="0 and 1"):
        M.binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="sigmoid"):
        M.binary_metrics([0, 1], [-1.0, 3.0], 0.5)
    with pytest.raises(ValueError, match="entries"):
        M.binary_metrics([0, 1, 1], [0.1, 0.2], 0.5)


def test_youden_threshold_by_hand():
    # J = TPR - FPR at each threshold (descending): 0.9: .25; 0.8: .5; 0.7: .5-1/6; 0.6: .5-2/6;
    # 0.55: .75-2/6; 0.45: 1-2/6 = 2/3 (max); 0.4: 1-3/6 ...
    assert M.choose_threshold(Y, P, "youden") == 0.45


def test_youden_tie_takes_highest_threshold():
    # y = 0 1 0 1 at 0.2 0.4 0.6 0.8: J(0.8) = .5, J(0.6) = 0, J(0.4) = .5 -> 0.8
    assert M.choose_threshold([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8]) == 0.8


def test_sensitivity_threshold_by_hand():
    # TPR reaches 0.5 at 0.8, 0.75 at 0.55, 1.0 at 0.45; the highest such threshold is returned.
    assert M.choose_threshold(Y, P, "sensitivity", target_sensitivity=0.5) == 0.8
    assert M.choose_threshold(Y, P, "sensitivity", target_sensitivity=0.75) == 0.55
    assert M.choose_threshold(Y, P, "sensitivity", target_sensitivity=0.76) == 0.45
    assert M.choose_threshold(Y, P, "sensitivity", target_sensitivity=1.0) == 0.45
    # Exactly 19 of 20 positives is 0.95 even though 19/20 is not exact in floating point.
    y = np.r_[np.ones(20), np.zeros(5)]
    p = np.r_[np.linspace(0.99, 0.6, 20), np.full(5, 0.1)]
    assert M.choose_threshold(y, p, "sensitivity", 0.95) == pytest.approx(p[18])


def test_threshold_errors_and_range():
    with pytest.raises(ValueError, match="both classes"):
        M.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="unknown threshold method"):
        M.choose_threshold(Y, P, "f1")
    # Perfect separation at the top: Youden can pick the highest score; never +inf.
    t = M.choose_threshold([0, 0, 1], [0.1, 0.2, 1.0])
    assert t == 1.0 and math.isfinite(t)


def test_bootstrap_ci_contains_point_and_is_deterministic():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    a = M.bootstrap_ci(y, p, 0.5, n_boot=300, seed=7)
    b = M.bootstrap_ci(y, p, 0.5, n_boot=300, seed=7)
    c = M.bootstrap_ci(y, p, 0.5, n_boot=300, seed=8)
    assert a == b and a != c
    point = M.binary_metrics(y, p, 0.5)
    assert list(a) == list(M.BINARY_METRICS)
    for k, entry in a.items():
        lo, hi = entry["ci95"]
        assert entry["value"] == point[k]  # the full-data estimate, not the bootstrap mean
        assert lo <= entry["value"] <= hi, k
        assert hi - lo < 0.25, k


def test_bootstrap_alpha_names_the_interval():
    a = M.bootstrap_ci(Y, P, 0.5, n_boot=50, alpha=0.1)
    assert set(a["accuracy"]) == {"value", "ci90"}
    none = M.bootstrap_ci(Y, P, 0.5, n_boot=0)
    assert all(math.isnan(v) for v in none["accuracy"]["ci95"])


def test_vectorised_bootstrap_matches_sklearn_on_duplicated_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.round(np.clip(rng.normal(0.3 + 0.4 * y, 0.25), 0, 1), 2)  # rounded: many ties
    W, _, _ = M._resample_weights(len(y), None, 4, np.random.default_rng(2))
    fast = M._weighted_binary_metrics(W, y, p, p >= 0.4)
    for b in range(len(W)):
        idx = np.repeat(np.arange(len(y)), W[b].astype(int))
        for k, v in M.binary_metrics(y[idx], p[idx], 0.4).items():
            assert fast[k][b] == pytest.approx(v, abs=1e-12), k


def test_bootstrap_single_class_resamples_are_skipped():
    # 1 positive among 30 images: many resamples draw no positive; the AUC interval uses the rest.
    y = np.r_[np.zeros(29), 1]
    p = np.r_[np.linspace(0.0, 0.5, 29), 0.9]
    ci = M.bootstrap_ci(y, p, 0.5, n_boot=200)
    assert ci["roc_auc"]["ci95"] == [1.0, 1.0]
    assert all(math.isfinite(v) for v in ci["recall"]["ci95"])


def test_grouped_bootstrap_resamples_whole_patients():
    # 40 patients, each with 3 identical images. Resampling patients of the 120-image set must give
    # exactly the intervals of resampling images of the 40-image per-patient set (same seed, same
    # draws; every count scales by 3), and wider ones than the naive image bootstrap.
    rng = np.random.default_rng(3)
    y1 = rng.integers(0, 2, 40)
    p1 = np.clip(rng.normal(0.35 + 0.3 * y1, 0.2), 0, 1)
    y3, p3, groups = np.repeat(y1, 3), np.repeat(p1, 3), np.repeat(np.arange(40), 3)
    per_patient = M.bootstrap_ci(y1, p1, 0.5, n_boot=300, seed=0)
    clustered = M.bootstrap_ci(y3, p3, 0.5, groups=groups, n_boot=300, seed=0)
    naive = M.bootstrap_ci(y3, p3, 0.5, n_boot=300, seed=0)
    for k in M.BINARY_METRICS:
        assert clustered[k]["ci95"] == pytest.approx(per_patient[k]["ci95"], abs=1e-12), k
    width = lambda ci, k: ci[k]["ci95"][1] - ci[k]["ci95"][0]
    assert width(clustered, "roc_auc") > 1.3 * width(naive, "roc_auc")


def test_resample_weights_keep_patients_intact():
    groups = np.array(["b", "a", "b", "c", "a", "b"])  # unsorted string ids
    W, n_units, unit = M._resample_weights(6, groups, 50, np.random.default_rng(0))
    assert (n_units, unit) == (3, "patient") and W.shape == (50, 6)
    for g in "abc":
        cols = W[:, groups == g]
        assert (cols == cols[:, :1]).all()  # all images of a patient share its draw count
    # Each resample draws 3 patients: summing one image's count per patient gives 3.
    assert (W[:, [1, 0, 3]].sum(axis=1) == 3).all()


def test_bootstrap_with_many_groups_gives_intervals_around_the_estimate():
    # was a wall-clock limit (speed belongs in benchmarks); now a contract that can fail
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = np.clip(y * 0.3 + rng.random(1000) * 0.7, 0, 1)
    out = M.bootstrap_ci(y, p, 0.5, groups=rng.integers(0, 400, 1000), n_boot=1000)
    auc = out["roc_auc"]
    assert auc["ci95"][0] < auc["value"] < auc["ci95"][1] and auc["ci95"][1] - auc["ci95"][0] < 0.1


def _calibrated_logits(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return z, y


def test_temperature_fixes_overconfidence():
    z, y = _calibrated_logits()
    over = 5 * z  # an overconfident model
    T = M.fit_temperature(over, y)
    assert 3.5 < T < 7.0
    assert M._nll(over / T, y, False) < M._nll(over, y, False) - 0.1
    p = M.apply_temperature(over, T)
    assert p.shape == (len(y),) and np.all((p > 0) & (p < 1))
    assert M.expected_calibration_error(y, p) < M.expected_calibration_error(y, M.apply_temperature(over, 1.0))
    # (N, 1) logits like the model's binary head, and a calibrated model keeps T near 1.
    assert M.fit_temperature(z[:, None], y) == pytest.approx(1.0, abs=0.15)


def test_temperature_multiclass():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (3000, 3))
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in prob])
    T = M.fit_temperature(4 * z, y, multiclass=True)
    assert 3.0 < T < 5.5
    q = M.apply_temperature(4 * z, T, multiclass=True)
    assert q.shape == (3000, 3) and np.allclose(q.sum(1), 1)
    with pytest.raises(ValueError, match="positive"):
        M.apply_temperature(z, 0.0)


def test_ece_by_hand_and_synthetic():
    # Two bins: [0, .5): mean p .2, frequency .5 -> |.3| * 2/4; [.5, 1]: .8 vs 1.0 -> .2 * 2/4.
    assert M.expected_calibration_error([0, 1, 1, 1], [0.2, 0.2, 0.8, 0.8], n_bins=2) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert M.expected_calibration_error(y, p) < 0.02
    over = 1 / (1 + np.exp(-5 * np.log(p / (1 - p))))
    assert M.expected_calibration_error(y, over) > 0.1


def test_reliability_curve():
    mean_pred, frac_pos, counts = M.reliability_curve([0, 1, 1, 1, 0], [0.2, 0.2, 0.8, 0.8, 1.0], n_bins=4)
    # Bins [0,.25) [.25,.5) [.5,.75) [.75,1]; 1.0 falls into the last one.
    assert counts.tolist() == [2, 0, 0, 3]
    assert mean_pred[0] == pytest.approx(0.2) and frac_pos[0] == pytest.approx(0.5)
    assert mean_pred[3] == pytest.approx(2.6 / 3) and frac_pos[3] == pytest.approx(2 / 3)
    assert np.isnan(mean_pred[1]) and np.isnan(frac_pos[2])


# 3-class hand example. argmax predictions: 0 1 1 1 2 0 for labels 0 0 1 1 2 2.
Y3 = np.array([0, 0, 1, 1, 2, 2])
P3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],
    ]
)


def test_multiclass_by_hand():
    r = M.multiclass_metrics(Y3, P3, ["a", "b", "c"], n_boot=100)
    pc = {n: {k: v["value"] for k, v in d.items()} for n, d in r["per_class"].items()}
    # a: TP 1, FP 1 (row 5), FN 1 (row 1), TN 3.  b: TP 2, FP 1, FN 0, TN 3.  c: TP 1, FP 0, FN 1, TN 4.
    assert pc["a"]["precision"] == pytest.approx(1 / 2) and pc["a"]["recall"] == pytest.approx(1 / 2)
    assert pc["b"]["precision"] == pytest.approx(2 / 3) and pc["b"]["recall"] == pytest.approx(1.0)
    assert pc["c"]["precision"] == pytest.approx(1.0) and pc["c"]["specificity"] == pytest.approx(1.0)
    assert pc["b"]["f1"] == pytest.approx(4 / 5)
    # a vs rest: positives score .7, .3; negatives .1 .2 .1 .5 -> 4 + 3 of 8 pairs.
    assert pc["a"]["roc_auc"] == pytest.approx(7 / 8)
    macro = {k: v["value"] for k, v in r["macro"].items()}
    assert macro["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert macro["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert macro["specificity"] == pytest.approx((3 / 4 + 3 / 4 + 1) / 3)
    assert macro["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert r["accuracy"]["value"] == pytest.approx(4 / 6)
    assert r["balanced_accuracy"]["value"] == pytest.approx(macro["recall"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    lo, hi = r["macro"]["roc_auc"]["ci95"]
    assert lo <= r["macro"]["roc_auc"]["value"] <= hi


def test_evaluation_report_binary_is_json_ready():
    rep = M.evaluation_report(Y, P, ["NORMAL", "PNEUMONIA"], threshold=0.45, groups=np.arange(10) // 2, n_boot=50)
    assert rep["task"] == "binary" and rep["positive_class"] == "PNEUMONIA"
    assert rep["n_images"] == 10 and rep["n_patients"] == 5 and rep["threshold"] == 0.45
    assert rep["at_0.5"]["confusion_matrix"] == [[4, 2], [1, 3]]  # [[TN, FP], [FN, TP]]
    assert rep["at_threshold"]["confusion_matrix"] == [[4, 2], [0, 4]]
    for k in M.BINARY_METRICS:
        assert rep[k] == rep["at_threshold"][k] and set(rep[k]) == {"value", "ci95"}
    assert rep["confusion_matrix"] == rep["at_threshold"]["confusion_matrix"]
    assert rep["at_0.5"]["accuracy"]["value"] == pytest.approx(0.7)
    json.dumps(rep, allow_nan=False)


def test_evaluation_report_nan_becomes_none():
    rep = M.evaluation_report([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9], ["NORMAL", "PNEUMONIA"], 0.5, n_boot=20)
    assert rep["roc_auc"]["value"] is None and rep["recall"]["ci95"] == [None, None]
    assert rep["specificity"]["value"] == pytest.approx(0.75)
    text = json.dumps(rep, allow_nan=False)
    assert "NaN" not in text
    assert isinstance(rep["n_images"], int) and isinstance(rep["confusion_matrix"][0][0], int)


def test_evaluation_report_multiclass():
    rep = M.evaluation_report(Y3, P3, ["a", "b", "c"], threshold=None, n_boot=30)
    assert rep["task"] == "multiclass" and rep["threshold"] is None
    assert set(rep["per_class"]) == {"a", "b", "c"} and "roc_auc" in rep["macro"]
    json.dumps(rep, allow_nan=False)
