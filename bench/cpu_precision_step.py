"""Is bf16 worth it on this CPU? One training step of the recipe's model (128 px, batch 32, d_model
128, 4 heads, ffn 256, 2 layers; forward, BCE, backward, AdamW) in fp32 NCHW (the baseline),
fp32 channels_last (what ``precision: auto`` runs where the CPU lacks native bf16) and bf16
autocast with channels_last (what it runs where the CPU has native bf16), timed in one process on
the same batch.

    python bench/cpu_precision_step.py [--steps 4]

Without AVX512-BF16 or AMX, bf16 is emulated and far slower than fp32; ``chexformer.runtime``
therefore resolves ``precision: auto`` to fp32 there. The ratios are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (after 2 untimed)")
    a = p.parse_args()
    from chexformer import Config
    from chexformer.model import build_model
    from chexformer.runtime import cpu_supports_bf16, resolve_precision

    cfg = Config(img_size=128, d_model=128, num_heads=4, ffn_dim=256, num_layers=2, backbone_weights="none")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 128, 128, generator=g), torch.randint(0, 2, (32,), generator=g).float()

    def seconds_per_step(channels_last: bool, bf16: bool) -> float:
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=2).train()
        inputs = x
        if channels_last:
            model, inputs = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(inputs).reshape(-1)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        return (time.perf_counter() - start) / a.steps

    print(f"native bf16: {cpu_supports_bf16()}; precision 'auto' resolves to {resolve_precision('auto', 'cpu')}; "
          f"{torch.get_num_threads()} threads")
    base = seconds_per_step(False, False)
    print(f"| variant | s / step | speed vs fp32 NCHW |\n|---|---|---|\n| fp32 NCHW | {base:.3f} | 1.00x |")
    for name, bf16 in [("fp32 channels_last", False), ("bf16 autocast channels_last", True)]:
        s = seconds_per_step(True, bf16)
        print(f"| {name} | {s:.3f} | {base / s:.2f}x |")


if __name__ == "__main__":
    main()
