"""Training end to end on tiny data: files written, resume after SIGKILL, cache, DDP, real data."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from chexformer import Config
from chexformer.checkpoint import load_checkpoint
from chexformer.config import ConfigError
from chexformer.history import read_history
from chexformer.synthetic import make_synthetic_dataset
from chexformer.train import RunExistsError, XrayDataModule, train
from chexformer.weights import WeightsError, read_checkpoint_file

from .conftest import SHARED_DATA

TINY = dict(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, batch_size=16, epochs=2,
            backbone_weights="none", num_workers=0, precision="32", log_images_every=1, patience=3)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, n_per_class=16, img_size=64, seed=0)
    return root


def _cfg(data, out, **kw):
    return Config(**{**TINY, "data_dir": str(data), "out_dir": str(out), **kw})


RUN_FILES = ["config.yaml", "split.csv", "history.csv", "summary.json", "checkpoints/best.ckpt",
             "checkpoints/last.ckpt", "checkpoints/final.ckpt"]


def test_short_run_writes_every_file(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(tiny_data, out))
    for name in RUN_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 3
    assert summary["best_val_loss"] is not None and torch.isfinite(torch.tensor(summary["best_val_loss"]))
    # the host it computed on: the same seed and code train another model on another CPU generation
    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["cpu_capability"]
    if Path("/proc/cpuinfo").is_file():
        assert env["cpu_id"].startswith("cpu family ") and " model " in env["cpu_id"]
    # last.ckpt is the newest epoch, whether or not it improved the validation loss
    assert load_checkpoint(out / "checkpoints/last.ckpt")[1].epoch == 1
    assert load_checkpoint(out / "checkpoints/final.ckpt")[1].epoch == 1
    model, meta = load_checkpoint(out / "checkpoints/best.ckpt")
    assert meta.class_names == ["NORMAL", "PNEUMONIA"] and 0 <= meta.threshold <= 1 and meta.temperature > 0
    assert Config.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())) == meta.config
    # the training images' sharpness per class (an acquisition cue), in the summary and the checkpoint
    assert set(summary["data"]["sharpness"]["median"]) == {"NORMAL", "PNEUMONIA"}
    assert meta.extra["data"]["sharpness"] == summary["data"]["sharpness"]
    # TensorBoard got losses, AUC, learning rate, gradient histograms and images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train_loss", "train_acc", "train_auc", "val_loss", "val_acc", "val_auc"):
        assert tag in tags["scalars"], tag
    assert any(t.startswith("lr-") for t in tags["scalars"])
    assert any(t.startswith("gradients/") for t in tags["histograms"])
    assert {"inputs", "feature_maps", "attention_last_layer"} <= set(tags["images"])
    hparams = __import__("yaml").safe_load((out / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["img_size"] == 64 and hparams["logger"] == "tensorboard"  # the run's config, not empty
    # every history row belongs to its epoch: the same numbers TensorBoard has for that epoch
    import csv

    rows = list(csv.DictReader((out / "history.csv").open()))
    for tag in ("train_loss", "train_acc", "val_loss", "val_auc"):
        scalars = acc.Scalars(tag)
        assert len(scalars) == len(rows) == 2, tag
        for row, ev in zip(rows, scalars):
            assert float(row[tag]) == pytest.approx(ev.value, rel=1e-4, abs=1e-5), (tag, row["epoch"])
    # after training: shift-robust threshold, TTA threshold and the guard stored in best.ckpt
    extra = meta.extra
    assert extra["threshold_rule"] == "shift_robust" and 0 < extra["tta_threshold"] < 1
    assert extra["guard"] is None and "validation_shift_suite" in extra  # too few images for a guard: skipped
    suite = json.loads((out / "validation_shift_suite.json").read_text())
    assert len(suite["rows"]) == 25 and suite["threshold"] == pytest.approx(meta.threshold)
    assert suite["precision"] == "32" and set(suite["seconds_per_step"]) == {"suite", "tta", "guard"}
    # results of the test split
    assert (out / "results" / "metrics.json").is_file()
    # a second run into the same folder does not overwrite it
    with pytest.raises(RunExistsError):
        train(_cfg(tiny_data, out))


def test_post_training_steps_score_in_the_runs_precision(tiny_data, tmp_path, monkeypatch):
    """A run trained in bf16 scores the suite and TTA in bf16 autocast (the recipe's CPU time),
    and the threshold it stores is the one chosen on those scores: re-scoring validation in bf16
    (as bench/threshold_epochs.py does by default) gives the stored cut back."""
    from chexformer.data import XrayDataset, read_split_csv
    from chexformer.inference import Predictor
    from chexformer.robustness import operating_threshold, shift_suite_logits

    built = []
    load = Predictor.from_checkpoint.__func__

    def spy(cls, path, **kwargs):
        predictor = load(cls, path, **kwargs)
        built.append(predictor.precision)
        return predictor

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(spy))
    out = tmp_path / "bf16run"
    train(_cfg(tiny_data, out, epochs=1, precision="bf16-mixed"), evaluate=False)
    monkeypatch.undo()
    assert built == ["bf16-mixed"]  # the one Predictor of the post-training steps
    suite = json.loads((out / "validation_shift_suite.json").read_text())
    _, meta = load_checkpoint(out / "checkpoints/best.ckpt")
    assert suite["precision"] == "bf16-mixed" and meta.extra["validation_shift_suite"]["precision"] == "bf16-mixed"
    assert suite["threshold"] == pytest.approx(meta.threshold) and 0 < meta.extra["tta_threshold"] < 1
    rescore = Predictor.from_checkpoint(out / "checkpoints/best.ckpt", device="cpu", precision="bf16-mixed")
    val = XrayDataset(read_split_csv(out / "split.csv", "val"), rescore.img_size, rescore.cfg.keep_aspect, preload=True)
    probs = {k: rescore.probabilities(v) for k, v in shift_suite_logits(rescore, val, seed=meta.config.seed).items()}
    y = __import__("numpy").array(val.labels)
    assert operating_threshold(y, probs, meta.extra["threshold_rule"])[0] == pytest.approx(meta.threshold, abs=1e-9)


def test_csv_logger_records_metrics_and_hyperparameters(tiny_data, tmp_path):
    import csv

    out = tmp_path / "csvrun"
    train(_cfg(tiny_data, out, epochs=1, logger="csv"))
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert any(r.get("val_loss") for r in rows) and any(r.get("train_loss") for r in rows)
    assert __import__("yaml").safe_load((out / "csv" / "hparams.yaml").read_text())["logger"] == "csv"
    assert not (out / "tensorboard").exists() and (out / "history.csv").is_file()


def test_mlflow_logger_without_mlflow_is_one_clear_error(tiny_data, tmp_path):
    try:
        import mlflow  # noqa: F401
        pytest.skip("mlflow is installed")
    except ImportError:
        pass
    from chexformer.config import ConfigError

    with pytest.raises(ConfigError, match="pip install mlflow"):
        train(_cfg(tiny_data, tmp_path / "ml", epochs=1, logger="mlflow"))


def test_missing_data_folder_explains_the_layout(tmp_path):
    from chexformer.data import DatasetLayoutError

    with pytest.raises(DatasetLayoutError) as err:
        train(_cfg(tmp_path / "nowhere", tmp_path / "run"))
    assert "train/" in str(err.value) and "Kermany" in str(err.value)
    assert str(err.value).count("expected layout") == 1  # the layout once, not twice


def test_sharpness_is_measured_always_and_matched_in_training_only(tiny_data):
    from chexformer.shifts import SharpnessMatch

    dm = XrayDataModule(_cfg(tiny_data, "unused", augment=True, sharpness_match=1.0))
    dm.build_images()
    info = dm.summary()["sharpness"]
    medians = info["median"]
    assert set(medians) == set(dm.class_names) and all(v > 0 for v in medians.values())
    sharper = max(medians, key=medians.get)
    assert medians[sharper] > 1.01 * min(medians.values())  # the synthetic classes differ
    assert list(info["match_sigma"]) == [sharper] and info["match_p"] == 1.0
    assert isinstance(dm.train_images.label_transform, SharpnessMatch) and dm.val_images.label_transform is None
    i = next(k for k, s in enumerate(dm.train_samples) if dm.class_names[s.label] == sharper)
    assert not torch.equal(dm.train_images.label_transform(dm.train_images.uint8(i), dm.train_samples[i].label),
                           dm.train_images.uint8(i))
    off = XrayDataModule(_cfg(tiny_data, "unused", augment=True))
    off.build_images()
    assert off.train_images.label_transform is None and "match_sigma" not in off.summary()["sharpness"]
    assert off.summary()["sharpness"]["median"] == medians


def test_cached_and_uncached_frozen_paths_give_the_same_features(tiny_data):
    cfg = _cfg(tiny_data, "unused", freeze_cnn=True, cache_views=2)
    from chexformer.model import build_model

    model = build_model(cfg).eval()
    dm = XrayDataModule(cfg)
    dm.setup()
    dm.enable_feature_cache(model, None, "32", "cpu")
    images, labels, idx = next(iter(torch.utils.data.DataLoader(dm.val_images, batch_size=8)))
    with torch.no_grad():
        direct = model.forward_features(images)
    cached = torch.stack([dm.val_set[i][0] for i in idx.tolist()])
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=2e-3)
    # view 0 of the training cache is the un-augmented image, identical to the eval path
    img0 = dm.transforms(False)(dm.train_images.uint8(0)).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(dm.train_set.cache.get(0, 0), model.forward_features(img0)[0], rtol=2e-3, atol=2e-3)
    # and the logits through the cached path match the plain model
    with torch.no_grad():
        torch.testing.assert_close(model.forward_from_features(cached), model(images), rtol=1e-2, atol=1e-2)


def test_disk_cache_is_reused(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_data, out, freeze_cnn=True, cache_features="disk", epochs=1, cache_views=2)
    s1 = train(cfg)
    assert s1["feature_cache"] is True
    files = sorted((out / "feature_cache").glob("features-*.pt"))
    assert len(files) == 2
    stamp = [f.stat().st_mtime_ns for f in files]
    train(cfg.replace(out_dir=str(tmp_path / "run2"), cache_dir=str(out / "feature_cache")))
    assert [f.stat().st_mtime_ns for f in files] == stamp  # read, not recomputed


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "chexformer", *args], env=env, **kw)


def _train_args(data, out, epochs):
    return ["train", "--data-dir", str(data), "--out-dir", str(out), "--img-size", "64", "--d-model", "32",
            "--num-heads", "4", "--ffn-dim", "64", "--num-layers", "1", "--batch-size", "8", "--epochs", str(epochs),
            "--backbone-weights", "none", "--num-workers", "0", "--precision", "32", "--patience", "10"]


def test_sigkill_mid_epoch_then_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = _cli(*_train_args(tiny_data, out, 3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no last.ckpt after the first epoch"
    time.sleep(1.0)  # inside epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    load_checkpoint(last)  # whatever moment the kill came, last.ckpt is complete
    assert (out / "checkpoints" / "best.ckpt").is_file()
    done_before = len((out / "history.csv").read_text().splitlines()) - 1
    assert done_before < 3

    resumed = _cli(*_train_args(tiny_data, out, 3), "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, log[-3000:]
    assert "resuming from" in log
    epochs = [int(line.split(",")[0]) for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [0, 1, 2]
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    _, meta = load_checkpoint(out / "checkpoints" / "final.ckpt")
    assert meta.epoch == 2


def _interrupted_at_epoch_2(monkeypatch, cfg):
    """Train ``cfg`` until the start of epoch 2, where an exception stops it: an interruption, not
    a shorter budget (last.ckpt holds epoch 1)."""
    import chexformer.train as train_module

    class Crash(RuntimeError):
        pass

    def crash_at_epoch_2(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise Crash

    with monkeypatch.context() as m, pytest.raises(Crash):
        m.setattr(train_module.ResumeState, "on_train_epoch_start", crash_at_epoch_2)
        train(cfg, evaluate=False)


def _assert_same_run(resumed, whole):
    """The resumed run retraced the uninterrupted one: history.csv (but the seconds), and
    final.ckpt's scheduler state, learning rates and weights. Returns both checkpoints."""
    def rows(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_history(out / "history.csv")]

    assert rows(resumed) == rows(whole)
    a = read_checkpoint_file(whole / "checkpoints" / "final.ckpt")  # weights_only, as every reader loads it
    b = read_checkpoint_file(resumed / "checkpoints" / "final.ckpt")
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == \
        [g["lr"] for g in b["optimizer_states"][0]["param_groups"]]
    wa, wb = a["state_dict"], b["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return a, b


@pytest.mark.parametrize("selection", ["val_loss", "last"])
def test_every_checkpoint_is_written_after_its_epochs_history_row(tiny_data, tmp_path, monkeypatch, selection):
    """A kill can land between two files of one epoch. history.csv must be written first: a
    last.ckpt of epoch N with no row N would resume at N+1 and lose the row for good (seen in CI
    as history epochs [0, 2] after a SIGKILL). Each save records the rows on disk at that moment."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = tmp_path / "run"
    seen = []
    save = ModelCheckpoint._save_checkpoint

    def recording_save(self, trainer, filepath):
        rows = [int(r["epoch"]) for r in read_history(out / "history.csv")]
        seen.append((os.path.basename(filepath), trainer.current_epoch, rows))
        save(self, trainer, filepath)

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", recording_save)
    train(_cfg(tiny_data, out, epochs=2, checkpoint_selection=selection))
    assert {name for name, _, _ in seen} >= {"best.ckpt", "last.ckpt"}
    for name, epoch, rows in seen:
        assert rows and rows[-1] == epoch, (name, epoch, rows)


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_data, tmp_path):
    """A run stopped after epoch 1 and resumed must retrace the uninterrupted run: same history,
    same final weights, same scheduler state. Augmentation (acquisition too), dropout and EMA draw
    from the RNGs, and Lightning steps the plateau scheduler after writing the epoch's checkpoint,
    so this fails if the checkpoint carries neither the generators nor that step."""
    kw = dict(augment=True, acquisition_aug=0.5, dropout_rate=0.2, ema_decay=0.9, checkpoint_selection="last",
              lr_patience=0)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(_cfg(tiny_data, whole, epochs=3, **kw), evaluate=False)
    train(_cfg(tiny_data, part, epochs=2, **kw), evaluate=False)
    train(_cfg(tiny_data, part, epochs=3, **kw), resume=True, evaluate=False)
    a, b = _assert_same_run(part, whole)
    assert a["lr_schedulers"][0]["last_epoch"] == 3


def test_resume_that_cannot_continue_is_one_clear_error_and_leaves_the_run_as_it_was(tiny_data, tmp_path,
                                                                                     monkeypatch):
    """--resume with an option that changes the model, or with a damaged last.ckpt, stops before
    anything is written (and before the images are decoded, the slow part of setting up):
    config.yaml stays the run's, so a plain --resume still works afterwards."""
    out = tmp_path / "run"
    train(_cfg(tiny_data, out, epochs=1), evaluate=False)
    config, last = (out / "config.yaml").read_text(), out / "checkpoints" / "last.ckpt"
    with monkeypatch.context() as m:
        m.setattr(XrayDataModule, "build_images", lambda self: pytest.fail("images decoded before the resume check"))
        with pytest.raises(ConfigError, match=r"d_model: 32 in the run, 64 now"):
            train(_cfg(tiny_data, out, epochs=2, d_model=64), resume=True, evaluate=False)
    assert (out / "config.yaml").read_text() == config
    intact = last.read_bytes()
    last.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        train(_cfg(tiny_data, out, epochs=2), resume=True, evaluate=False)
    assert (out / "config.yaml").read_text() == config
    last.write_bytes(intact)
    train(_cfg(tiny_data, out, epochs=2), resume=True, evaluate=False)
    assert len((out / "history.csv").read_text().splitlines()) == 3  # header + epochs 0 and 1


def test_cosine_schedule_ends_at_min_lr_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """lr_schedule: cosine falls every batch from init_lr to min_lr over the epochs budget, never
    looking at validation loss; a run interrupted after epoch 1 and resumed must rebuild the curve
    over the same total steps and retrace the uninterrupted run."""
    kw = dict(augment=True, acquisition_aug=0.5, ema_decay=0.9, checkpoint_selection="last", lr_schedule="cosine",
              init_lr=1e-3, min_lr=1e-5)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(_cfg(tiny_data, whole, epochs=3, **kw), evaluate=False)
    lrs = [float(r["lr"]) for r in read_history(whole / "history.csv")]
    assert 1e-3 > lrs[0] > lrs[1] > lrs[2] and lrs[2] == pytest.approx(1e-5), lrs

    _interrupted_at_epoch_2(monkeypatch, _cfg(tiny_data, part, epochs=3, **kw))
    assert len(read_history(part / "history.csv")) == 2
    train(_cfg(tiny_data, part, epochs=3, **kw), resume=True, evaluate=False)
    _assert_same_run(part, whole)


def test_final_anneal_resumes_exactly_and_warns_when_a_run_is_extended(tiny_data, tmp_path, monkeypatch, caplog):
    """The anneal reads its end from the epoch and the budget, not from the checkpoint: a run
    interrupted inside it retraces the uninterrupted one; one extended past an end it annealed for
    says so."""
    kw = dict(checkpoint_selection="last", final_anneal_epochs=2, init_lr=1e-3, lr_factor=0.3, lr_patience=5)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(_cfg(tiny_data, whole, epochs=3, **kw), evaluate=False)
    _interrupted_at_epoch_2(monkeypatch, _cfg(tiny_data, part, epochs=3, **kw))  # epoch 1 was already capped
    # what the checkpoint keeps of it (for the warning of a budget-forecast end): epoch 1, capped, its end configured
    saved = read_checkpoint_file(part / "checkpoints" / "last.ckpt")
    assert saved["callbacks"]["FinalAnneal"] == {"epoch": 1, "left": 2, "planned": 2, "capped": 1}
    # the same checkpoint as if a budget had forecast the end after epoch 1: its resume warns (the
    # state reaches the callback through Lightning's restore)
    import shutil

    forged = tmp_path / "forged"
    shutil.copytree(part, forged)
    saved["callbacks"]["FinalAnneal"] = {"epoch": 1, "left": 1, "planned": 2, "capped": 1}
    torch.save(saved, forged / "checkpoints" / "last.ckpt")
    off = tmp_path / "forged_off"
    shutil.copytree(forged, off)
    with caplog.at_level("WARNING", logger="chexformer"):
        train(_cfg(tiny_data, forged, epochs=3, **kw), resume=True, evaluate=False)
    said = "epoch 2 trained under the final anneal for an end the epoch budget forecast (epoch 2 of 3)"
    assert caplog.text.count(said) == 1
    caplog.clear()
    # the same resume with the anneal turned off: the (inert) FinalAnneal callback still says it
    with caplog.at_level("WARNING", logger="chexformer"):
        train(_cfg(tiny_data, off, epochs=3, **{**kw, "final_anneal_epochs": 0}), resume=True, evaluate=False)
    assert caplog.text.count(said) == 1
    caplog.clear()
    # a resume that trains no epoch (the run is complete) rewrites final.ckpt with the state it loaded
    final = forged / "checkpoints" / "final.ckpt"
    written = final.stat().st_mtime_ns
    train(_cfg(tiny_data, forged, epochs=3, **kw), resume=True, evaluate=False)
    assert final.stat().st_mtime_ns > written
    assert read_checkpoint_file(final)["callbacks"]["FinalAnneal"]["epoch"] == 2
    with caplog.at_level("WARNING", logger="chexformer"):
        train(_cfg(tiny_data, part, epochs=3, **kw), resume=True, evaluate=False)
    assert "budget forecast" not in caplog.text
    _assert_same_run(part, whole)
    with caplog.at_level("WARNING", logger="chexformer.module"):
        train(_cfg(tiny_data, whole, epochs=4, **kw), resume=True, evaluate=False)
    assert "last 2 epochs were annealed for an end at epoch 3, with epochs=4" in caplog.text


def test_extending_a_cosine_run_warns_that_the_curve_changes(tiny_data, tmp_path, caplog):
    out = tmp_path / "run"
    kw = dict(checkpoint_selection="last", lr_schedule="cosine")
    train(_cfg(tiny_data, out, epochs=1, **kw), evaluate=False)
    with caplog.at_level("WARNING", logger="chexformer.module"):
        train(_cfg(tiny_data, out, epochs=2, **kw), resume=True, evaluate=False)
    assert "cosine curve spans the whole budget" in caplog.text and "over 1 epochs as lr_schedule=cosine over 2" \
        in caplog.text


def test_resume_state_gives_each_rank_its_own_generators(caplog):
    from types import SimpleNamespace

    from chexformer.callbacks import ResumeState, _generator_state

    def saved_by(seed):
        torch.manual_seed(seed)
        return _generator_state()

    ranks = [saved_by(0), saved_by(1)]
    checkpoint = {**ranks[0], "scheduler_metrics": {}, "ranks": ranks}
    for rank in (0, 1):  # a two-rank run resumed on two ranks: each continues from its own state
        state = ResumeState(seed=0)
        state.setup(SimpleNamespace(world_size=2, global_rank=rank), None, "fit")
        state.load_state_dict(checkpoint)
        assert torch.equal(torch.get_rng_state(), ranks[rank]["torch"])
    # a one-device checkpoint resumed on two ranks: rank 1 keeps its own seed (seed + 1), not rank zero's
    state = ResumeState(seed=7)
    state.setup(SimpleNamespace(world_size=2, global_rank=1), None, "fit")
    state.load_state_dict({**ranks[0], "scheduler_metrics": {}})
    assert torch.equal(torch.get_rng_state(), saved_by(8)["torch"])
    # and rank zero says that the continued run cannot retrace the saved one
    with caplog.at_level("WARNING", logger="chexformer.callbacks"):
        state = ResumeState(seed=7)
        state.setup(SimpleNamespace(world_size=2, global_rank=0), None, "fit")
        state.load_state_dict({**ranks[1], "scheduler_metrics": {}})
    assert torch.equal(torch.get_rng_state(), ranks[1]["torch"])
    assert "generator states for 1 process(es), this run has 2" in caplog.text


def test_training_metrics_under_ddp_cover_every_rank(monkeypatch):
    # the history's training columns come from every rank's outputs, not rank zero's share: rank 0
    # (here) got its two images right, the simulated rank 1 its two wrong
    from types import SimpleNamespace

    from chexformer.model import build_model
    from chexformer.module import ChexFormerModule

    cfg = Config(**TINY)
    module = ChexFormerModule(cfg, ["NORMAL", "PNEUMONIA"], build_model(cfg, num_classes=2))
    module._trainer = SimpleNamespace(world_size=2)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    other = {0: torch.tensor(3.0), 1: torch.zeros(2, dtype=torch.long)}  # rank 1's loss sum and labels

    def all_gather(t):
        return torch.stack([t, other.get(t.dim(), t) if t.dtype != torch.long else other[1]])

    monkeypatch.setattr(module, "all_gather", all_gather)
    module._train_out = [(torch.full((2, 1), 2.0), torch.ones(2, dtype=torch.long), torch.tensor(1.0))]
    module.on_train_epoch_end()
    m = module.epoch_train_metrics
    assert (m["train_loss"], m["train_acc"], m["train_auc"]) == (1.0, 0.5, 0.5)  # rank 0 alone: 0.5, 1.0, nan


def test_ranks_that_disagree_on_resuming_stop_at_setup(monkeypatch):
    # a node that cannot see last.ckpt (a run folder not shared across nodes) would start afresh while
    # the others resume, and the ranks would hang on each other's collectives
    from types import SimpleNamespace

    from chexformer.callbacks import ResumeState

    def gather(out, flag):
        out[:] = [True, flag]  # rank 0 found the checkpoint; this rank (1) reports its own

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    with pytest.raises(RuntimeError, match=r"ranks \[0\] found the checkpoint .* and ranks \[1\] did not"):
        ResumeState(seed=0).setup(SimpleNamespace(world_size=2, global_rank=1, ckpt_path=None), None, "fit")
    ResumeState(seed=0).setup(SimpleNamespace(world_size=2, global_rank=1, ckpt_path="last.ckpt"), None, "fit")


def test_resume_from_a_checkpoint_without_generator_state_warns(tiny_data, tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(tiny_data, out, epochs=1), evaluate=False)
    last = out / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint_file(last)
    assert "ResumeState" in ckpt["callbacks"]
    del ckpt["callbacks"]["ResumeState"]  # as written by chexformer before the callback existed
    torch.save(ckpt, last)
    train(_cfg(tiny_data, out, epochs=2), resume=True, evaluate=False)
    assert "carries no random generator state" in caplog.text
    assert load_checkpoint(out / "checkpoints" / "final.ckpt")[1].epoch == 1


@pytest.mark.xdist_group("ddp")  # one worker runs both, one after the other (ports, cores)
def test_two_process_ddp_ranks_agree(tiny_data, tmp_path):
    import shutil

    out, data = tmp_path / "ddp", tmp_path / "data"
    shutil.copytree(tiny_data, data)  # one image fewer and a 0.3 split: 7 validation images, an odd count
    (data / "train" / "NORMAL" / "IM-1006-0001.png").unlink()
    # the recipe's budget and final anneal ride along: the anneal gathers every rank's forecast of the end
    # (a budget this long forecasts the configured end), so the ranks cap the last epoch alike
    args = _train_args(data, out, 2) + ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                                         "--epoch-budget-minutes", "600", "--final-anneal-epochs", "1",
                                         "--class-weighting", "none", "--validation-split", "0.3"]
    proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["agree"] is True
    assert check["process_group_alive"] is True  # checked before the group is torn down
    assert len(set(check["checksums"])) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert log.count("final_anneal_epochs=1: epoch 2 is projected to be 1 from the end") == 2  # once per rank
    # both ranks destroy their gloo group before rank 1 exits (left to interpreter shutdown, it can abort)
    assert "DDP: rank 0 released its process group" in log and "DDP: rank 1 released its process group" in log
    assert log.count("data-parallel training on 2 processes (devices=2, num_nodes=1): a step averages 2 x 8 = 16") == 1
    # validation loss counts each image once, though the sampler pads an odd count with a repeat
    meta = read_checkpoint_file(out / "checkpoints" / "last.ckpt")["chexformer"]["extra"]["val_predictions"]
    assert len(meta["labels"]) == 7
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(meta["logits"]),
                                                                torch.tensor(meta["labels"]).float())
    assert float(read_history(out / "history.csv")[-1]["val_loss"]) == pytest.approx(float(loss), rel=1e-5)
    # each rank drew its own augmentation and dropout (rank 1 from seed + 1), and the checkpoint keeps
    # both ranks' generators for a resume (with one seed for all, the two states would be equal)
    ranks = read_checkpoint_file(out / "checkpoints" / "last.ckpt")["callbacks"]["ResumeState"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert ranks[0]["python"] != ranks[1]["python"]
    assert [float(r["lr"]) for r in read_history(out / "history.csv")] == [1e-4, 1e-4 * 0.3]


@pytest.mark.xdist_group("ddp")  # one worker runs them, one after the other (ports, cores)
def test_two_process_ddp_resume_retraces_the_uninterrupted_run(tiny_data, tmp_path):
    # each rank resumes from its own generators (rank 1's differ from rank zero's): the continued
    # run draws what the uninterrupted one drew, on both ranks
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--lr-patience", "0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    for args in (_train_args(tiny_data, whole, 2) + ddp, _train_args(tiny_data, part, 1) + ddp,
                 _train_args(tiny_data, part, 2) + ddp + ["--resume"]):
        proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log = proc.communicate(timeout=600)[0].decode()
        assert proc.returncode == 0, log[-3000:]
        assert log.count("released its process group") == 2
    assert "random generator states for" not in log
    _assert_same_run(part, whole)


@pytest.mark.xdist_group("ddp")  # one worker runs them, one after the other (ports, cores)
def test_two_process_ddp_builds_the_feature_cache_on_each_rank(tiny_data, tmp_path):
    out = tmp_path / "ddp_cache"
    args = _train_args(tiny_data, out, 1) + ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                                              "--freeze-cnn", "true", "--cache-views", "1"]
    proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check["agree"] is True and check["feature_cache_device"] == "cpu"
    assert log.count("fast frozen path") == 2  # once per rank, inside setup()


def _kermany_folder(root, names):
    from PIL import Image

    rng = np.random.default_rng(len(names))
    for rel in names:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(path)
    return root


def _names(split, n, start=0):
    return ([f"{split}/NORMAL/IM-{start + k:04d}-0001.png" for k in range(n)]
            + [f"{split}/PNEUMONIA/person{start + k}_bacteria_{k}.png" for k in range(n)])


def test_too_small_val_folder_is_set_aside_for_the_patient_split(tmp_path, caplog):
    root = _kermany_folder(tmp_path / "d", _names("train", 30) + _names("val", 8, start=100))
    dm = XrayDataModule(_cfg(root, tmp_path / "o"))
    with caplog.at_level("WARNING", logger="chexformer"):
        dm.scan()
    assert dm.val_source.startswith("split") and "too few images" in caplog.text
    assert not any("/val/" in str(s.path) for s in dm.train_samples + dm.val_samples)
    assert 8 <= len(dm.val_samples) <= 16  # 20 % of 60 training images, by patient
    big = _kermany_folder(tmp_path / "e", _names("train", 30) + _names("val", 30, start=100))
    dm = XrayDataModule(_cfg(big, tmp_path / "o"))
    dm.scan()
    assert dm.val_source == "folder" and len(dm.val_samples) == 60


def test_blank_training_images_are_reported_not_silently_learned(tmp_path, caplog):
    """A 1 x 1 PNG or a blank frame in a class folder trains as that class; the run says so."""
    from PIL import Image

    root = make_synthetic_dataset(tmp_path / "d", n_per_class=16, img_size=64, seed=0)
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(root / "train" / "NORMAL" / "IM-9998-0001.png")
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(root / "train" / "PNEUMONIA" / "person9999_virus_1.png")
    dm = XrayDataModule(_cfg(root, tmp_path / "o"))
    with caplog.at_level("WARNING", logger="chexformer"):
        dm.build_images()
    suspect = {Path(p).name: r for p, r in dm.summary()["suspect_images"]}
    assert set(suspect) == {"IM-9998-0001.png", "person9999_virus_1.png"}
    assert all(r.startswith("blank image") for r in suspect.values())
    assert "2 image(s) fail the pixel check" in caplog.text
    assert len(dm.train_samples) + len(dm.val_samples) == 26  # kept, as labelled (24 train of 32 + 2)


def test_patient_in_train_and_test_is_an_error_unless_allowed(tmp_path):
    from chexformer.data import PatientOverlapError

    root = _kermany_folder(tmp_path / "d", _names("train", 10) + ["test/PNEUMONIA/person3_virus_99.png",
                                                                   "test/NORMAL/IM-0500-0001.png"])
    with pytest.raises(PatientOverlapError, match="person3"):
        XrayDataModule(_cfg(root, tmp_path / "o")).scan()
    dm = XrayDataModule(_cfg(root, tmp_path / "o", allow_patient_overlap=True))
    dm.scan()
    assert dm.summary()["shared_patients"] == {"train/test": ["person3"]}


KERMANY = SHARED_DATA / "kermany224" / "train"


@pytest.mark.skipif(not KERMANY.is_dir(), reason=f"real data not found at {KERMANY}")
def test_one_epoch_on_a_patient_grouped_subset_of_real_data(tmp_path):
    from chexformer.data import scan_folder, split_by_patient

    scan = scan_folder(KERMANY, verify=False)
    # a patient-grouped subset: the validation side of a 2% split, linked (never copied) into a data folder
    _, subset = split_by_patient(scan.samples, 0.02, seed=0)
    root = tmp_path / "data" / "train"
    for s in subset:
        dest = root / scan.class_names[s.label] / s.path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(s.path)
    out = tmp_path / "run"
    summary = train(_cfg(tmp_path / "data", out, img_size=96, epochs=1, validation_split=0.3))
    assert torch.isfinite(torch.tensor(summary["best_val_loss"]))
    history = (out / "history.csv").read_text().splitlines()
    row = dict(zip(history[0].split(","), history[1].split(",")))
    for key in ("train_loss", "val_loss", "val_acc"):
        assert torch.isfinite(torch.tensor(float(row[key]))), key
    _, meta = load_checkpoint(out / "checkpoints" / "best.ckpt")
    assert meta.extra["guard"]["threshold"] > 0  # enough real images: the guard is fitted and stored
    import csv

    with (out / "split.csv").open() as f:
        rows = list(csv.DictReader(f))
    sides = {}
    for r in rows:
        sides.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(v) == 1 for v in sides.values()), "a patient straddles the split"


def test_optimizer_groups_scale_the_backbone_and_leave_frozen_parameters_out():
    from chexformer.model import build_model
    from chexformer.module import ChexFormerModule

    cfg = Config(**{**TINY, "freeze_cnn": True, "fine_tune_layers": 1, "init_lr": 1e-3, "backbone_lr_scale": 0.1})
    module = ChexFormerModule(cfg, ["NORMAL", "PNEUMONIA"], build_model(cfg))
    opt = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["backbone"]["lr"] == pytest.approx(1e-4)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in in_opt for p in frozen)
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert all(id(p) in in_opt for p in trainable)
    backbone_ids = {id(p) for p in groups["backbone"]["params"]}
    assert backbone_ids == {id(p) for p in module.model.backbone.denseblock4.parameters()} | {
        id(p) for p in module.model.backbone.norm5.parameters()}


def test_sampler_balances_the_classes(tmp_path):
    root = tmp_path / "d"
    make_synthetic_dataset(root, n_per_class=12, img_size=64, seed=5, splits=("train",))
    for f in sorted((root / "train" / "NORMAL").iterdir())[:8]:  # make NORMAL the minority (4 vs 12)
        f.unlink()
    dm = XrayDataModule(_cfg(root, tmp_path / "o", class_weighting="sampler", validation_split=0.25))
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    torch.manual_seed(0)
    labels = [dm.train_samples[i].label for _ in range(50) for i in loader.sampler]
    share = sum(labels) / len(labels)
    assert 0.4 < share < 0.6  # about half and half, against 0.75 positives in the data


def test_best_checkpoint_metadata_belongs_to_the_best_epoch(tiny_data, tmp_path):
    import csv

    out = tmp_path / "best"
    train(_cfg(tiny_data, out, epochs=3, patience=10))
    rows = list(csv.DictReader((out / "history.csv").open()))
    best_epoch = min(rows, key=lambda r: float(r["val_loss"]))["epoch"]
    _, meta = load_checkpoint(out / "checkpoints" / "best.ckpt")
    assert meta.epoch == int(best_epoch)
    _, last = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert last.epoch == 2


def test_last_selection_trains_the_whole_budget_and_keeps_the_lowest_loss_epoch_beside_it(tiny_data, tmp_path):
    import csv

    out = tmp_path / "lastsel"
    # patience=1 would stop a val_loss-selected run early; with 'last' the whole budget runs
    summary = train(_cfg(tiny_data, out, epochs=4, patience=1, checkpoint_selection="last"))
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3] and summary["checkpoint_selection"] == "last"
    _, best = load_checkpoint(out / "checkpoints" / "best.ckpt")
    _, lowest = load_checkpoint(out / "checkpoints" / "lowest_val_loss.ckpt")
    assert best.epoch == 3 and best.threshold is not None
    assert lowest.epoch == int(min(rows, key=lambda r: float(r["val_loss"]))["epoch"])
    assert summary["best_val_loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-4)


@pytest.mark.parametrize("selection", ["val_loss", "last"])
def test_only_val_loss_selection_stops_early(tiny_data, tmp_path, selection):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from chexformer.train import RunFolder, build_trainer

    cfg = _cfg(tiny_data, tmp_path / "cb", checkpoint_selection=selection)
    dm = XrayDataModule(cfg)
    dm.setup()
    trainer, best = build_trainer(cfg, dm, RunFolder(tmp_path / "cb"), "cpu", "32", cached=False)
    stoppers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    files = {c.filename for c in trainer.callbacks if isinstance(c, ModelCheckpoint)}
    if selection == "val_loss":
        assert len(stoppers) == 1 and best.monitor == "val_loss" and "lowest_val_loss" not in files
    else:
        assert not stoppers and best.monitor == "epoch" and best.mode == "max" and "lowest_val_loss" in files


def test_three_class_training_end_to_end(tmp_path):
    import shutil

    root = make_synthetic_dataset(tmp_path / "d3", n_per_class=12, img_size=64, seed=6)
    other = make_synthetic_dataset(tmp_path / "extra", n_per_class=12, img_size=64, seed=7)
    for split in ("train", "test"):
        (root / split / "OTHER").mkdir()
        for f in (other / split / "NORMAL").iterdir():
            shutil.copy(f, root / split / "OTHER" / f"other-{f.name}")
    out = tmp_path / "run3"
    # the copied class reuses the synthetic patient ids of another data set: they only coincide
    summary = train(_cfg(root, out, epochs=1, validation_split=0.3, allow_patient_overlap=True))
    assert summary["class_names"] == ["NORMAL", "OTHER", "PNEUMONIA"]
    model, meta = load_checkpoint(out / "checkpoints" / "best.ckpt")
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["task"] == "multiclass" and len(metrics["confusion_matrix"]) == 3


def test_max_minutes_stops_training_early(tiny_data, tmp_path):
    summary = train(_cfg(tiny_data, tmp_path / "short", epochs=50, patience=50, max_minutes=0.005))
    assert summary["epochs_run"] < 50 and (tmp_path / "short" / "checkpoints" / "best.ckpt").is_file()


def test_epoch_budget_stops_when_the_next_epoch_would_overrun(monkeypatch):
    from types import SimpleNamespace

    from chexformer import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(current_epoch=0, max_epochs=14, should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda stop, all: stop))
    budget = callbacks.EpochBudget(minutes=10)  # 600 s
    budget.on_train_start(trainer, None)
    for epoch, seconds in enumerate([150, 120, 130]):  # the longest (150 s) is the projection
        trainer.current_epoch = epoch
        budget.on_train_epoch_start(trainer, None)
        clock[0] += seconds
        budget.on_train_epoch_end(trainer, None)
        assert not trainer.should_stop, epoch  # 150 / 270 / 400 s + 150 s <= 600 s
    trainer.current_epoch = 3
    budget.on_train_epoch_start(trainer, None)
    clock[0] += 100
    budget.on_train_epoch_end(trainer, None)  # 500 s + 150 s > 600 s
    assert trainer.should_stop and budget.stopped_after == 3
    last = callbacks.EpochBudget(minutes=1)
    last.on_train_start(trainer, None)
    trainer.should_stop, trainer.current_epoch = False, 13  # the budget's last epoch: nothing left to stop
    last.on_train_epoch_start(trainer, None)
    clock[0] += 500
    last.on_train_epoch_end(trainer, None)
    assert not trainer.should_stop and last.stopped_after is None
    # a reserve of 1.5 longest epochs for the steps after training: 270 s + 150 s * 2.5 > 600 s
    reserved = callbacks.EpochBudget(minutes=10, reserve=1.5)
    reserved.on_train_start(trainer, None)
    trainer.should_stop = False
    for epoch, seconds in enumerate([150, 120]):
        trainer.current_epoch = epoch
        reserved.on_train_epoch_start(trainer, None)
        clock[0] += seconds
        reserved.on_train_epoch_end(trainer, None)
        if epoch == 0:
            assert not trainer.should_stop  # 150 s + 375 s <= 600 s: goes on
    assert trainer.should_stop and reserved.stopped_after == 1  # 270 s + 375 s > 600 s (without the reserve: 420 s)


@pytest.mark.parametrize(("batch_seconds", "projected"), [(3.0, 3), (1.0, 11), (0.5, 14)])
def test_epoch_budget_warns_early_when_the_machine_is_too_slow_for_the_plan(monkeypatch, caplog, batch_seconds,
                                                                           projected):
    from types import SimpleNamespace

    from chexformer import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(current_epoch=0, max_epochs=14, num_training_batches=100, should_stop=False,
                              is_global_zero=True,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda stop, all: stop))
    budget = callbacks.EpochBudget(minutes=20, reserve=1.0)  # 1,200 s
    budget.on_train_start(trainer, None)
    budget.on_train_epoch_start(trainer, None)
    with caplog.at_level("WARNING", logger="chexformer"):
        for batch_idx in range(9):
            clock[0] += batch_seconds
            budget.on_train_batch_end(trainer, None, None, None, batch_idx)
        assert budget.projected_epochs is None  # a tenth of the epoch not reached yet
        clock[0] += batch_seconds
        budget.on_train_batch_end(trainer, None, None, None, 9)
        # 100 batches: epochs of 300 / 100 / 50 s; one more epoch plus the reserve must end by 1,200 s:
        # 3 x 300 + 2 x 300 > 1,200 >= 2 x 300 + 600; 11 x 100 + 200 > 1,200 >= 10 x 100 + 200; 14 x 50 fit
        assert budget.projected_epochs == projected
        clock[0] += 1000.0  # probed once: a later slow batch changes nothing
        budget.on_train_batch_end(trainer, None, None, None, 10)
    assert budget.projected_epochs == projected
    warned = [r.getMessage() for r in caplog.records if "projected to let about" in r.getMessage()]
    if projected < 14:
        assert len(warned) == 1 and f"about {projected} of the 14 planned epochs" in warned[0]
        assert "--epoch-budget-minutes 0" in warned[0]
    else:
        assert not warned
    resumed = callbacks.EpochBudget(minutes=20, reserve=1.0)  # a resumed run counts the epochs behind it
    trainer.current_epoch = 6
    resumed.on_train_start(trainer, None)
    resumed.on_train_epoch_start(trainer, None)
    for batch_idx in range(10):
        clock[0] += batch_seconds
        resumed.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert resumed.projected_epochs == min(14, 6 + projected)  # the same pace, 8 epochs left
    progressive = callbacks.EpochBudget(minutes=20, low_res_ratio=0.5)  # its own plan adapts: no probe
    progressive.on_train_start(trainer, None)
    progressive.on_train_epoch_start(trainer, None)
    for batch_idx in range(20):
        clock[0] += 60.0
        progressive.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert progressive.projected_epochs is None


@pytest.mark.parametrize("reserve", [0.0, 1.5])
@pytest.mark.parametrize("pause", [0, 60])
def test_epoch_budget_projects_the_end_its_own_stop_rule_reaches(monkeypatch, reserve, pause):
    from types import SimpleNamespace

    from chexformer import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(current_epoch=0, max_epochs=14, should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda stop, all: stop))
    trainer.strategy.all_gather = lambda tensor: tensor
    budget = callbacks.EpochBudget(minutes=20, reserve=reserve)  # 1,200 s of 150-s epochs
    budget.on_train_start(trainer, None)
    # the final anneal reads the same forecast: a shortened run still ends on its two lowest rates
    group = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3, "name": "head"}
    trainer.optimizers = [torch.optim.AdamW([group])]
    anneal = callbacks.FinalAnneal(2, 0.5, {"head": 1e-3}, {"head": 0.0}, budget=budget)
    projected, rates = [], []
    for epoch in range(14):
        trainer.current_epoch = epoch
        budget.on_train_epoch_start(trainer, None)
        anneal.on_train_epoch_start(trainer, SimpleNamespace(device=torch.device("cpu")))
        rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        projected.append(epoch + budget.epochs_left(epoch, 14))  # the end it forecasts, in epochs
        clock[0] += 150
        budget.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            break
        clock[0] += pause  # checkpoints and epoch-end hooks after the budget's own: the rule's clock runs on
    ran = epoch + 1
    # 8 x 150 + 150 > 1,200 = 7 x 150 + 150; 6 x 150 + 2.5 x 150 > 1,200; with 60-s pauses between
    # epochs (a forecast without them says 7 and 6): 6 x 150 + 5 x 60 + 150 > 1,200 >= 5 x 150 + 4 x 60 + 150;
    # 5 x 150 + 4 x 60 + 375 > 1,200 >= 4 x 150 + 3 x 60 + 375
    assert ran == {(0, 0.0): 8, (0, 1.5): 6, (60, 0.0): 6, (60, 1.5): 5}[pause, reserve]
    assert projected[0] == 14  # nothing measured yet: the whole plan
    assert set(projected[1:]) == {ran}, projected  # from then on, the epoch the rule stops after
    assert rates == [1e-3] * (ran - 2) + [5e-4, 2.5e-4]
    # what its checkpoint keeps: the last epoch was capped for an end the budget forecast
    assert anneal.state_dict() == {"epoch": ran - 1, "left": 1, "planned": 14 - (ran - 1), "capped": 1}


def _budget_with_small_epochs(monkeypatch, budget, low_res_until: int, full: float, low: float):
    """Run ``budget`` (with a two-epoch FinalAnneal reading it) over up to 14 epochs on a fake clock:
    an epoch lasts ``low`` seconds where the module trains it small, else ``full``. Returns the
    epochs run, each epoch's size ('low' or 'full') and each epoch's learning rate."""
    from types import SimpleNamespace

    from chexformer import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(current_epoch=0, max_epochs=14, should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda stop, all: stop,
                                                       all_gather=lambda tensor: tensor))
    group = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3, "name": "head"}
    trainer.optimizers = [torch.optim.AdamW([group])]
    anneal = callbacks.FinalAnneal(2, 0.5, {"head": 1e-3}, {"head": 0.0}, budget=budget)
    module = SimpleNamespace(low_res_until=low_res_until, device=torch.device("cpu"))
    budget.on_train_start(trainer, module)
    sides, rates = [], []
    for epoch in range(14):
        trainer.current_epoch = epoch
        budget.on_train_epoch_start(trainer, module)
        anneal.on_train_epoch_start(trainer, module)
        rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        sides.append("low" if epoch < module.low_res_until else "full")  # what the module trains at
        clock[0] += low if sides[-1] == "low" else full
        budget.on_train_epoch_end(trainer, module)
        if trainer.should_stop:
            break
    return epoch + 1, sides, rates


@pytest.mark.parametrize("full, low, trained, small", [
    (150, 100, 14, []),                        # every epoch fits at full size: the plan is inert
    (240, 170, 14, [1, 2, 3, 4, 5, 6, 7]),     # 11 epochs at full size; the block buys all 14
    (420, 300, 6, [1, 2]),                     # not even the block buys 14: room for 3 full-size epochs at the end
])
def test_epoch_budget_plans_low_size_epochs_only_where_it_binds(monkeypatch, full, low, trained, small):
    from chexformer import callbacks

    budget = callbacks.EpochBudget(minutes=58, reserve=2.5, low_res_ratio=(96 / 128) ** 2, plan=True)
    ran, sides, rates = _budget_with_small_epochs(monkeypatch, budget, 0, full, low)
    # 240 s: 11 epochs without the plan (11 x 240 + 3.5 x 240 > 3,480); epoch 1 plans with 135 s (the
    # area ratio), then with the 170 s measured: the fewest low-size epochs that fit 14 (240 + 7 x 170 +
    # 5 x 240 + 3.5 x 240 <= 3,480 < the same with 6 of them); 420 s: 5 epochs without it
    assert ran == trained and budget.low_res_epochs == small
    assert [i for i, side in enumerate(sides) if side == "low"] == small and sides[-3:] == ["full"] * 3
    if trained == 14:  # the anneal was told the true end all along: only the last two epochs are capped
        assert rates == [1e-3] * 12 + [5e-4, 2.5e-4] and budget.stopped_after is None
    else:
        assert budget.stopped_after == trained - 1 and rates[-2:] == [5e-4, 2.5e-4]


def test_epoch_budget_with_fixed_low_size_epochs_projects_the_full_size_ones(monkeypatch):
    # low_res_epochs 9 under the budget: the stop rule and the anneal's forecast must not take the
    # short epochs for the long ones to come (a full-size epoch is projected from a short one by the
    # area ratio until one is measured), so the run the budget cuts still ends annealed
    from chexformer import callbacks

    budget = callbacks.EpochBudget(minutes=58, reserve=2.5, low_res_ratio=(96 / 128) ** 2)
    ran, _, rates = _budget_with_small_epochs(monkeypatch, budget, 9, full=255, low=178)
    # 9 x 178 + 4 x 255 + 3.5 x 255 > 3,480 >= 9 x 178 + 3 x 255 + 3.5 x 255: 13 epochs, the last two capped
    assert ran == 13 and budget.stopped_after == 12 and budget.low_res_epochs == list(range(9))
    assert rates == [1e-3] * 11 + [5e-4, 2.5e-4]
    # a resumed run continues the plan's block: the epochs trained small are kept in the checkpoint
    resumed = callbacks.EpochBudget(minutes=58, low_res_ratio=0.5, plan=True)
    resumed.load_state_dict(budget.state_dict() | {"low_res_epochs": [1, 2, 3]})
    assert resumed._block_open(4) and not resumed._block_open(5)


def test_final_anneal_gathers_the_budget_forecast_on_the_module_device():
    # an NCCL process group (DDP across GPUs) gathers CUDA tensors only: the forecast must be made on
    # the module's device, not the CPU default (a meta device stands in for a GPU here)
    from types import SimpleNamespace

    from chexformer import callbacks

    seen = []

    def all_gather(tensor):
        seen.append(tensor.device)
        return torch.tensor([3, 1])  # two ranks' forecasts: the earliest end wins

    group = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3, "name": "head"}
    trainer = SimpleNamespace(current_epoch=5, max_epochs=14, optimizers=[torch.optim.AdamW([group])],
                              strategy=SimpleNamespace(all_gather=all_gather))
    anneal = callbacks.FinalAnneal(2, 0.5, {"head": 1e-3}, {"head": 0.0}, budget=callbacks.EpochBudget(minutes=20))
    anneal.on_train_epoch_start(trainer, SimpleNamespace(device=torch.device("meta")))
    assert seen == [torch.device("meta")]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 2.5e-4  # one epoch left on some rank: the last cap


def test_resuming_a_run_annealed_for_the_budget_end_warns(caplog):
    from types import SimpleNamespace

    from chexformer.callbacks import FinalAnneal

    def resumed(state):
        anneal = FinalAnneal(2, 0.3, {"head": 1e-3}, {"head": 0.0})
        anneal.load_state_dict(state)
        caplog.clear()
        with caplog.at_level("WARNING", logger="chexformer.callbacks"):
            anneal.on_train_start(SimpleNamespace(ckpt_path="last.ckpt", is_global_zero=True), None)
        return caplog.text

    # the budget stopped a 14-epoch run after epoch 7 (0-based 6), annealed for that end: warns
    assert "epoch 7 trained under the final anneal for an end the epoch budget forecast (epoch 7 of 14)" in resumed(
        {"epoch": 6, "left": 1, "planned": 8, "capped": 1})
    assert not resumed({"epoch": 12, "left": 2, "planned": 2, "capped": 1})  # the configured end: retraces
    assert not resumed({"epoch": 3, "left": 9, "planned": 11, "capped": 0})  # not annealed yet


def test_final_anneal_caps_the_last_epochs_and_leaves_a_lower_rate_alone():
    from types import SimpleNamespace

    from chexformer.callbacks import FinalAnneal
    from chexformer.module import group_rates

    cfg = Config(init_lr=1e-3, backbone_lr_scale=0.1, min_lr=2e-5, lr_factor=0.3)
    anneal = FinalAnneal(2, cfg.lr_factor, *group_rates(cfg))
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3, "name": "head"},
                                   {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4, "name": "backbone"}])
    trainer = SimpleNamespace(current_epoch=0, max_epochs=7, optimizers=[optimizer])
    seen = []
    for epoch in range(7):
        trainer.current_epoch = epoch
        anneal.on_train_epoch_start(trainer, None)
        anneal.on_train_batch_start(trainer, None, None, 0)
        seen.append([g["lr"] for g in optimizer.param_groups])
    # 5 epochs untouched, then the plateau schedule's own rates (1e-3 * 0.3 * 0.3 to the last bit);
    # the backbone's 1e-4 * 0.09 is below min_lr, so its floor (min_lr) holds
    assert seen == [[1e-3, 1e-4]] * 5 + [[1e-3 * 0.3, 1e-4 * 0.3], [1e-3 * 0.3 * 0.3, 2e-5]]
    for group, lr in zip(optimizer.param_groups, (5e-5, 1e-5)):  # a schedule already below the cap
        group["lr"] = lr
    anneal.on_train_batch_start(trainer, None, None, 1)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-5, 1e-5]
    with pytest.raises(ConfigError, match="final_anneal_epochs must not be negative"):
        Config(final_anneal_epochs=-1).validate()


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_final_anneal_ends_a_training_run_at_the_capped_rate(tiny_data, tmp_path, schedule):
    out = tmp_path / schedule
    train(_cfg(tiny_data, out, epochs=3, checkpoint_selection="last", lr_schedule=schedule, final_anneal_epochs=2,
               init_lr=1e-3, min_lr=1e-6, lr_factor=0.3, lr_patience=5))
    rates = [float(r["lr"]) for r in read_history(out / "history.csv")]
    # history.csv keeps the rate at each epoch's end: epoch 1 under the first cap, epoch 2 under the
    # second (a cosine schedule, stepped every batch, is capped before every step, so it holds too)
    assert rates[1] <= 3e-4 * (1 + 1e-9) and rates[2] <= 9e-5 * (1 + 1e-9), rates
    if schedule == "plateau":  # patience 5: the schedule itself never reduced; the caps are the rates
        assert rates == pytest.approx([1e-3, 3e-4, 9e-5], rel=1e-12)
        # TensorBoard logs each epoch's rate at its start: the capped one, for every parameter group
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard")).Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("lr-")]
        assert tags
        for tag in tags:
            logged = [e.value for e in acc.Scalars(tag)]
            assert logged == pytest.approx([logged[0], logged[0] * 0.3, logged[0] * 0.09], rel=1e-6), (tag, logged)
    else:  # cosine is under the caps by each epoch's end, but not at epoch 1's start (0.75x): other weights
        plain = tmp_path / "plain"
        train(_cfg(tiny_data, plain, epochs=3, checkpoint_selection="last", lr_schedule=schedule, init_lr=1e-3,
                   min_lr=1e-6, lr_factor=0.3, lr_patience=5))
        a, b = (read_checkpoint_file(o / "checkpoints" / "best.ckpt")["state_dict"] for o in (out, plain))
        assert any(not torch.equal(a[n], b[n]) for n in a)


def test_final_anneal_that_never_binds_trains_the_same_weights(tiny_data, tmp_path):
    # caps above the schedule's own rates (cosine from 1e-3 over 3 epochs is at <= 0.75x by epoch 1's
    # first step and <= 0.25x by epoch 2's, under 0.9x and 0.81x): the run is the run without them,
    # to every bit, so a recipe whose schedule is already below the caps trains the model it did
    states = []
    for k in (0, 2):
        out = tmp_path / f"anneal{k}"
        train(_cfg(tiny_data, out, epochs=3, checkpoint_selection="last", lr_schedule="cosine", init_lr=1e-3,
                   min_lr=1e-6, lr_factor=0.9, final_anneal_epochs=k))
        states.append(read_checkpoint_file(out / "checkpoints" / "best.ckpt")["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_epoch_budget_ends_a_run_on_an_epoch_boundary_and_says_so(tiny_data, tmp_path, caplog):
    out = tmp_path / "budget"
    with caplog.at_level("WARNING", logger="chexformer"):
        summary = train(_cfg(tiny_data, out, epochs=4, checkpoint_selection="last", epoch_budget_minutes=1e-4))
    assert summary["epochs_run"] == 1 and summary["time_budget"] == {
        "minutes": 1e-4, "reserve": 0.0, "epochs": 4, "stopped_after_epoch": 0, "projected_epochs": 1,
        "low_res_epochs": []}
    assert "stopping after epoch 1 of 4" in caplog.text
    assert "projected to let about 1 of the 4 planned epochs" in caplog.text  # said in the first epoch
    assert [int(r["epoch"]) for r in read_history(out / "history.csv")] == [0]
    assert read_checkpoint_file(out / "checkpoints" / "best.ckpt")["epoch"] == 0
    with pytest.raises(ConfigError, match="epoch_budget_minutes"):
        _cfg(tiny_data, out, epoch_budget_minutes=5, swa_epochs=1, ema_decay=0.0).validate()
    with pytest.raises(ConfigError, match="epoch_budget_reserve must not be negative"):
        _cfg(tiny_data, out, epoch_budget_minutes=5, epoch_budget_reserve=-1).validate()
    _cfg(tiny_data, out, epoch_budget_minutes=0, epoch_budget_reserve=2.5).validate()  # the recipe, budget off


def test_feature_cache_key_changes_with_files_weights_and_precision(tiny_data, tmp_path):
    import dataclasses
    import json as _json

    from chexformer.data import scan_folder
    from chexformer.data.cache import cache_key
    from chexformer.model import build_model

    samples = scan_folder(tiny_data / "train").samples
    model = build_model(_cfg(tiny_data, "x", freeze_cnn=True))
    desc = _json.dumps({"img_size": 64, "precision": "32"})
    key = cache_key(samples, model.backbone, desc, 1)
    assert cache_key(samples, model.backbone, desc, 1) == key  # stable
    changed = [dataclasses.replace(samples[0], digest="0" * 32), *samples[1:]]  # a file's content changed
    assert cache_key(changed, model.backbone, desc, 1) != key
    with torch.no_grad():
        model.backbone.conv0.weight[0, 0, 0, 0] += 1.0  # the weights changed
    assert cache_key(samples, model.backbone, desc, 1) != key
    key_w = cache_key(samples, model.backbone, desc, 1)
    assert cache_key(samples, model.backbone, _json.dumps({"img_size": 64, "precision": "bf16-mixed"}), 1) != key_w


def test_mixup_blends_pairs_with_one_weight_per_batch():
    from chexformer.module import mixup

    torch.manual_seed(3)
    x = torch.randn(8, 3, 4, 4)
    mixed, perm, lam = mixup(x, 0.2)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])


def test_mixup_training_loss_mixes_both_labels_losses():
    """The training step's loss is lam * loss(y) + (1 - lam) * loss(y[perm]) on the mixed batch;
    with mixup off it is the plain loss of the unmixed batch."""
    from chexformer.model import build_model
    from chexformer.module import ChexFormerModule, mixup

    cfg = Config(**{**TINY, "dropout_rate": 0.0, "attn_dropout": 0.0, "mixup_alpha": 0.4})
    module = ChexFormerModule(cfg, ["NORMAL", "PNEUMONIA"], build_model(cfg),
                              class_weight=torch.tensor([2.0])).eval()  # eval: BatchNorm fixed
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 0, 1, 1, 0])
    torch.manual_seed(5)
    loss = module.training_step((x, y, torch.arange(6)), 0)
    torch.manual_seed(5)
    mixed, perm, lam = mixup(x, 0.4)
    assert 0.0 < lam < 1.0 and not torch.equal(y, y[perm])  # the pairing mixes the labels here
    with torch.no_grad():
        logits = module.model(mixed)
        expected = lam * module._loss(logits, y) + (1 - lam) * module._loss(logits, y[perm])
        plain = module._loss(module.model(x), y)
    torch.testing.assert_close(loss.detach(), expected)
    assert not torch.isclose(loss.detach(), plain)
    module.cfg = Config(**{**TINY, "dropout_rate": 0.0, "attn_dropout": 0.0})
    torch.testing.assert_close(module.training_step((x, y, torch.arange(6)), 0).detach(), plain)


class _BNRegression(L.LightningModule):
    """A linear model behind BatchNorm, trained by SGD on fixed random data: small enough to
    record every step's weights."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).squeeze(1), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_swa_update_on_the_cpu_is_torch_default_to_the_bit():
    """The SWA callback names torch's per-tensor update so that CUDA runs work; on the CPU, where
    torch picks that update by itself, the average is the same to the bit as without it."""
    from torch.optim.swa_utils import AveragedModel

    from chexformer.callbacks import SWA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    default = AveragedModel(net, use_buffers=True)
    ours = AveragedModel(net, use_buffers=True, **SWA(start_epoch=0)._kwargs)
    for _ in range(20):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            net(torch.randn(16, 4))  # train mode: moves BatchNorm's running statistics and step counter
        default.update_parameters(net)
        ours.update_parameters(net)
    assert ours.avg_fn is not None and default.avg_fn is None
    for (name, a), b in zip(default.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("foreach_on_cpu", [False, True], ids=["cpu-path", "cuda-path"])
def test_swa_averages_every_step_of_the_last_epochs_and_validates_raw_weights_before(tmp_path, monkeypatch,
                                                                                    foreach_on_cpu):
    """SWA(start_epoch=1) over 3 epochs: epoch 0 is validated and checkpointed with the raw
    weights; from epoch 1 on, with the uniform mean of the raw weights (and BatchNorm buffers) after
    each optimiser step so far; the model that leaves training is the mean over epochs 1-2.
    ``cuda-path``: torch's AveragedModel takes its foreach branch on devices with foreach kernels
    (CUDA), whose SWA update raised on BatchNorm's integer step counter (seen on an H200); the
    CPU, made to look like such a device, runs that branch here."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.optim import swa_utils

    if foreach_on_cpu:
        monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cpu", "cuda"])

    from chexformer.callbacks import SWA

    def floats(state_dict):  # BatchNorm's integer step counter is not averaged
        return {k: v.detach().clone().float() for k, v in state_dict.items() if "num_batches" not in k}

    def state(m):
        return floats(m.state_dict())

    class Record(Callback):  # listed after SWA: it sees what SWA left in the module
        def __init__(self):
            self.steps, self.validated = {}, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.setdefault(trainer.current_epoch, []).append(state(pl_module))

        def on_validation_epoch_start(self, trainer, pl_module):
            self.validated[trainer.current_epoch] = state(pl_module)

    def mean(states):
        return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}

    def assert_states(a, b):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=k)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4) * 3 + 1, torch.randn(64))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    record = Record()
    module = _BNRegression()
    trainer = L.Trainer(max_epochs=3, callbacks=[SWA(start_epoch=1), record, ModelCheckpoint(
        dirpath=tmp_path, filename="e{epoch}", save_top_k=-1, every_n_epochs=1, auto_insert_metric_name=False)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        accelerator="cpu")
    trainer.fit(module, loader, loader)
    assert [len(record.steps[e]) for e in range(3)] == [8, 8, 8]
    assert_states(record.validated[0], record.steps[0][-1])
    assert_states(record.validated[1], mean(record.steps[1]))
    assert_states(record.validated[2], mean(record.steps[1] + record.steps[2]))
    assert not torch.allclose(record.validated[2]["net.1.weight"], record.steps[2][-1]["net.1.weight"])
    assert_states(state(module), mean(record.steps[1] + record.steps[2]))
    saved = {e: torch.load(tmp_path / f"e{e}.ckpt", weights_only=False) for e in range(3)}
    assert_states(floats(saved[0]["state_dict"]), record.steps[0][-1])
    assert_states(floats(saved[2]["state_dict"]), mean(record.steps[1] + record.steps[2]))


@pytest.mark.parametrize("swa_epochs", [1, 2])
def test_resume_with_swa_continues_the_average_exactly(tiny_data, tmp_path, monkeypatch, swa_epochs):
    """Interrupted at the start of epoch 2 of 3 and resumed: with swa_epochs 2 the checkpoint holds
    an average of epoch 1 to continue, with 1 it holds raw weights and the average starts after the
    resume; either way the run retraces the uninterrupted one."""
    kw = dict(augment=True, acquisition_aug=0.5, ema_decay=0.0, swa_epochs=swa_epochs, checkpoint_selection="last",
              lr_patience=0)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(_cfg(tiny_data, whole, epochs=3, **kw), evaluate=False)

    _interrupted_at_epoch_2(monkeypatch, _cfg(tiny_data, part, epochs=3, **kw))
    train(_cfg(tiny_data, part, epochs=3, **kw), resume=True, evaluate=False)
    a, _ = _assert_same_run(part, whole)
    assert int(a["averaging_state"]["n_averaged"]) > 0


def test_resuming_swa_with_a_larger_budget_warns_that_the_average_began_earlier(tiny_data, tmp_path, caplog):
    out = tmp_path / "run"
    kw = dict(ema_decay=0.0, swa_epochs=1, checkpoint_selection="last")
    train(_cfg(tiny_data, out, epochs=2, **kw), evaluate=False)  # averages epoch 1
    with caplog.at_level("WARNING", logger="chexformer.callbacks"):
        train(_cfg(tiny_data, out, epochs=3, **kw), resume=True, evaluate=False)  # would start at epoch 2
    assert "average began at epoch 1, this run's epochs and swa_epochs start it at 2" in caplog.text


def test_split_seed_fixes_the_validation_split_whatever_the_seed(tmp_path):
    root = _kermany_folder(tmp_path / "d", _names("train", 30))

    def val(**kw):
        dm = XrayDataModule(_cfg(root, tmp_path / "o", **kw))
        dm.scan()
        return sorted(str(s.path) for s in dm.val_samples)

    reference = val(seed=42)
    assert val(seed=1, split_seed=42) == val(seed=2, split_seed=42) == reference
    assert val(seed=1) != reference  # without it the seed moves the split
    assert val(seed=42, split_seed=1) == val(seed=1)
    with pytest.raises(ConfigError, match="split_seed"):
        _cfg(root, tmp_path / "o", split_seed=-2).validate()


def test_true_bf16_run_logs_its_image_panels(tiny_data, tmp_path):
    # under bf16-true Lightning casts the weights to bf16: the panels' fp32 images must follow them
    out = tmp_path / "bf16"
    train(_cfg(tiny_data, out, precision="bf16-true", log_images_every=1, epochs=2, low_res_epochs=1,
               low_res_size=32), evaluate=False)  # and a low-size epoch: bf16 batches scaled down
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"inputs", "feature_maps"} <= set(events.Tags()["images"])



def test_gradient_histograms_are_unscaled_under_a_loss_scaler(tmp_path, monkeypatch):
    # 16-mixed (a GPU; Lightning turns it into bf16 on a CPU) scales the loss, and the fused AdamW
    # unscales inside its own step, after the hook that logs the histograms: they must show the gradients
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger

    from chexformer.model import build_model
    from chexformer.module import ChexFormerModule

    logged = {}
    monkeypatch.setattr(TensorBoardLogger, "experiment", property(lambda self: SimpleNamespace(
        add_histogram=lambda tag, values, step: logged.__setitem__(tag, values))))
    cfg = Config(**TINY)
    module = ChexFormerModule(cfg, ["NORMAL", "PNEUMONIA"], build_model(cfg, num_classes=2))
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 0.5 * 1024)  # the gradient 0.5, scaled by 1,024
    optimizer = torch.optim.AdamW(module.model.parameters(), fused=True)
    module._trainer = SimpleNamespace(logger=TensorBoardLogger(tmp_path), current_epoch=0, loggers=[],
                                      precision_plugin=SimpleNamespace(
                                          scaler=torch.amp.GradScaler("cpu", init_scale=1024.0)))
    module._log_grads = True
    module.on_before_optimizer_step(optimizer)
    assert logged and all(torch.equal(v, torch.full_like(v, 0.5)) for v in logged.values())
    # an optimizer without a fused step: Lightning has unscaled its gradients before the hook
    for p in module.model.parameters():
        p.grad = torch.full_like(p, 0.5)
    logged.clear()
    module._log_grads = True
    module.on_before_optimizer_step(torch.optim.AdamW(module.model.parameters(), foreach=False))
    assert logged and all(torch.equal(v, torch.full_like(v, 0.5)) for v in logged.values())


def test_the_first_process_of_another_node_is_not_rank_zero_before_the_trainer(tiny_data, tmp_path, monkeypatch):
    # Lightning's own launcher on node 1: only NODE_RANK says so until the Trainer sets the rank
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    from chexformer.train import RunFolder, build_data, not_rank_zero_on_other_nodes, prepare_run_folder

    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setattr(utils_rank_zero_only, "rank", 0)
    monkeypatch.delenv("NODE_RANK", raising=False)
    not_rank_zero_on_other_nodes()
    assert rank_zero_only.rank == 0  # one node: unchanged
    monkeypatch.setenv("NODE_RANK", "1")
    not_rank_zero_on_other_nodes()
    assert rank_zero_only.rank != 0 and utils_rank_zero_only.rank != 0
    cfg = _cfg(tiny_data, tmp_path / "node1")
    prepare_run_folder(RunFolder(tmp_path / "node1"), cfg, build_data(cfg))
    assert not (tmp_path / "node1" / "config.yaml").exists()  # node 0 writes it


def test_low_res_epochs_train_the_first_epochs_smaller_and_validate_at_full_size(tiny_data, tmp_path, monkeypatch,
                                                                                  caplog):
    from chexformer.module import ChexFormerModule
    seen = []
    logits = ChexFormerModule._logits

    def record(self, x):
        seen.append((self.current_epoch, self.training, tuple(x.shape[-2:])))
        return logits(self, x)

    monkeypatch.setattr(ChexFormerModule, "_logits", record)
    with caplog.at_level("INFO", logger="chexformer"):
        summary = train(_cfg(tiny_data, tmp_path / "lowres", epochs=3, low_res_epochs=2, low_res_size=32),
                        evaluate=False)
    sides = {}
    for epoch, training, side in seen:
        sides.setdefault((epoch, training), set()).add(side)
    assert sides[(0, True)] == sides[(1, True)] == {(32, 32)}
    assert sides[(2, True)] == {(64, 64)}
    assert all(side == {(64, 64)} for (_, training), side in sides.items() if not training)  # validation
    assert summary["epochs_run"] == 3
    assert "progressive resizing: epoch 1 trains at 32 px (validation at 64 px)" in caplog.text
    assert "progressive resizing: epoch 3 trains at 64 px" in caplog.text
    for bad in ({"low_res_size": 64}, {"low_res_size": 48}, {"low_res_epochs": -1}, {"low_res_epochs": 2}):
        with pytest.raises(ConfigError, match="low_res"):
            Config(**{**TINY, "low_res_epochs": 1, **bad}).validate()
    for bad in ({"epoch_budget_minutes": 0}, {"epoch_budget_minutes": 60, "low_res_epochs": 2}):
        with pytest.raises(ConfigError, match="low_res_budget plans"):
            Config(**{**TINY, "low_res_budget": True, **bad}).validate()


def test_low_res_budget_trains_the_epochs_its_plan_asks_for_small(tiny_data, tmp_path, monkeypatch):
    # the plan itself is tested with a fake clock (test_epoch_budget_plans_low_size_epochs_only_where_it_binds);
    # here a plan of two low-size epochs reaches the module, and summary.json lists them
    from chexformer.callbacks import EpochBudget
    from chexformer.module import ChexFormerModule
    seen = []
    logits = ChexFormerModule._logits

    def record(self, x):
        if self.training:
            seen.append((self.current_epoch, x.shape[-1]))
        return logits(self, x)

    monkeypatch.setattr(ChexFormerModule, "_logits", record)
    monkeypatch.setattr(EpochBudget, "low_res_needed", lambda self, epoch, max_epochs: max(0, 3 - epoch))
    summary = train(_cfg(tiny_data, tmp_path / "plan", epochs=4, low_res_size=32, low_res_budget=True,
                         epoch_budget_minutes=600), evaluate=False)
    assert sorted(set(seen)) == [(0, 64), (1, 32), (2, 32), (3, 64)]
    assert summary["time_budget"]["low_res_epochs"] == [1, 2] and summary["epochs_run"] == 4


def test_consistency_loss_is_the_jensen_shannon_divergence_of_the_views():
    from chexformer.module import consistency_loss

    same = torch.tensor([[[1.5], [1.5]], [[-0.3], [-0.3]]])
    assert float(consistency_loss(same)) == pytest.approx(0.0, abs=1e-7)
    # two views at p = 0.9 and 0.5: JSD = H(mean) - mean H, in nats
    logit = math.log(0.9 / 0.1)
    binary = consistency_loss(torch.tensor([[[logit], [0.0]]]))

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    assert float(binary) == pytest.approx(h(0.7) - (h(0.9) + h(0.5)) / 2, rel=1e-5)
    # softmax over two classes with logits (0, z) is the sigmoid of z
    softmax = consistency_loss(torch.tensor([[[0.0, logit], [0.0, 0.0]]]))
    assert float(softmax) == pytest.approx(float(binary), rel=1e-5)


def test_consistency_training_step_adds_the_views_disagreement_to_both_views_losses():
    from chexformer.model import build_model
    from chexformer.module import ChexFormerModule, consistency_loss

    cfg = Config(**{**TINY, "dropout_rate": 0.0, "attn_dropout": 0.0, "consistency": 3.0})
    module = ChexFormerModule(cfg, ["NORMAL", "PNEUMONIA"], build_model(cfg),
                              class_weight=torch.tensor([2.0])).eval()  # eval: BatchNorm fixed
    torch.manual_seed(0)
    x, y = torch.randn(3, 2, 3, 64, 64), torch.tensor([0, 1, 1])
    loss = module.training_step((x, y, torch.arange(3)), 0)
    with torch.no_grad():
        logits = module.model(x.flatten(0, 1))
        supervised = module._loss(logits, torch.tensor([0, 0, 1, 1, 1, 1]))
        jsd = consistency_loss(logits.view(3, 2, 1))
    assert float(jsd) > 0
    torch.testing.assert_close(loss.detach(), supervised + 3.0 * jsd)
    for bad, match in (({"consistency": -1.0}, "consistency must not"), ({"augment": False}, "augment"),
                       ({"mixup_alpha": 0.2}, "mixup"), ({"batch_size": 1}, "batch_size")):
        with pytest.raises(ConfigError, match=match):
            Config(**{**TINY, "consistency": 1.0, **bad}).validate()


def test_consistency_trains_two_independent_views_of_half_as_many_images(tiny_data, tmp_path, monkeypatch):
    from chexformer.module import ChexFormerModule
    seen = []
    step = ChexFormerModule.training_step

    def record(self, batch, batch_idx):
        seen.append(batch[0].clone())
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ChexFormerModule, "training_step", record)
    summary = train(_cfg(tiny_data, tmp_path / "views", epochs=1, consistency=1.0, batch_size=8), evaluate=False)
    assert summary["epochs_run"] == 1
    assert all(x.dim() == 5 and x.shape[1] == 2 and x.shape[0] <= 4 for x in seen)  # 8 views a step: 4 images
    assert sum(x.shape[0] for x in seen) == summary["data"]["splits"]["train"]["images"]  # each image once, twice seen
    assert all(not torch.equal(x[:, 0], x[:, 1]) for x in seen)  # augmented independently
    with pytest.raises(ConfigError, match="consistency"):
        train(_cfg(tiny_data, tmp_path / "frozen", epochs=1, consistency=1.0, freeze_cnn=True), evaluate=False)


def test_budget_reserve_counts_single_view_epochs_under_consistency(tiny_data, tmp_path):
    # a two-view epoch costs about two single-view ones, while the steps after training score one view:
    # the reserve of 2.5 longest epochs becomes 1.25 two-view epochs (summary.json: in the run's own epochs)
    for name, consistency, reserve in (("one", 0.0, 2.5), ("two", 1.0, 1.25)):
        summary = train(_cfg(tiny_data, tmp_path / name, epochs=1, consistency=consistency, batch_size=8,
                             epoch_budget_minutes=600, epoch_budget_reserve=2.5), evaluate=False)
        assert summary["epochs_run"] == 1 and summary["time_budget"]["reserve"] == reserve
