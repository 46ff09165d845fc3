"""Self-supervised pretraining of the backbone on the training images (SimSiam), for a time budget.

    python bench/ssl_pretrain.py --config configs/kermany.yaml --data-dir ../shared/data/kermany224 \\
        --seed 42 --minutes 18 --out runs/ssl18-s42_backbone.pt
    chexformer train --config configs/kermany.yaml --data-dir ../shared/data/kermany224 \\
        --out-dir runs/ssl18-s42 --seed 42 --backbone-weights file --pretrained-path runs/ssl18-s42_backbone.pt

The issue's candidate "self-supervised pretraining on the training images", measured as a probe:
the recipe's DenseNet121 backbone learns from the images alone, without labels, for ``--minutes``,
and the file it writes (torchvision DenseNet121 keys, ``features.*``) starts the recipe instead of
random weights. The images are those of the **training patients** of the split that
``chexformer train`` makes with the same ``--seed`` / ``--split-seed`` (validation patients are
never seen, not even unlabelled). The two views of an image are the recipe's training transform
with every acquisition change on (``acquisition_aug`` 1.0: resolution loss, blur, gamma, noise, JPEG),
so the representation is pushed to be the same whatever the acquisition: what issue 9 asks of the
model.

SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): no negative
pairs and no momentum encoder, so it works at the small batches a 2-core CPU affords; collapse is
prevented by the stop-gradient and the predictor, and watched through the standard deviation of the
l2-normalised projection (``z_std``; about 1/sqrt(dim) when the outputs spread, 0 when they have
collapsed to one vector), logged with the loss. lightly (``lightly.models.modules.SimSiamProjectionHead``,
``lightly.loss.NegativeCosineSimilarity``) provides the same heads and loss; they are a dozen lines,
written here to keep the project's dependencies as they are. Optimiser: AdamW (the recipe's learning
rate, 1e-3) with a cosine decay over the time budget, not the paper's SGD with batch 512: over a few
epochs at batch 64 the paper's rate (0.05 x 64 / 256) barely moves a random network.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chexformer.config import load_config  # noqa: E402
from chexformer.data.datamodule import XrayDataModule  # noqa: E402
from chexformer.data.datasets import build_transforms  # noqa: E402
from chexformer.model import build_model  # noqa: E402
from chexformer.runtime import autocast_dtype, resolve_precision  # noqa: E402

log = logging.getLogger("ssl_pretrain")


class TwoViews(Dataset):
    """Two independently augmented views of each (already resized, uint8) training image; no labels."""

    def __init__(self, images, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images.uint8(i)
        return self.transform(img), self.transform(img)


class SimSiam(nn.Module):
    """backbone -> global mean -> projector (z) -> predictor (p); the loss compares p of one view
    with the stop-gradient z of the other (Chen & He 2021, Algorithm 1)."""

    def __init__(self, backbone: nn.Module, in_dim: int = 1024, dim: int = 512, pred_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.backbone(x)).mean(dim=(2, 3))  # (B, 1024): the backbone's map, pooled
        z = self.projector(h)
        return z, self.predictor(z)


def simsiam_loss(p1: torch.Tensor, z1: torch.Tensor, p2: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity with stop-gradient on z: -1 at perfect agreement."""
    return -(F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
             + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()) / 2


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors under torchvision DenseNet121's names (``features.*``), a format
    :func:`chexformer.weights.load_backbone_weights` reads."""
    return {f"features.{k}": v.detach().clone() for k, v in backbone.state_dict().items()}


def pretrain(args: argparse.Namespace) -> dict:
    overrides = {"data_dir": str(args.data_dir), "seed": args.seed, "split_seed": args.split_seed}
    cfg = load_config(args.config, overrides)
    ssl_cfg = load_config(args.config, {**overrides, "acquisition_aug": args.acquisition_aug})
    torch.manual_seed(args.seed)
    dm = XrayDataModule(cfg)
    dm.build_images()
    images = dm.train_images
    log.info("%d training images (the %d of the validation patients are left out)", len(images), len(dm.val_samples))
    views = TwoViews(images, build_transforms(ssl_cfg, train=True, mean=dm.mean, std=dm.std))
    loader = DataLoader(views, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
                        generator=torch.Generator().manual_seed(args.seed))

    backbone = build_model(cfg, num_classes=len(dm.class_names)).backbone
    net = SimSiam(backbone).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([
        {"params": [*net.backbone.parameters(), *net.projector.parameters()], "cosine": True},
        {"params": net.predictor.parameters(), "cosine": False},  # fixed rate for the predictor (the paper's choice)
    ], lr=args.lr, weight_decay=args.weight_decay)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    dtype = autocast_dtype(precision)
    log.info("SimSiam for %.1f min, batch %d, lr %g, precision %s", args.minutes, args.batch_size, args.lr, precision)

    budget, start = args.minutes * 60, time.perf_counter()
    trace, step, seen, done = [], 0, 0, False
    net.train()
    while not done:
        for v1, v2 in loader:
            elapsed = time.perf_counter() - start
            if elapsed >= budget or (args.max_steps and step >= args.max_steps):
                done = True
                break
            for group in opt.param_groups:
                group["lr"] = args.lr * (0.5 * (1 + math.cos(math.pi * elapsed / budget)) if group["cosine"] else 1.0)
            x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                z, p = net(x)
            z1, z2 = z.float().chunk(2)
            p1, p2 = p.float().chunk(2)
            loss = simsiam_loss(p1, z1, p2, z2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(v1)
            if step % args.log_every == 0 or step == 1:
                z_std = F.normalize(z1.detach(), dim=-1).std(dim=0).mean().item()
                trace.append({"step": step, "epochs": round(seen / len(views), 3), "seconds": round(elapsed, 1),
                              "loss": round(loss.item(), 4), "z_std": round(z_std, 4)})
                log.info("step %d (%.2f epochs, %.0f s): loss %.4f, z_std %.4f (1/sqrt(dim) = %.4f)", step,
                         seen / len(views), elapsed, loss.item(), z_std, 1 / math.sqrt(z1.shape[1]))
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"SimSiam loss is {loss.item()} at step {step}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone_state(net.backbone), args.out)
    result = {"steps": step, "epochs": seen / len(views), "seconds": time.perf_counter() - start,
              "images": len(views), "batch_size": args.batch_size, "lr": args.lr, "precision": precision,
              "acquisition_aug": args.acquisition_aug, "seed": args.seed, "split_seed": args.split_seed,
              "trace": trace, "backbone": str(args.out)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    log.info("wrote %s after %d steps (%.2f epochs, %.1f min)", args.out, step, result["epochs"],
             result["seconds"] / 60)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "kermany.yaml")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the backbone file (and OUT.json: the run's record)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split-seed", type=int, default=-1, help="as chexformer train's (-1: --seed)")
    p.add_argument("--minutes", type=float, default=18.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: time only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--acquisition-aug", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return pretrain(args)


if __name__ == "__main__":
    main()
