"""The command line: help, config errors, summary, evaluate, predict, explain, export."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from chexformer import Config
from chexformer.checkpoint import load_checkpoint
from chexformer.cli import DEMO_OVERRIDES, build_parser, main
from chexformer.config import load_config
from chexformer.synthetic import make_synthetic_dataset

from .conftest import write_checkpoint

TINY = Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, precision="32")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.ckpt", TINY, threshold=0.4, temperature=1.5)


@pytest.mark.parametrize("cmd", [["chexformer"], [sys.executable, "-m", "chexformer"]])
def test_help_from_console_script_and_module(cmd):
    if cmd[0] == "chexformer":
        cmd = [str(__import__("pathlib").Path(sys.executable).parent / "chexformer")]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("train", "evaluate", "explain", "predict", "export", "demo"):
        assert sub in out
    out = subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--img-size" in out and "--freeze-cnn" in out and "--resume" in out and "--print-config" in out
    text = " ".join(out.split())
    assert "Square input side in pixels; a multiple of 32" in text and "(default: 224)" in text
    assert "--precision {auto,32,bf16-mixed,16-mixed,bf16-true}" in text


def test_building_the_parser_imports_no_torch():
    """--help must answer at once: the parser is built without torch, numpy or Lightning."""
    code = ("import sys, chexformer.cli; chexformer.cli.build_parser(); "
            "heavy = {'torch', 'numpy', 'lightning', 'torchvision'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("argv, hint", [
    (["train", "--img-szie", "64"], "unrecognized arguments: --img-szie 64 (did you mean --img-size?)"),
    (["summary", "--fine-tune-layres=2"], "did you mean --fine-tune-layers?"),
    (["trian"], "invalid choice: 'trian'"),
    (["export", "--checkpoint", "c", "--output", "o", "--format", "onnxx"], "(did you mean onnx?)"),
])
def test_misspelt_option_or_command_gets_a_suggestion(argv, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and hint in err, err
    if argv[0] == "train":
        assert err.startswith("usage: chexformer train")  # the subcommand's usage, not the top level's
    if argv == ["trian"]:
        assert "(did you mean train?)" in err


def test_verbose_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "train"]).verbose is True
    assert parser.parse_args(["train", "-v"]).verbose is True
    assert parser.parse_args(["summary", "--verbose", "--img-size", "64"]).verbose is True
    assert parser.parse_args(["train"]).verbose is False


def test_log_messages_follow_the_current_stderr(monkeypatch):
    """The handler main() installs writes to sys.stderr as it is at each message: a second main() in
    the same process, after stderr was replaced (and the old one closed), still logs, to the new one."""
    import io
    import logging

    from chexformer.cli import _setup_logging

    old = io.StringIO()
    monkeypatch.setattr(sys, "stderr", old)
    _setup_logging(False)
    old.close()
    new = io.StringIO()
    monkeypatch.setattr(sys, "stderr", new)
    _setup_logging(False)
    logging.getLogger("chexformer").warning("after the swap")
    assert "WARNING chexformer: after the swap" in new.getvalue() and "Logging error" not in new.getvalue()


def test_bad_enumeration_value_is_one_clear_message(caplog):
    assert main(["summary", "--threshold-method", "youdn"]) == 2
    assert ("threshold_method: expected one of shift_robust, shift_worst, youden, sensitivity, got 'youdn'"
            in caplog.text)
    assert "did you mean 'youden'?" in caplog.text


def test_print_config_shows_the_resolved_config_and_does_not_train(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("img_size: 128\nbatch_size: 4\nprecision: 32\n")
    out_dir = tmp_path / "run"
    assert main(["train", "--print-config", "--config", str(path), "--img-size", "96", "--out-dir", str(out_dir)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(path, {"img_size": "96", "out_dir": str(out_dir)})
    assert printed == expected.to_dict() and Config.from_dict(printed) == expected
    assert (printed["img_size"], printed["batch_size"], printed["precision"]) == (96, 4, "32")
    assert not out_dir.exists()
    # demo: its small model and data paths, nothing generated
    assert main(["demo", "--print-config", "--out-dir", str(out_dir), "--epochs", "2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 2 and printed["d_model"] == DEMO_OVERRIDES["d_model"]
    assert printed["data_dir"] == str(out_dir / "demo-data") and not out_dir.exists()


def test_summary_with_seed_defaults(capsys):
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "(1, 1024, 7, 7)" in out and "49 tokens" in out and "logits (1, 1)" in out
    lines = out.splitlines()
    assert len(lines) < 40
    for stage in ("conv0", "denseblock1", "transition3", "denseblock4", "norm5", "proj", "layers.0", "layers.1",
                  "head"):
        assert stage in out, stage
    row = next(line for line in lines if "backbone.denseblock4" in line)
    assert "(1, 1024, 7, 7)" in row and "2,158,080" in row and row.endswith("yes")
    assert "parameters: 8,284,545 trainable, 0 frozen" in out and "backbone weights: random initialisation" in out


def test_summary_of_a_frozen_linear_baseline(capsys):
    assert main(["summary", "--arch", "linear", "--img-size", "64", "--freeze-cnn", "true",
                 "--fine-tune-layers", "1", "--backbone-weights", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("LinearHeadDenseNet") and len(out.splitlines()) < 40
    assert next(line for line in out.splitlines() if "denseblock3" in line).endswith("frozen")
    assert next(line for line in out.splitlines() if "denseblock4" in line).endswith("yes")
    assert "global average pool" in out and "logits (1, 1)" in out


def test_summary_loads_a_chexnet_file_through_pretrained_path(tmp_path, capsys):
    from torchvision.models import densenet121

    state = {f"module.densenet121.{k}": v for k, v in densenet121(weights=None).state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "model.pth.tar")
    assert main(["summary", "--img-size", "64", "--pretrained-path", str(tmp_path / "model.pth.tar")]) == 0
    out = capsys.readouterr().out
    import re

    loaded = re.search(r"\(chexnet\): loaded (\d+) backbone tensors", out)
    assert loaded and int(loaded.group(1)) == len([k for k in state if ".features." in k]) and "missing 0" in out


def test_config_error_is_one_clear_message(capsys, caplog):
    assert main(["summary", "--d-model", "100", "--num-heads", "8"]) == 2
    assert "divisible by num_heads" in caplog.text


def test_train_without_data_shows_the_layout(tmp_path, caplog):
    assert main(["train", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "train/<CLASS" in caplog.text or "train/" in caplog.text
    assert "doi:10.17632/rscbjbr9sj.2" in caplog.text


def test_evaluate_writes_metrics_predictions_plots_and_report(ckpt, tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", n_per_class=12, img_size=64, seed=1, splits=("test",),
                                  test_fraction=1.0)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data / "test"), "--out-dir", str(out),
                 "--n-boot", "200"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                "brier", "ece"):
        assert set(m[key]) == {"value", "ci95"}, key
    assert m["threshold"] == pytest.approx(0.4) and m["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert m["n_images"] == 24 and len(m["confusion_matrix"]) == 2 and "at_0.5" in m
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 24
    for name in ("confusion_matrix", "roc", "pr", "reliability", "inputs"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
    assert list((out / "plots").glob("attention_*.png")) and list((out / "plots").glob("heatmaps_*.png"))
    assert (out / "report.html").stat().st_size > 10000
    # --target-sensitivity re-chooses the threshold on the stored validation predictions
    out2 = tmp_path / "eval2"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data / "test"), "--out-dir", str(out2),
                 "--n-boot", "50", "--target-sensitivity", "1.0"]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert "sensitivity" in m2["threshold_source"] and m2["threshold"] != m["threshold"]


def _write_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 70), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 90, 3), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(folder / "c16.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored")


def test_predict_with_a_corrupt_file(ckpt, tmp_path):
    _write_inputs(tmp_path / "in")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(out), "--precision", "32",
                 str(tmp_path / "in")]) == 0
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a.png", "b.jpg", "c16.png", "broken.png"}
    assert rows["broken.png"]["error"] and not rows["broken.png"]["prob_PNEUMONIA"]
    for name in ("a.png", "b.jpg", "c16.png"):
        p = float(rows[name]["prob_PNEUMONIA"])
        assert 0 <= p <= 1 and rows[name]["predicted_label"] == ("PNEUMONIA" if p >= 0.4 else "NORMAL")
        assert float(rows[name]["prob_NORMAL"]) == pytest.approx(1 - p, abs=2e-6)
    # the CSV agrees with the model applied directly (fp32, Platt scaling with the stored T and b)
    from chexformer.data import build_transforms, load_image, resize_image

    model, meta = load_checkpoint(ckpt)
    x = build_transforms(meta.config, False, meta.mean, meta.std)(resize_image(load_image(tmp_path / "in/a.png"), 64))
    with torch.no_grad():
        expected = torch.sigmoid(model(x[None]) / meta.temperature + meta.bias).item()
    assert float(rows["a.png"]["prob_PNEUMONIA"]) == pytest.approx(expected, abs=1e-5)


def test_explain_writes_one_panel_per_image(ckpt, tmp_path):
    _write_inputs(tmp_path / "in")
    out = tmp_path / "explain"
    assert main(["explain", "--checkpoint", str(ckpt), "--out-dir", str(out), str(tmp_path / "in/a.png"),
                 str(tmp_path / "in/broken.png")]) == 0
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 5000
    rows = list(csv.DictReader((out / "explain.csv").open()))
    assert rows[1]["error"] and rows[0]["panel"]


def test_export_onnx_from_the_cli(ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out)]) == 0
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["threshold"] == pytest.approx(0.4) and meta["class_names"] == ["NORMAL", "PNEUMONIA"]


def test_checkpoint_that_is_not_chexformer(tmp_path, caplog):
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    assert main(["predict", "--checkpoint", str(bad), "--output", str(tmp_path / "p.csv"), str(tmp_path)]) == 2
    assert "not a chexformer checkpoint" in caplog.text


def test_an_output_that_is_an_input_is_refused_before_any_work(ckpt, tmp_path, caplog):
    """`--output` naming the checkpoint or an input image would destroy it: one clear error, and the
    file is untouched; a folder, an unwritable place or a bad batch size are refused up front too."""
    _write_inputs(tmp_path / "in")
    image = tmp_path / "in" / "a.png"
    before = {p: p.read_bytes() for p in (ckpt, image)}
    for output in (ckpt, image):
        assert main(["predict", "--checkpoint", str(ckpt), "--output", str(output), str(tmp_path / "in")]) == 2
        assert "also an input" in caplog.text
    caplog.clear()
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(ckpt)]) == 2
    assert "also an input" in caplog.text
    assert {p: p.read_bytes() for p in (ckpt, image)} == before

    caplog.clear()
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "in"), str(image)]) == 2
    assert "is a folder" in caplog.text
    caplog.clear()
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(image / "p.csv"), str(image)]) == 2
    assert "cannot create the folder" in caplog.text  # the output's folder would be a file
    for bad in ("0", "-1"):
        caplog.clear()
        assert main(["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "p.csv"),
                     "--batch-size", bad, str(image)]) == 2
        assert "--batch-size must be >= 1" in caplog.text
    assert not (tmp_path / "p.csv").exists()
    caplog.clear()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "in"),
                 "--out-dir", str(tmp_path / "ev"), "--n-boot", "-5"]) == 2
    assert "--n-boot must be >= 0" in caplog.text


def test_blank_images_are_flagged_without_a_guard(ckpt, tmp_path, caplog):
    """A checkpoint without a guard (small data) still flags images whose pixels show they are no
    radiograph, in predict's CSV and explain's, instead of a bare confident label."""
    _write_inputs(tmp_path / "in")
    Image.fromarray(np.full((50, 50), 255, np.uint8)).save(tmp_path / "in" / "white.png")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(out), str(tmp_path / "in")]) == 0
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert rows["white.png"]["warning"].startswith("blank image") and rows["white.png"]["in_distribution"] == "False"
    assert rows["a.png"]["warning"] == "" and rows["a.png"]["predicted_label"]
    assert "fail the pixel check" in caplog.text
    assert main(["explain", "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "ex"),
                 str(tmp_path / "in" / "white.png")]) == 0
    assert next(csv.DictReader((tmp_path / "ex" / "explain.csv").open()))["warning"].startswith("blank image")
    # evaluate follows the same rule (guard.population_verdicts): a blank image in a labelled folder is named
    data = make_synthetic_dataset(tmp_path / "d", n_per_class=4, img_size=64, seed=1, splits=("test",),
                                  test_fraction=1.0)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "test" / "NORMAL" / "black.png")
    caplog.clear()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data / "test"), "--out-dir",
                 str(tmp_path / "ev"), "--n-boot", "0"]) == 0
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader((tmp_path / "ev" / "predictions.csv").open())}
    assert len(rows) == 9 and rows["black.png"]["warning"].startswith("blank image")
    assert rows["black.png"]["in_distribution"] == "False"
    assert {r["in_distribution"] for r in rows.values()} == {"", "False"}  # no guard: the others unknown
    assert sum(bool(r["warning"]) for r in rows.values()) == 1
    assert "1 of 9 images fail the pixel check" in caplog.text


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(range(256)), bytes(range(7, 200))])
def test_a_file_that_is_no_checkpoint_is_named_so(content, tmp_path, caplog):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(content)
    assert main(["predict", "--checkpoint", str(bad), "--output", str(tmp_path / "p.csv"), str(tmp_path)]) == 2
    assert "is not a PyTorch checkpoint" in caplog.text and "trust" not in caplog.text
    caplog.clear()
    assert main(["predict", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "p.csv"), str(bad)]) == 2
    assert "is a folder, not a checkpoint file" in caplog.text


def test_runtime_options_are_checked_by_name(ckpt, tmp_path, caplog):
    _write_inputs(tmp_path / "in")
    assert main(["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "p.csv"), "--device", "banana",
                 str(tmp_path / "in" / "a.png")]) == 2
    assert "--device must be auto, cpu or cuda[:N]" in caplog.text
    checks = [("--devices", "foo", "devices must be 'auto'"), ("--seed", "-5", "seed must lie"),
              ("--init-lr", "inf", "init_lr must be a finite number")]
    if not torch.cuda.is_available():
        checks.append(("--accelerator", "gpu", "torch sees no CUDA GPU"))
    for option, value, message in checks:
        caplog.clear()
        assert main(["train", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), option, value]) == 2
        assert message in caplog.text
    assert not (tmp_path / "run").exists()


def test_evaluate_on_a_bad_folder_shows_the_folder_layout_not_the_training_one(ckpt, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "empty"),
                 "--out-dir", str(tmp_path / "ev")]) == 2
    assert "no class sub-folders" in caplog.text and "one labelled folder" in caplog.text
    assert "train/<CLASS_A>" not in caplog.text


def test_a_system_error_is_one_message_with_the_traceback_only_under_verbose(ckpt, tmp_path, caplog):
    """An OSError from the system (here: a folder to create below a file) ends as one logged error
    and exit status 2; with -v the traceback is logged too, for whoever debugs it."""
    _write_inputs(tmp_path / "in")
    out_dir = str(tmp_path / "in" / "a.png" / "ev")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "in"), "--out-dir", out_dir]) == 2
    assert "Not a directory" in caplog.text and "Traceback" not in caplog.text
    caplog.clear()
    assert main(["-v", "evaluate", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "in"),
                 "--out-dir", out_dir]) == 2
    assert "Traceback" in caplog.text
