"""The out-of-population guard: contracts on synthetic images, separation on real chest X-rays."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from chexformer import Config, build_model
from chexformer.checkpoint import CheckpointMeta
from chexformer.data import find_images, load_image, resize_image
from chexformer.guard import (
    UNIFORM_AREA_SHARE,
    Guard,
    _fit_layer,
    _squared_distance,
    fit_guard,
    pixel_problems,
    pooled_features,
    uniform_area,
)
from chexformer.inference import Predictor
from chexformer.shifts import fill_masked, jpeg, standardize_tensor
from chexformer.synthetic import synthetic_image

from .conftest import SHARED_DATA

TINY = Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, precision="32")
KERMANY_TRAIN = SHARED_DATA / "kermany224" / "train"


def _predictor(model: torch.nn.Module) -> Predictor:
    meta = CheckpointMeta(config=TINY, class_names=["NORMAL", "PNEUMONIA"])
    return Predictor(model, meta, device="cpu", precision="32")


def _out_of_population(pred: Predictor) -> dict[str, list[torch.Tensor]]:
    """Natural photos (and crops of them), documents, blank frames and noise, through the same
    loader as any other input (grey, intensity rule, resize)."""
    skd = pytest.importorskip("skimage.data", reason="scikit-image is in the dev extra")
    out: dict[str, list[torch.Tensor]] = {"photo": [], "document": [], "blank": [], "noise": []}
    photos = ["astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "retina", "immunohistochemistry",
              "colorwheel", "camera", "moon", "horse", "clock", "coins", "grass", "gravel", "brick", "cell",
              "microaneurysms", "shepp_logan_phantom", "logo"]
    for name in photos:
        try:
            a = np.asarray(getattr(skd, name)(), dtype=np.float64)
        except (AttributeError, ImportError, OSError, ValueError):  # not bundled with this scikit-image
            continue
        a = a[..., :3] if a.ndim == 3 else a
        h, w = a.shape[:2]
        for crop in (a, a[: 3 * h // 4, : 3 * w // 4], a[h // 4:, w // 4:]):
            out["photo"].append(pred.load_array(crop))
    for name in ("text", "page"):
        a = getattr(skd, name)().astype(np.float64)
        out["document"] += [pred.load_array(a), pred.load_array(255 - a)]
    rng = np.random.default_rng(0)
    for _ in range(8):
        page = Image.new("L", (400, 400), 255)
        draw = ImageDraw.Draw(page)
        for line in range(25):
            words = ("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(8))
            draw.text((10, 10 + 15 * line), " ".join(words), fill=0)
        out["document"].append(pred.load_array(np.asarray(page, dtype=np.float64)))
    for value in (0, 128, 255):
        out["blank"].append(pred.load_array(np.full((200, 200), value, dtype=np.float64)))
    for _ in range(6):
        out["noise"] += [pred.load_array(rng.random((224, 224))), pred.load_array(rng.normal(size=(224, 224, 3)))]
    blobs = np.kron(rng.random((12, 12)) > 0.5, np.ones((16, 16)))  # a blocky binary pattern
    out["noise"] += [pred.load_array(skd.checkerboard().astype(np.float64)), pred.load_array(blobs.astype(np.float64))]
    assert len(out["photo"]) >= 30, "too few scikit-image sample photos available"
    return out


# ----------------------------------------------------------------------------------------------
# Contracts (synthetic radiographs, random weights: no data needed)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_guard():
    torch.manual_seed(0)
    pred = _predictor(build_model(TINY, num_classes=2).eval())
    rng = np.random.default_rng(0)
    images = [pred.load_array(synthetic_image(rng, 96, opacity=bool(i % 2))[0]) for i in range(60)]
    return pred, images, fit_guard(pred, images[:36], images[36:], n_components=8)


def test_guard_dict_is_plain_small_and_survives_a_weights_only_checkpoint(synthetic_guard, tmp_path):
    pred, images, d = synthetic_guard
    text = json.dumps(d, allow_nan=False)  # plain values only, no numpy, no tensors, no NaN
    assert len(text) < 1_000_000
    assert [layer["name"] for layer in d["layers"]] == ["denseblock1", "denseblock2", "denseblock3", "norm5"]
    torch.save({"chexformer": {"extra": {"guard": d}}}, tmp_path / "g.ckpt")
    loaded = torch.load(tmp_path / "g.ckpt", weights_only=True)["chexformer"]["extra"]["guard"]
    a, b = Guard.from_dict(d), Guard.from_dict(loaded)
    np.testing.assert_allclose(a.score(pred, images[36:]), b.score(pred, images[36:]), rtol=1e-9)
    assert b.threshold == d["threshold"] and b.img_size == 64


def test_guard_scores_validation_as_fitted(synthetic_guard):
    pred, images, d = synthetic_guard
    guard = Guard.from_dict(d)
    val = guard.score(pred, images[36:])
    assert val.shape == (24,) and np.isfinite(val).all() and (val >= 0).all()
    assert np.median(val) == pytest.approx(d["val_score_median"], rel=1e-4)
    assert guard.threshold == pytest.approx(np.quantile(val, 0.99), rel=1e-4)
    assert guard.flag(val).dtype == bool and guard.flag(val).sum() <= 1
    assert guard.flag([guard.threshold * 2, 0.0, float("nan")]).tolist() == [True, False, True]
    assert guard.score(pred, []).shape == (0,)


def test_layer_fit_is_ledoit_wolf_mahalanobis_in_principal_components():
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12)) @ rng.normal(size=(12, 12)) * rng.uniform(0.1, 10, 12) + 3.0
    mean, projection, offset = _fit_layer(x, n_components=5)
    z = (x - x.mean(0)) / x.std(0)
    pca = PCA(n_components=5, svd_solver="full").fit(z)
    lw = LedoitWolf().fit(pca.transform(z))
    probe = rng.normal(size=(7, 12)) * 4
    expected = lw.mahalanobis(pca.transform((probe - x.mean(0)) / x.std(0)))
    np.testing.assert_allclose(_squared_distance(probe, mean, projection, offset), expected, rtol=1e-8)


def test_guard_rejects_bad_input(synthetic_guard):
    pred, images, d = synthetic_guard
    with pytest.raises(ValueError, match="version"):
        Guard.from_dict({"version": 99})
    with pytest.raises(ValueError, match="malformed guard"):
        Guard.from_dict({"version": 1, "layers": [], "threshold": 2.0, "img_size": 64})
    with pytest.raises(ValueError, match="at least 20 training"):
        fit_guard(pred, images[:5], images[36:])
    with pytest.raises(ValueError, match="fitted at 96 px"):
        Guard.from_dict({**d, "img_size": 96}).score(pred, images[:2])
    pred.model.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"):
            pooled_features(pred, images[:2])
    finally:
        pred.model.eval()


def test_guard_warns_when_the_model_weights_differ(synthetic_guard, caplog):
    pred, images, d = synthetic_guard
    Guard.from_dict({**d, "model_fingerprint": d["model_fingerprint"] + 1.0}).score(pred, images[:1])
    assert "other model weights" in caplog.text


def test_pixel_problems():
    flat = torch.zeros(3, 64, 64, dtype=torch.uint8)
    mask = flat.clone()
    mask[:, :32] = 255
    grey = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert pixel_problems([flat, mask, grey]) == ["blank image (a single grey value)",
                                                  "only 2 grey levels (a drawing or mask, not a radiograph)", None]


def _noisy(size: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(60, 200, (1, size, size), generator=g, dtype=torch.uint8).expand(3, -1, -1).clone()


def test_uniform_patch_is_a_pixel_problem():
    """A mid-grey patch of 1/8 of the image (the probe's two top-centre cells) is named, with its
    share; black areas (collimation), a patch under 1/16 and a field of flat tiles of alternating
    levels (JPEG blocks) are not."""
    noisy = _noisy()
    grey, black, small, blocks = noisy.clone(), noisy.clone(), noisy.clone(), noisy.clone()
    grey[:, :32, 32:96] = 128
    black[:, :32, 32:96] = 0
    small[:, 40:70, 40:70] = 128  # 30 px: at most 9 whole 8-px tiles, under 16
    for i in range(8):  # 64 x 64 px of 8-px tiles at levels 100 / 140 / 180 in turn: no two neighbours alike
        for j in range(8):
            blocks[:, 32 + 8 * i:40 + 8 * i, 32 + 8 * j:40 + 8 * j] = 100 + 40 * ((i + j) % 3)
    assert uniform_area(grey) == pytest.approx(32 / 256)
    assert uniform_area(noisy) == 0.0
    assert uniform_area(blocks) == pytest.approx(1 / 256)
    reasons = pixel_problems([noisy, grey, black, small, blocks])
    assert reasons[0] is None and reasons[2:] == [None, None, None]
    assert reasons[1].startswith("a uniform grey area covers 12% of the image")


@pytest.mark.skipif(not (SHARED_DATA / "kermany224" / "train").is_dir(), reason="real chest X-rays not found")
def test_uniform_patch_check_on_real_radiographs():
    """Every 8th Kermany training image passes the check, also after JPEG at quality 50; with the
    probe's mean-grey patch over the two top-centre cells every one fails it."""
    files = [f for c in ("NORMAL", "PNEUMONIA") for f in find_images(SHARED_DATA / "kermany224" / "train" / c)[::8]]
    images = [resize_image(load_image(f), 128) for f in files]
    assert max(uniform_area(x) for x in images) < UNIFORM_AREA_SHARE / 2
    assert pixel_problems(images) == [None] * len(images)
    assert pixel_problems([jpeg(x, 50) for x in images]) == [None] * len(images)
    top_centre = torch.zeros(128, 128, dtype=torch.bool)
    top_centre[:32, 32:96] = True
    patched = [fill_masked(x, top_centre) for x in images]
    assert all(r and r.startswith("a uniform grey area") for r in pixel_problems(patched))


def test_synthetic_images_pass_the_pixel_check():
    """The demo's synthetic radiographs (the embedded default) must not trip the uniform-patch check."""
    rng = np.random.default_rng(0)
    images = [standardize_tensor(torch.from_numpy(synthetic_image(rng, 128, opacity=k % 2 == 1)[0]).expand(3, -1, -1))
              for k in range(40)]
    assert pixel_problems(images) == [None] * len(images)


# ----------------------------------------------------------------------------------------------
# Real chest X-rays against photos, documents, blank frames and noise
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not KERMANY_TRAIN.is_dir(), reason=f"real chest X-rays not found at {KERMANY_TRAIN}")
def test_guard_separates_chest_xrays_from_other_images():
    """A tiny model trained for a few steps at 64 px on real radiographs (enough for its BatchNorm
    statistics to describe X-rays); the guard is fitted on 150 of them with its threshold set on 50
    more and must rank 120 held-out radiographs below every kind of foreign image."""
    torch.manual_seed(0)
    model = build_model(TINY, num_classes=2)
    pred = _predictor(model)
    rng = np.random.default_rng(0)
    files = [(p, label) for label, name in enumerate(("NORMAL", "PNEUMONIA"))
             for p in rng.choice(sorted((KERMANY_TRAIN / name).iterdir()), 160, replace=False)]
    order = rng.permutation(len(files))
    images = [pred.load(files[i][0]) for i in order]
    labels = torch.tensor([files[i][1] for i in order], dtype=torch.float32)
    train, val, held_out = images[:150], images[150:200], images[200:320]

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(5):
        idx = torch.randint(0, len(train), (16,))
        loss = F.binary_cross_entropy_with_logits(model(pred.to_input([train[i] for i in idx]))[:, 0], labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    guard = Guard.from_dict(fit_guard(pred, train, val))
    xray = guard.score(pred, held_out)
    foreign = {kind: guard.score(pred, imgs) for kind, imgs in _out_of_population(pred).items()}
    all_foreign = np.concatenate(list(foreign.values()))
    auroc = {kind: roc_auc_score(np.r_[np.zeros(len(xray)), np.ones(len(s))], np.r_[xray, s])
             for kind, s in {**foreign, "all": all_foreign}.items()}
    flagged = {"xray": guard.flag(xray).mean(), "foreign": guard.flag(all_foreign).mean()}
    print({k: round(v, 4) for k, v in auroc.items()}, {k: round(float(v), 3) for k, v in flagged.items()})
    assert min(auroc.values()) >= 0.99, auroc
    assert flagged["xray"] <= 0.05 and flagged["foreign"] >= 0.85, flagged
    assert guard.flag(foreign["blank"]).all()
