"""Export a trained model for deployment as ONNX or TorchScript, and verify the export.

The exported graph is a small wrapper whose ``forward(image)`` returns the model's logits in eval
mode: input ``image`` (batch, 3, S, S) float32, normalised; output ``logits`` (batch, K), with a
dynamic batch size. Everything needed to use it (class names, image size, the intensity rule and
normalisation, the decision threshold, the Platt temperature and bias, and how logits become
probabilities) travels with it three ways:

* a side file ``<output>.json`` (always written; it also records the parity check),
* ONNX ``metadata_props`` (key ``chexformer`` holds the full JSON; the main fields also have
  their own human-readable keys),
* a TorchScript extra file ``chexformer.json``.

After writing, the file is reloaded (onnxruntime's CPU provider, or ``torch.jit.load``) and its
logits are compared with PyTorch's on random batches of 2 and 3 images; a mismatch above the
tolerance raises :class:`ExportError` and removes the file. The model passed in is never changed:
the export works on (and is compared with) a CPU float32 eval-mode copy.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chexformer import __version__
from chexformer.checkpoint import CheckpointMeta
from chexformer.data.io import INTENSITY_PERCENTILES

log = logging.getLogger(__name__)

__all__ = ["ExportError", "export_model", "export_metadata", "load_exported_metadata", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
METADATA_KEY = "chexformer"
TORCHSCRIPT_EXTRA_FILE = "chexformer.json"
PARITY_BATCH_SIZES = (2, 3)


class ExportError(RuntimeError):
    """The model could not be exported, or the exported file does not reproduce its logits."""


# ----------------------------------------------------------------------------------------------
# The exported module
# ----------------------------------------------------------------------------------------------
class LogitsWrapper(nn.Module):
    """``forward(image) -> logits`` for a ChexFormer or LinearHeadDenseNet.

    ``explicit_attention`` routes ChexFormer's attention through the explicit softmax path
    (``need_weights=True``; same logits within 1e-5) for exporters that cannot translate the
    fused ``scaled_dot_product_attention`` kernel.
    """

    def __init__(self, model: nn.Module, explicit_attention: bool = False) -> None:
        super().__init__()
        self.model = model
        self.explicit_attention = explicit_attention and hasattr(model, "tokens_from_features")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.explicit_attention:
            feats = self.model.forward_features(image)  # (B, 1024, S/32, S/32)
            tokens = self.model.tokens_from_features(feats, need_weights=True)[0]  # (B, 1 + N, d_model)
            return self.model.forward_head(tokens)  # (B, K)
        return self.model(image)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A CPU float32 eval-mode copy without gradients; the caller's model is left untouched."""
    clone = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    clone.eval()
    clone.requires_grad_(False)
    return clone


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------
def _version() -> str:
    return str(__version__)


def export_metadata(meta: CheckpointMeta, fmt: str, num_outputs: int, img_size: int | None = None) -> dict[str, Any]:
    """The JSON-serialisable description of an exported model (see the module docstring)."""
    size = int(img_size if img_size is not None else meta.config.img_size)
    binary = num_outputs == 1
    positive = meta.positive_class if binary else None
    equalize = getattr(meta.config, "intensity", "stretch") == "equalize"
    if binary:
        probability = "p = sigmoid(logits[:, 0] / temperature + bias) is the probability of positive_class"
        decision = "predict positive_class (class_names[1]) when p >= threshold, else class_names[0]"
    else:
        probability = "p = softmax(logits / temperature, axis=1); column i is class_names[i]"
        decision = "predict class_names[argmax(p, axis=1)] (threshold is unused)"
    return {
        "format": fmt,
        "chexformer_version": _version(),
        "arch": meta.config.arch,
        "class_names": list(meta.class_names),
        "num_classes": len(meta.class_names),
        "positive_class": positive,
        "threshold": float(meta.threshold),
        "temperature": float(meta.temperature),
        "bias": float(meta.bias),
        "intensity_percentiles": [float(v) for v in INTENSITY_PERCENTILES],
        "keep_aspect": bool(meta.config.keep_aspect),
        "intensity": "stretch, equalize" if equalize else "stretch",
        "mean": [float(v) for v in meta.mean],
        "std": [float(v) for v in meta.std],
        "img_size": size,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "preprocess": (
                "grey values at the file's own depth (colour as ITU-R 601 luma; DICOM through its modality "
                "and VOI LUTs or window, MONOCHROME1 inverted); the image's own intensity_percentiles mapped "
                "linearly to 0..255, rounded and clipped to 8 bits; resized (bilinear) to "
                f"{size}x{size}" + (", the longer side first, centred on black" if meta.config.keep_aspect else "")
                + "; the same percentile mapping again on the resized image"
                + ("; global histogram equalisation (torchvision.transforms.v2.functional.equalize)"
                   if equalize else "")
                + "; grey copied to 3 channels; scaled to [0, 1]; then (x - mean) / std per channel. chexformer "
                "decodes large JPEGs at a reduced scale (never below the model size) before this, so a JPEG "
                "decoded at full size may score a little differently (not measured)"
            ),
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", num_outputs], "dtype": "float32"},
        "probability": probability,
        "decision": decision,
        "epoch": int(meta.epoch),
        "config": meta.config.to_dict(),
    }


def _side_file(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def load_exported_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported model: from the side file ``<path>.json`` when present (or when
    ``path`` is that side file), else from the ONNX ``metadata_props`` or the TorchScript extra
    file ``chexformer.json``."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    side = _side_file(path)
    if side.is_file():
        return json.loads(side.read_text())
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if zipfile.is_zipfile(path):  # TorchScript archives are zip files
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(f"extra/{TORCHSCRIPT_EXTRA_FILE}")]
            if not names:
                raise ExportError(f"{path}: TorchScript file without a {TORCHSCRIPT_EXTRA_FILE} extra file")
            return json.loads(zf.read(names[0]))
    try:
        import onnx  # local: optional (the export extra)
    except ImportError as exc:
        raise ExportError(f"{path}: reading ONNX metadata needs the onnx package ({exc})") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise ExportError(f"{path}: neither a TorchScript archive nor an ONNX model ({exc})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path}: ONNX model without chexformer metadata ('{METADATA_KEY}' metadata_props entry)")
    return json.loads(props[METADATA_KEY])


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------
def _onnx_attempts(
    wrapper_fused: nn.Module, wrapper_explicit: nn.Module, opset: int
) -> list[tuple[str, int, Callable]]:
    """Exporter configurations to try in order: the TorchScript-based exporter (fast, stable
    with ``dynamic_axes``) with the fused then the explicit attention path, then the
    ``torch.export``-based one (opset >= 18, which it translates natively)."""

    def legacy(wrapper: nn.Module) -> Callable:
        def run(example: torch.Tensor, output: Path) -> None:
            with warnings.catch_warnings():
                # Traced shape comparisons (the positional-encoding branch) become constants: right
                # for the fixed input size S, and the parity check confirms it.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(output),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    do_constant_folding=True,
                )

        return run

    dynamo_opset = max(opset, 18)

    def dynamo(wrapper: nn.Module) -> Callable:
        def run(example: torch.Tensor, output: Path) -> None:
            torch.onnx.export(
                wrapper,
                (example,),
                str(output),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=dynamo_opset,
                external_data=False,
            )

        return run

    return [
        ("TorchScript-based exporter, fused attention", opset, legacy(wrapper_fused)),
        ("TorchScript-based exporter, explicit attention", opset, legacy(wrapper_explicit)),
        ("torch.export-based exporter", dynamo_opset, dynamo(wrapper_fused)),
    ]


def _export_onnx(wrapper_fused: nn.Module, wrapper_explicit: nn.Module, example: torch.Tensor, output: Path,
                 opset: int, metadata: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    try:  # local: optional (the export extra)
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime: pip install 'chexformer[export]' ({exc})") from None

    errors = []
    for name, used_opset, attempt in _onnx_attempts(wrapper_fused, wrapper_explicit, opset):
        try:
            with torch.no_grad():
                attempt(example, output)
        except Exception as exc:  # exporters raise many types; each failure is reported below
            log.warning("ONNX export with the %s failed: %s", name, exc)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        log.info("ONNX graph written with the %s (opset %d)", name, used_opset)
        metadata["opset"] = used_opset
        metadata["onnx_exporter"] = name
        break
    else:
        raise ExportError("ONNX export failed with every exporter:\n  - " + "\n  - ".join(errors))

    proto = onnx.load(str(output))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(_onnx_props(metadata))
    onnx.helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{output}: the exported ONNX graph is invalid: {exc}") from None
    onnx.save(proto, str(output))

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"{output}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {inputs} -> {outputs}"
        )
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _onnx_props(metadata: dict[str, Any]) -> dict[str, str]:
    """metadata_props entries (string values): the full JSON plus readable copies of the main fields."""
    props = {METADATA_KEY: json.dumps(metadata)}
    for key in ("class_names", "threshold", "temperature", "bias", "mean", "std", "img_size", "positive_class",
                "chexformer_version", "probability", "decision"):
        value = metadata[key]
        props[key] = value if isinstance(value, str) else json.dumps(value)
    return props


# ----------------------------------------------------------------------------------------------
# TorchScript
# ----------------------------------------------------------------------------------------------
def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, output: Path,
                        metadata: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    with warnings.catch_warnings():
        # The positional-encoding branch on the grid size is traced as a constant, which is right
        # for the fixed input size S; the parity check below confirms it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    torch.jit.save(traced, str(output), _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(metadata)})
    loaded = torch.jit.load(str(output), map_location="cpu")
    loaded.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _check_parity(reference: nn.Module, run: Callable[[np.ndarray], np.ndarray], img_size: int,
                  atol: float) -> float:
    reference.eval()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in PARITY_BATCH_SIZES:
        x = torch.randn(batch, 3, img_size, img_size, generator=gen)
        with torch.no_grad():
            expected = reference(x).numpy()
        got = np.asarray(run(x.numpy()))
        if got.shape != expected.shape:
            raise ExportError(f"exported model returned shape {got.shape} for batch {batch}, expected {expected.shape}")
        if not np.isfinite(got).all():
            raise ExportError(f"exported model returned non-finite logits for batch {batch}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_model(model: nn.Module, meta: CheckpointMeta, fmt: str, output: str | Path, opset: int = 17,
                 atol: float = 1e-4) -> Path:
    """Export ``model`` (ChexFormer or LinearHeadDenseNet) and verify the file reproduces its logits.

    Args:
        model: the trained model; not modified (a CPU float32 eval-mode copy is exported).
        meta: its checkpoint metadata (class names, normalisation, threshold, temperature, config).
        fmt: 'onnx' or 'torchscript'.
        output: file to write; its parent folder is created. ``<output>.json`` is written beside it.
        opset: ONNX opset (>= 14 for the fused attention kernel).
        atol: largest allowed absolute logit difference against PyTorch.

    Returns:
        ``output`` as a Path.

    Raises:
        ExportError: unknown format, missing ONNX packages, exporter failure, or a parity
            mismatch (the bad file is removed).
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: expected one of {EXPORT_FORMATS}")
    output = Path(output)
    img_size = int(meta.config.img_size)
    model_size = getattr(model, "img_size", img_size)
    if model_size != img_size:
        raise ExportError(f"model img_size {model_size} differs from the metadata's img_size {img_size}")
    num_outputs = int(getattr(model, "num_outputs", meta.num_outputs))
    if num_outputs != meta.num_outputs:
        raise ExportError(f"model has {num_outputs} outputs but the metadata names {meta.num_classes} classes")

    clone = _frozen_copy(model)
    # Wrappers in eval mode too: exporters restore the top module's mode afterwards, and a
    # wrapper left in training mode would switch the copy's dropout back on.
    fused, explicit = LogitsWrapper(clone).eval(), LogitsWrapper(clone, explicit_attention=True).eval()
    metadata = export_metadata(meta, fmt, num_outputs, img_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    _side_file(output).unlink(missing_ok=True)  # a stale side file must not describe a new export
    example = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))

    if fmt == "onnx":
        run = _export_onnx(fused, explicit, example, output, opset, metadata)
    else:
        run = _export_torchscript(fused, example, output, metadata)

    diff = _check_parity(fused, run, img_size, atol)
    if not diff <= atol:
        output.unlink(missing_ok=True)
        raise ExportError(
            f"{fmt} export does not reproduce the PyTorch logits: max abs difference {diff:.3g} > {atol:g} "
            f"on batches of {PARITY_BATCH_SIZES}; {output} was removed"
        )
    log.info("%s export verified: max abs logit difference %.3g on batch sizes %s", fmt, diff, PARITY_BATCH_SIZES)

    side = dict(metadata)
    side["file"] = output.name
    side["verification"] = {"batch_sizes": list(PARITY_BATCH_SIZES), "max_abs_diff": diff, "atol": atol,
                            "runtime": "onnxruntime CPUExecutionProvider" if fmt == "onnx" else "torch.jit.load"}
    _side_file(output).write_text(json.dumps(side, indent=2) + "\n")
    log.info("exported %s model to %s (metadata in %s)", fmt, output, _side_file(output))
    return output
