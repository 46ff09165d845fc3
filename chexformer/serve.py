"""Web service for one checkpoint: a Gradio page for people and a JSON API for programs, one server.

* ``/`` (Gradio): drop a PNG, JPEG or DICOM; see the calibrated probability, the label at the
  stored threshold and what that threshold meant on validation, Grad-CAM and attention-rollout
  overlays on the image (opacity slider), the out-of-population guard's verdict and the model card.
* ``POST /api/predict``: a multipart upload (field ``file``) or JSON ``{"image": base64,
  "filename": optional}`` -> ``{probability, label, threshold, in_distribution, ood_score, ...,
  error}``; a file that cannot be read is HTTP 400 with ``error`` set, never a traceback.
* ``GET /api/health``, ``GET /api/model`` (the model card as JSON).

Every prediction goes through :class:`~chexformer.inference.Predictor` (the same preprocessing,
calibration and threshold as ``chexformer predict``). Requests run in a thread pool; at most
``max_concurrent`` of them use the model at once (a semaphore), so correctness never depends on
the model being re-entrant. The web parts (``gradio``, ``fastapi``, ``uvicorn``) are imported
inside the functions that need them: ``pip install chexformer[app]``.

Research use only: the page and the card say so; this is not a medical device.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chexformer import data
from chexformer.card import NOT_A_DEVICE, model_card, operating_point
from chexformer.explain import explain_batch, upsample_heatmap
from chexformer.guard import Guard, population_verdicts
from chexformer.inference import Predictor
from chexformer.plots import overlay_heatmap

log = logging.getLogger(__name__)

__all__ = ["Service", "BackgroundServer", "build_app", "create_app", "model_card", "operating_point", "serve"]

HEATMAP_CMAP = "inferno"  # perceptually uniform, monotone in lightness, readable in grey
DISPLAY_SIZE = 448  # longest side of the images shown on the page
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
_INSTALL_HINT = "the web service needs the app extra: pip install chexformer[app]"


def _require(module: str) -> Any:
    """Import an optional web dependency or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({module} is missing: {exc})") from None


class RequestError(ValueError):
    """A request the client must fix (HTTP 400): an unreadable or missing file."""


# ----------------------------------------------------------------------------------------------
# The model card and the meaning of the threshold (data in chexformer.card, text here)
# ----------------------------------------------------------------------------------------------
def _card_markdown(card: Mapping[str, Any]) -> str:
    lines = ["### Model card", f"**{NOT_A_DEVICE}**", "", f"**Intended use.** {card['intended_use']}", ""]
    lines += [f"**Classes:** {', '.join(card['class_names'])} (input {card['architecture']['img_size']} px, "
              f"epoch {card['epoch']}).", ""]
    td = card.get("training_data") or {}
    splits = td.get("splits") or {}
    if td:
        facts = [f"{k}: {v}" for k, v in td.items() if isinstance(v, (str, int, float)) and k != "val_source"]
        if td.get("val_source"):
            facts.append(f"validation split: {td['val_source']}")
        lines.append("**Training data.** " + ("; ".join(facts) if facts else ""))
        for name, s in splits.items():
            per = ", ".join(f"{c} {n}" for c, n in (s.get("per_class") or {}).items())
            lines.append(f"- {name}: {s.get('images')} images, {s.get('patients')} patients ({per})")
    else:
        lines.append("**Training data.** Not recorded in this checkpoint.")
    val = card["validation"]
    lines.append("")
    lines.append(f"**Validation.** ROC AUC {_fmt(val['roc_auc'])}.")
    if val.get("shift_suite"):
        worst = val["shift_suite"].get("worst") or {}
        lines.append(f"Under simulated acquisition shifts the worst ROC AUC was {_fmt(worst.get('roc_auc'))}.")
    lines.append("")
    lines += [f"- {text}" for text in card["limitations"]]
    return "\n".join(lines)


def _threshold_markdown(op: Mapping[str, Any] | None, names: list[str]) -> str:
    if op is None:
        return "No validation predictions stored in this checkpoint: the threshold's error rates are unknown."
    rule = f", chosen by rule '{op['threshold_rule']}'" if op.get("threshold_rule") else ""
    return (f"Threshold {op['threshold']:.3f}{rule}. On the {op['n_images']} validation images it found "
            f"{_pct(op['sensitivity'])} of {names[1]} images (sensitivity, {op['n_positive']} images) and called "
            f"{_pct(op['specificity'])} of {names[0]} images {names[0]} (specificity, {op['n_negative']} images).")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.0f} %"


# ----------------------------------------------------------------------------------------------
# The service: one checkpoint, thread-safe prediction and explanation
# ----------------------------------------------------------------------------------------------
class Service:
    """A checkpoint loaded once, with its guard, model card and a limit on concurrent inference."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", *, precision: str = "32",
                 max_concurrent: int = 1) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.checkpoint = Path(checkpoint)
        self.predictor = Predictor.from_checkpoint(checkpoint, device=device, precision=precision)
        stored = self.predictor.meta.extra.get("guard")
        self.guard = Guard.from_dict(stored) if stored else None
        if self.guard is not None:
            self.guard.check_model(self.predictor)
        self.card = model_card(self.predictor, self.guard, checkpoint)
        self._slots = threading.BoundedSemaphore(max_concurrent)
        log.info("serving %s on %s (%s); guard: %s", self.checkpoint, self.predictor.device,
                 self.predictor.precision, "yes" if self.guard else "none")

    @property
    def class_names(self) -> list[str]:
        return list(self.predictor.meta.class_names)

    # --- files ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _as_file(self, content: bytes, filename: str | None) -> Iterator[Path]:
        """Bytes -> a temporary file whose suffix is kept when it names an image format (DICOM is
        recognised by its magic bytes too), removed afterwards."""
        suffix = Path(filename or "").suffix.lower()
        suffix = suffix if suffix in data.IMAGE_EXTENSIONS else ""
        fd, name = tempfile.mkstemp(prefix="chexformer-upload-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            yield Path(name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def load(self, path: str | os.PathLike) -> torch.Tensor:
        """A file -> the model's uint8 image; an unreadable file is a :class:`RequestError`."""
        try:
            return self.predictor.load(path)
        except data.ImageReadError as exc:
            raise RequestError(f"cannot read the image: {exc.reason}") from None

    # --- prediction -----------------------------------------------------------------------------
    def predict_image(self, img: torch.Tensor) -> dict[str, Any]:
        """One uint8 image (3, S, S) -> the API's JSON result (``error`` None)."""
        with self._slots:
            prob = self.predictor.predict_images([img])
            score = None if self.guard is None else float(self.guard.score(self.predictor, [img])[0])
        verdicts, problems = population_verdicts([img], self.guard, None if score is None else [score])
        return self._result(prob[0], score, verdicts[0], problems[0])

    def predict_bytes(self, content: bytes, filename: str | None = None) -> dict[str, Any]:
        if not content:
            raise RequestError("the uploaded file is empty")
        with self._as_file(content, filename) as path:
            img = self.load(path)
        return self.predict_image(img)

    def _result(self, prob: Any, ood_score: float | None, in_distribution: bool | None,
                problem: str | None) -> dict[str, Any]:
        names = self.class_names
        p = np.atleast_1d(np.asarray(prob, dtype=np.float64))
        if self.predictor.binary:
            probability = float(p[0])
            probabilities = {names[0]: 1.0 - probability, names[1]: probability}
            label = self.predictor.label(p[:1])[0]
        else:
            probabilities = {n: float(v) for n, v in zip(names, p)}
            label = self.predictor.label(p[None])[0]
            probability = probabilities[label]
        return {
            "probability": probability,
            "probabilities": probabilities,
            "label": label,
            "threshold": self.predictor.threshold(),
            "positive_class": self.predictor.meta.positive_class,
            "in_distribution": in_distribution,
            "ood_score": ood_score,
            "ood_threshold": None if self.guard is None else self.guard.threshold,
            "warning": problem,
            "class_names": names,
            "error": None,
        }

    # --- explanation (the page) -----------------------------------------------------------------
    def explain_file(self, path: str | os.PathLike) -> dict[str, Any]:
        """Prediction, the image for display and its Grad-CAM / rollout maps cut to the image."""
        img = self.load(path)
        display = self._display_image(path, img)
        result = self.predict_image(img)
        x = self.predictor.to_input([img]).to(self.predictor.device)
        with self._slots:
            maps = explain_batch(self.predictor.model, x, self.predictor.meta)
        gradcam = self._to_image_frame(maps["gradcam"][0], display.shape[:2])
        rollout = None if maps["rollout"] is None else self._to_image_frame(maps["rollout"][0], display.shape[:2])
        return {"result": result, "display": display, "gradcam": gradcam, "rollout": rollout}

    def _display_image(self, path: str | os.PathLike, img: torch.Tensor) -> np.ndarray:
        """The uploaded image (intensity rule applied, original aspect) at most DISPLAY_SIZE px."""
        try:
            pil = data.load_image(path, size_hint=DISPLAY_SIZE)
        except data.ImageReadError:  # read once already, so only a race could get here
            return img.permute(1, 2, 0).numpy()
        pil.thumbnail((DISPLAY_SIZE, DISPLAY_SIZE))
        return np.asarray(pil.convert("RGB"))

    def _to_image_frame(self, heatmap: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
        """A model-grid heatmap (h, w) -> the displayed image's frame (H, W): with ``keep_aspect``
        the padding the model saw is cut away first, otherwise the map is stretched like the image."""
        S = self.predictor.img_size
        hm = upsample_heatmap(heatmap.float().cpu(), (S, S))
        if self.predictor.cfg.keep_aspect:
            H, W = hw
            scale = S / max(H, W)
            h, w = max(1, round(H * scale)), max(1, round(W * scale))
            top, left = (S - h) // 2, (S - w) // 2
            hm = hm[top:top + h, left:left + w]
        return upsample_heatmap(hm, hw).numpy()


def render_overlay(display: np.ndarray, heatmap: np.ndarray | None, opacity: float) -> np.ndarray | None:
    """The heatmap coloured with a perceptual colour map over the image, uint8 (H, W, 3)."""
    if heatmap is None or display is None:
        return None
    over = overlay_heatmap(display, heatmap, alpha=float(opacity), cmap=HEATMAP_CMAP)
    return np.clip(np.rint(over * 255), 0, 255).astype(np.uint8)


def _verdict_markdown(service: Service, result: Mapping[str, Any]) -> str:
    if result.get("warning"):
        return f"**Guard: the pixel check fails** ({result['warning']}). Do not trust the probability."
    if service.guard is None:
        return "Guard: no guard in this checkpoint; nothing checks that the image resembles the training images."
    score, t = result["ood_score"], result["ood_threshold"]
    if result["in_distribution"]:
        return f"Guard: within the training population (score {score:.2f}, threshold {t:.2f})."
    return (f"**Guard: OUT OF POPULATION** (score {score:.2f} > threshold {t:.2f}). This image is unlike the "
            "training images; the probability is not meaningful for it.")


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
def _theme(gr: Any) -> Any:
    """The default theme with system fonts: the page makes no request to a font server."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_blocks(service: Service) -> Any:
    """The Gradio page for a loaded :class:`Service`."""
    gr = _require("gradio")
    names = service.class_names
    positive = service.predictor.meta.positive_class or "predicted class"
    op = service.card["validation"]["operating_point"]
    file_types = sorted(data.IMAGE_EXTENSIONS)

    def analyse(path: str | None, opacity: float):
        if not path:
            return ("", "Drop a chest X-ray (PNG, JPEG or DICOM).", None, None, None, None)
        try:
            out = service.explain_file(path)
        except RequestError as exc:
            return ("", f"**Cannot read this file.** {exc}", None, None, None, None)
        res = out["result"]
        label_line = (f"**{res['label']}** at threshold {res['threshold']:.3f}" if service.predictor.binary
                      else f"**{res['label']}** (highest probability)")
        summary = "\n\n".join([
            f"P({positive}) = **{res['probability']:.3f}** (calibrated) -> {label_line}",
            _threshold_markdown(op, names) if service.predictor.binary else "",
            _verdict_markdown(service, res),
            f"_{NOT_A_DEVICE}_",
        ])
        state = {"display": out["display"], "gradcam": out["gradcam"], "rollout": out["rollout"]}
        return (f"{res['probability']:.4f}", summary, out["display"],
                render_overlay(out["display"], out["gradcam"], opacity),
                render_overlay(out["display"], out["rollout"], opacity), state)

    def restyle(state: dict | None, opacity: float):
        if not state:
            return None, None
        return (render_overlay(state["display"], state["gradcam"], opacity),
                render_overlay(state["display"], state["rollout"], opacity))

    # Uploaded images are deleted from Gradio's cache an hour after upload (checked every 10 minutes).
    with gr.Blocks(title="chexformer", analytics_enabled=False, delete_cache=(600, 3600)) as blocks:
        gr.Markdown(f"## chexformer: {' vs '.join(names)}\n**{NOT_A_DEVICE}**")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_types=file_types, type="filepath",
                                 elem_id="upload")
                opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity", elem_id="opacity")
                probability = gr.Textbox(label=f"P({positive}), calibrated", interactive=False, elem_id="probability")
                summary = gr.Markdown("Drop a chest X-ray (PNG, JPEG or DICOM).", elem_id="summary")
            with gr.Column(scale=2):
                with gr.Row():
                    original = gr.Image(label="Image", type="numpy", format="png", interactive=False,
                                        elem_id="original")
                    gradcam = gr.Image(label="Grad-CAM", type="numpy", format="png", interactive=False,
                                       elem_id="gradcam")
                    rollout = gr.Image(label="Attention rollout", type="numpy", format="png", interactive=False,
                                       elem_id="rollout")
                gr.Markdown(f"Image after the intensity rule, as the model reads it. Grad-CAM: where the evidence for "
                            f"{positive} lies; attention rollout: which regions reached the classifier through "
                            f"attention. Bright = more ('{HEATMAP_CMAP}' colour map), each map scaled to its own "
                            "maximum, so colours compare regions within one map only.")
        state = gr.State(None)
        gr.Markdown(_card_markdown(service.card), elem_id="model-card")
        upload.change(analyse, inputs=[upload, opacity],
                      outputs=[probability, summary, original, gradcam, rollout, state])
        opacity.release(restyle, inputs=[state, opacity], outputs=[gradcam, rollout])
    return blocks


def build_app(checkpoint: str | os.PathLike, device: str = "auto") -> Any:
    """The Gradio page (``gradio.Blocks``) for a checkpoint; ``.launch()`` it or mount it."""
    _require("gradio")  # before the model is loaded
    return build_blocks(Service(checkpoint, device))


# ----------------------------------------------------------------------------------------------
# The HTTP API and the combined app
# ----------------------------------------------------------------------------------------------
def _json_error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse  # local: optional (the app extra)

    return JSONResponse({"error": message}, status_code=status)


async def _read_request(request: Any, max_bytes: int) -> tuple[bytes, str | None]:
    """The image bytes and file name of a multipart upload or a JSON body with base64."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None:  # any other file field will do
            upload = next((v for v in form.values() if hasattr(v, "read")), None)
        if upload is None or not hasattr(upload, "read"):
            raise RequestError("multipart request without a file: send the image in a field named 'file'")
        content = await upload.read()
        filename = upload.filename
    elif ctype.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("the body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise RequestError('JSON body must be {"image": "<base64>", "filename": "optional.png"}')
        text = body["image"]
        if text.startswith("data:") and "," in text:  # a data URL
            text = text.split(",", 1)[1]
        try:
            content = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("'image' is not valid base64") from None
        filename = body.get("filename") if isinstance(body.get("filename"), str) else None
    else:
        raise RequestError("send multipart/form-data with a 'file' field, or JSON {\"image\": \"<base64>\"}")
    if len(content) > max_bytes:
        raise RequestError(f"file too large ({len(content)} bytes; the limit is {max_bytes})")
    return content, filename


def create_app(checkpoint: str | os.PathLike | Service, device: str = "auto", *, max_concurrent: int = 1,
               max_bytes: int = MAX_UPLOAD_BYTES, ui: bool = True) -> Any:
    """A FastAPI app with ``/api/predict``, ``/api/health``, ``/api/model`` and (``ui``) the
    Gradio page mounted at ``/``. Run it with uvicorn (see :func:`serve`)."""
    fastapi = _require("fastapi")
    gr = _require("gradio") if ui else None  # before the model is loaded
    from starlette.concurrency import run_in_threadpool  # local: optional (the app extra, with fastapi)

    service = checkpoint if isinstance(checkpoint, Service) else Service(checkpoint, device,
                                                                          max_concurrent=max_concurrent)
    app = fastapi.FastAPI(title="chexformer", description=NOT_A_DEVICE, docs_url="/api/docs",
                          openapi_url="/api/openapi.json", redoc_url=None)
    app.state.service = service
    started = time.time()

    async def predict(request):
        try:
            content, filename = await _read_request(request, max_bytes)
            return await run_in_threadpool(service.predict_bytes, content, filename)
        except RequestError as exc:
            return _json_error(400, str(exc))
        except Exception as exc:  # logged here with its traceback; the client gets one line
            log.exception("prediction failed")
            return _json_error(500, f"internal error: {type(exc).__name__}")

    predict.__annotations__["request"] = fastapi.Request  # resolved here: fastapi is imported lazily
    app.post("/api/predict")(predict)

    @app.get("/api/health")
    def health():
        return {"status": "ok", "checkpoint": service.checkpoint.name, "device": str(service.predictor.device),
                "guard": service.guard is not None, "uptime_s": round(time.time() - started, 1)}

    @app.get("/api/model")
    def model():
        return service.card

    if gr is not None:
        app = gr.mount_gradio_app(app, build_blocks(service), path="/", theme=_theme(gr), footer_links=[])
    return app


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread on a loopback port (tests, benchmarks)::

        with BackgroundServer(create_app(ckpt)) as server:
            httpx.get(server.url + "/api/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        uvicorn = _require("uvicorn")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          max_concurrent: int = 1, log_level: str = "info") -> None:
    """Serve the page at ``http://host:port/`` and the API under ``/api`` until interrupted.
    The default host is loopback only; bind 0.0.0.0 deliberately, behind your own access control."""
    uvicorn = _require("uvicorn")
    app = create_app(checkpoint, device, max_concurrent=max_concurrent)
    log.info("chexformer service on http://%s:%d/ (API: /api/predict, /api/health, /api/model)", host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
