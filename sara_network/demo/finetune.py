"""The quick-start job: SaRA fine-tunes the pretrained digits model to a new style, on the CPU.

The base (shipped in the package, rebuilt by `python -m sara_network.demo.pretrain`) draws thin
digits 0-7. The target style is *bold* digits (each stroke dilated), which the base never saw.
SaRA trains only the entries with |w| below a global threshold (5% of the Linear/Conv2d weights)
with the nuclear-norm term and the progressive step, in the paper's regime (lr = the paper's rule,
lr/threshold about 0.3), exactly as on a Stable Diffusion U-Net; then the job writes the native
file and a kohya LoRA export, measures the export applied in place of the native file, and draws a
before / after / LoRA sample grid. `--selection gradient` trains a file whose LoRA export is nearly
exact (benchmarks/README.md).

Torch runs on one intra-op thread by default (--threads N to change it): on a shared, busy machine
more threads than free cores made the same run several times slower.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from ..convert import CUSTOM_BASE
from ..fileformat import read_tensors
from ..network import SaraNetwork, collect_targets
from ..options import SELECTION_MODES, SaraConfig, auto_lr, parse_lr
from . import data, model

# What the native file says about its base, so every `sara` command reads it without --base-model:
# the digits U-Net is no Stable Diffusion model (no SD modelspec / resolution is stamped on it).
BASE_METADATA = {"ss_base_model_version": CUSTOM_BASE, "ss_sd_model_name": model.BASE_PATH.name}
CALIBRATION_BATCHES = 10  # gradient selection modes: training batches scored before training


def embolden(images: torch.Tensor) -> torch.Tensor:
    """The target style: strokes dilated by a 3x3 max filter (images in [-1, 1], ink is bright)."""
    return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def batch_loss(unet, scheduler, images, labels, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The epsilon-prediction loss of one random batch (noise and timesteps from `generator`)."""
    pick = torch.randint(0, len(images), (batch_size,), generator=generator)
    x0, y = images[pick], labels[pick]
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    return F.mse_loss(unet(scheduler.add_noise(x0, noise, timesteps), timesteps, class_labels=y).sample, noise)


def train(unet, network: SaraNetwork, images, labels, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Plain epsilon-prediction training of the SaRA deltas (AdamW, warmup + cosine)."""
    scheduler = model.build_scheduler()
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(steps):
        loss = batch_loss(unet, scheduler, images, labels, batch_size, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.trainable_parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(f"  step {step + 1:4d}/{steps}  train loss {sum(losses[-25:]) / len(losses[-25:]):.4f}", flush=True)
    unet.eval()
    return losses


@contextlib.contextmanager
def lora_applied(modules: Mapping[str, torch.nn.Module], lora_tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The model as a LoRA consumer runs it: each module's weight plus its kohya LoRA's dense delta
    (up @ down * alpha / rank, what A1111 / ComfyUI add), restored exactly on exit. `modules` maps
    kohya names to the layers; the SaRA patches must be off (network.unpatch())."""
    from ..convert import lora_deltas

    originals = {}
    try:
        with torch.no_grad():
            for name, delta in lora_deltas(lora_tensors).items():
                weight = modules[name].weight
                originals[name] = weight.detach().clone()
                weight.add_(delta.reshape(weight.shape).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                modules[name].weight.copy_(original)


def export_lora(native_path: str, lora_path: str, rank: int) -> str:
    """A kohya LoRA from the native file through the `sara to-lora` command."""
    from ..cli import main as sara

    status = sara(["to-lora", native_path, lora_path, "--rank", str(rank), "--overwrite", "--show", "0"])
    return lora_path if status == 0 else f"failed (sara to-lora exit status {status})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sara_network.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--steps", type=int, default=450, help="fine-tuning steps")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--density", type=float, default=0.05, help="SaRA budget as a fraction of the weights")
    parser.add_argument("--lr", type=parse_lr, default="auto", help="a number, or 'auto' (default): the paper's "
                        "rule 1e-3 * exp(-350 * threshold) for the threshold the selection found")
    parser.add_argument("--lambda_rank", type=float, default=5e-3)
    parser.add_argument("--selection", choices=SELECTION_MODES, default="magnitude",
                        help="which entries train (the network arg of the same name; gradient modes score "
                             f"{CALIBRATION_BATCHES} training batches first and run without the progressive step, "
                             "as presets/sd15-lora-export-50M.toml)")
    parser.add_argument("--samples", type=int, default=8, help="samples per class in the grid")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps for the grid")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a few steps only (CI smoke mode)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest on a shared machine; try your free cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.sample_steps = 6, 2, 4
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads} (change with --threads N)")
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()

    unet = model.load_base()
    splits = data.splits()
    train_images, train_labels = embolden(splits.pretrain.images), splits.pretrain.labels
    eval_images, eval_labels = embolden(splits.old_eval.images), splits.old_eval.labels
    grid_labels = [c for c in data.OLD_CLASSES for _ in range(args.samples)]
    before_loss = model.denoising_loss(unet, eval_images, eval_labels, seed=0, draws=2)
    print(f"base model: {sum(p.numel() for p in unet.parameters()):,d} parameters; "
          f"bold-digit loss before fine-tuning {before_loss:.4f}")
    before_samples = model.sample(unet, grid_labels, seed=1, steps=args.sample_steps)

    config = SaraConfig(density=args.density, lambda_rank=args.lambda_rank, rank_min_dim=32,
                        progressive_iter=0.5 if args.selection == "magnitude" else None, selection=args.selection)
    network = SaraNetwork(config)
    network.select(collect_targets(unet, [], [], config.preset))
    network.total_steps = args.steps
    network.patch()
    network.attach_optimizer_hooks()
    if network.calibration_pending():  # gradient modes: score batches of the training data first
        calibration, scheduler = torch.Generator().manual_seed(1), model.build_scheduler()
        unet.train()
        network.calibrate(lambda step: batch_loss(unet, scheduler, train_images, train_labels, args.batch, calibration),
                          CALIBRATION_BATCHES)
        unet.eval()
    network.log_selection()
    trainable = network.selected_count()
    print(f"SaRA trains {trainable:,d} of {sum(p.numel() for p in unet.parameters()):,d} parameters "
          f"({trainable / sum(p.numel() for p in unet.parameters()):.2%})")
    lr = auto_lr(network.thresholds["unet"]) if args.lr == "auto" else args.lr
    print(f"lr {lr:.3g}" + (" (the paper's rule for this threshold)" if args.lr == "auto" else ""))
    train(unet, network, train_images, train_labels, args.steps, args.batch, lr, seed=0)

    after_loss = model.denoising_loss(unet, eval_images, eval_labels, seed=0, draws=2)
    after_samples = model.sample(unet, grid_labels, seed=1, steps=args.sample_steps)
    native_path = os.path.join(args.out, "digits_bold_sara.safetensors")
    network.save(native_path, torch.float16, {"ss_output_name": "digits_bold_sara",
                                              "ss_network_module": "sara_network", **BASE_METADATA})
    lora = export_lora(native_path, os.path.join(args.out, "digits_bold_lora.safetensors"), args.lora_rank)
    phases = {"before": before_samples, "after": after_samples}
    lora_line = lora
    if os.path.isfile(lora):  # what a LoRA user gets: the export, read back and applied to the base
        network.unpatch()
        with lora_applied({m.sara_name: m.base for m in network.sara_modules()}, read_tensors(lora)[0]):
            lora_loss = model.denoising_loss(unet, eval_images, eval_labels, seed=0, draws=2)
            phases["lora"] = model.sample(unet, grid_labels, seed=1, steps=args.sample_steps)
        kept = (before_loss - lora_loss) / (before_loss - after_loss) if before_loss != after_loss else float("nan")
        lora_line = (f"{lora}\n  applied instead of the native file: bold-digit loss {lora_loss:.4f}, "
                     f"{kept:.0%} of the native file's improvement")
    grid_path = os.path.join(args.out, "before_after.png")
    rows = [samples[i:i + args.samples] for samples in phases.values() for i in range(0, len(grid_labels), args.samples)]
    labels = [f"{when} {digit}" for when in phases for digit in data.OLD_CLASSES]
    model.save_grid_png(rows, grid_path, labels=labels)
    print(f"\nbold-digit denoising loss on held-out digits: before {before_loss:.4f} -> after {after_loss:.4f}")
    print(f"trainable parameters: {trainable:,d}")
    print(f"native SaRA file: {native_path}")
    print(f"LoRA export:      {lora_line}")
    print(f"samples (rows 'before <digit>': base, 'after <digit>': fine-tuned, 'lora <digit>': the LoRA export; "
          f"same seeds): {grid_path}")
    print(f"wall time: {time.time() - started:.0f} s on {args.threads} torch thread(s)")
