"""What the SaRA diffusers training scripts share: arguments, models, image folders, the training
loop with checkpoints and validation, and the final save.

train_text_to_image_sara.py and train_dreambooth_sara.py differ only in their data (captions vs.
instance / class prompts) and their loss (prior preservation); everything else is here. The SaRA
part is three calls into sara_network.hf: `apply_sara` (instead of a LoRA config + add_adapter),
`register_accelerate_hooks` (checkpoint save / load) and `load_sara` (final validation).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sara_network.compat import dtype_kwargs
from sara_network.hf import (add_sara_args, all_reduce_gradients, apply_sara, load_sara, register_accelerate_hooks,
                             sara_config_from_args)
from sara_network.options import SaraOptionError

logger = logging.getLogger("sara_train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# arguments
def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The arguments both scripts take (model, resolution, optimizer, schedule, checkpoints, ...)."""
    model = parser.add_argument_group("model and output")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="A local diffusers folder (or a Hub id) of a Stable Diffusion 1.x / 2.x model.")
    model.add_argument("--revision", type=str, default=None, help="Revision of the model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    model.add_argument("--output_dir", type=str, default="sara-model",
                       help="Where the SaRA file, checkpoints and validation images are written.")
    model.add_argument("--output_name", type=str, default="sara_weights",
                       help="File name (without .safetensors) of the final native SaRA file.")
    model.add_argument("--save_precision", type=str, default="fp32", choices=sorted(SAVE_DTYPES),
                       help="dtype of the deltas in the saved file.")
    model.add_argument("--export_lora_rank", type=int, default=None,
                       help="Also write a kohya-format LoRA of this rank (SVD of the deltas) next to the SaRA file.")
    model.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")

    data = parser.add_argument_group("images")
    data.add_argument("--resolution", type=int, default=512, help="Training images are resized and cropped to this.")
    data.add_argument("--center_crop", action="store_true", help="Crop the center (default: a random crop).")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses.")

    train = parser.add_argument_group("training")
    train.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimizer steps in total; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in backward to save memory.")
    train.add_argument("--train_text_encoder", action="store_true",
                       help="Also train SaRA deltas of the text encoder.")
    train.add_argument("--learning_rate", type=float, default=1e-4,
                       help="Learning rate (overridden by --sara_lr auto or a number).")
    train.add_argument("--text_encoder_lr", type=float, default=None,
                       help="Learning rate of the text encoder's deltas (default: --learning_rate).")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by batch size, accumulation steps and processes.")
    train.add_argument("--lr_scheduler", type=str, default="constant",
                       help='linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.')
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit instead of torch AdamW.")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=0.0,
                       help="Decoupled weight decay. It pulls the deltas (not the weights) towards 0.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0 disables it).")
    train.add_argument("--prediction_type", type=str, default=None, choices=[None, "epsilon", "v_prediction"],
                       help="Override the scheduler's prediction type.")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Frozen weights in this dtype and the forward under autocast; the deltas stay fp32. "
                            "Default: the accelerate config.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    train.add_argument("--report_to", type=str, default=None,
                       help="tensorboard, wandb, ... (accelerate trackers); none by default.")
    train.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, under --output_dir.")

    saving = parser.add_argument_group("checkpoints and validation")
    saving.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Save a resumable checkpoint-<step> folder every this many optimizer steps.")
    saving.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    saving.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='A checkpoint folder, or "latest" for the newest one in --output_dir.')
    saving.add_argument("--validation_prompt", type=str, default=None, help="Prompt of the validation images.")
    saving.add_argument("--num_validation_images", type=int, default=4)
    saving.add_argument("--validation_steps", type=int, default=None,
                        help="Also make validation images every this many optimizer steps (always at the end).")
    saving.add_argument("--validation_inference_steps", type=int, default=30)
    saving.add_argument("--validation_guidance_scale", type=float, default=7.5)

    add_sara_args(parser, switch=False)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks shared by both scripts; parser.error() on a bad combination."""
    try:
        args.sara_config = sara_config_from_args(args)
    except SaraOptionError as error:
        parser.error(str(error))
    if args.export_lora_rank is not None:
        if args.export_lora_rank < 1:
            parser.error("--export_lora_rank must be >= 1")
        try:
            lora_exporter()
        except RuntimeError as error:
            parser.error(str(error))
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")


def lora_exporter() -> Callable:
    """The native -> kohya LoRA export (`sara to-lora`), or a RuntimeError saying it is missing."""
    try:
        from sara_network import cli, convert  # noqa: F401
    except ImportError:
        raise RuntimeError("--export_lora_rank needs sara_network.convert (the native -> LoRA converter), which "
                           "this sara-network does not have; train without it and convert the file later") from None
    return export_lora


def export_lora(native_path: str, lora_path: str, rank: int, base_model_version: str) -> None:
    """Write a kohya-format LoRA of `rank` (truncated SVD per module) of a native file, with the
    metadata the UIs read, exactly as `sara to-lora --rank N` does."""
    from sara_network import cli

    status = cli.main(["to-lora", native_path, lora_path, "--rank", str(rank), "--overwrite",
                       "--base-model", base_model_version, "--show", "0"])
    if status != 0:
        raise RuntimeError(f"the LoRA export of {native_path} failed (see the message above)")


def base_model_version(models: "Models") -> str:
    """kohya's ss_base_model_version of an SD 1.x / 2.x model."""
    if models.unet.config.cross_attention_dim == 1024:
        return "sd_v2_v" if models.noise_scheduler.config.prediction_type == "v_prediction" else "sd_v2"
    return "sd_v1"


# ---------------------------------------------------------------------------------------------
# images
def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such image folder")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, name) for name in names]


def read_captioned_folder(folder: str, image_column: str = "file_name", caption_column: str = "text",
                          caption_extension: str = ".txt") -> list[tuple[str, str]]:
    """(image path, caption) pairs: from metadata.jsonl (one JSON object per line with the image's
    file name and its caption) or, without it, from image + same-name caption files."""
    metadata = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(metadata):
        pairs = []
        with open(metadata, encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                for column in (image_column, caption_column):
                    if column not in record:
                        raise ValueError(f"{metadata}, line {number}: no {column!r} field")
                path = os.path.join(folder, record[image_column])
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{metadata}, line {number}: {path} does not exist")
                pairs.append((path, str(record[caption_column])))
        if not pairs:
            raise ValueError(f"{metadata} lists no images")
        return pairs
    pairs = []
    for path in list_images(folder):
        caption_path = os.path.splitext(path)[0] + caption_extension
        if not os.path.isfile(caption_path):
            raise FileNotFoundError(f"{path} has no caption: write {caption_path} or a metadata.jsonl")
        with open(caption_path, encoding="utf-8") as stream:
            pairs.append((path, stream.read().strip()))
    return pairs


def prepare_image(path: str, resolution: int, center_crop: bool, random_flip: bool, rng: random.Random) -> torch.Tensor:
    """Load as RGB, resize the short side to `resolution`, crop a square, maybe flip -> CHW in [-1, 1]."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


class SeededEpochSampler(torch.utils.data.Sampler):
    """Yields (index, item seed) in a shuffled order that depends only on (seed, epoch).

    Crops and flips are drawn from the item seed, not from the global RNG, so a resumed run sees
    exactly the images an uninterrupted one would (accelerate may load a batch ahead). The epoch is
    set by the training loop through `shuffle_epoch`."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.shuffle_epoch = size, seed, 0

    def __len__(self):
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.shuffle_epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.size,), generator=generator).tolist()
        return iter(zip(order, seeds))


# ---------------------------------------------------------------------------------------------
# models
@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_models(args) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = args.pretrained_model_name_or_path
    common = {"revision": args.revision}
    return Models(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )


def base_pipeline(args, weight_dtype: torch.dtype, device, **components):
    """A pipeline of the model folder (components given as keywords replace the folder's)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, safety_checker=None,
        requires_safety_checker=False, **components, **dtype_kwargs("diffusers", weight_dtype))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def make_pipeline(args, models: Models, weight_dtype: torch.dtype, device):
    """An inference pipeline of the model folder, with the given (possibly patched) components."""
    return base_pipeline(args, weight_dtype, device, tokenizer=models.tokenizer, text_encoder=models.text_encoder,
                         vae=models.vae, unet=models.unet)


def generate_images(pipeline, prompt: str, count: int, seed: Optional[int], steps: int, guidance: float,
                    accelerator) -> list[Image.Image]:
    """Images from a private generator (the training RNG is left untouched)."""
    generator = torch.Generator(device=accelerator.device).manual_seed(seed if seed is not None else 0)
    images = []
    with torch.no_grad(), accelerator.autocast():
        for _ in range(count):
            images.append(pipeline(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                   generator=generator).images[0])
    return images


def save_images(images: list[Image.Image], folder: str, stem: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for number, image in enumerate(images):
        paths.append(os.path.join(folder, f"{stem}-{number}.png"))
        image.save(paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------
# training
def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=args.report_to, project_config=project)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args, network, accelerator, batch_size: int):
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * batch_size * accelerator.num_processes
    groups = network.param_groups(learning_rate, args.text_encoder_lr)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def find_checkpoint(args) -> Optional[str]:
    if args.resume_from_checkpoint != "latest":
        return args.resume_from_checkpoint
    if not os.path.isdir(args.output_dir):
        return None
    found = [name for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")]
    found.sort(key=lambda name: int(name.split("-")[1]))
    return os.path.join(args.output_dir, found[-1]) if found else None


def prune_checkpoints(args) -> None:
    """Keep room for one more checkpoint under --checkpoints_total_limit."""
    if args.checkpoints_total_limit is None:
        return
    found = sorted((name for name in os.listdir(args.output_dir) if name.startswith("checkpoint-")),
                   key=lambda name: int(name.split("-")[1]))
    for name in found[: max(0, len(found) - args.checkpoints_total_limit + 1)]:
        logger.info(f"removing old checkpoint {name}")
        shutil.rmtree(os.path.join(args.output_dir, name))


LossFunction = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def mse_loss(model_pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def train(args, accelerator, models: Models, dataset: torch.utils.data.Dataset, collate: Callable,
          loss_function: LossFunction = mse_loss, extra_metadata: Optional[dict] = None) -> str:
    """Apply SaRA, train, checkpoint, validate and save; returns the path of the final SaRA file."""
    from diffusers.optimization import get_scheduler

    unet, vae, text_encoder, noise_scheduler = models.unet, models.vae, models.text_encoder, models.noise_scheduler
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    vae.eval()
    text_encoder.eval()
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)

    seed = args.seed if args.seed is not None else 0
    sampler = SeededEpochSampler(len(dataset), seed)
    # A DataLoader draws a seed from its generator at every epoch; with none it would draw from the
    # global RNG, which a resumed run restores to the checkpoint's state and must not disturb.
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=args.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(seed))
    # steps per process: accelerate gives each process its share of the batches
    steps_per_epoch = math.ceil(math.ceil(len(dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    # SaRA: select from the fp32 weights as loaded, before casting the frozen model. A fractional
    # --sara_progressive_iter is a fraction of max_train_steps.
    network = apply_sara(unet, [text_encoder], args.sara_config, train_text_encoder=args.train_text_encoder,
                         total_steps=args.max_train_steps)
    weight_dtype = weight_dtype_of(accelerator)
    for model in (unet, vae, text_encoder):
        model.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    network.to(accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    register_accelerate_hooks(accelerator, network, SAVE_DTYPES[args.save_precision])


    optimizer = make_optimizer(args, network, accelerator, args.train_batch_size)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    # The frozen U-Net is not prepared: nothing in it requires a gradient, so DDP would refuse it,
    # and the network's gradients are all-reduced by hand (all_reduce_gradients).
    optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("sara-train", config=tracker_config)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        path = find_checkpoint(args)
        if path is None:
            accelerator.print(f"no checkpoint to resume from in {args.output_dir}; starting a new run")
        else:
            accelerator.print(f"resuming from {path}")
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} examples, {args.num_train_epochs} epochs, batch {total_batch} in total, "
                f"{args.max_train_steps} optimizer steps, {network.selected_count():,d} SaRA parameters")
    params = network.trainable_parameters()
    trained = [p for p in params if p.requires_grad]
    text_trained = args.train_text_encoder and any(m.component != "unet" for m in network.sara_modules())
    loss_sum = torch.zeros((), device=accelerator.device)

    for epoch in range(first_epoch, args.num_train_epochs):
        sampler.shuffle_epoch = epoch
        epoch_loader = dataloader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches)
        network.train()
        for batch in epoch_loader:
            with accelerator.accumulate(network):
                pixel_values = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
                with torch.no_grad():
                    latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                if args.noise_offset:
                    noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                             device=latents.device, dtype=latents.dtype)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                with accelerator.autocast():
                    with torch.set_grad_enabled(text_trained):
                        encoder_hidden_states = text_encoder(batch["input_ids"].to(accelerator.device),
                                                             return_dict=False)[0]
                    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = loss_function(model_pred, target, batch)
                loss_sum += loss.detach() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    all_reduce_gradients(accelerator, network)
                    if args.max_grad_norm:
                        accelerator.clip_grad_norm_(trained, args.max_grad_norm)
                optimizer.step()  # SaRA's rank term and progressive step run from optimizer step hooks
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                global_step += 1
                step_loss = float(accelerator.reduce(loss_sum, reduction="mean"))
                loss_sum.zero_()
                logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
                if network.last_rank_norm is not None:
                    logs["sara_rank_norm"] = network.last_rank_norm
                accelerator.log(logs, step=global_step)
                logger.info(f"step {global_step}/{args.max_train_steps}: loss {step_loss:.5f}")
                if global_step % args.checkpointing_steps == 0:
                    if accelerator.is_main_process:
                        prune_checkpoints(args)
                    accelerator.wait_for_everyone()
                    save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                    accelerator.save_state(save_path)
                    logger.info(f"saved state to {save_path}")
                if (args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0
                        and accelerator.is_main_process):
                    run_validation(args, accelerator, models, weight_dtype, f"step-{global_step:06d}")
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    final_path = os.path.join(args.output_dir, f"{args.output_name}.safetensors")
    if accelerator.is_main_process:
        network.unpatch()
        metadata = {"ss_sd_model_name": args.pretrained_model_name_or_path,
                    "ss_base_model_version": base_model_version(models),
                    "ss_steps": str(global_step), "ss_resolution": str(args.resolution),
                    "ss_learning_rate": str(args.learning_rate), **(extra_metadata or {})}
        network.save(final_path, SAVE_DTYPES[args.save_precision], metadata)
        logger.info(f"saved {final_path}")
        if args.export_lora_rank is not None:
            lora_path = os.path.join(args.output_dir, f"{args.output_name}_lora_r{args.export_lora_rank}.safetensors")
            lora_exporter()(final_path, lora_path, args.export_lora_rank, base_model_version(models))
            logger.info(f"saved {lora_path}")
        if args.validation_prompt:
            final_validation(args, accelerator, final_path, weight_dtype)
    accelerator.end_training()
    return final_path


def run_validation(args, accelerator, models: Models, weight_dtype, stem: str) -> list[str]:
    """Images with the deltas as they are now (the training network is patched into the models)."""
    pipeline = make_pipeline(args, models, weight_dtype, accelerator.device)
    images = generate_images(pipeline, args.validation_prompt, args.num_validation_images, args.seed,
                             args.validation_inference_steps, args.validation_guidance_scale, accelerator)
    return save_images(images, os.path.join(args.output_dir, "validation"), stem)


def final_validation(args, accelerator, sara_path: str, weight_dtype) -> list[str]:
    """A fresh pipeline of the base model with the saved file loaded, as a user would run it."""
    pipeline = base_pipeline(args, weight_dtype, accelerator.device)
    load_sara(pipeline, sara_path)
    images = generate_images(pipeline, args.validation_prompt, args.num_validation_images, args.seed,
                             args.validation_inference_steps, args.validation_guidance_scale, accelerator)
    return save_images(images, os.path.join(args.output_dir, "validation"), "final")
