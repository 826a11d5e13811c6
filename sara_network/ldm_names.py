"""kohya module names -> the names UIs and single-file checkpoints use (the original LDM layout).

FLUX.1 and SD3 ("flux", "sd3") need no U-Net renaming: kohya's models (library/flux_models.py,
sd3_models.py), ComfyUI, Forge and the single-file checkpoints all hold Black Forest Labs' / SAI's
layout (`double_blocks.0.img_attn.qkv`, `joint_blocks.0.x_block.attn.qkv`), and their text encoders
are HF CLIP / T5 everywhere. diffusers' split layout is dit_names.py's business.

A SaRA file names modules as kohya does: diffusers-derived paths for the SD1/SD2 U-Net
(`lora_unet_down_blocks_0_attentions_0_proj_in`), LDM paths for kohya's SDXL U-Net
(`lora_unet_input_blocks_4_1_proj_in`; diffusers-trained SDXL files carry diffusers paths) and
HF-CLIP paths for every text encoder (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).
AUTOMATIC1111, Forge, ComfyUI and `.safetensors` checkpoints hold the models in the LDM layout,
where OpenCLIP text encoders (SD2, SDXL's second) fuse q/k/v into one `in_proj_weight`, so a
q/k/v delta lands on a third of its rows. Everything here is pure string arithmetic; the tests
check it against diffusers' own single-file converter on the full SD1.5 and SDXL configurations.

    checkpoint_key("lora_unet_down_blocks_0_attentions_0_proj_in", "sd1")
      -> CheckpointTarget("model.diffusion_model.input_blocks.1.1.proj_in.weight", chunk=None, ...)
    a1111_module_name("lora_te_text_model_encoder_layers_0_mlp_fc1", "sd1")
      -> "transformer_text_model_encoder_layers_0_mlp_fc1"
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Optional, Union

import torch

UNET = "lora_unet"


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """Where diffusers' (level, layer) blocks sit among LDM's flat `input_blocks`/`output_blocks`."""

    layers_per_block: int
    attention: tuple[bool, ...]  # per down level; the up levels mirror it

    def up_has_attention(self, level: int) -> bool:
        return self.attention[len(self.attention) - 1 - level]


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """One text encoder as a checkpoint and A1111 hold it."""

    checkpoint_prefix: str  # state-dict prefix of the encoder's model
    a1111_prefix: Optional[str]  # A1111's network_layer_mapping name prefix (None: A1111 has no such model)
    comfy_prefix: str  # ComfyUI / Forge clip state-dict prefix
    open_clip: bool  # OpenCLIP layout (fused in_proj, resblocks) instead of HF CLIP


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    unet: Optional[UNetLayout]  # None: a DiT, whose kohya paths are its checkpoint paths
    text_encoders: dict  # kohya prefix -> TextEncoder
    title: str = ""  # the model's name in messages

    @property
    def kohya_names_diffusers_unet(self) -> bool:
        """kohya names this U-Net by diffusers paths (SD1/SD2), not LDM ones (SDXL) nor DiT ones."""
        return self.unet is not None and self.name != "sdxl"


_CLIP_L = TextEncoder("cond_stage_model.transformer.", "transformer_", "clip_l.transformer.", False)
_SD_LAYOUT = UNetLayout(2, (True, True, True, False))


def _dit_encoder(comfy_name: str) -> TextEncoder:
    """A FLUX / SD3 text encoder: `text_encoders.<name>.transformer.` in single-file checkpoints (HF
    layout, SD3's CLIP-G too), `<name>.transformer.` in ComfyUI and Forge."""
    return TextEncoder(f"text_encoders.{comfy_name}.transformer.", None, f"{comfy_name}.transformer.", False)


ARCHS = {
    "sd1": Arch("sd1", _SD_LAYOUT, {"lora_te": _CLIP_L}, "SD1"),
    "sd2": Arch("sd2", _SD_LAYOUT, {"lora_te": TextEncoder("cond_stage_model.model.", "model_", "clip_h.transformer.",
                                                           True)}, "SD2"),
    "sdxl": Arch("sdxl", UNetLayout(2, (False, True, True)), {
        "lora_te1": TextEncoder("conditioner.embedders.0.transformer.", "0_transformer_", "clip_l.transformer.", False),
        "lora_te2": TextEncoder("conditioner.embedders.1.model.", "1_model_", "clip_g.transformer.", True),
    }, "SDXL"),
    # kohya's lora_flux / lora_sd3 prefixes: CLIP-L te1, CLIP-G te2, T5-XXL always te3
    "flux": Arch("flux", None, {"lora_te1": _dit_encoder("clip_l"), "lora_te3": _dit_encoder("t5xxl")}, "FLUX.1"),
    "sd3": Arch("sd3", None, {"lora_te1": _dit_encoder("clip_l"), "lora_te2": _dit_encoder("clip_g"),
                              "lora_te3": _dit_encoder("t5xxl")}, "SD3"),
}
UNET_CHECKPOINT_PREFIX = "model.diffusion_model."
ArchLike = Union[str, Arch]


class UnknownModuleName(ValueError):
    """A name that does not belong to the architecture (wrong prefix or unknown block)."""


def arch_of(metadata: dict) -> str:
    """'sd1', 'sd2', 'sdxl', 'flux' or 'sd3' from a file's ss_base_model_version / modelspec.architecture."""
    version = str(metadata.get("ss_base_model_version", "")) + " " + str(metadata.get("modelspec.architecture", ""))
    if "flux" in version:
        return "flux"
    if "stable-diffusion-3" in version or version.split(" ")[0] in ("medium", "5-medium", "5-large"):
        return "sd3"
    if "sdxl" in version or "stable-diffusion-xl" in version:
        return "sdxl"
    if "sd_v2" in version or "stable-diffusion-v2" in version or metadata.get("ss_v2") == "True":
        return "sd2"
    return "sd1"


def get_arch(arch: ArchLike) -> Arch:
    if isinstance(arch, Arch):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    return ARCHS[arch]


# ---------------------------------------------------------------------------------------------
# underscored kohya names -> dotted module paths
_COMPOUNDS = {tuple(word.split("_")) for word in (
    # LDM U-Net
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "in_layers", "out_layers",
    "emb_layers", "skip_connection", "proj_in", "proj_out", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    # diffusers U-Net
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "add_embedding", "linear_1", "linear_2", "conv_shortcut", "time_emb_proj",
    # CLIP (HF and OpenCLIP)
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "text_projection", "c_fc", "c_proj", "ln_1", "ln_2", "ln_final", "in_proj",
    # T5 (FLUX / SD3 te3)
    "wi_0", "wi_1", "relative_attention_bias",
    # FLUX.1 (Black Forest Labs' layout)
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in",
    "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer", "adaLN_modulation",
    # SD3 (SAI's MMDiT layout)
    "joint_blocks", "x_block", "context_block", "x_embedder", "t_embedder", "y_embedder", "context_embedder")}


def dotted(underscored: str) -> str:
    """`input_blocks_1_1_proj_in` -> `input_blocks.1.1.proj_in` (kohya's '.'->'_' undone)."""
    tokens, parts, i = underscored.split("_"), [], 0
    while i < len(tokens):
        for width in (3, 2, 1):
            if width == 1 or tuple(tokens[i:i + width]) in _COMPOUNDS:
                parts.append("_".join(tokens[i:i + width]))
                i += width
                break
    return ".".join(parts)


def split_name(kohya_name: str, arch: ArchLike) -> tuple[str, str]:
    """(kohya prefix, dotted module path in kohya's model) of a kohya name."""
    arch = get_arch(arch)
    for prefix in (UNET, *arch.text_encoders):
        if kohya_name.startswith(prefix + "_"):
            return prefix, dotted(kohya_name[len(prefix) + 1:])
    raise UnknownModuleName(f"{kohya_name}: not a {arch.title or arch.name} module name "
                     f"(expected a prefix of {', '.join([UNET, *arch.text_encoders])})")


# ---------------------------------------------------------------------------------------------
# U-Net: diffusers paths <-> LDM paths
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SLOT = {"resnets": 0, "attentions": 1}
_DIFFUSERS_HEADS = ("down_blocks", "up_blocks", "mid_block", *{k.split(".")[0] for k in _TOP_TO_LDM})


def is_diffusers_unet_path(path: str) -> bool:
    return path.split(".")[0] in _DIFFUSERS_HEADS


def _inner(kind: str, rest: list[str]) -> str:
    if kind == "resnets" and rest:
        rest = [_RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]]
    return ".".join(rest)


def diffusers_to_ldm_unet(path: str, layout: UNetLayout) -> str:
    """A diffusers U-Net module path (`down_blocks.1.resnets.0.conv1`) as an LDM path (`input_blocks.4.0.in_layers.2`)."""
    for top, ldm in _TOP_TO_LDM.items():
        if path == top or path.startswith(top + "."):
            return ldm + path[len(top):]
    parts, step = path.split("."), layout.layers_per_block + 1
    try:
        if parts[0] == "mid_block":
            kind, j = parts[1], int(parts[2])
            block = 2 * j if kind == "resnets" else _SLOT[kind]
            return ".".join(filter(None, [f"middle_block.{block}", _inner(kind, parts[3:])]))
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return ".".join([f"input_blocks.{(level + 1) * step}.0.op", *parts[5:]])
            block = f"input_blocks.{1 + level * step + j}.{_SLOT[kind]}"
        elif parts[0] == "up_blocks":
            if kind == "upsamplers":
                slot = 2 if layout.up_has_attention(level) else 1
                return ".".join([f"output_blocks.{level * step + layout.layers_per_block}.{slot}", *parts[4:]])
            block = f"output_blocks.{level * step + j}.{_SLOT[kind]}"
        else:
            raise KeyError(parts[0])
    except (IndexError, KeyError, ValueError):
        raise UnknownModuleName(f"{path}: not a diffusers U-Net module path") from None
    return ".".join(filter(None, [block, _inner(kind, parts[4:])]))


def ldm_to_diffusers_unet(path: str, layout: UNetLayout) -> str:
    """The inverse of diffusers_to_ldm_unet (`input_blocks.4.0.in_layers.2` -> `down_blocks.1.resnets.0.conv1`)."""
    for top, ldm in _TOP_TO_LDM.items():
        if path == ldm or path.startswith(ldm + "."):
            return top + path[len(ldm):]
    match = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?(?:\.(.*))?", path)
    if not match:
        raise UnknownModuleName(f"{path}: not an LDM U-Net module path")
    head, block, slot, rest = match[1], int(match[2]), match[3], match[4]
    step = layout.layers_per_block + 1
    if head == "middle_block":
        kind, prefix = ("attentions", "mid_block.attentions.0") if block % 2 else ("resnets", f"mid_block.resnets.{block // 2}")
        tail = ".".join(filter(None, [slot, rest]))
    else:
        level, j = ((block - 1) // step, (block - 1) % step) if head == "input_blocks" else divmod(block, step)
        base = "down_blocks" if head == "input_blocks" else "up_blocks"
        tail = rest or ""
        if head == "input_blocks" and j == step - 1:  # input_blocks.{3(l+1)}.0.op
            return ".".join(filter(None, [f"down_blocks.{level}.downsamplers.0.conv", *(tail.split(".")[1:])]))
        if head == "output_blocks" and slot is not None and (slot == "2" or (slot == "1" and tail.startswith("conv"))):
            return ".".join(filter(None, [f"up_blocks.{level}.upsamplers.0", tail]))
        kind = "resnets" if slot == "0" else "attentions"
        prefix = f"{base}.{level}.{kind}.{j}"
    if kind == "resnets":
        reverse = {ldm: name for name, ldm in _RESNET_TO_LDM.items()}
        for ldm, name in reverse.items():
            if tail == ldm or tail.startswith(ldm + "."):
                tail = name + tail[len(ldm):]
                break
    return ".".join(filter(None, [prefix, tail]))


def ldm_unet_path(kohya_name: str, arch: ArchLike) -> str:
    """The LDM module path (`input_blocks.1.1.proj_in`) of a `lora_unet_` name, diffusers- or LDM-named."""
    arch = get_arch(arch)
    prefix, path = split_name(kohya_name, arch)
    if prefix != UNET:
        raise UnknownModuleName(f"{kohya_name}: not a U-Net module")
    return diffusers_to_ldm_unet(path, arch.unet) if arch.unet is not None and is_diffusers_unet_path(path) else path


# ---------------------------------------------------------------------------------------------
# text encoders: HF-CLIP paths <-> OpenCLIP paths
_HF_TO_OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_QKV = ("q_proj", "k_proj", "v_proj")


class OpenClipTarget(NamedTuple):
    path: str  # OpenCLIP module path, or the fused MultiheadAttention for q/k/v
    chunk: Optional[int]  # 0/1/2: q/k/v's third of in_proj_weight / in_proj_bias
    transposed: bool  # text_projection is a bare (hidden, proj) matrix, HF's Linear weight transposed


def hf_to_open_clip(path: str) -> OpenClipTarget:
    """`text_model.encoder.layers.3.self_attn.k_proj` -> (`transformer.resblocks.3.attn`, chunk 1)."""
    if path == "text_projection":
        return OpenClipTarget("text_projection", None, True)
    if path == "text_model.final_layer_norm":
        return OpenClipTarget("ln_final", None, False)
    match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
    if match:
        layer, inner = match[1], match[2]
        if inner.startswith("self_attn.") and inner.split(".")[1] in _QKV:
            return OpenClipTarget(f"transformer.resblocks.{layer}.attn", _QKV.index(inner.split(".")[1]), False)
        if inner in _HF_TO_OPEN_CLIP:
            return OpenClipTarget(f"transformer.resblocks.{layer}.{_HF_TO_OPEN_CLIP[inner]}", None, False)
    raise UnknownModuleName(f"{path}: no OpenCLIP counterpart for this text-encoder module")


def open_clip_to_hf(path: str, chunk: Optional[int] = None) -> str:
    """The inverse of hf_to_open_clip (a fused `attn` needs its q/k/v chunk)."""
    if path == "text_projection":
        return path
    if path == "ln_final":
        return "text_model.final_layer_norm"
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", path)
    if match:
        prefix = f"text_model.encoder.layers.{match[1]}."
        if match[2] == "attn" and chunk is not None:
            return prefix + "self_attn." + _QKV[chunk]
        reverse = {open_clip: hf for hf, open_clip in _HF_TO_OPEN_CLIP.items()}
        if match[2] in reverse:
            return prefix + reverse[match[2]]
    raise UnknownModuleName(f"{path}: no HF-CLIP counterpart for this OpenCLIP module")


# ---------------------------------------------------------------------------------------------
# the public mappings
class CheckpointTarget(NamedTuple):
    """Where a module's delta goes in an LDM single-file checkpoint state dict."""

    key: str  # the weight's key
    bias_key: Optional[str]  # the bias's key (None: the target has no bias)
    chunk: Optional[int]  # q/k/v third of a fused in_proj (weight and bias), else None
    transposed: bool  # stored transposed (OpenCLIP text_projection)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of the checkpoint's weight (or bias) that has the module's own shape; a view,
        so `target.view(state_dict[target.key]).add_(delta)` patches the checkpoint in place."""
        part = tensor.chunk(3, 0)[self.chunk] if self.chunk is not None else tensor
        return part.t() if self.transposed else part


def checkpoint_key(kohya_name: str, arch: ArchLike, unet_prefix: str = UNET_CHECKPOINT_PREFIX) -> CheckpointTarget:
    """The checkpoint key(s) of a kohya module name: `model.diffusion_model.<ldm path>.weight`,
    `cond_stage_model.transformer.<hf path>.weight` (SD1), `conditioner.embedders.0/1...` (SDXL),
    `text_encoders.t5xxl.transformer.<hf path>.weight` (FLUX / SD3). `unet_prefix`: "" for a bare
    transformer file (Black Forest Labs' flux1-dev.safetensors)."""
    arch = get_arch(arch)
    prefix, path = split_name(kohya_name, arch)
    if prefix == UNET:
        base = unet_prefix + ldm_unet_path(kohya_name, arch)
        return CheckpointTarget(base + ".weight", base + ".bias", None, False)
    encoder = arch.text_encoders[prefix]
    if not encoder.open_clip:
        base = encoder.checkpoint_prefix + path
        return CheckpointTarget(base + ".weight", base + ".bias", None, False)
    target = hf_to_open_clip(path)
    base = encoder.checkpoint_prefix + target.path
    if target.transposed:
        return CheckpointTarget(base, None, None, True)
    if target.chunk is not None:
        return CheckpointTarget(base + ".in_proj_weight", base + ".in_proj_bias", target.chunk, False)
    return CheckpointTarget(base + ".weight", base + ".bias", None, False)


def kohya_name_for_checkpoint_key(key: str, arch: ArchLike, chunk: Optional[int] = None,
                                  unet_prefix: str = UNET_CHECKPOINT_PREFIX) -> str:
    """The kohya name of a checkpoint weight key (the reverse of checkpoint_key; a fused
    `in_proj_weight` needs its q/k/v `chunk`). U-Net names come out as kohya writes them:
    diffusers-style for SD1/SD2, LDM-style for SDXL, the checkpoint's own for FLUX / SD3."""
    arch = get_arch(arch)
    stem = re.sub(r"\.(in_proj_)?weight$", "", key)
    for prefix, encoder in arch.text_encoders.items():
        if stem.startswith(encoder.checkpoint_prefix):
            path = stem[len(encoder.checkpoint_prefix):]
            if encoder.open_clip:
                path = open_clip_to_hf(path, chunk)
            return f"{prefix}_{path.replace('.', '_')}"
    if stem.startswith(unet_prefix) and (unet_prefix or not stem.startswith(("text_encoders.", "vae."))):
        path = stem[len(unet_prefix):]
        if arch.kohya_names_diffusers_unet:
            path = ldm_to_diffusers_unet(path, arch.unet)
        return f"{UNET}_{path.replace('.', '_')}"
    raise UnknownModuleName(f"{key}: not a {arch.name} U-Net or text-encoder key")


def a1111_module_name(kohya_name: str, arch: ArchLike) -> str:
    """The module's name in A1111's `sd_model.network_layer_mapping` (an OpenCLIP q/k/v maps to its
    fused MultiheadAttention `..._attn`; A1111 keys the q/k/v delta as `<that>_q_proj`)."""
    arch = get_arch(arch)
    if arch.unet is None:
        raise UnknownModuleName(f"{kohya_name}: AUTOMATIC1111 has no {arch.title} models")
    prefix, path = split_name(kohya_name, arch)
    if prefix == UNET:
        return "diffusion_model_" + ldm_unet_path(kohya_name, arch).replace(".", "_")
    encoder = arch.text_encoders[prefix]
    if encoder.open_clip:
        path = hf_to_open_clip(path).path
    return encoder.a1111_prefix + path.replace(".", "_")


def comfy_key(kohya_name: str, arch: ArchLike) -> str:
    """The weight key ComfyUI and Forge patch (`diffusion_model.<ldm path>.weight`,
    `clip_l.transformer.<hf path>.weight`, `clip_g...`: their CLIPs keep q/k/v separate)."""
    arch = get_arch(arch)
    prefix, path = split_name(kohya_name, arch)
    if prefix == UNET:
        return f"diffusion_model.{ldm_unet_path(kohya_name, arch)}.weight"
    return f"{arch.text_encoders[prefix].comfy_prefix}{path}.weight"


def a1111_attention_siblings(sd_key: str) -> list[str]:
    """A1111 patches an OpenCLIP attention (SD2 text encoder, SDXL's second) only when the network has
    its q, k, v and out: the four keys of the layer an `..._attn_q_proj`-style key belongs to, else []."""
    match = re.fullmatch(r"(.*_transformer_resblocks_\d+_attn)_(?:q_proj|k_proj|v_proj|out_proj)", sd_key)
    return [f"{match[1]}_{part}" for part in (*_QKV, "out_proj")] if match else []
