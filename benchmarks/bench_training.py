"""Step time of the networks' training recipe against candidate speed-ups, in one run.

Run: ``.venv/bin/python benchmarks/bench_training.py`` (all architectures) or with
``--nets unet --steps 30``. One training step is what :func:`lemmse_core.train.fit` does:
draw a batch, measure it, forward, MSE, backward, clip, AdamW, EMA. Variants:

- ``today``: the recipe as :func:`fit` runs it (float32, contiguous, foreach AdamW);
- ``channels_last``: model and inputs in channels-last memory format;
- ``bf16``: forward under ``torch.autocast("cpu", torch.bfloat16)`` (AVX-512 BF16);
- ``fused_adamw``: ``AdamW(fused=True)``;
- ``compile``: ``torch.compile(model)`` (compilation time reported apart);
- ``batch×4``: four times the batch (per-sample time; the learning rate would scale).

Prints seconds per step, per-sample milliseconds and the speed-up over ``today``. Speed
only: adopting a variant also needs PSNR(net, formula) within 0.3 dB of today's.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

import lemmse_core as lc
from lemmse_core import train

VARIANTS = ("today", "channels_last", "bf16", "fused_adamw", "compile", "batch×4")


def make_step(config, images, variant):
    """``(step, model)``: one training step of ``config`` on ``images`` for ``variant``."""
    A, B = train.build_operators(config, tuple(images.shape[1:]))
    model = train._build(config, "cpu")
    ema = train._build(config, "cpu").requires_grad_(False)
    fused = variant == "fused_adamw"
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, fused=fused or None)
    memory = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory)
    forward = torch.compile(model) if variant == "compile" else model
    batch = config.batch_size * (4 if variant == "batch×4" else 1)
    gen = torch.Generator().manual_seed(0)

    def step():
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        sigma = config.sigma_max * torch.rand(batch, generator=gen)
        ax = A.A(x)
        v = B.A(ax + sigma[:, None, None, None] * torch.randn(ax.shape, generator=gen))
        v = v.contiguous(memory_format=memory)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if variant == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            out = forward(v, sigma)
        loss = torch.mean((out.float() - x) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        train._update_ema(ema, model, 0.999)
        return loss.item()

    return step, batch


def time_variant(config, images, variant, steps):
    step, batch = make_step(config, images, variant)
    start = time.perf_counter()
    step()  # warm-up (compilation for ``compile``)
    warm = time.perf_counter() - start
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, batch, warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="unet,resnet,patchmlp")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    images = lc.data.load("fashionmnist", n=1000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, FashionMNIST 28×28")
    print("| net | variant | s/step | ms/sample | speed-up per sample | warm-up s |")
    print("|---|---|---|---|---|---|")
    for net in args.nets.split(","):
        config = train.TrainConfig(net=net, preset="tiny", batch_size=16)
        base = None
        for variant in args.variants.split(","):
            try:
                t, batch, warm = time_variant(config, images, variant, args.steps)
            except Exception as error:  # a variant this machine cannot run: say why
                print(f"| {net} | {variant} | failed: {type(error).__name__}: {error} |")
                continue
            per_sample = t / batch
            base = per_sample if variant == "today" else base
            gain = f"{base / per_sample:.2f}×" if base else "-"
            print(f"| {net} | {variant} | {t:.4f} | {per_sample * 1e3:.2f} | {gain} | {warm:.1f} |")


if __name__ == "__main__":
    main()
