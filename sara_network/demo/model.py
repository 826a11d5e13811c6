"""The demo UNet, its noise schedule, a paired-noise denoising loss, DDIM sampling and the committed base weights."""

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from . import BASE_METADATA_KEY


BASE_PATH = Path(__file__).with_name("digits_base.safetensors")
METADATA_KEY = BASE_METADATA_KEY  # safetensors metadata entry holding the training config and results as JSON

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 128),
    "norm_num_groups": 16,
    # Attention only at 4x4 (and in the mid block): the cheapest layout that still samples clean digits.
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "num_class_embeds": 11,  # digits 0-9 plus the null class 10
    "attention_head_dim": 32,
}

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}


def build_unet() -> UNet2DModel:
    """A freshly initialised demo UNet (2,736,353 parameters). Seed the global RNG first for a reproducible init."""
    return UNet2DModel(**UNET_CONFIG)


def build_scheduler() -> DDPMScheduler:
    """The training noise schedule: DDPM, 1000 steps, cosine betas, epsilon prediction."""
    return DDPMScheduler(**SCHEDULER_CONFIG)


@torch.no_grad()
def denoising_loss(
    unet: UNet2DModel, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, draws: int = 4
) -> float:
    """Mean epsilon-prediction MSE over `draws` noisings of every image.

    Noise and timesteps come from a private generator seeded with `seed`, so two models (or two methods) evaluated
    with the same seed see exactly the same draws: differences in the loss are then differences in the models, which
    is what makes this usable as the learning/forgetting metric.
    """
    scheduler = build_scheduler()
    generator = torch.Generator().manual_seed(seed)
    device = unet.device
    images, labels = images.to(device), labels.to(device)
    total = 0.0
    for _ in range(draws):
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        timesteps, noise = timesteps.to(device), noise.to(device)
        noisy = scheduler.add_noise(images, noise, timesteps)
        pred = unet(noisy, timesteps, class_labels=labels).sample
        total += F.mse_loss(pred.float(), noise).item()
    return total / draws


@torch.no_grad()
def sample(unet: UNet2DModel, labels: Sequence[int] | torch.Tensor, seed: int = 0, steps: int = 50) -> torch.Tensor:
    """Deterministic DDIM samples (eta 0, clipped x0) for each class label; returns (N, 1, 16, 16) in [-1, 1]."""
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=True)
    scheduler.set_timesteps(steps)
    device = unet.device
    labels = torch.as_tensor(labels, dtype=torch.long).to(device)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), unet.config.in_channels, size, size), generator=generator).to(device)
    for t in scheduler.timesteps:
        eps = unet(x, t, class_labels=labels).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1.0, 1.0).cpu()


def save_grid_png(
    rows_of_images: Sequence[torch.Tensor], path: str | os.PathLike, labels: Sequence[str] | None = None, scale: int = 4
) -> None:
    """Write rows of (K, 1, H, W) images in [-1, 1] as one PNG, each digit enlarged `scale` times (nearest),
    each row's label (if given) in a left margin wide enough for the longest one."""
    from PIL import Image, ImageDraw

    rows = [r.detach().cpu().float() for r in rows_of_images]
    height, width = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    pad = 2
    margin = 8 + 6 * max(len(str(label)) for label in labels) if labels is not None else 0
    columns = max(len(r) for r in rows)
    grid = Image.new(
        "L", (margin + columns * (width + pad) + pad, len(rows) * (height + pad) + pad), color=128
    )
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        top = pad + i * (height + pad)
        if labels is not None:
            draw.text((4, top + height // 2 - 5), str(labels[i]), fill=255)
        pixels = ((row.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        for j, image in enumerate(pixels):
            tile = Image.fromarray(image[0]).resize((width, height), Image.NEAREST)
            grid.paste(tile, (margin + pad + j * (width + pad), top))
    grid.save(path)


def load_base(path: str | os.PathLike | None = None) -> UNet2DModel:
    """The pretrained demo base (EMA weights), loaded with safetensors only (no pickle), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = BASE_PATH if path is None else Path(path)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])["config"]
    if config != json.loads(json.dumps(UNET_CONFIG)):
        raise ValueError(f"{path} was trained with a different UNet config: {config}")
    unet = build_unet()
    unet.load_state_dict(load_file(str(path)), strict=True)
    return unet.eval()
