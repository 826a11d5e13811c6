"""Tiny models built from configs (random weights, fixed seeds) for the tests.

- `tiny_sd1()`: diffusers UNet2DConditionModel + one CLIPTextModel: SD1.x layout and diffusers
  module names, as kohya's own SD1 U-Net uses.
- `tiny_sdxl()`: a small U-Net with the original (LDM / SAI) module names kohya's SDXL U-Net uses
  (`input_blocks.N.M...`, `middle_block`, `output_blocks`, `time_embed`, `label_emb`, `out`), and two
  text encoders (CLIPTextModel, CLIPTextModelWithProjection), as kohya's SDXL trainer hands over.
- `tiny_flux()` / `tiny_sd3()`: a diffusers FluxTransformer2DModel / SD3Transformer2DModel (SD3.5
  Medium style: q/k norms and a second attention) and its layers re-stacked into the layout kohya's
  own FLUX / MMDiT classes have (`double_blocks.0.img_attn.qkv`, `joint_blocks.0.x_block.attn.qkv`),
  with the text encoders kohya's trainers hand over (CLIP-L + T5 for FLUX; CLIP-L, CLIP-G, T5 for SD3).
"""
from __future__ import annotations

import types

import torch
from torch import nn
import torch.nn.functional as F

CROSS_DIM = 32


def tiny_text_encoder(seed: int, with_projection: bool = False, hidden: int = CROSS_DIM, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=99, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=16, projection_dim=hidden)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval()


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=8)


def tiny_sd1(seed: int = 0):
    return types.SimpleNamespace(unet=tiny_unet(seed), text_encoders=[tiny_text_encoder(seed + 1)], kind="sd1")


# ---------------------------------------------------------------------------------------------
# An SDXL-style U-Net with LDM module names (small, written for the tests).
class ResBlock(nn.Module):
    def __init__(self, channels, out_channels, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim, context_dim, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).view(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(layers, h, emb, context):
    for layer in layers:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context)
        else:
            h = layer(h)
    return h


class TinyLDMUNet(nn.Module):
    """Two levels (32, 64 channels), attention at the second level and in the middle, like SDXL's
    layout in miniature; `y` is the pooled-text + size vector of SDXL (`label_emb`)."""

    def __init__(self, in_channels=4, channels=(32, 64), context_dim=CROSS_DIM, adm_dim=48):
        super().__init__()
        c0, c1 = channels
        emb = 4 * c0
        self.model_channels = c0
        self.time_embed = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_dim, emb), nn.SiLU(), nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_channels, c0, 3, padding=1)),
            nn.Sequential(ResBlock(c0, c0, emb)),
            nn.Sequential(Downsample(c0)),
            nn.Sequential(ResBlock(c0, c1, emb), SpatialTransformer(c1, context_dim)),
        ])
        self.middle_block = nn.Sequential(ResBlock(c1, c1, emb), SpatialTransformer(c1, context_dim), ResBlock(c1, c1, emb))
        self.output_blocks = nn.ModuleList([
            nn.Sequential(ResBlock(2 * c1, c1, emb), SpatialTransformer(c1, context_dim)),
            nn.Sequential(ResBlock(c1 + c0, c1, emb), SpatialTransformer(c1, context_dim), Upsample(c1)),
            nn.Sequential(ResBlock(c1 + c0, c0, emb)),
            nn.Sequential(ResBlock(2 * c0, c0, emb)),
        ])
        self.out = nn.Sequential(nn.GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, in_channels, 3, padding=1))
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self):
        self.gradient_checkpointing = True

    def _block(self, layers, h, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(_run, layers, h, emb, context, use_reentrant=False)
        return _run(layers, h, emb, context)

    def forward(self, x, timesteps, context, y):
        half = self.model_channels // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (9.21 / half))
        args = timesteps.float()[:, None] * freqs[None]
        t_emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = self._block(block, h, emb, context)
            skips.append(h)
        h = self._block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


def tiny_sdxl(seed: int = 0, text_layers: int = 2):
    """`text_layers` >= 3 lets hosts that read the penultimate layer (ComfyUI's SDXL CLIP) build it."""
    torch.manual_seed(seed)
    unet = TinyLDMUNet()
    encoders = [tiny_text_encoder(seed + 1, layers=text_layers),
                tiny_text_encoder(seed + 2, with_projection=True, hidden=CROSS_DIM, layers=text_layers)]
    return types.SimpleNamespace(unet=unet, text_encoders=encoders, kind="sdxl")


# ---------------------------------------------------------------------------------------------
# FLUX.1 / SD3: diffusers transformers, and the same layers in kohya's (Black Forest Labs' / SAI's) layout
def tiny_t5(seed: int, hidden: int = CROSS_DIM):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=99, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    return T5EncoderModel(config).eval()


def tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    # one head of FLUX.1's width 128 (its rope axes 16, 56, 56, which ComfyUI's model detection assumes)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=128,
                                  num_attention_heads=1, joint_attention_dim=CROSS_DIM, pooled_projection_dim=CROSS_DIM,
                                  guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    # SAI's MMDiT (and ComfyUI's detection) ties the width to the depth: 64 per block, as many heads as blocks
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=CROSS_DIM, caption_projection_dim=128,
                                 pooled_projection_dim=2 * CROSS_DIM, out_channels=4, pos_embed_max_size=8,
                                 dual_attention_layers=(0,), qk_norm="rms_norm").eval()


def kohya_layout_model(transformer, arch: str) -> nn.Module:
    """The transformer's Linear / Conv2d layers under kohya's paths (fused q/k/v, FLUX's linear1, original
    AdaLN order), with copies of its weights: what kohya's own model classes hand the network.
    No forward: the tests only select, patch and merge layers."""
    from sara_network.convert import dit_targets

    root = nn.Module()
    for target in dit_targets(transformer, arch)[0]:
        source = target.module
        if isinstance(source, nn.Conv2d):
            layer = nn.Conv2d(source.in_channels, source.out_channels, source.kernel_size, source.stride,
                              bias=source.bias is not None)
        else:
            layer = nn.Linear(source.weight.shape[1], source.weight.shape[0], bias=source.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(source.weight)
            if source.bias is not None:
                layer.bias.copy_(source.bias)
        owner, *parents = root, *target.path.split(".")[:-1]
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(target.path.split(".")[-1], layer)
    return root


def tiny_flux(seed: int = 0):
    transformer = tiny_flux_transformer(seed)
    return types.SimpleNamespace(unet=kohya_layout_model(transformer, "flux"), diffusers=transformer, kind="flux",
                                 text_encoders=[tiny_text_encoder(seed + 1), tiny_t5(seed + 2)])


def tiny_sd3(seed: int = 0):
    transformer = tiny_sd3_transformer(seed)
    return types.SimpleNamespace(unet=kohya_layout_model(transformer, "sd3"), diffusers=transformer, kind="sd3",
                                 text_encoders=[tiny_text_encoder(seed + 1, with_projection=True, layers=3),  # hosts
                                                tiny_text_encoder(seed + 2, with_projection=True, layers=3),  # read -2
                                                tiny_t5(seed + 3)])


# the transformers' parameters that are not Linear / Conv2d weights: diffusers name -> original name
OTHER_PARAMETERS = {
    "flux": [(r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "double_blocks.{}.img_attn.norm.query_norm.scale"),
             (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "double_blocks.{}.img_attn.norm.key_norm.scale"),
             (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", "double_blocks.{}.txt_attn.norm.query_norm.scale"),
             (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", "double_blocks.{}.txt_attn.norm.key_norm.scale"),
             (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "single_blocks.{}.norm.query_norm.scale"),
             (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "single_blocks.{}.norm.key_norm.scale")],
    "sd3": [(r"pos_embed\.pos_embed", "pos_embed"),
            (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "joint_blocks.{}.x_block.attn.ln_q.weight"),
            (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "joint_blocks.{}.x_block.attn.ln_k.weight"),
            (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", "joint_blocks.{}.context_block.attn.ln_q.weight"),
            (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", "joint_blocks.{}.context_block.attn.ln_k.weight"),
            (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", "joint_blocks.{}.x_block.attn2.ln_q.weight"),
            (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", "joint_blocks.{}.x_block.attn2.ln_k.weight")],
}


def original_layout_state_dict(models) -> dict:
    """The whole transformer in its original single-file layout (what a FLUX / SD3 checkpoint, ComfyUI
    and Forge hold): kohya's layers (models.unet) plus the diffusers transformer's other parameters
    (q/k norms, SD3's position table), renamed."""
    import re

    checkpoint = {k: v.detach().clone() for k, v in models.unet.state_dict().items()}
    for key, value in models.diffusers.state_dict().items():
        for pattern, original in OTHER_PARAMETERS[models.kind]:
            match = re.fullmatch(pattern, key)
            if match:
                checkpoint[original.format(*match.groups())] = value.detach().clone()
    return checkpoint


BASE_MODEL_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "5-medium"}


# ---------------------------------------------------------------------------------------------
def random_sara_file(models, path: str, seed: int, metadata: dict):
    """A SaRA network on `models` (5% density, biases too) with random deltas, saved to `path`;
    fp16-exact values, so the fp16 file is lossless. Returns the network, applied to the models."""
    import sara_network

    te = models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]
    t5 = {"train_t5xxl": "true"} if models.kind in ("flux", "sd3") else {}  # kohya's arg: T5-XXL trains too
    net = sara_network.create_network(1.0, None, None, None, te, models.unet, density="0.05", include_bias="true", **t5)
    net.apply_to(te, models.unet, True, True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.trainable_parameters():
            parameter.copy_((torch.randn(parameter.shape, generator=generator) * 0.1).half().float())
    net.save(path, torch.float16, {"ss_base_model_version": BASE_MODEL_VERSION[models.kind], **metadata})
    return net


# ---------------------------------------------------------------------------------------------
def batch(kind: str, seed: int, size: int = 2):
    """A fixed (latents, timesteps, token ids, target noise) batch for a denoising step."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(size, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (size,), generator=generator)
    ids = torch.randint(0, 99, (size, 16), generator=generator)
    target = torch.randn(size, 4, 8, 8, generator=generator)
    return latents, timesteps, ids, target


def predict(models, latents, timesteps, ids):
    """The U-Net prediction with text conditioning from the model's text encoder(s)."""
    if models.kind == "sd1":
        context = models.text_encoders[0](ids).last_hidden_state
        return models.unet(latents, timesteps, context).sample
    hidden = models.text_encoders[0](ids).last_hidden_state
    second = models.text_encoders[1](ids)
    y = torch.cat([second.text_embeds, torch.zeros(latents.shape[0], 16, dtype=second.text_embeds.dtype)], dim=-1)
    return models.unet(latents, timesteps, hidden + second.last_hidden_state, y)


def denoising_loss(models, seed: int, size: int = 2) -> torch.Tensor:
    latents, timesteps, ids, target = batch(models.kind, seed, size)
    return F.mse_loss(predict(models, latents, timesteps, ids).float(), target)
