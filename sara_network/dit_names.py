"""kohya's FLUX.1 / SD3 transformer paths <-> diffusers' FluxTransformer2DModel / SD3Transformer2DModel.

kohya trains FLUX.1 on its own model class (Black Forest Labs' layout) and SD3 on SAI's MMDiT
layout; ComfyUI, Forge and single-file checkpoints hold the same layouts, so a native SaRA file
names these modules as kohya does (`lora_unet_double_blocks_0_img_attn_qkv`, see ldm_names.py).
diffusers splits some of those layers: a fused q/k/v Linear is three Linears, FLUX's single-block
`linear1` is q, k, v and the MLP's input projection, and a final AdaLN modulation stores
(scale, shift) where the original stores (shift, scale). So a kohya layer is a stack of row ranges
of diffusers layers, top to bottom:

    pieces("double_blocks.0.img_attn.qkv", (96, 32), "flux")
      -> [Piece("transformer_blocks.0.attn.to_q", 0, 32), Piece("...to_k", 0, 32), Piece("...to_v", 0, 32)]

Pure string and shape arithmetic; tests/test_flux_sd3.py checks it against diffusers' own
single-file converters (convert_flux_ / convert_sd3_transformer_checkpoint_to_diffusers).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, NamedTuple, Sequence

from .ldm_names import UnknownModuleName

# kohya path template -> diffusers path templates; {i} is the block number. One diffusers path:
# the same layer (a `swap` layer when its rows are 2 x its columns, see _rows); several: the kohya
# layer is those layers stacked.
_FLUX_BLOCK = {
    "double_blocks.{i}.img_attn.qkv": ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                       "transformer_blocks.{i}.attn.to_v"),
    "double_blocks.{i}.img_attn.proj": ("transformer_blocks.{i}.attn.to_out.0",),
    "double_blocks.{i}.img_mlp.0": ("transformer_blocks.{i}.ff.net.0.proj",),
    "double_blocks.{i}.img_mlp.2": ("transformer_blocks.{i}.ff.net.2",),
    "double_blocks.{i}.img_mod.lin": ("transformer_blocks.{i}.norm1.linear",),
    "double_blocks.{i}.txt_attn.qkv": ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
                                       "transformer_blocks.{i}.attn.add_v_proj"),
    "double_blocks.{i}.txt_attn.proj": ("transformer_blocks.{i}.attn.to_add_out",),
    "double_blocks.{i}.txt_mlp.0": ("transformer_blocks.{i}.ff_context.net.0.proj",),
    "double_blocks.{i}.txt_mlp.2": ("transformer_blocks.{i}.ff_context.net.2",),
    "double_blocks.{i}.txt_mod.lin": ("transformer_blocks.{i}.norm1_context.linear",),
    "single_blocks.{i}.linear1": ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                  "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
    "single_blocks.{i}.linear2": ("single_transformer_blocks.{i}.proj_out",),
    "single_blocks.{i}.modulation.lin": ("single_transformer_blocks.{i}.norm.linear",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_SD3_BLOCK = {
    "joint_blocks.{i}.x_block.attn.qkv": ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                          "transformer_blocks.{i}.attn.to_v"),
    "joint_blocks.{i}.x_block.attn.proj": ("transformer_blocks.{i}.attn.to_out.0",),
    "joint_blocks.{i}.x_block.attn2.qkv": ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                                           "transformer_blocks.{i}.attn2.to_v"),
    "joint_blocks.{i}.x_block.attn2.proj": ("transformer_blocks.{i}.attn2.to_out.0",),
    "joint_blocks.{i}.x_block.mlp.fc1": ("transformer_blocks.{i}.ff.net.0.proj",),
    "joint_blocks.{i}.x_block.mlp.fc2": ("transformer_blocks.{i}.ff.net.2",),
    "joint_blocks.{i}.x_block.adaLN_modulation.1": ("transformer_blocks.{i}.norm1.linear",),
    "joint_blocks.{i}.context_block.attn.qkv": ("transformer_blocks.{i}.attn.add_q_proj",
                                                "transformer_blocks.{i}.attn.add_k_proj",
                                                "transformer_blocks.{i}.attn.add_v_proj"),
    "joint_blocks.{i}.context_block.attn.proj": ("transformer_blocks.{i}.attn.to_add_out",),
    "joint_blocks.{i}.context_block.mlp.fc1": ("transformer_blocks.{i}.ff_context.net.0.proj",),
    "joint_blocks.{i}.context_block.mlp.fc2": ("transformer_blocks.{i}.ff_context.net.2",),
    "joint_blocks.{i}.context_block.adaLN_modulation.1": ("transformer_blocks.{i}.norm1_context.linear",),
    "x_embedder.proj": ("pos_embed.proj",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "context_embedder": ("context_embedder",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
LAYOUTS = {"flux": _FLUX_BLOCK, "sd3": _SD3_BLOCK}

# the diffusers pipeline subfolder of each kohya text-encoder prefix
TEXT_ENCODER_FOLDERS = {"flux": {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
                        "sd3": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}}


class Piece(NamedTuple):
    """The next `rows` rows of a kohya layer are rows [start, start + rows) of this diffusers layer."""

    path: str
    start: int
    rows: int


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_FORWARD = {arch: [(_pattern(k), k, v) for k, v in layout.items()] for arch, layout in LAYOUTS.items()}
_BACKWARD = {arch: [(_pattern(d), k, position) for k, v in layout.items() for position, d in enumerate(v)]
             for arch, layout in LAYOUTS.items()}


def _rows(kohya_template: str, count: int, shape: Sequence[int]) -> list[tuple[int, int]]:
    """(start, rows) in the diffusers layer(s) of each stacked part of a kohya weight of `shape`."""
    out = shape[0]
    if count == 4:  # FLUX linear1: q, k, v (hidden each, hidden = in_features) and the MLP input
        hidden = shape[1]
        return [(0, hidden)] * 3 + [(0, out - 3 * hidden)]
    if count == 3:
        return [(0, out // 3)] * 3
    if "adaLN_modulation" in kohya_template and len(shape) > 1 and out == 2 * shape[1]:
        half = out // 2  # a final AdaLN: (shift, scale) in the original, (scale, shift) in diffusers
        return [(half, half), (0, half)]
    return [(0, out)]


def pieces(path: str, shape: Sequence[int], arch: str) -> list[Piece]:
    """The diffusers row ranges a kohya transformer layer (weight `shape`) is made of, top to bottom."""
    for pattern, template, targets in _FORWARD[arch]:
        match = pattern.match(path)
        if match:
            rows = _rows(template, len(targets), shape)
            paths = [t.format(**match.groupdict()) for t in targets]
            if len(paths) == 1 and len(rows) == 2:
                paths *= 2
            return [Piece(p, start, count) for p, (start, count) in zip(paths, rows)]
    raise UnknownModuleName(f"{path}: not a kohya {arch} transformer module path")


def kohya_path(diffusers_path: str, arch: str) -> tuple[str, int]:
    """(kohya path, position of this layer in its stack) of a diffusers transformer layer."""
    for pattern, template, position in _BACKWARD[arch]:
        match = pattern.match(diffusers_path)
        if match:
            return template.format(**match.groupdict()), position
    raise UnknownModuleName(f"{diffusers_path}: not a diffusers {arch} transformer layer")


def kohya_layout(shapes: Mapping[str, Sequence[int]], arch: str) -> dict[str, list[Piece]]:
    """{kohya path: pieces} covering the given diffusers layers ({path: weight shape}); layers with no
    kohya counterpart are left out."""
    stacks: dict[str, dict[int, str]] = {}
    for path in shapes:
        try:
            kohya, position = kohya_path(path, arch)
        except UnknownModuleName:
            continue
        stacks.setdefault(kohya, {})[position] = path
    layout = {}
    for kohya, parts in stacks.items():
        paths = [parts[p] for p in sorted(parts)]
        if len(paths) != len(LAYOUTS[arch][_template(kohya, arch)]):
            raise UnknownModuleName(f"{kohya}: the diffusers model has only {paths} of its layers")
        stacked = [sum(shapes[p][0] for p in paths), *shapes[paths[0]][1:]]
        layout[kohya] = pieces(kohya, stacked, arch)
    return layout


def _template(path: str, arch: str) -> str:
    return next(template for pattern, template, _ in _FORWARD[arch] if pattern.match(path))


def arch_of_names(names: Iterable[str]) -> str | None:
    """'flux' or 'sd3' when kohya module names are unmistakably of one of them, else None."""
    for name in names:
        if name.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")):
            return "flux"
        if name.startswith("lora_unet_joint_blocks_"):
            return "sd3"
    return None
