import argparse
from dataclasses import fields

import pytest
import yaml

from chexformer.config import (
    Config,
    ConfigError,
    add_config_arguments,
    config_from_args,
    field_choices,
    field_docs,
    load_config,
)

SEED_FIELDS = ["img_size", "batch_size", "validation_split", "d_model", "num_heads", "ffn_dim", "num_layers",
               "init_lr", "epochs", "min_lr", "patience", "dropout_rate", "freeze_cnn", "fine_tune_layers"]


def test_every_seed_parameter_is_a_field():
    cfg = Config()
    for name in SEED_FIELDS + ["data_dir", "pretrained_path", "out_dir", "seed", "precision"]:
        assert hasattr(cfg, name), name
    assert cfg.data_dir == "data" and cfg.pretrained_path == "pretrained/model.pth.tar"
    cfg.validate()


def test_yaml_round_trip(tmp_path):
    cfg = Config(img_size=128, d_model=64, num_heads=4, freeze_cnn=True, fine_tune_layers=2, init_lr=3e-4,
                 threshold_method="youden", precision="32", intensity="equalize")
    path = tmp_path / "run" / "config.yaml"
    cfg.save(path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["img_size"] == 128
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("img_size: 128\nbatch_size: 4\nfreeze_cnn: true\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--img-size", "96", "--freeze-cnn", "false", "--init-lr", "1e-3"])
    cfg = config_from_args(args)
    assert (cfg.img_size, cfg.batch_size, cfg.freeze_cnn, cfg.init_lr) == (96, 4, False, 1e-3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_model": 100, "num_heads": 8}, "divisible by num_heads"),
        ({"validation_split": 0.0}, "validation_split"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"init_lr": -1e-3}, "init_lr"),
        ({"min_lr": -1.0}, "min_lr"),
        ({"dropout_rate": 1.5}, "dropout_rate"),
        ({"img_size": 100}, "multiple of 32"),
        ({"batch_size": 0}, "batch_size"),
        ({"fine_tune_layers": 2}, "freeze_cnn=true"),
        ({"fine_tune_layers": 9, "freeze_cnn": True}, "fine_tune_layers"),
        ({"backbone_weights": "chexnet"}, "backbone_weights"),
        ({"patient_regex": "(unclosed"}, "patient_regex"),
        ({"sharpness_match": 1.5}, "sharpness_match"),
        ({"mixup_alpha": -0.2}, "mixup_alpha"),
        ({"swa_epochs": 3, "epochs": 2, "checkpoint_selection": "last"}, "swa_epochs"),
        ({"swa_epochs": 1, "ema_decay": 0.99, "checkpoint_selection": "last"}, "swa_epochs and ema_decay"),
        ({"swa_epochs": 1, "checkpoint_selection": "val_loss"}, "fixed budget"),
        ({"strategy": "ddp_spawn"}, "strategy: expected one of auto, ddp"),
        ({"init_lr": float("inf")}, "init_lr must be a finite number"),
        ({"seed": -5}, "seed must lie in"),
        ({"devices": "two"}, "devices must be 'auto'"),
    ],
)
def test_validation_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(changes)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"d_model": 100, "validation_split": 2.0, "init_lr": -1})
    text = str(err.value)
    assert "divisible" in text and "validation_split" in text and "init_lr" in text


def test_unknown_key_and_bad_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("img_sise: 128\nbatch_size: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown key 'img_sise'" in str(err.value) and "img_size" in str(err.value)
    assert "batch_size: expected int" in str(err.value)


def test_yaml_file_that_is_not_utf8_or_repeats_a_key_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"epochs: 3\nout_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not a UTF-8 text file"):
        load_config(path)
    path.write_text("epochs: 3\nimg_size: 128\nepochs: 30\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: .*key 'epochs' appears twice"):
        load_config(path)
    path.write_text("epochs: 3\nimg_size: 128\n")
    assert load_config(path, {"devices": "0,1"}).epochs == 3  # one key once each, and a list of devices: fine


def test_bool_and_int_coercion():
    assert Config.from_dict({"freeze_cnn": "yes", "epochs": "3"}).freeze_cnn is True
    with pytest.raises(ConfigError, match="freeze_cnn"):
        Config.from_dict({"freeze_cnn": "maybe"})
    with pytest.raises(ConfigError, match="epochs"):
        Config.from_dict({"epochs": 2.5})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_every_field_has_a_docstring_and_the_option_help_shows_it():
    docs = field_docs()
    assert [f.name for f in fields(Config) if not docs.get(f.name)] == []
    assert docs["img_size"].startswith("Square input side in pixels")
    assert "\n" not in docs["min_val_per_class"] and "``" not in docs["validation_split"]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--img-size INT Square input side in pixels; a multiple of 32" in text and "(default: 224)" in text
    assert "--threshold-method {shift_robust,shift_worst,youden,sensitivity} How the operating threshold" in text
    assert "(default: shift_robust)" in text and "--freeze-cnn BOOL" in text and "(default: false)" in text
    assert "--batch-size INT Images per training step" in text


def test_enumeration_fields_are_literals():
    choices = field_choices()
    assert choices["threshold_method"] == ("shift_robust", "shift_worst", "youden", "sensitivity")
    assert choices["intensity"] == ("stretch", "equalize")
    assert {"arch", "backbone_weights", "class_weighting", "preload", "cache_features", "precision",
            "accelerator"} <= set(choices)
    for name, allowed in choices.items():
        assert getattr(Config(), name) in allowed, name


def test_literal_coercion():
    assert Config.from_dict({"precision": 32}).precision == "32"  # YAML reads `precision: 32` as an int
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"threshold_method": "youdn"})
    assert ("threshold_method: expected one of shift_robust, shift_worst, youden, sensitivity, got 'youdn' "
            "(did you mean 'youden'?)") in str(err.value)
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"arch": "transformer"})
    assert "arch: expected one of hybrid, linear, got 'transformer'" in str(err.value)
    assert "did you mean" not in str(err.value)
    for bad in (True, None, ["hybrid"]):
        with pytest.raises(ConfigError, match="arch: expected one of"):
            Config.from_dict({"arch": bad})


def test_validate_checks_enumerations_of_a_directly_built_config():
    with pytest.raises(ConfigError, match="intensity must be one of stretch, equalize, got 'gamma'"):
        Config(intensity="gamma").validate()


def test_auto_precision_on_a_gpu_without_native_bf16_is_fp16(monkeypatch):
    # a V100 or T4 reports bf16 as supported by emulation (torch's default), which is slow: fp16 there
    import torch

    from chexformer.runtime import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert resolve_precision("auto") == "bf16-mixed"
    assert resolve_precision("32") == "32"
