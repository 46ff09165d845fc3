"""The HTML report: complete, self-contained, escaped, and rendered by a real browser."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from chexformer import metrics as M
from chexformer import plots as P
from chexformer.report import write_report

CLASSES = ["NORMAL", "PNEUMONIA"]
NASTY = '<script>alert("x")</script> & <b>bold</b>'


class _Collector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(text: str) -> list[tuple[str, dict[str, str | None]]]:
    c = _Collector()
    c.feed(text)
    return c.tags


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A realistic binary run: metrics, four figures (one given as a list of two), data summary."""
    d = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.6).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1.2, 300) + 2.4 * (y - 0.5))))
    groups = np.arange(300) // 2
    t = M.choose_threshold(y, p)
    metrics = M.evaluation_report(y, p, CLASSES, t, groups=groups, n_boot=200)
    img = np.clip(np.random.default_rng(1).normal(0.4, 0.1, (64, 64, 3)), 0, 1)
    plots = {
        "roc": P.plot_roc(y, p, d / "roc.png", auc=metrics["roc_auc"]["value"], auc_ci=metrics["roc_auc"]["ci95"],
                          threshold=t),
        "confusion_matrix": P.plot_confusion_matrix(metrics["confusion_matrix"], CLASSES, d / "cm.png"),
        "reliability": P.plot_reliability(y, p, d / "rel.png", class_names=CLASSES),
        "gradcam": [P.plot_heatmap_panel(img, {"Grad-CAM": rng.random((7, 7))}, d / f"cam{i}.png", f"image {i}")
                    for i in range(2)],
    }
    data_summary = {
        "source": "chest_xray (Kermany et al. 2018)",
        "split_method": "by patient, stratified",
        "splits": {
            "train": {"images": 4100, "patients": 1200, "per_class": {"NORMAL": 1050, "PNEUMONIA": 3050}},
            "val": {"images": 500, "patients": 150, "per_class": {"NORMAL": 130, "PNEUMONIA": 370}},
            "test": {"images": 300, "patients": 150, "per_class": {"NORMAL": int((y == 0).sum()),
                                                                    "PNEUMONIA": int((y == 1).sum())}},
        },
        "sharpness": {"img_size": 128, "images": 512, "median": {"NORMAL": 0.0049, "PNEUMONIA": 0.0037},
                      "match_p": 1.0, "match_sigma": {"NORMAL": 0.75}},
        "skipped": [["train/PNEUMONIA/<img src=x>.jpeg", "unreadable: truncated JPEG"],
                    {"path": "val/NORMAL/a.dcm", "reason": "not a frontal view"}],
    }
    config = {"model": {"d_model": 256, "num_heads": 8, "note": NASTY}, "lr": 1e-4, "augment": ["flip", "rotate"],
              "pretrained": None}
    path = write_report(d / "out", title=f"Pneumonia {NASTY}", config=config, data_summary=data_summary,
                        metrics=json.loads(json.dumps(metrics)), plots=plots, notes=["Test set: 1 site only.", NASTY])
    return path, metrics


def test_report_written_with_all_sections(run):
    path, metrics = run
    assert path.name == "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    for section in ("<h2>Data</h2>", "<h2>Metrics</h2>", "<h2>Figures</h2>", "<h2>Configuration</h2>"):
        assert section in text
    assert "NORMAL" in text and "PNEUMONIA" in text
    assert f"{metrics['threshold']:.4g}" in text and "threshold 0.5" in text
    assert "Sensitivity (recall)" in text and "95% CI" in text
    assert f"{metrics['roc_auc']['value']:.3f}" in text
    lo, hi = metrics["recall"]["ci95"]
    assert f"{lo:.3f}&ndash;{hi:.3f}" in text  # the interval at the chosen threshold
    assert f"{metrics['at_0.5']['recall']['value']:.3f}" in text
    assert "4,100" in text and "Kermany" in text and "not a frontal view" in text
    assert "NORMAL 4.90e-03, PNEUMONIA 3.70e-03; the sharpest class is 1.32x" in text
    assert "Training blurred NORMAL to match (sharpness_match 1.0)" in text
    assert "model.d_model" in text and '[&quot;flip&quot;, &quot;rotate&quot;]' in text
    assert "1 of 2: cam0" in text and "2 of 2: cam1" in text


def test_report_is_self_contained(run):
    text = run[0].read_text(encoding="utf-8")
    tags = _parse(text)
    imgs = [a for t, a in tags if t == "img"]
    assert len(imgs) == 5
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    for tag, attrs in tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for attr in ("src", "href", "srcset", "action", "poster"):
            v = (attrs.get(attr) or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//", "file:")), (tag, attr, v)
    assert not re.search(r"url\(|@import|@font-face", text)
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


def test_report_escapes_text(run):
    text = run[0].read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>bold</b>" not in text and "<img src=x>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
    assert "train/PNEUMONIA/&lt;img src=x&gt;.jpeg" in text


def test_report_nan_and_missing_plot(tmp_path, caplog):
    metrics = M.evaluation_report([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9], CLASSES, 0.5, n_boot=20)
    path = write_report(tmp_path, title="one class", config={}, data_summary={}, metrics=metrics,
                        plots={"roc": tmp_path / "nope.png"})
    text = path.read_text(encoding="utf-8")
    assert "n/a" in text and "Image not found" in text and "nope.png" in text
    assert "No files were skipped" in text
    assert "not found" in caplog.text


def test_report_multiclass(tmp_path):
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8],
                  [0.5, 0.1, 0.4]])
    metrics = M.evaluation_report(y, p, ["NORMAL", "BACTERIAL", "VIRAL"], None, n_boot=30)
    path = write_report(tmp_path, title="three classes", config={"classes": 3}, data_summary={}, metrics=metrics,
                        plots={})
    text = path.read_text(encoding="utf-8")
    assert "macro average" in text and "BACTERIAL" in text and "Balanced accuracy" in text
    assert f"{4 / 6:.3f}" in text  # accuracy


# ----------------------------------------------------------------------------------------------
# A real browser
# ----------------------------------------------------------------------------------------------
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# Counts decoded images after load and writes the result into the DOM for --dump-dom.
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesOk = ok + "/" + imgs.length;
});
</script>"""


def _chromium(*args: str, profile) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    text = run[0].read_text(encoding="utf-8")
    # A test copy with the probe; the CSP of the real page forbids scripts, so allow inline ones here.
    probe = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probe = probe.replace("</body>", _PROBE + "</body>", 1)
    page = tmp_path / "probe.html"
    page.write_text(probe, encoding="utf-8")
    res = _chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'data-images-ok="(\d+)/(\d+)"', res.stdout)
    assert m, f"probe did not run; stderr: {res.stderr[-2000:]}"
    assert m.group(1) == m.group(2) == "5", m.group(0)

    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", run[0].as_uri(),
                    profile=tmp_path / "profile")
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
