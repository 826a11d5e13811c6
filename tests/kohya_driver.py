"""Plays kohya's train_network.py call sequence (kohya_contract.md section 1) on tiny models.

Shared by the kohya contract tests and the multi-process test; no kohya code is needed.
"""
from __future__ import annotations

import types

import torch

import models
import sara_network


def text_encoder_arg(m):
    """kohya passes one CLIPTextModel for SD1/2 and a list for SDXL."""
    return m.text_encoders[0] if m.kind == "sd1" else m.text_encoders


def make_network(m, network_args: dict, max_train_steps: int = 8, train_text_encoder: bool = True,
                 train_unet: bool = True, network_weights=None):
    network = sara_network.create_network(1.0, None, 1.0, None, text_encoder_arg(m), m.unet,
                                          neuron_dropout=None, dropout=None, **network_args)
    network.prepare_network(types.SimpleNamespace(max_train_steps=max_train_steps, network_weights=network_weights))
    network.apply_to(text_encoder_arg(m), m.unet, train_text_encoder, train_unet)
    return network


def make_optimizer(network, kind: str = "adamw", multi_te_lr: bool = True, weight_decay: float = 0.0):
    if multi_te_lr:
        groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-3], 2e-3, 1e-3)
    else:
        groups, descriptions = network.prepare_optimizer_params(1e-3, 2e-3, 1e-3)
    assert len(groups) == len(descriptions)
    if kind == "sgd":  # linear in the gradient: equivalence tests compare without Adam's amplification
        return torch.optim.SGD(groups, lr=0.5)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=1e-3, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=weight_decay)


def freeze_and_cast(m, network, weight_dtype=None):
    """What kohya does after apply_to: freeze (and cast) the base models, then prepare_grad_etc."""
    for model in [m.unet, *m.text_encoders]:
        model.requires_grad_(False)
        if weight_dtype is not None:
            model.to(weight_dtype)
    network.prepare_grad_etc(text_encoder_arg(m), m.unet)
    network.on_epoch_start(text_encoder_arg(m), m.unet)


def train_steps(m, network, optimizer, steps: int, accumulation: int = 1, batch_seed: int = 0,
                autocast_dtype=None, batch_size: int = 2, all_reduce=None):
    """kohya's loop: micro-batches, backward, (all-reduce), clip, step, zero_grad."""
    for _ in range(steps):
        for micro in range(accumulation):
            network.on_step_start(text_encoder_arg(m), m.unet)
            latents, timesteps, ids, target = models.batch(m.kind, batch_seed, batch_size)
            part = slice(micro * batch_size // accumulation, (micro + 1) * batch_size // accumulation)
            with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                prediction = models.predict(m, latents[part], timesteps[part], ids[part])
            loss = torch.nn.functional.mse_loss(prediction.float(), target[part]) / accumulation
            loss.backward()
        if all_reduce is not None:
            all_reduce(network)
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def delta_snapshot(network) -> dict:
    return {name: module.pinned_delta().detach().clone() for name, module in network.named_children()}
