"""Pretrain the demo base bit-for-bit reproducibly on CPU.

    python -m sara_network.demo.pretrain            # writes digits_base.safetensors + .json (15-30 min on CPU)
    python -m sara_network.demo.pretrain --check    # rebuilds into a temp file and compares its sha256 with the json

Reproducibility comes from a fixed step count (not wall time), fixed seeds, deterministic algorithms and a fixed
thread count; the same torch build on the same kind of CPU then produces the same bytes.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import NULL_CLASS, OLD_CLASSES, splits
from .model import (
    BASE_PATH,
    METADATA_KEY,
    UNET_CONFIG,
    build_scheduler,
    build_unet,
    denoising_loss,
    sample,
    save_grid_png,
)


SEED = 0
THREADS = 1  # one thread: deterministic, and far faster than a contended pool on small shared CPUs
STEPS = 800
BATCH_SIZE = 128
LR = 2e-3
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
LABEL_DROPOUT = 0.1
EVAL_DRAWS = 4
SAMPLES_PER_CLASS = 10
LOG_EVERY = 50


def lr_factor(step: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to zero at `total_steps`."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(steps: int = STEPS) -> tuple[torch.nn.Module, float]:
    """Train from a seeded init and return the EMA model and its old-class eval loss."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)

    data = splits()
    images, labels = data.pretrain.images, data.pretrain.labels
    unet = build_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    # All batch, dropout, noise and timestep draws come from this generator, never from the global RNG.
    generator = torch.Generator().manual_seed(SEED)

    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(images), (BATCH_SIZE,), generator=generator)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(BATCH_SIZE, generator=generator) < LABEL_DROPOUT] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH_SIZE,), generator=generator)

        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)

        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - decay)

        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            eval_loss = denoising_loss(ema, data.old_eval.images, data.old_eval.labels, seed=SEED, draws=EVAL_DRAWS)
            print(
                f"step {step + 1}/{steps}  train {running:.4f}  eval(EMA) {eval_loss:.4f}  "
                f"lr {lr_schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    return ema, eval_loss


def save_base(unet: torch.nn.Module, path: Path, steps: int, eval_loss: float) -> str:
    """Write fp32 safetensors atomically (temp file + rename) and return its sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in unet.state_dict().items()}
    info = {"config": UNET_CONFIG, "steps": steps, "eval_loss_old": round(eval_loss, 6), "torch": torch.__version__}
    # A single metadata key: safetensors writes metadata from a hash map, so with several keys their order (and the
    # file's sha256) would change from run to run.
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return sha256(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_accuracy(unet: torch.nn.Module, grid: Path | None = None) -> float:
    """SVC accuracy of DDIM samples (SAMPLES_PER_CLASS per old class) against the class they were conditioned on."""
    from .classifier import classify

    labels = torch.tensor(OLD_CLASSES).repeat_interleave(SAMPLES_PER_CLASS)
    images = sample(unet, labels, seed=SEED)
    if grid is not None:
        save_grid_png(images.split(SAMPLES_PER_CLASS), grid, labels=[str(c) for c in OLD_CLASSES])
    return int((torch.from_numpy(classify(images)) == labels).sum()) / len(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {STEPS}, or the json's)")
    parser.add_argument("--out", type=Path, default=BASE_PATH, help="safetensors path; the json goes next to it")
    parser.add_argument("--check", action="store_true", help="rebuild into a temp file and compare sha256")
    parser.add_argument("--grid", type=Path, default=None, help="also save the sample grid used for the accuracy")
    args = parser.parse_args(argv)
    info_path = args.out.with_suffix(".json")

    if args.check:
        expected = json.loads(info_path.read_text())
        steps = args.steps or expected["steps"]
        ema, eval_loss = train(steps)
        with tempfile.TemporaryDirectory() as tmp:
            digest = save_base(ema, Path(tmp) / args.out.name, steps, eval_loss)
        verdict = "MATCH" if digest == expected["sha256"] else "MISMATCH"
        print(f"{verdict}: rebuilt {digest}, expected {expected['sha256']}")
        raise SystemExit(0 if verdict == "MATCH" else 1)

    steps = args.steps or STEPS
    start = time.perf_counter()
    ema, eval_loss = train(steps)
    minutes = (time.perf_counter() - start) / 60
    digest = save_base(ema, args.out, steps, eval_loss)
    accuracy = sample_accuracy(ema, args.grid)
    info = {
        "file": args.out.name,
        "sha256": digest,
        "steps": steps,
        "eval_loss_old": round(eval_loss, 6),
        "eval_draws": EVAL_DRAWS,
        "sample_accuracy": accuracy,
        "samples_per_class": SAMPLES_PER_CLASS,
        "torch_version": torch.__version__,
        "threads": THREADS,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} ({minutes:.1f} min training), eval loss {eval_loss:.4f}, sample accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
