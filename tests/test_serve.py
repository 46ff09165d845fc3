"""The web service: the JSON API (PNG, DICOM, base64, bad files) and the page in a real browser."""

import base64
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from chexformer import Config
from chexformer.guard import fit_guard
from chexformer.inference import Predictor
from chexformer.serve import BackgroundServer, build_app, create_app
from chexformer.synthetic import synthetic_image

from .conftest import write_checkpoint, write_dicom

APP_EXTRA = "the web service needs the app extra: pip install chexformer[app]"

TINY = Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=1, precision="32")
DATA = {"source": "synthetic radiographs (chexformer.synthetic)", "val_source": "split of train by patient",
        "skipped": [["/data/train/NORMAL/broken.png", "truncated"]],
        "splits": {"train": {"images": 28, "patients": 20, "per_class": {"NORMAL": 14, "PNEUMONIA": 14}},
                   "val": {"images": 20, "patients": 16, "per_class": {"NORMAL": 10, "PNEUMONIA": 10}}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random-weight checkpoint with a guard fitted on synthetic radiographs, served on a
    free loopback port; a synthetic radiograph as PNG and the same pixels as a 16-bit DICOM."""
    pytest.importorskip("gradio", reason=APP_EXTRA)
    root = tmp_path_factory.mktemp("serve")
    ckpt = write_checkpoint(root / "best.ckpt", TINY, threshold=0.4, temperature=1.5)
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    rng = np.random.default_rng(0)
    images = [pred.load_array(synthetic_image(rng, 96, opacity=bool(i % 2))[0]) for i in range(48)]
    obj = torch.load(ckpt, weights_only=True)
    obj["chexformer"]["extra"].update(guard=fit_guard(pred, images[:28], images[28:], n_components=8), data=DATA)
    torch.save(obj, ckpt)
    pixels = synthetic_image(rng, 128, opacity=True)[0]
    png = root / "xray.png"
    Image.fromarray(pixels).save(png)
    dcm = write_dicom(root / "xray.dcm", pixels.astype(np.uint16) * 257)
    with BackgroundServer(create_app(ckpt, device="cpu")) as server:
        yield server, png, dcm


def test_missing_gradio_is_one_clear_error(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "best.ckpt", TINY)
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install chexformer\[app\]"):
        build_app(ckpt)


def _post_file(server, path, name=None, content=None):
    import httpx

    content = path.read_bytes() if content is None else content
    return httpx.post(f"{server.url}/api/predict", files={"file": (name or path.name, content)}, timeout=60)


def test_api_predicts_png_and_dicom_alike(served):
    server, png, dcm = served
    r = _post_file(server, png)
    assert r.status_code == 200, r.text
    out = r.json()
    for key in ("probability", "label", "threshold", "in_distribution", "ood_score", "class_names", "error"):
        assert key in out, key
    assert 0.0 <= out["probability"] <= 1.0 and out["error"] is None
    assert out["class_names"] == ["NORMAL", "PNEUMONIA"] and out["threshold"] == pytest.approx(0.4)
    assert out["label"] == ("PNEUMONIA" if out["probability"] >= 0.4 else "NORMAL")
    assert isinstance(out["in_distribution"], bool) and out["ood_score"] > 0
    d = _post_file(server, dcm)
    assert d.status_code == 200, d.text
    assert d.json()["probability"] == pytest.approx(out["probability"], abs=1e-6)  # same pixels, same rule
    # A DICOM without its suffix is recognised by its magic bytes; base64 JSON gives the same answer.
    assert _post_file(server, dcm, name="upload").json()["probability"] == pytest.approx(out["probability"], abs=1e-6)
    import httpx

    b64 = base64.b64encode(png.read_bytes()).decode()
    j = httpx.post(f"{server.url}/api/predict", json={"image": f"data:image/png;base64,{b64}"}, timeout=60)
    assert j.status_code == 200 and j.json()["probability"] == pytest.approx(out["probability"], abs=1e-6)


def test_api_rejects_bad_input_with_400_json(served):
    import httpx

    server, png, _ = served
    cases = [
        _post_file(server, png, name="x.png", content=b"this is not an image"),
        _post_file(server, png, name="cut.png", content=png.read_bytes()[:200]),
        _post_file(server, png, name="empty.png", content=b""),
        httpx.post(f"{server.url}/api/predict", json={"image": "%%% not base64"}, timeout=30),
        httpx.post(f"{server.url}/api/predict", json={"picture": "x"}, timeout=30),
        httpx.post(f"{server.url}/api/predict", content=b"raw", headers={"content-type": "text/plain"}, timeout=30),
        httpx.post(f"{server.url}/api/predict", data={"note": "no file"}, files={"other": ("a.txt", b"")}, timeout=30),
    ]
    for r in cases:
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json") and r.json()["error"]
        assert "Traceback" not in r.text
    assert "cannot read the image" in cases[0].json()["error"]


def test_api_health_and_model_card(served):
    import httpx

    server, _, _ = served
    health = httpx.get(f"{server.url}/api/health", timeout=30).json()
    assert health["status"] == "ok" and health["guard"] is True
    card = httpx.get(f"{server.url}/api/model", timeout=30).json()
    assert card["training_data"]["source"].startswith("synthetic")
    assert card["training_data"]["skipped_files"] == 1 and "broken.png" not in str(card)  # no file paths
    op = card["validation"]["operating_point"]
    # Stored validation logits [-2, -1, 0.5, 1, 2, -0.5] at T = 1.5 and threshold 0.4: positives
    # 0.5, 1, 2 all pass; negatives -2, -1, -0.5 give 0.21, 0.34, 0.42, so one of three passes.
    assert op["sensitivity"] == 1.0 and op["specificity"] == pytest.approx(2 / 3)
    assert any("not a medical device" in text.lower() for text in card["limitations"])
    assert card["guard"]["threshold"] > 0


def test_api_concurrent_requests_agree(served):
    server, png, _ = served
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _post_file(server, png).json()["probability"], range(16)))
    assert max(results) - min(results) < 1e-6


def test_browser_upload_shows_probability_and_heatmaps(served):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    server, png, _ = served
    expected = _post_file(server, png).json()["probability"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(180_000)  # generous: a loaded 2-core CI machine
            page.goto(server.url + "/")
            page.locator("#upload input[type=file]").set_input_files(str(png))
            box = page.locator("#probability textarea, #probability input").first
            sync_api.expect(box).not_to_have_value("")
            assert float(box.input_value()) == pytest.approx(expected, abs=1e-3)
            for elem in ("gradcam", "rollout"):
                img = page.locator(f"#{elem} img").first
                sync_api.expect(img).to_be_visible()
                page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle())
            sync_api.expect(page.locator("#summary")).to_contain_text("Guard")
            sync_api.expect(page.locator("#model-card")).to_contain_text("Not a medical device")
        finally:
            browser.close()
