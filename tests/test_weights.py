"""The backbone loader: every accepted format round-trips exactly; bad files give clear errors."""

import collections
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet, densenet121

from chexformer import Config, WeightsError, build_model, load_backbone_weights
from chexformer.weights import init_backbone

NEW_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")


@pytest.fixture(scope="module")
def reference():
    """A randomly initialised torchvision DenseNet121 with non-trivial BatchNorm statistics."""
    torch.manual_seed(1)
    ref = densenet121(weights=None)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return ref.eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 64, 64)


def _old_style(state):
    """torchvision keys -> pre-0.4 style ('norm1' -> 'norm.1') as in CheXNet's model.pth.tar."""
    return collections.OrderedDict((NEW_KEY.sub(r"\1.\2.\3", k), v) for k, v in state.items())


def _assert_same_backbone(model, ref, x):
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), F.relu(ref.features(x)), atol=0, rtol=0)


def _fresh():
    return build_model(Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64))


def test_chexnet_format_round_trips_exactly(tmp_path, reference, x):
    state = _old_style(reference.state_dict())
    assert any(".norm.1." in k for k in state)
    chexnet = {
        f"module.densenet121.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")
    }  # checkpoints from PyTorch 0.3 have no num_batches_tracked
    chexnet.pop("module.densenet121.classifier.weight")
    chexnet.pop("module.densenet121.classifier.bias")
    chexnet["module.densenet121.classifier.0.weight"] = torch.randn(14, 1024)
    chexnet["module.densenet121.classifier.0.bias"] = torch.randn(14)
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "arch": "densenet121", "best_loss": 0.1, "state_dict": chexnet}, path)

    model = _fresh()
    report = load_backbone_weights(model, path)
    assert report.format == "chexnet"
    assert report.loaded == len([k for k in chexnet if ".features." in k])
    assert report.missing == [] and report.unexpected == []
    assert report.dropped == ["module.densenet121.classifier.0.weight", "module.densenet121.classifier.0.bias"]
    _assert_same_backbone(model, reference, x)


@pytest.mark.parametrize("style", ["new", "old"])
def test_torchvision_state_dict_round_trips(tmp_path, reference, x, style):
    state = reference.state_dict() if style == "new" else _old_style(reference.state_dict())
    path = tmp_path / "densenet121.pth"
    torch.save(state, path)
    model = _fresh()
    report = load_backbone_weights(model, path)
    assert report.format == "torchvision-densenet121" and not report.missing
    _assert_same_backbone(model, reference, x)


def test_single_channel_conv0_is_adapted(tmp_path, reference):
    one = densenet121(weights=None)
    one.load_state_dict(reference.state_dict())
    one.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    one.eval()
    path = tmp_path / "xrv.pt"
    torch.save(one.state_dict(), path)
    model = _fresh()
    report = load_backbone_weights(model, path)
    assert report.adapted_conv0
    grey = torch.randn(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(grey.expand(-1, 3, -1, -1)),
                                   F.relu(one.features(grey)), atol=1e-5, rtol=1e-4)


def test_chexformer_checkpoint_round_trips(tmp_path, reference, x):
    source = _fresh()
    source.backbone.load_state_dict(reference.features.state_dict())
    ckpt = {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
            "chexformer": {"version": 1}, "epoch": 3}
    path = tmp_path / "best.ckpt"
    torch.save(ckpt, path)
    model = _fresh()
    report = load_backbone_weights(model, path)
    assert report.format == "chexformer"
    assert any(k.startswith("model.layers.") for k in report.dropped)
    _assert_same_backbone(model, reference, x)


def test_loads_into_plain_torchvision_densenet(tmp_path, reference, x):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    target = densenet121(weights=None).eval()
    load_backbone_weights(target, path)
    with torch.no_grad():
        torch.testing.assert_close(target.features(x), reference.features(x), atol=0, rtol=0)


def test_truncated_file_is_a_clear_error(tmp_path, reference):
    path = tmp_path / "full.pth"
    torch.save(reference.state_dict(), path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_backbone_weights(_fresh(), cut)


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n" * 10])
def test_non_checkpoint_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "notes.pth.tar"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="PyTorch checkpoint"):
        load_backbone_weights(_fresh(), path)


@pytest.mark.parametrize("change", [{"threshold": float("nan")}, {"threshold": 1.5}, {"temperature": 0.0},
                                    {"bias": float("inf")}, {"normalization": {"mean": [0.5] * 3, "std": [0.0] * 3}}])
def test_chexformer_metadata_out_of_range_is_a_clear_error(tmp_path, change):
    """An edited or damaged checkpoint whose threshold is NaN labelled every image NORMAL."""
    from chexformer.checkpoint import load_checkpoint

    from .conftest import write_checkpoint

    path = write_checkpoint(tmp_path / "best.ckpt", Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64,
                                                           num_layers=1))
    obj = torch.load(path, weights_only=True)
    obj["chexformer"].update(change)
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=f"metadata is invalid: {next(iter(change))} out of range"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone_weights(_fresh(), tmp_path / "nope.pth")


def test_wrong_shape_checkpoint_is_a_clear_error(tmp_path):
    other = DenseNet(growth_rate=16, block_config=(6, 12, 24, 16))  # same keys, other shapes
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit DenseNet121"):
        load_backbone_weights(_fresh(), path)


def test_unrelated_network_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)).state_dict(), path)
    with pytest.raises(WeightsError, match="no DenseNet121 backbone tensors"):
        load_backbone_weights(_fresh(), path)


def test_partial_backbone_is_refused(tmp_path, reference):
    state = {k: v for k, v in reference.state_dict().items() if "denseblock4" not in k}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="partial load"):
        load_backbone_weights(_fresh(), path)


class _Custom:
    def __init__(self):
        self.value = 3


def test_file_needing_unpickling_is_refused_with_the_option_named(tmp_path, reference):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": reference.state_dict(), "extra": _Custom()}, path)
    with pytest.raises(WeightsError, match="--trust-checkpoint"):
        load_backbone_weights(_fresh(), path)
    report = load_backbone_weights(_fresh(), path, trusted=True)
    assert report.loaded > 0


def test_missing_pretrained_path_warns_and_continues(tmp_path, caplog):
    cfg = Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, pretrained_path=str(tmp_path / "model.pth.tar"))
    with caplog.at_level("WARNING", logger="chexformer"):
        assert init_backbone(_fresh(), cfg) is None
    text = caplog.text
    assert str(tmp_path / "model.pth.tar") in text and "RANDOM" in text


def test_public_api():
    import chexformer

    for name in ("Config", "build_model", "load_backbone_weights"):
        assert hasattr(chexformer, name)
