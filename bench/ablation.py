"""Ablation: DenseNet121 with a pooled linear head vs the hybrid with 1, 2 and 4 encoder layers.

    python bench/ablation.py --data-dir ../shared/data/kermany224 --out-dir runs/ablation \\
        [--img-size 96] [--epochs 3] [--seeds 0 1 2] [--variants linear hybrid1 hybrid2 hybrid4] [--max-images N]

Every row is one ``chexformer.train.train(cfg, evaluate=False)`` run from random initialisation
(``backbone_weights=none``) on the SAME images and the SAME patient-level split. ``train`` splits
``DATA/train`` with ``cfg.seed``, so the split would move with the seed; instead this script
computes the split once (``split_by_patient(samples, --validation-split, seed=--split-seed)``)
and writes it as a folder of symlinks (never copies), ``OUT/data/{train,val}/<class>/...``.
``XrayDataModule`` then uses ``val/`` as it is, and the seed only changes the initialisation,
augmentation and shuffling. ``OUT/split.csv`` records the split; a restart that would produce a
different split stops with an error.

Variants: ``linear`` (``arch=linear``: global average pooling + linear, the baseline) and
``hybridN`` (``arch=hybrid``, N encoder layers). Shared settings: batch 32, init_lr 1e-3,
backbone_lr_scale 1.0, d_model 128, 4 heads, ffn 256, dropout 0.1, precision auto, num_workers 0,
log_images_every 0, patience epochs + 1 (no early stop); ``--set KEY=VALUE`` changes others.

The AUC of a run is the validation AUC at the best checkpoint (lowest validation loss), read
from ``checkpoints/best.ckpt`` (``meta.extra["val_auc"]`` via ``load_checkpoint``); if that is
missing, the AUC of the lowest-val_loss epoch in ``history.csv``. The ``auc_source`` column says
which; ``max_val_auc`` (the best epoch by AUC, optimistic) is recorded for reference only.

Rows are appended to ``OUT/ablation.csv`` as each run ends, so a killed ablation keeps what it
finished; rerunning the same command skips finished rows and resumes an unfinished run from its
``last.ckpt`` (its row is then marked ``resumed`` and its minutes cover only the resumed part).
At the end the markdown table is printed and written to ``OUT/ablation.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.ablation")

REPO = Path(__file__).resolve().parents[1]

SETTINGS = dict(batch_size=32, init_lr=1e-3, backbone_lr_scale=1.0, d_model=128, num_heads=4, ffn_dim=256,
                dropout_rate=0.1, precision="auto", num_workers=0, log_images_every=0, backbone_weights="none",
                freeze_cnn=False)

FIELDS = ["variant", "arch", "layers", "seed", "val_auc", "auc_source", "best_epoch", "best_val_loss",
          "max_val_auc", "epochs_run", "minutes", "resumed", "img_size", "epochs", "train_images", "val_images",
          "precision", "run_dir", "finished_at"]
# Settings a finished row must share with the current command for the table to compare like with like.
MUST_MATCH = ("img_size", "epochs", "train_images", "val_images")


def parse_variant(name: str) -> tuple[str, int | None]:
    """'linear' -> ('linear', None); 'hybrid4' -> ('hybrid', 4)."""
    if name == "linear":
        return "linear", None
    m = re.fullmatch(r"hybrid(\d+)", name)
    if not m:
        raise ValueError(f"unknown variant {name!r}: expected 'linear' or 'hybridN' (N encoder layers, e.g. hybrid2)")
    return "hybrid", int(m.group(1))


# ----------------------------------------------------------------------------------------------
# One fixed split, as a folder of symlinks
# ----------------------------------------------------------------------------------------------
def _subset(samples: list, n: int, seed: int) -> list:
    """About ``n`` of ``samples``, whole patient groups, every class kept in proportion: the
    held-out side of a patient-level split with fraction n / len(samples)."""
    from chexformer.data import split_by_patient

    if n >= len(samples):
        return samples
    return split_by_patient(samples, n / len(samples), seed)[1]


def _split_csv_text(train: list, val: list, class_names: list[str]) -> str:
    """The columns of chexformer.data.write_split_csv, with resolved source paths, as a string."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "class_name", "patient", "split"])
    for split, part in (("train", train), ("val", val)):
        for s in part:
            writer.writerow([str(Path(s.path).resolve()), s.label, class_names[s.label], s.group, split])
    return buf.getvalue()


def prepare_data(src: Path, out: Path, split_seed: int, validation_split: float,
                 max_images: int | None) -> tuple[Path, dict[str, Any]]:
    """Scan ``src/train`` (and ``src/val`` if present), split once, write ``out/data`` symlinks."""
    from chexformer import data

    train_root = src / "train"
    scan = data.scan_folder(train_root)
    class_names = scan.class_names
    roots = {}
    if (src / "val").is_dir():
        val_scan = data.scan_folder(src / "val", class_names)
        train, val = scan.samples, val_scan.samples
        split_source = f"{src}/val as is"
        for s in val:
            roots[id(s)] = src / "val"
    else:
        train, val = data.split_by_patient(scan.samples, validation_split, split_seed)
        split_source = f"split_by_patient({validation_split}, seed={split_seed})"
    if max_images is not None:
        val_max = max(2, round(max_images * validation_split / (1 - validation_split)))
        train, val = _subset(train, max_images, split_seed), _subset(val, val_max, split_seed)
        split_source += f", subset of about {max_images} train / {val_max} val images (--max-images)"

    manifest = out / "split.csv"
    text = _split_csv_text(train, val, class_names)
    if manifest.is_file() and manifest.read_text() != text:
        raise SystemExit(
            f"{manifest} holds a different split than this command gives (other data, --split-seed, "
            "--validation-split or --max-images). Rows of different splits cannot share a table: "
            "use another --out-dir, or remove the old one."
        )
    link_root = out / "data"
    if link_root.exists():
        stray = [p for p in link_root.rglob("*") if not p.is_symlink() and not p.is_dir()]
        if stray:
            raise SystemExit(f"{link_root} holds files this script did not make (e.g. {stray[0]}); "
                             "refusing to replace it")
        shutil.rmtree(link_root)  # removes the links only, never their targets
    for split, part in (("train", train), ("val", val)):
        for s in part:
            base = roots.get(id(s), train_root) / class_names[s.label]
            link = link_root / split / class_names[s.label] / Path(s.path).relative_to(base)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(s.path).resolve(), link)
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(text)
    info = {"class_names": class_names, "train_images": len(train), "val_images": len(val),
            "train_patients": len({s.group for s in train}), "val_patients": len({s.group for s in val}),
            "split": split_source}
    log.info("ablation data: %d train images (%d patients), %d validation images (%d patients); %s; links in %s",
             info["train_images"], info["train_patients"], info["val_images"], info["val_patients"], split_source,
             link_root)
    return link_root, info


# ----------------------------------------------------------------------------------------------
# Runs and rows
# ----------------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk, so a kill right after keeps it."""
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())


def read_auc(run_dir: Path) -> dict[str, Any]:
    """Validation AUC at the best (lowest val_loss) checkpoint, and the max over epochs."""
    from chexformer.checkpoint import load_checkpoint
    from chexformer.history import read_history

    history = read_history(run_dir / "history.csv")
    aucs = [a for a in (_num(r.get("val_auc")) for r in history) if a is not None]
    out: dict[str, Any] = {"val_auc": None, "auc_source": "", "best_epoch": None,
                           "max_val_auc": max(aucs) if aucs else None, "epochs_run": len(history)}
    best = run_dir / "checkpoints" / "best.ckpt"
    if best.is_file():
        _, meta = load_checkpoint(best)
        out["best_epoch"] = meta.epoch
        auc = _num(meta.extra.get("val_auc"))
        if auc is not None:
            out.update(val_auc=auc, auc_source="best.ckpt meta.extra.val_auc (lowest val_loss)")
            return out
    scored = [r for r in history if _num(r.get("val_loss")) is not None]
    if scored:
        row = min(scored, key=lambda r: _num(r["val_loss"]))
        out.update(val_auc=_num(row.get("val_auc")), best_epoch=int(row["epoch"]),
                   auc_source="history.csv, epoch of lowest val_loss")
    return out


def run_one(variant: str, seed: int, args: argparse.Namespace, data_dir: Path, info: dict[str, Any],
            overrides: dict[str, Any]) -> dict[str, Any]:
    from chexformer.config import Config
    from chexformer.train import train

    arch, layers = parse_variant(variant)
    run_dir = Path(args.out_dir) / "runs" / f"{variant}-seed{seed}"
    resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    values = {**SETTINGS, "batch_size": args.batch_size, "patience": args.epochs + 1, **overrides,
              "data_dir": str(data_dir), "out_dir": str(run_dir), "img_size": args.img_size, "epochs": args.epochs,
              "seed": seed, "arch": arch}
    if layers is not None:
        values["num_layers"] = layers
    cfg = Config.from_dict(values, source=f"ablation {variant} seed {seed}")
    log.info("ablation run %s seed %d -> %s%s", variant, seed, run_dir, " (resuming)" if resume else "")
    start = time.perf_counter()
    summary = train(cfg, resume=resume, evaluate=False)
    minutes = (time.perf_counter() - start) / 60
    auc = read_auc(run_dir)
    return {
        "variant": variant, "arch": arch, "layers": "" if layers is None else layers, "seed": seed,
        "val_auc": auc["val_auc"], "auc_source": auc["auc_source"], "best_epoch": auc["best_epoch"],
        "best_val_loss": summary.get("best_val_loss"), "max_val_auc": auc["max_val_auc"],
        "epochs_run": auc["epochs_run"], "minutes": round(minutes, 3), "resumed": int(resume),
        "img_size": args.img_size, "epochs": args.epochs, "train_images": info["train_images"],
        "val_images": info["val_images"], "precision": summary.get("precision"), "run_dir": str(run_dir),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict[str, str]], variants: list[str], seeds: list[int]) -> str:
    seed_headers = [f"AUC seed{seeds[0]}"] + [f"seed{s}" for s in seeds[1:]]
    headers = ["model", "layers", *seed_headers, "mean ± std", "minutes/run"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for variant in variants:
        arch, layers = parse_variant(variant)
        by_seed = {int(r["seed"]): r for r in rows if r["variant"] == variant}
        aucs = [_num(by_seed[s]["val_auc"]) if s in by_seed else None for s in seeds]
        got = [a for a in aucs if a is not None]
        if len(got) >= 2:
            mean_std = f"{statistics.mean(got):.4f} ± {statistics.stdev(got):.4f}"
        elif got:
            mean_std = f"{got[0]:.4f} (1 seed)"
        else:
            mean_std = "-"
        minutes = [m for m in (_num(r["minutes"]) for r in by_seed.values() if r.get("resumed") in ("0", 0))
                   if m is not None]
        model = "DenseNet121 + pooled linear head" if arch == "linear" else "DenseNet121 + Transformer"
        cells = [model, "-" if layers is None else str(layers),
                 *["-" if a is None else f"{a:.4f}" for a in aucs], mean_std,
                 f"{statistics.mean(minutes):.2f}" if minutes else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "kermany224"),
                   help="folder with train/<class>/ (and optionally val/) (default: %(default)s)")
    p.add_argument("--out-dir", default="runs/ablation")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["linear", "hybrid1", "hybrid2", "hybrid4"])
    p.add_argument("--max-images", type=int, help="patient-grouped training subset of about N images "
                   "(validation: about N * split / (1 - split)); for smoke tests")
    p.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"])
    p.add_argument("--split-seed", type=int, default=0, help="seed of the one fixed split (default 0)")
    p.add_argument("--validation-split", type=float, default=0.2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other Config field, e.g. --set augment=false (repeatable)")
    args = p.parse_args(argv)
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as exc:
            p.error(str(exc))
    if len(set(args.variants)) != len(args.variants) or len(set(args.seeds)) != len(args.seeds):
        p.error("--variants and --seeds must not repeat")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.max_images is not None and args.max_images < 4:
        p.error("--max-images must be >= 4")
    if not 0 < args.validation_split < 1:
        p.error("--validation-split must lie strictly between 0 and 1")
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        args.overrides[key.strip().replace("-", "_")] = value.strip()
    fixed = {"data_dir", "out_dir", "img_size", "epochs", "seed", "arch", "num_layers"} & set(args.overrides)
    if fixed:
        p.error(f"--set cannot change {', '.join(sorted(fixed))}: use the script's own options")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    from chexformer.config import Config, ConfigError

    try:  # fail on a bad --set before any run starts
        Config.from_dict({**SETTINGS, **args.overrides}, source="--set")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, info = prepare_data(Path(args.data_dir), out, args.split_seed, args.validation_split, args.max_images)
    csv_path = out / "ablation.csv"
    rows = read_rows(csv_path)
    for r in rows:
        mismatch = [k for k in MUST_MATCH if str(r.get(k)) != str({**info, **vars(args)}.get(k))]
        if mismatch:
            raise SystemExit(f"{csv_path}: row {r['variant']} seed {r['seed']} was made with other settings "
                             f"({', '.join(f'{k}={r.get(k)}' for k in mismatch)}); use another --out-dir")
    done = {(r["variant"], int(r["seed"])) for r in rows}
    total = len(args.variants) * len(args.seeds)
    for variant in args.variants:
        for seed in args.seeds:
            if (variant, seed) in done:
                log.info("skip %s seed %d: already in %s", variant, seed, csv_path)
                continue
            row = run_one(variant, seed, args, data_dir, info, args.overrides)
            append_row(csv_path, row)
            rows.append({k: str(v) for k, v in row.items()})
            log.info("done %s seed %d: val AUC %s (%s), %.1f min [%d/%d rows]", variant, seed, row["val_auc"],
                     row["auc_source"], row["minutes"], len({(r["variant"], int(r["seed"])) for r in rows}), total)
    table = markdown_table(rows, args.variants, args.seeds)
    note = (f"Validation AUC at the lowest-val_loss checkpoint; {info['train_images']} train / {info['val_images']} "
            f"validation images ({info['split']}), {args.img_size} px, {args.epochs} epochs, random init, "
            f"batch {args.batch_size}, init_lr {SETTINGS['init_lr']:g}, d_model {SETTINGS['d_model']}, "
            f"{SETTINGS['num_heads']} heads, ffn {SETTINGS['ffn_dim']}"
            + (f", overrides {args.overrides}" if args.overrides else "")
            + ". minutes/run: wall time of train(), runs that were not resumed.")
    (out / "ablation.md").write_text(f"{table}\n\n{note}\n")
    print(f"\n{table}\n\n{note}\n\nwrote {csv_path} and {out / 'ablation.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
