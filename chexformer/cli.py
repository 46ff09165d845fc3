"""Command-line entry point: ``chexformer <command>`` and ``python -m chexformer <command>``.

Commands: ``demo`` (the whole pipeline on a generated data set), ``train``, ``evaluate``,
``explain``, ``predict``, ``serve``, ``export``, ``summary`` (the model a config builds).
Every config field is an option: ``--img-size 128 --freeze-cnn true``; ``--config FILE`` reads YAML;
``chexformer train --print-config`` shows the resolved config. ``chexformer COMMAND --help`` explains
each option.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Only light modules at the top: building the parser (and so --help) must not import torch, numpy or
# Lightning. Each command imports what it needs.
from chexformer import __version__
from chexformer._help import ArgumentParser
from chexformer.config import Config, add_config_arguments, config_from_args, load_config, overrides_from_args

log = logging.getLogger("chexformer")

# The embedded default: a small synthetic data set and a model sized to finish in minutes on 2 CPU cores.
DEMO_OVERRIDES = {
    "img_size": 128, "batch_size": 16, "d_model": 64, "num_heads": 4, "ffn_dim": 128, "num_layers": 2,
    "epochs": 10, "patience": 5, "init_lr": 1e-3, "backbone_lr_scale": 1.0, "dropout_rate": 0.1,
    "backbone_weights": "none", "num_workers": 0, "log_images_every": 2, "validation_split": 0.25,
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message, not the stream it found when
    created: ``main()`` called twice in one process (a notebook, a test session capturing stderr)
    would otherwise keep writing to a replaced, possibly closed stream. (The standard library's
    ``logging._StderrHandler``, behind ``logging.lastResort``, does the same but is private.)"""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def _setup_logging(verbose: bool) -> None:
    """chexformer's messages to stderr; Lightning keeps its own handler (no duplicate lines)."""
    if not any(getattr(h, "_chexformer", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._chexformer = True
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_config(cfg: Config) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and not args.config:
        out = overrides_from_args(args).get("out_dir")
        stored = Path(out) / "config.yaml" if out else None
        if stored and stored.is_file():
            log.info("--resume: using the run's stored config %s (command-line options still override)", stored)
            args.config = str(stored)
    cfg = config_from_args(args)
    if args.print_config:
        return _print_config(cfg)
    from chexformer.train import train

    train(cfg, resume=args.resume)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    explicit = overrides_from_args(args)
    out = Path(explicit.get("out_dir", "runs/demo"))
    data_dir = Path(explicit.get("data_dir", out / "demo-data"))
    base = load_config(args.config) if args.config else None
    overrides = {**DEMO_OVERRIDES, **explicit, "out_dir": str(out), "data_dir": str(data_dir)}
    cfg = load_config(None, {**(base.to_dict() if base else {}), **overrides})
    if args.print_config:
        return _print_config(cfg)
    from chexformer.synthetic import make_synthetic_dataset
    from chexformer.train import train

    if not (data_dir / "train").is_dir():
        log.info("generating the synthetic demo data set in %s", data_dir)
        make_synthetic_dataset(data_dir, n_per_class=args.images_per_class, img_size=128, seed=0)
    log.info("demo: synthetic chest-radiograph-like images, random backbone init, img_size %d, %d epochs",
             cfg.img_size, cfg.epochs)
    summary = train(cfg, resume=args.resume)
    log.info("demo finished: open %s/results/report.html", summary["out_dir"])
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from chexformer._help import model_table
    from chexformer.model import build_model
    from chexformer.weights import init_backbone

    cfg = config_from_args(args)
    model = build_model(cfg, num_classes=args.num_classes).eval()
    report = init_backbone(model, cfg)
    print("\n".join(model_table(model, cfg, report)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from chexformer.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.data_dir, args.out_dir,
                                  target_sensitivity=args.target_sensitivity, n_boot=args.n_boot,
                                  strict=args.strict, device=args.device, precision=args.precision,
                                  backend=args.backend, shift_suite=args.shift_suite)
    print(json.dumps({k: v for k, v in results.items() if k in ("threshold", "n_images")}, indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from chexformer.explain import explain_files

    explain_files(args.checkpoint, args.images, args.out_dir, device=args.device, common_scale=args.common_scale)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from chexformer.predict import predict_paths

    rows = predict_paths(args.checkpoint, args.paths, args.output, batch_size=args.batch_size, tta=args.tta,
                         device=args.device, precision=args.precision, backend=args.backend)
    failed = sum(1 for r in rows if r.error)
    log.info("wrote %d rows to %s (%d unreadable)", len(rows), args.output, failed)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from chexformer.serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, max_concurrent=args.max_concurrent)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from chexformer.checkpoint import load_checkpoint
    from chexformer.export import export_model
    from chexformer.runtime import check_output_file

    for out in (args.output, f"{args.output}.json"):  # the export and its side file
        check_output_file(out, protect=[args.checkpoint])
    model, meta = load_checkpoint(args.checkpoint)
    path = export_model(model, meta, args.format, Path(args.output))
    log.info("exported %s (metadata in %s.json)", path, path)
    return 0


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--precision", default="32", choices=["32", "auto", "bf16-mixed", "16-mixed"],
                   help="32 (default: every command gives the same numbers); auto / bf16-mixed: 1.3-2x faster on CPUs "
                        "with native bf16 (bench/predict_speed.py); moved a trained model's probabilities up to 0.028")
    p.add_argument("--backend", default="eager", choices=["eager", "jit", "auto"],
                   help="eager PyTorch (default); jit: TorchScript trace+freeze (CPU), faster per batch but slower "
                        "to start; auto: jit on CPU when it matches eager fp32 within 1e-3 on a probe batch")


_CONFIG_USAGE = "[--config FILE] [--FIELD-NAME VALUE ...]"
_PRINT_CONFIG_HELP = "print the resolved config (defaults, --config file, options) as YAML and exit"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="chexformer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"chexformer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # -v also after the command; SUPPRESS keeps the subcommand from resetting `chexformer -v train`.
    common = ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], **kwargs)

    p = command("train", "train on DATA_DIR/train, evaluate on DATA_DIR/test",
                usage=f"%(prog)s [-h] [-v] [--resume] [--print-config] {_CONFIG_USAGE}")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from checkpoints/last.ckpt")
    p.add_argument("--print-config", action="store_true", help=_PRINT_CONFIG_HELP)
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = command("demo", "generate a small synthetic data set and run the whole pipeline on it",
                usage=f"%(prog)s [-h] [-v] [--resume] [--images-per-class N] [--print-config] {_CONFIG_USAGE}")
    p.add_argument("--resume", action="store_true", help="continue the demo run from its last checkpoint")
    p.add_argument("--images-per-class", type=int, default=240, metavar="N",
                   help="size of the generated data set (default: 240)")
    p.add_argument("--print-config", action="store_true",
                   help=_PRINT_CONFIG_HELP + " (the demo's small model and data included)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = command("summary", "build the model a config describes and print a table of its stages",
                usage=f"%(prog)s [-h] [-v] [--num-classes N] {_CONFIG_USAGE}")
    p.add_argument("--num-classes", type=int, default=2, metavar="N", help="classes of the head (default: 2)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_summary)

    p = command("evaluate", "metrics with CIs, plots and an HTML report for a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True, help="a folder with one sub-folder per class (e.g. DATA/test)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="report at the validation threshold reaching this sensitivity instead of Youden's J")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--strict", action="store_true", help="unreadable images are an error, not a reported skip")
    p.add_argument("--shift-suite", action="store_true",
                   help="also re-score the set under 8 acquisition shifts x 3 severities (robustness suite)")
    _add_runtime_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("explain", "attention rollout, Grad-CAM and feature maps for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--common-scale", action="store_true",
                   help="one heatmap scale for all images (a faint map stays faint) instead of 0..1 per map")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_explain)

    p = command("predict", "probabilities and labels for image files or folders, as CSV")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (average logits over small shifts and a zoom; uses the threshold "
                        "chosen on validation with the same views)")
    _add_runtime_arguments(p)
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = command("serve", "web viewer and HTTP API for a checkpoint (needs the app extra)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--max-concurrent", type=int, default=1, help="inferences run at the same time (default: 1)")
    p.set_defaults(func=cmd_serve)

    p = command("export", "export a checkpoint to ONNX or TorchScript")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    # ConfigError, DatasetLayoutError and WeightsError are ValueErrors: an input to fix, not a bug.
    except (ValueError, OSError) as exc:  # FileNotFoundError, PermissionError, a full disk, ...
        log.error("%s", exc)
        log.debug("where it was raised (shown with -v):", exc_info=True)
        return 2
    except Exception as exc:
        from chexformer.data import ImageReadError  # imported only here: printing help needs no torch
        from chexformer.export import ExportError

        if not isinstance(exc, (ImageReadError, ExportError)):
            raise
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
