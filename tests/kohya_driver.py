"""Plays kohya's train_network.py call sequence (kohya_contract.md section 1) on tiny models.

Shared by the kohya contract tests and the multi-process test; no kohya code is needed. Besides
the SD1/SDXL models of models.py, `tiny_flux()` / `tiny_sd3()` stand in for what kohya's
flux_train_network.py / sd3_train_network.py hand to the network module: a transformer with the
module names of kohya's `flux_models.Flux` / `sd3_models.MMDiT` and the text encoders as a list,
[CLIP-L, T5-XXL] for FLUX and [CLIP-L, CLIP-G, T5-XXL] for SD3 (transformers classes, as kohya's).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

import models
import sara_network

HIDDEN = 32  # every stand-in width: the DiTs' and the text encoders'


class _Stream(nn.Module):
    """One stream of a DiT block: modulation, attention (fused qkv), MLP. Never registered itself:
    `_register` puts its layers at kohya's paths in the block that holds it."""

    def __init__(self):
        super().__init__()
        self.mod = nn.Linear(HIDDEN, 6 * HIDDEN)
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.fc1, self.fc2 = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def attend(self, x, vec):
        shift, scale, gate, *self._mlp_mod = self.mod(F.silu(vec))[:, None].chunk(6, dim=-1)
        return self.qkv(F.layer_norm(x, (HIDDEN,)) * (1 + scale) + shift), gate

    def finish(self, x, attended, gate):
        x = x + gate * self.proj(attended)
        shift, scale, gate2 = self._mlp_mod
        return x + gate2 * self.fc2(F.gelu(self.fc1(F.layer_norm(x, (HIDDEN,)) * (1 + scale) + shift)))


def _joint_attention(qkvs):
    """Attention over the concatenated streams; returns each stream's part."""
    lengths = [q.shape[1] for q in qkvs]
    q, k, v = torch.cat(qkvs, dim=1).chunk(3, dim=-1)
    heads = lambda t: t.unflatten(-1, (4, HIDDEN // 4)).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
    return out.split(lengths, dim=1)


def _register(block: nn.Module, paths: dict) -> _Stream:
    """A new _Stream whose layers are registered in `block` at kohya's paths ({'qkv': 'img_attn.qkv', ...})."""
    stream = _Stream()
    for attr, path in paths.items():
        parent = block
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, getattr(stream, attr))
    block.streams = getattr(block, "streams", []) + [stream]  # a plain list: not a second registration
    return stream


class TinyKohyaFlux(nn.Module):
    """kohya flux_models.Flux's module names: img_in, txt_in, time_in, vector_in, double_blocks
    (img_/txt_ mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2), single_blocks (linear1, linear2,
    modulation.lin), final_layer (linear, adaLN_modulation.1)."""

    def __init__(self):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(16, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.time_in, self.vector_in = nn.Module(), nn.Module()
        for embedder, width in ((self.time_in, 16), (self.vector_in, HIDDEN)):
            embedder.in_layer, embedder.out_layer = nn.Linear(width, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.double_blocks = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.double_blocks:
            for s in ("img", "txt"):
                _register(block, {"mod": f"{s}_mod.lin", "qkv": f"{s}_attn.qkv", "proj": f"{s}_attn.proj",
                                  "fc1": f"{s}_mlp.0", "fc2": f"{s}_mlp.2"})
        self.single_blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.linear1, block.linear2 = nn.Linear(HIDDEN, 7 * HIDDEN), nn.Linear(5 * HIDDEN, HIDDEN)
            block.modulation = nn.Module()
            block.modulation.lin = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.single_blocks.append(block)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(HIDDEN, 16)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, 2 * HIDDEN))

    def forward(self, img, txt, t_emb, pooled):
        img, txt = self.img_in(img), self.txt_in(txt)
        vec = self.time_in.out_layer(F.silu(self.time_in.in_layer(t_emb)))
        vec = vec + self.vector_in.out_layer(F.silu(self.vector_in.in_layer(pooled)))
        for block in self.double_blocks:
            img_s, txt_s = block.streams
            (img_qkv, img_gate), (txt_qkv, txt_gate) = img_s.attend(img, vec), txt_s.attend(txt, vec)
            txt_out, img_out = _joint_attention([txt_qkv, img_qkv])
            img, txt = img_s.finish(img, img_out, img_gate), txt_s.finish(txt, txt_out, txt_gate)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            shift, scale, gate = block.modulation.lin(F.silu(vec))[:, None].chunk(3, dim=-1)
            qkv, mlp = block.linear1(F.layer_norm(x, (HIDDEN,)) * (1 + scale) + shift).split([3 * HIDDEN, 4 * HIDDEN], -1)
            (attended,) = _joint_attention([qkv])
            x = x + gate * block.linear2(torch.cat([attended, F.gelu(mlp)], dim=-1))
        img = x[:, txt.shape[1]:]
        shift, scale = self.final_layer.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.final_layer.linear(F.layer_norm(img, (HIDDEN,)) * (1 + scale) + shift)


class TinyKohyaMMDiT(nn.Module):
    """kohya sd3_models.MMDiT's module names (SD3.5-medium layout): x_embedder.proj (conv),
    t_embedder.mlp, y_embedder.mlp, context_embedder, joint_blocks (x_block / context_block:
    adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2; x_block.attn2 in block 0),
    final_layer (linear, adaLN_modulation.1)."""

    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(4, HIDDEN, 2, stride=2)
        self.t_embedder, self.y_embedder = nn.Module(), nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(16, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN))
        self.y_embedder.mlp = nn.Sequential(nn.Linear(2 * HIDDEN, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN))
        self.context_embedder = nn.Linear(HIDDEN, HIDDEN)
        names = {"mod": "adaLN_modulation.1", "qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        self.joint_blocks = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.joint_blocks:
            block.x_block, block.context_block = nn.Module(), nn.Module()
            _register(block.x_block, names)
            _register(block.context_block, names)
        attn2 = self.joint_blocks[0].x_block.attn2 = nn.Module()
        attn2.qkv, attn2.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(HIDDEN, 16)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, 2 * HIDDEN))

    def forward(self, latents, context, t_emb, pooled):
        x = self.x_embedder.proj(latents).flatten(2).transpose(1, 2)
        c = self.context_embedder(context)
        vec = self.t_embedder.mlp(t_emb) + self.y_embedder.mlp(pooled)
        for block in self.joint_blocks:
            (xs,), (cs,) = block.x_block.streams, block.context_block.streams
            (x_qkv, x_gate), (c_qkv, c_gate) = xs.attend(x, vec), cs.attend(c, vec)
            c_out, x_out = _joint_attention([c_qkv, x_qkv])
            if hasattr(block.x_block, "attn2"):  # MMDiT-X: a second, image-only attention
                attn2 = block.x_block.attn2
                x_out = x_out + attn2.proj(_joint_attention([attn2.qkv(x)])[0])
            x, c = xs.finish(x, x_out, x_gate), cs.finish(c, c_out, c_gate)
        shift, scale = self.final_layer.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.final_layer.linear(F.layer_norm(x, (HIDDEN,)) * (1 + scale) + shift)


def tiny_t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=99, d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def tiny_flux(seed: int = 0):
    torch.manual_seed(seed)
    return types.SimpleNamespace(unet=TinyKohyaFlux(), kind="flux",
                                 text_encoders=[models.tiny_text_encoder(seed + 1), tiny_t5(seed + 2)])


def tiny_sd3(seed: int = 0):
    torch.manual_seed(seed)
    return types.SimpleNamespace(unet=TinyKohyaMMDiT(), kind="sd3",
                                 text_encoders=[models.tiny_text_encoder(seed + 1, with_projection=True),
                                                models.tiny_text_encoder(seed + 2, with_projection=True),
                                                tiny_t5(seed + 3)])


def _timestep_embedding(timesteps):
    frequencies = torch.exp(-torch.arange(8) / 8 * 9.2)
    angles = timesteps[:, None].float() / 1000 * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def predict(m, latents, timesteps, ids):
    """The denoiser's prediction, conditioned through every text encoder of the model."""
    if m.kind not in ("flux", "sd3"):
        return models.predict(m, latents, timesteps, ids)
    t_emb = _timestep_embedding(timesteps).to(latents.dtype)
    t5 = m.text_encoders[-1](input_ids=ids).last_hidden_state
    if m.kind == "flux":
        pooled = m.text_encoders[0](ids).pooler_output
        patches = latents.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        out = m.unet(patches, t5, t_emb, pooled)
        b, c, h, w = latents.shape
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    clip_l, clip_g = (encoder(ids) for encoder in m.text_encoders[:2])
    context = torch.cat([clip_l.last_hidden_state + clip_g.last_hidden_state, t5], dim=1)
    out = m.unet(latents, context, t_emb, torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1))
    b, c, h, w = latents.shape
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


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
                prediction = predict(m, latents[part], timesteps[part], ids[part])
            loss = torch.nn.functional.mse_loss(prediction.float(), target[part]) / accumulation
            loss.backward()
        if all_reduce is not None:
            all_reduce(network)
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def delta_snapshot(network) -> dict:
    return {name: module.pinned_delta().detach().clone() for name, module in network.named_children()}
