"""Export to ONNX and TorchScript: logits parity with a dynamic batch, metadata, errors."""

import importlib.util
import json

import numpy as np
import pytest
import torch

import chexformer
from chexformer import build_model
from chexformer import export as export_mod
from chexformer.checkpoint import CheckpointMeta
from chexformer.export import ExportError, LogitsWrapper, export_model, load_exported_metadata

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed (pip install 'chexformer[export]')")


@pytest.fixture
def binary(tiny_cfg):
    model = build_model(tiny_cfg)  # left in training mode on purpose: export must not care or change it
    meta = CheckpointMeta(config=tiny_cfg, class_names=["NORMAL", "PNEUMONIA"], threshold=0.37, temperature=1.5,
                          epoch=4)
    return model, meta


def _reference(model, x):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was_training)
    return out


def _snapshot(model):
    return model.training, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    assert model.training == snapshot[0]
    for k, v in snapshot[1].items():
        assert torch.equal(model.state_dict()[k], v), k


def _check_metadata(md, meta, fmt):
    assert md["format"] == fmt
    assert md["class_names"] == ["NORMAL", "PNEUMONIA"] and md["positive_class"] == "PNEUMONIA"
    assert md["threshold"] == pytest.approx(0.37) and md["temperature"] == pytest.approx(1.5)
    assert md["mean"] == pytest.approx(list(meta.mean)) and md["std"] == pytest.approx(list(meta.std))
    assert md["img_size"] == 64
    assert md["input"]["name"] == "image" and md["input"]["shape"] == ["batch", 3, 64, 64]
    assert md["output"]["name"] == "logits" and md["output"]["shape"] == ["batch", 1]
    assert "sigmoid" in md["probability"] and "temperature" in md["probability"]
    assert md["chexformer_version"] == chexformer.__version__
    assert md["config"]["d_model"] == 32


def test_torchscript_export_roundtrip(binary, tmp_path):
    model, meta = binary
    snap = _snapshot(model)
    path = export_model(model, meta, "torchscript", tmp_path / "sub" / "model.pt")
    assert path == tmp_path / "sub" / "model.pt" and path.is_file()
    _assert_unchanged(model, snap)

    loaded = torch.jit.load(str(path))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            got = loaded(x)
        assert got.shape == (batch, 1)
        torch.testing.assert_close(got, _reference(model, x), atol=1e-4, rtol=0)

    side = json.loads((tmp_path / "sub" / "model.pt.json").read_text())
    _check_metadata(side, meta, "torchscript")
    assert side["verification"]["max_abs_diff"] <= 1e-4
    assert load_exported_metadata(path) == side
    # Without the side file the metadata comes from the archive's extra file.
    (tmp_path / "sub" / "model.pt.json").unlink()
    embedded = load_exported_metadata(path)
    _check_metadata(embedded, meta, "torchscript")
    extra = {"chexformer.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["chexformer.json"]) == embedded


@needs_ort
def test_onnx_export_roundtrip(binary, tmp_path):
    import onnx
    import onnxruntime as ort

    model, meta = binary
    snap = _snapshot(model)
    path = export_model(model, meta, "onnx", tmp_path / "model.onnx")
    _assert_unchanged(model, snap)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "image" and out.name == "logits"
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [3, 64, 64]  # dynamic batch
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        got = session.run(["logits"], {"image": x.numpy()})[0]
        assert got.shape == (batch, 1)
        np.testing.assert_allclose(got, _reference(model, x).numpy(), atol=1e-4, rtol=0)

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"]) == ["NORMAL", "PNEUMONIA"]
    assert float(props["threshold"]) == pytest.approx(0.37) and float(props["temperature"]) == pytest.approx(1.5)
    assert props["positive_class"] == "PNEUMONIA" and json.loads(props["img_size"]) == 64
    assert {"mean", "std", "chexformer_version", "chexformer"} <= set(props)

    side = json.loads((tmp_path / "model.onnx.json").read_text())
    _check_metadata(side, meta, "onnx")
    assert side["opset"] == 17 and side["verification"]["max_abs_diff"] <= 1e-4
    (tmp_path / "model.onnx.json").unlink()
    embedded = load_exported_metadata(path)
    _check_metadata(embedded, meta, "onnx")
    assert embedded == json.loads(props["chexformer"])


@needs_ort
def test_onnx_falls_back_to_explicit_attention(binary, tmp_path, monkeypatch):
    """If the fused attention kernel cannot be exported, the explicit path is used instead."""
    real = export_mod._onnx_attempts

    def failing_first(*args):
        attempts = real(*args)

        def broken(example, output):
            raise RuntimeError("pretend scaled_dot_product_attention is not exportable")

        return [(attempts[0][0], attempts[0][1], broken), *attempts[1:]]

    monkeypatch.setattr(export_mod, "_onnx_attempts", failing_first)
    model, meta = binary
    path = export_model(model, meta, "onnx", tmp_path / "model.onnx")
    md = load_exported_metadata(path)
    assert "explicit attention" in md["onnx_exporter"]
    assert md["verification"]["max_abs_diff"] <= 1e-4


def test_explicit_attention_wrapper_matches_fused(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(LogitsWrapper(model, explicit_attention=True)(x), model(x), atol=1e-5, rtol=0)


def test_multiclass_linear_export_metadata(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(arch="linear")
    model = build_model(cfg, num_classes=3)
    meta = CheckpointMeta(config=cfg, class_names=["NORMAL", "BACTERIA", "VIRUS"])
    path = export_model(model, meta, "torchscript", tmp_path / "model.pt")
    md = load_exported_metadata(path)
    assert md["positive_class"] is None and md["output"]["shape"] == ["batch", 3]
    assert "softmax" in md["probability"] and md["arch"] == "linear"
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(x), _reference(model, x), atol=1e-4, rtol=0)


def test_parity_failure_raises_and_removes_the_file(binary, tmp_path, monkeypatch):
    real = export_mod._export_torchscript

    def off_by_a_bit(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export_mod, "_export_torchscript", off_by_a_bit)
    model, meta = binary
    with pytest.raises(ExportError, match="does not reproduce"):
        export_model(model, meta, "torchscript", tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "model.pt.json").exists()


def test_bad_requests_raise_export_error(binary, tiny_cfg, tmp_path):
    model, meta = binary
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model, meta, "tflite", tmp_path / "m")
    wrong_size = CheckpointMeta(config=tiny_cfg.replace(img_size=96), class_names=meta.class_names)
    with pytest.raises(ExportError, match="img_size"):
        export_model(model, wrong_size, "torchscript", tmp_path / "m.pt")
    three = CheckpointMeta(config=tiny_cfg, class_names=["a", "b", "c"])
    with pytest.raises(ExportError, match="outputs"):
        export_model(model, three, "torchscript", tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError):
        load_exported_metadata(tmp_path / "missing.onnx")


@pytest.mark.parametrize("intensity", ["stretch", "equalize"])
def test_following_the_exported_metadata_alone_reproduces_predict(binary, tmp_path, intensity):
    """A deployer with the exported file, its metadata and only PIL and NumPy (and the equalisation
    it names) gets the probability and label `chexformer predict` gives, on a 16-bit PNG of another
    size: the metadata must carry the Platt bias and the intensity rule, not only the temperature."""
    import dataclasses

    from PIL import Image
    from torchvision.transforms.v2.functional import equalize

    from chexformer.inference import Predictor

    model, meta = binary
    meta.bias = -0.8
    meta.config = dataclasses.replace(meta.config, intensity=intensity)
    path = export_model(model, meta, "torchscript", tmp_path / "model.pt")
    md = load_exported_metadata(path)
    assert md["bias"] == pytest.approx(-0.8) and "bias" in md["probability"]

    rng = np.random.default_rng(0)
    grey = (np.linspace(0, 50_000, 90)[:, None] + rng.normal(0, 3_000, (90, 70))).clip(0, 65_535).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "x.png")
    expected = Predictor(model, meta, device="cpu").predict_files([tmp_path / "x.png"], guard=False)[0]

    def stretch(a):
        lo, hi = np.percentile(a.astype(np.float64), md["intensity_percentiles"])
        return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)

    s = md["img_size"]
    x = stretch(np.asarray(Image.fromarray(stretch(np.asarray(Image.open(tmp_path / "x.png"))))
                           .resize((s, s), Image.Resampling.BILINEAR)))
    assert md["intensity"] == ("stretch, equalize" if intensity == "equalize" else "stretch")
    assert ("equalisation" in md["input"]["preprocess"]) == (intensity == "equalize")
    if intensity == "equalize":
        x = equalize(torch.from_numpy(x)[None]).numpy()[0]
    x = (np.repeat(x[None].astype(np.float32) / 255, 3, axis=0) - np.array(md["mean"], np.float32)[:, None, None]) \
        / np.array(md["std"], np.float32)[:, None, None]
    with torch.no_grad():
        logit = float(torch.jit.load(str(path))(torch.from_numpy(x[None]).float())[0, 0])
    p = 1 / (1 + np.exp(-(logit / md["temperature"] + md["bias"])))
    assert p == pytest.approx(expected.probabilities[-1], abs=1e-4)
    assert (md["positive_class"] if p >= md["threshold"] else md["class_names"][0]) == expected.label
