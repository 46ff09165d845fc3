import pytest
import torch
from torch import nn

from chexformer import Config, build_model
from chexformer.model import BACKBONE_STAGES, ChexFormer


@pytest.mark.parametrize("num_classes, outputs", [(2, 1), (3, 3)])
@pytest.mark.parametrize("img_size", [224, 96])
def test_output_shapes_and_finite(num_classes, outputs, img_size):
    model = build_model(Config(img_size=img_size, d_model=64, num_heads=4, ffn_dim=128), num_classes=num_classes).eval()
    x = torch.randn(2, 3, img_size, img_size)
    logits = model(x)
    assert logits.shape == (2, outputs)
    assert torch.isfinite(logits).all()
    grid = img_size // 32
    assert model.feature_maps(x).shape == (2, 1024, grid, grid)
    maps = model.attention_maps(x)
    assert len(maps) == 2 and all(m.shape == (2, 4, 1 + grid * grid, 1 + grid * grid) for m in maps)


def test_seed_defaults_give_49_tokens():
    model = build_model(Config()).eval()
    maps = model.attention_maps(torch.randn(1, 3, 224, 224))
    assert maps[0].shape == (1, 8, 50, 50)


def test_other_input_size_interpolates_position_encoding(tiny_cfg):
    model = build_model(tiny_cfg).eval()  # laid out for 64 px (2x2 grid)
    logits = model(torch.randn(1, 3, 128, 128))  # 4x4 grid
    assert logits.shape == (1, 1) and torch.isfinite(logits).all()


def test_attention_rows_sum_to_one_and_explicit_path_matches_fused(tiny_cfg):
    model = build_model(tiny_cfg.replace(img_size=96)).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        fused = model(x)
        feats = model.forward_features(x)
        tokens, maps = model.tokens_from_features(feats, need_weights=True)
        explicit = model.forward_head(tokens)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
        assert (m >= 0).all()
    assert model.training is False
    model.train()
    model.attention_maps(x)
    assert model.training is True  # left as found


def _step(model, x):
    model.train()
    loss = model(x).float().pow(2).mean()
    loss.backward()


@pytest.mark.parametrize("freeze_cnn, fine_tune_layers", [(False, 0), (True, 0), (True, 1), (True, 2)])
def test_gradients_reach_trainable_parameters_only(tiny_cfg, freeze_cnn, fine_tune_layers):
    model = build_model(tiny_cfg.replace(freeze_cnn=freeze_cnn, fine_tune_layers=fine_tune_layers))
    _step(model, torch.randn(4, 3, 64, 64))
    trainable_stages = {n for s in BACKBONE_STAGES[: (5 if not freeze_cnn else fine_tune_layers)] for n in s}
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert p.requires_grad == (name.split(".")[1] in trainable_stages), name
        else:
            assert p.requires_grad, name
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient for {name}"
            assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_frozen_batchnorm_statistics_unchanged_by_training(tiny_cfg):
    model = build_model(tiny_cfg.replace(freeze_cnn=True, fine_tune_layers=1))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        _step(model, torch.randn(4, 3, 64, 64) * 3 + 1)
        opt.step()
    after = model.backbone.state_dict()
    frozen_stages = {n for s in BACKBONE_STAGES[1:] for n in s}
    changed_trainable = False
    for k, v in before.items():
        if k.split(".")[0] in frozen_stages:
            assert torch.equal(v, after[k]), f"frozen {k} changed"
        elif "running_mean" in k and not torch.equal(v, after[k]):
            changed_trainable = True
    assert changed_trainable, "trainable stage BatchNorm should update its statistics"
    for name, m in model.backbone.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (name.split(".")[0] in {"denseblock4", "norm5"}), name


def test_parameter_counts_logged(tiny_cfg, caplog):
    caplog.set_level("INFO", logger="chexformer")
    build_model(tiny_cfg.replace(freeze_cnn=True))
    assert any("trainable" in r.message and "frozen" in r.message for r in caplog.records)


def test_plain_module_usable_without_lightning():
    model = ChexFormer(num_classes=4, img_size=64, d_model=32, num_heads=2, ffn_dim=32, num_layers=1)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(ValueError, match="divisible"):
        ChexFormer(d_model=30, num_heads=4)


def test_linear_baseline(tiny_cfg):
    model = build_model(tiny_cfg.replace(arch="linear")).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1)
