"""Acquisition shifts, the robustness suite's table and the shift-robust threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexformer.data import standardize_intensity
from chexformer.robustness import cut_grid, operating_threshold, robust_threshold, suite_table
from chexformer.shifts import (
    SHIFT_SUITE,
    RandomAcquisition,
    SharpnessMatch,
    apply_shift,
    blur,
    sharpness,
    standardize_tensor,
)


def _image(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    grey = (100 + 60 * torch.sin(xx / 4.0) * torch.cos(yy / 5.0) + 10 * torch.randn(size, size, generator=g))
    return grey.clamp(0, 255).round().to(torch.uint8).expand(3, -1, -1).contiguous()


@pytest.mark.parametrize("shift", SHIFT_SUITE, ids=lambda s: s.name)
def test_every_shift_keeps_shape_and_grows_with_severity(shift):
    x = _image(224)
    ref = standardize_tensor(x).float()
    dist = []
    for severity in shift.severities:
        out = apply_shift(x, shift, severity, torch.Generator().manual_seed(1))
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # stays grey
        dist.append(float((out.float() - ref).abs().mean()))
    assert dist[0] > 0 and dist[0] <= dist[1] * 1.05 and dist[1] <= dist[2] * 1.05, dist


def test_standardize_tensor_matches_the_file_rule_and_is_idempotent():
    x = _image()
    ruled = standardize_tensor(x)
    assert torch.equal(ruled[0], torch.from_numpy(standardize_intensity(x[0].numpy())))
    assert torch.equal(standardize_tensor(ruled), ruled)


def test_random_acquisition_varies_and_keeps_contract():
    torch.manual_seed(0)
    aug = RandomAcquisition(p=1.0)
    outs = [aug(_image()) for _ in range(3)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 64, 64) for o in outs)
    assert not torch.equal(outs[0], outs[1])


def _textured(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grey = (128 + 40 * torch.randn(n, 1, 64, 64, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return torch.stack([standardize_tensor(x.expand(3, -1, -1)) for x in grey])


def test_sharpness_match_blurs_the_sharper_class_down_to_the_blunter_median():
    sharp = _textured(24, 0)
    soft = torch.stack([standardize_tensor(blur(x, 3.0)) for x in _textured(24, 1)])
    labels = torch.tensor([0] * 24 + [1] * 24)
    matcher, medians = SharpnessMatch.fit(torch.cat([sharp, soft]), labels)
    assert medians[0] > 2 * medians[1]
    assert set(matcher.sigmas) == {0} and 2.0 < matcher.sigmas[0] < 4.0  # the blunter class is left alone
    matched = torch.stack([standardize_tensor(matcher(x, 0)) for x in sharp])
    assert abs(float(sharpness(matched).median()) / medians[1] - 1) < 0.1
    assert torch.equal(matcher(soft[0], 1), soft[0])
    assert torch.equal(SharpnessMatch(matcher.sigmas, p=0.0)(sharp[0], 0), sharp[0])
    # Classes of one sharpness need nothing.
    same, _ = SharpnessMatch.fit(torch.cat([sharp, _textured(24, 2)]), labels)
    assert same.sigmas == {}


def test_suite_table_mean_worst_and_threshold():
    y = np.array([0] * 50 + [1] * 50)
    clean = np.r_[np.linspace(0.0, 0.4, 50), np.linspace(0.6, 1.0, 50)]
    shifted = np.clip(clean + 0.3, 0, 1)  # negatives above 0.2 -> false positives at 0.5
    table = suite_table(y, {"clean": clean, "blur/mild": shifted, "noise/mild": clean}, 0.5)
    assert table["rows"]["clean"]["specificity"] == 1.0
    assert table["rows"]["blur/mild"]["specificity"] < 1.0
    assert table["worst"]["specificity"] == table["rows"]["blur/mild"]["specificity"]
    assert table["worst_shift"]["specificity"] == "blur/mild"
    assert abs(table["mean"]["specificity"] - (1.0 + table["rows"]["blur/mild"]["specificity"]) / 2) < 1e-12


def test_cut_grid_counts_each_copy_at_every_cut():
    y = np.array([0, 0, 1, 1])
    cuts, sens, spec = cut_grid(y, {"clean": np.array([0.1, 0.6, 0.4, 0.9]),
                                    "s": np.array([0.2, 0.3, 0.7, 0.8])})
    assert sens.shape == spec.shape == (2, 999) and cuts[0] == 0.001 and cuts[-1] == 0.999
    at = int(np.argmin(abs(cuts - 0.5)))
    assert sens[:, at].tolist() == [0.5, 1.0] and spec[:, at].tolist() == [0.5, 1.0]
    at = int(np.argmin(abs(cuts - 0.65)))  # 0.6 < cut: both normals of the clean copy below it
    assert sens[:, at].tolist() == [0.5, 1.0] and spec[:, at].tolist() == [1.0, 1.0]
    assert (sens[:, 0] == 1).all() and (spec[:, 0] == 0).all()  # the lowest cut calls everything positive


def test_robust_threshold_moves_with_the_shifted_copies_and_is_stable():
    rng = np.random.default_rng(0)
    y = np.array([0] * 200 + [1] * 200)
    clean = np.r_[rng.uniform(0.0, 0.3, 200), rng.uniform(0.7, 1.0, 200)]  # separable: flat J on 0.3..0.7
    t_clean = robust_threshold(y, {"clean": clean})
    assert 0.3 <= t_clean <= 0.7 and abs(t_clean - 0.5) < 0.02  # middle of the flat top, not its edge
    shifted = np.r_[rng.uniform(0.2, 0.65, 200), rng.uniform(0.7, 1.0, 200)]  # negatives drift up
    t_shift = robust_threshold(y, {"clean": clean, "s": shifted})
    assert t_shift > 0.65  # above where the shifted negatives now sit


def test_worst_case_threshold_balances_the_copies_the_mean_outvotes():
    y = np.array([0] * 300 + [1] * 300)
    clean = np.r_[np.linspace(0.0, 0.3, 300), np.linspace(0.35, 1.0, 300)]  # J = 1 on 0.3..0.35
    shifted = np.r_[np.linspace(0.0, 0.6, 300), np.linspace(0.7, 1.0, 300)]  # J = 1 on 0.6..0.7
    probs = {f"clean{i}": clean for i in range(5)} | {"s": shifted}
    assert 0.3 <= robust_threshold(y, probs) <= 0.35  # five clean copies outvote the shifted one
    # the worst copy's J is largest where the clean sensitivity (1 - t) / 0.65 meets the shifted
    # specificity t / 0.6: t = 0.48
    assert abs(robust_threshold(y, probs, aggregate="worst") - 0.48) < 0.01
    with pytest.raises(ValueError, match="aggregate"):
        robust_threshold(y, probs, aggregate="median")


def test_operating_threshold_returns_the_configured_rules_cut():
    """The cut that training stores is the one of ``threshold_method``, on data where every rule's
    cut differs (the tiny training run cannot tell them apart when they coincide)."""
    y = np.array([0] * 300 + [1] * 300)
    clean = np.r_[np.linspace(0.0, 0.3, 300), np.linspace(0.35, 1.0, 300)]
    shifted = np.r_[np.linspace(0.0, 0.6, 300), np.linspace(0.7, 1.0, 300)]
    probs = {"clean": clean, "s": shifted}
    cuts = {m: operating_threshold(y, probs, m, target_sensitivity=0.5)[0]
            for m in ("youden", "sensitivity", "shift_robust", "shift_worst")}
    _, candidates = operating_threshold(y, probs, "youden")
    assert cuts["youden"] == candidates["youden_clean"] and 0.3 <= cuts["youden"] <= 0.35
    # mean J rises while shifted negatives leave the positive side (up to 0.6), falls after as clean
    # positives drop below the cut; the minimax cut balances the two copies lower, at 0.48
    assert cuts["shift_robust"] == candidates["shift_robust"] and 0.58 < cuts["shift_robust"] < 0.61
    assert cuts["shift_worst"] == candidates["shift_worst"] and abs(cuts["shift_worst"] - 0.48) < 0.01
    assert abs(cuts["sensitivity"] - 0.675) < 0.01  # half the positives (0.35..1.0) at or above it
    assert len(set(cuts.values())) == 4


def test_hide_edges_sets_each_band_to_the_mean_grey_and_keeps_the_middle():
    from chexformer.shifts import RandomEdgeOcclusion, hide_edges

    x = torch.arange(3 * 20 * 10, dtype=torch.int64).remainder(251).reshape(3, 20, 10).to(torch.uint8)
    out = hide_edges(x, (0.1, 0.2, 0.3, 0.0))  # top 2 rows, bottom 4 rows, left 3 columns, no right band
    value = round(float(x.float().mean()))
    assert (out[:, :2] == value).all() and (out[:, 16:] == value).all() and (out[:, :, :3] == value).all()
    assert torch.equal(out[:, 2:16, 3:], x[:, 2:16, 3:]) and out.dtype == torch.uint8
    assert torch.equal(hide_edges(x, (0.0, 0.0, 0.0, 0.0)), x)
    assert torch.equal(RandomEdgeOcclusion(p=0.0)(x), x)
    torch.manual_seed(0)
    changed = [not torch.equal(RandomEdgeOcclusion(p=1.0, max_fraction=0.3)(x), x) for _ in range(20)]
    assert all(changed)


def test_fill_masked_sets_the_mask_to_mean_black_or_a_grey_level_and_rejects_others():
    from chexformer.shifts import fill_masked

    x = _image(16)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[-4:, :4] = True
    for fill, value in (("mean", round(float(x.float().mean()))), ("black", 0), (96, 96), (255, 255)):
        out = fill_masked(x, mask, fill)
        assert (out[:, mask] == value).all() and torch.equal(out[:, ~mask], x[:, ~mask]), fill
    for bad in ("white", 256, -1, True):
        with pytest.raises(ValueError, match="grey level"):
            fill_masked(x, mask, bad)


def test_random_affine_pad_black_is_torchvisions_affine_and_random_fills_one_level_per_image():
    from torchvision.transforms import v2

    from chexformer.shifts import RandomAffinePad

    x = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).reshape(3, 32, 32).to(torch.uint8)
    torchvisions = v2.RandomAffine(degrees=7, translate=(0.06, 0.06), scale=(0.85, 1.25),
                                   interpolation=v2.InterpolationMode.BILINEAR, fill=0)
    for seed in range(5):  # the recipe's transform: the same draws, the same pixels
        torch.manual_seed(seed)
        ours = RandomAffinePad(7, 0.06, (0.85, 1.25))(x)
        torch.manual_seed(seed)
        assert torch.equal(ours, torchvisions(x))
    # zoomed out to half: the frame around the image is uncovered; "random" fills it with one grey
    # level per image (the same in every channel), drawn anew for each image
    flat = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    pad = RandomAffinePad(0.0, 0.0, (0.5, 0.5), fill="random")
    torch.manual_seed(0)
    levels = []
    for _ in range(8):
        out = pad(flat)
        frame = torch.cat([out[:, :6].flatten(), out[:, -6:].flatten(),
                           out[:, :, :6].flatten(), out[:, :, -6:].flatten()])
        assert (frame == frame[0]).all() and out.dtype == torch.uint8
        assert (out[:, 10:22, 10:22] == 200).all()  # the image itself, untouched
        levels.append(int(frame[0]))
    assert len(set(levels)) >= 6
    assert (RandomAffinePad(0.0, 0.0, (0.5, 0.5))(flat)[:, :6] == 0).all()  # "black" pads black
    with pytest.raises(ValueError, match="fill"):
        RandomAffinePad(7, 0.06, (0.85, 1.25), fill="white")
