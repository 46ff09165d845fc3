"""The one inference path: same picture same answer in every format, predict == evaluate, TTA
padding and threshold, --device, the shared CSV schema."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chexformer import Config
from chexformer.cli import main
from chexformer.inference import Predictor, tta_views
from chexformer.synthetic import make_synthetic_dataset

from .conftest import REPO, SHARED_DATA, write_checkpoint

sys.path.insert(0, str(REPO / "bench"))
from format_probe import write_every_format  # noqa: E402  (the benchmark's own encoder of nine formats)

TINY = Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, precision="32")
RAW = SHARED_DATA / "raw-samples"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.ckpt", TINY, threshold=0.4, temperature=1.5)


def _radiograph() -> np.ndarray:
    """A real full-size radiograph (read in place) or, without the shared data, a synthetic one."""
    files = sorted((RAW / "PNEUMONIA").glob("*.jpeg")) if RAW.is_dir() else []
    if files:
        img = Image.open(files[0]).convert("L")
        img.thumbnail((512, 512))
        return np.asarray(img)
    from chexformer.synthetic import synthetic_image

    return synthetic_image(np.random.default_rng(0), 256, opacity=True)[0]


def test_same_picture_scores_the_same_in_every_format(ckpt, tmp_path):
    files = write_every_format(_radiograph(), tmp_path / "formats")
    pred = Predictor.from_checkpoint(ckpt, device="cpu", precision="32")
    results = pred.predict_files(list(files.values()))
    assert all(r.error is None for r in results), [r.error for r in results]
    p = {name: r.probabilities[1] for name, r in zip(files, results)}
    spread = max(p.values()) - min(p.values())
    assert spread <= 0.01, p


def test_predict_and_evaluate_give_the_same_probability(ckpt, tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", n_per_class=6, img_size=64, seed=3, splits=("test",),
                                  test_fraction=1.0)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data / "test"), "--out-dir", str(out),
                 "--n-boot", "20"]) == 0  # defaults: the fast backend and precision, as predict's
    preds = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(preds), str(data / "test")]) == 0
    ev = {Path(r["path"]).name: float(r["prob_PNEUMONIA"]) for r in csv.DictReader((out / "predictions.csv").open())}
    pr = {Path(r["path"]).name: float(r["prob_PNEUMONIA"]) for r in csv.DictReader(preds.open())}
    assert set(ev) == set(pr) and len(ev) == 12
    assert max(abs(ev[k] - pr[k]) for k in ev) <= 1e-5


def test_csv_schema_is_shared(ckpt, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 70), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"no")
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "p.csv"),
                 str(tmp_path / "a.png"), str(tmp_path / "bad.png")]) == 0
    header = next(csv.reader((tmp_path / "p.csv").open()))
    assert header == ["path", "prob_NORMAL", "prob_PNEUMONIA", "predicted_label", "threshold", "error"]
    assert main(["explain", "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "x"), str(tmp_path / "a.png")]) == 0
    header = next(csv.reader((tmp_path / "x" / "explain.csv").open()))
    assert header[:5] == ["path", "prob_NORMAL", "prob_PNEUMONIA", "predicted_label", "threshold"]


def test_tta_pads_black_like_training_and_averages_logits(ckpt):
    img = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    views = tta_views(img)
    assert len(views) == 6 and all(v.dtype == torch.uint8 for v in views)
    assert int(views[1][:, :, :2].max()) == 0  # shifted right: the uncovered columns are black (training's fill)
    pred = Predictor.from_checkpoint(ckpt, device="cpu", precision="32")
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 255, (64, 64), dtype=np.uint8)).expand(3, -1, -1).contiguous()
    p_tta = pred.predict_images([image], tta=True)[0]
    mean_logit = pred.logits(pred.to_input(tta_views(image))).mean()
    assert p_tta == pytest.approx(float(pred.probabilities(mean_logit.reshape(1, 1))[0]), abs=1e-6)
    assert p_tta != pytest.approx(float(pred.predict_images([image])[0]), abs=1e-6)


def test_tta_uses_the_threshold_chosen_with_tta(ckpt, tmp_path):
    obj = torch.load(ckpt, weights_only=True)
    obj["chexformer"]["extra"]["tta_threshold"] = 0.123
    path = tmp_path / "tta.ckpt"
    torch.save(obj, path)
    pred = Predictor.from_checkpoint(path, device="cpu")
    assert pred.threshold(tta=True) == pytest.approx(0.123) and pred.threshold() == pytest.approx(0.4)


def test_device_cuda_without_a_gpu_is_one_clear_error(ckpt, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    Image.new("L", (32, 32), 9).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "p.csv"), "--device", "cuda",
                 str(tmp_path / "a.png")]) == 2
    assert "no CUDA GPU" in caplog.text


def test_checkpoint_saved_on_another_device_loads_on_cpu(ckpt, monkeypatch):
    # No GPU here to save a CUDA checkpoint: check the mechanism instead. Every tensor is mapped to
    # the CPU while loading (so cuda:N storages need no GPU), then moved to the asked-for device.
    import chexformer.weights as weights

    seen = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(weights.torch, "load", recording_load)
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    assert seen and all(str(loc) == "cpu" for loc in seen)
    assert pred.device.type == "cpu" and next(pred.model.parameters()).device.type == "cpu"


def test_jit_backend_matches_eager_fp32(ckpt, tmp_path):
    eager = Predictor.from_checkpoint(ckpt, device="cpu", precision="32")
    fast = Predictor.from_checkpoint(ckpt, device="cpu", precision="auto", backend="jit", batch_size=4)
    assert fast.backend == "jit"
    rng = np.random.default_rng(1)
    images = [torch.from_numpy(rng.integers(0, 255, (64, 64), dtype=np.uint8)).expand(3, -1, -1).contiguous()
              for _ in range(6)]  # 6 = one full traced batch of 4 and a padded one of 2
    gap = np.abs(fast.predict_images(images) - eager.predict_images(images)).max()
    assert gap <= 1e-3


def test_evaluate_report_has_suite_operating_points_errors_and_card(ckpt, tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", n_per_class=5, img_size=64, seed=4, splits=("test",),
                                  test_fraction=1.0)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data / "test"), "--out-dir", str(out),
                 "--n-boot", "20", "--shift-suite"]) == 0
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert len(m["shift_suite"]["rows"]) == 25 and {"mean", "worst", "worst_shift"} <= set(m["shift_suite"])
    table = m["threshold_table"]
    assert sum(r["chosen"] for r in table) == 1 and any(r["threshold"] == 0.5 for r in table)
    assert all(r["tp"] + r["fn"] == 5 and r["tn"] + r["fp"] == 5 for r in table)
    html = (out / "report.html").read_text()
    for section in ("Robustness suite", "Operating points", "Model card", "Not a medical device",
                    "Reliability before calibration", "synthetic demo data set"):
        assert section in html, section
    n_errors = sum(r["fn"] + r["fp"] for r in table if r["chosen"])
    pngs = sorted((out / "errors").glob("*.png")) if n_errors else []
    assert len(pngs) == min(n_errors, 24) and len(list((out / "errors").glob("*.npy"))) == len(pngs)
    if n_errors:
        assert "Errors to review" in html
