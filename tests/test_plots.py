"""Every plot function writes a PNG that opens, has a sensible size and is not blank."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from chexformer import metrics as M
from chexformer import plots as P

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_xray(size: int = 128, seed: int = 0) -> np.ndarray:
    """A grey (H, W, 3) float image that looks roughly like a frontal chest X-ray: bright body,
    two dark lung fields, a bright spine/mediastinum, faint ribs and a right-lower-lobe opacity."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.15 + 0.55 * np.exp(-(((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.5) ** 2) ** 2)
    for cx in (0.3, 0.7):
        lung = (((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2) < 1
        img = np.where(lung, img * 0.45, img)
    img += 0.08 * (np.sin(yy * 60) > 0.7) * (np.abs(xx - 0.5) > 0.1)  # ribs
    img += 0.35 * np.exp(-(((xx - 0.5) / 0.06) ** 2))  # spine
    img += 0.25 * np.exp(-(((xx - 0.3) / 0.07) ** 2 + ((yy - 0.65) / 0.07) ** 2))  # opacity (patient's right)
    img += rng.normal(0, 0.015, img.shape)
    return np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=-1)


def binary_data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    z = rng.normal(0, 1.2, n) + 2.4 * (y - 0.5) + 0.3  # AUC ~0.9, a little overconfident
    return y, 1 / (1 + np.exp(-z))


def check_png(path, min_w: int = 300, min_h: int = 250, max_side: int = 4000) -> Image.Image:
    assert path.exists() and path.stat().st_size > 2000, path
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
        assert min_w <= w <= max_side and min_h <= h <= max_side, im.size
        arr = np.asarray(im.convert("L"), dtype=np.float64)
    assert arr.std() > 5, "image looks blank"
    return im


def test_plot_history_from_rows_and_csv(tmp_path):
    rows = [
        {"epoch": e, "train_loss": 0.7 / e, "val_loss": 0.6 / e + 0.02 * e, "train_acc": 0.6 + 0.03 * e,
         "val_acc": 0.62 + 0.025 * e, "val_auc": 0.7 + 0.02 * e, "lr": 1e-4 * 0.8**e}
        for e in range(1, 13)
    ]
    check_png(P.plot_history(rows, tmp_path / "history.png"), min_w=600)
    # A CSV with a missing column (no train_acc) and an empty cell still plots.
    path = tmp_path / "history.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "train_loss", "val_loss", "val_auc", "lr"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in w.fieldnames} | ({"val_auc": ""} if r["epoch"] == 3 else {}))
    check_png(P.plot_history(path, tmp_path / "history_csv.png"), min_w=600)
    with pytest.raises(ValueError, match="none of the columns"):
        P.plot_history([{"epoch": 1}], tmp_path / "empty.png")


def test_plot_confusion_matrix(tmp_path):
    check_png(P.plot_confusion_matrix([[201, 33], [12, 378]], ["NORMAL", "PNEUMONIA"], tmp_path / "cm.png"))
    cm3 = [[50, 3, 2], [4, 40, 9], [0, 7, 60]]
    check_png(P.plot_confusion_matrix(cm3, ["NORMAL", "BACTERIAL", "VIRAL"], tmp_path / "cm3.png"))
    with pytest.raises(ValueError, match="shape"):
        P.plot_confusion_matrix([[1, 2]], ["a", "b"], tmp_path / "bad.png")


def test_plot_roc_pr_reliability(tmp_path):
    y, p = binary_data()
    rep = M.evaluation_report(y, p, ["NORMAL", "PNEUMONIA"], threshold=0.42, n_boot=100)
    check_png(P.plot_roc(y, p, tmp_path / "roc.png", auc=rep["roc_auc"]["value"],
                         auc_ci=rep["roc_auc"]["ci95"], threshold=0.42))
    check_png(P.plot_pr(y, p, tmp_path / "pr.png", ap=rep["pr_auc"]["value"], ap_ci=rep["pr_auc"]["ci95"]))
    check_png(P.plot_reliability(y, p, tmp_path / "rel.png", ece=rep["ece"]["value"],
                                 class_names=["NORMAL", "PNEUMONIA"]))
    # Defaults: computes AUC/AP/ECE itself; a torch tensor is fine too.
    check_png(P.plot_roc(torch.as_tensor(y), torch.as_tensor(p), tmp_path / "roc2.png"))
    check_png(P.plot_pr(y, p, tmp_path / "pr2.png"))
    check_png(P.plot_reliability(y, p, tmp_path / "rel2.png", n_bins=10))
    with pytest.raises(ValueError, match="against the rest"):
        P.plot_roc(y, np.ones((len(y), 3)) / 3, tmp_path / "bad.png")


def test_overlay_heatmap():
    img = synthetic_xray(64)
    hm = np.zeros((4, 4))
    hm[3, 0] = 5.0  # bottom-left hot spot
    over = P.overlay_heatmap(img, hm)
    assert over.shape == (64, 64, 3) and over.min() >= 0 and over.max() <= 1
    # Jet: hot = red (R high, B low) at the bottom-left, cold = blue at the top-right.
    assert over[60, 3, 0] > over[60, 3, 2] and over[3, 60, 2] > over[3, 60, 0]
    # Orientation kept: the uint8 / channels-first / grey inputs give the same result.
    assert np.allclose(P.overlay_heatmap((img * 255).round().astype(np.uint8), hm), over, atol=0.01)
    assert np.allclose(P.overlay_heatmap(torch.as_tensor(img).permute(2, 0, 1), hm), over)
    assert np.allclose(P.overlay_heatmap(img[..., 0], torch.as_tensor(hm)), over)
    assert np.isfinite(P.overlay_heatmap(img, np.ones((7, 7)))).all()  # constant map
    with pytest.raises(ValueError, match="denormalize"):
        P.overlay_heatmap(img * 3 - 1, hm)


def test_plot_feature_maps(tmp_path):
    img = synthetic_xray(128)
    feats = torch.rand(64, 4, 4)
    feats[7] += 3.0
    feats[7, 2:, :2] += 4.0  # channel 7 is the most active, in the lower-left quarter
    check_png(P.plot_feature_maps(img, feats, tmp_path / "feats.png", k=11), min_w=600)
    check_png(P.plot_feature_maps(img, feats[None], tmp_path / "feats_b.png", k=3))


def test_plot_attention_maps(tmp_path):
    img = synthetic_xray(128)
    gh = gw = 4
    layers = []
    for layer in range(2):
        logits = torch.randn(4, 1 + gh * gw, 1 + gh * gw)
        logits[:, 0, 1 + 13] += 3.0 + layer  # class token attends to grid cell (3, 1)
        layers.append(logits.softmax(-1))
    check_png(P.plot_attention_maps(img, layers, (gh, gw), tmp_path / "attn.png"), min_w=600)
    check_png(P.plot_attention_maps(img, [a[None].numpy() for a in layers], (gh, gw), tmp_path / "attn_b.png"))
    with pytest.raises(ValueError, match="does not match"):
        P.plot_attention_maps(img, layers, (3, 3), tmp_path / "bad.png")


def test_plot_heatmap_panel(tmp_path):
    img = synthetic_xray(128)
    yy, xx = np.mgrid[0:7, 0:7]
    cam = np.exp(-((xx - 2) ** 2 + (yy - 4.5) ** 2) / 2.0)  # over the opacity
    rollout = np.exp(-((xx - 4) ** 2 + (yy - 3) ** 2) / 4.0)
    check_png(P.plot_heatmap_panel(img, {"Grad-CAM": cam, "Attention rollout": rollout},
                                   tmp_path / "panel.png", title="PNEUMONIA p=0.91"), min_w=600)


def test_denormalize_round_trip():
    x = torch.rand(2, 3, 8, 8)
    normed = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    back = P.denormalize(normed, MEAN, STD)
    assert isinstance(back, torch.Tensor) and torch.allclose(back, x, atol=1e-6)
    assert np.allclose(P.denormalize(normed[0].numpy(), MEAN, STD), x[0].numpy(), atol=1e-6)
    assert P.denormalize(torch.full((3, 2, 2), 10.0), MEAN, STD).max() == 1.0


def test_plot_inputs(tmp_path):
    base = torch.as_tensor(synthetic_xray(96), dtype=torch.float32).permute(2, 0, 1)
    batch = torch.stack([base.flip(-1) if i % 2 else base for i in range(6)])
    normed = (batch - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    probs = torch.tensor([0.1, 0.8, 0.3, 0.6, 0.99, 0.02])
    check_png(P.plot_inputs(normed, MEAN, STD, tmp_path / "inputs.png", labels=labels,
                            class_names=["NORMAL", "PNEUMONIA"], probs=probs))
    check_png(P.plot_inputs(normed[:2], MEAN, STD, tmp_path / "inputs_plain.png"), min_w=200)
