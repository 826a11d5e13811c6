"""Weight patches from native SaRA files, shared by the UI integrations and the tools.

Each UI keeps the base weights and adds a delta to them: AUTOMATIC1111 asks a network module for a
dense `updown`, Forge and ComfyUI take patches keyed by their own parameter names, a merged
checkpoint is a state dict. The functions below turn a file's ModuleDelta into each of those, so
every host computes the same numbers, base + multiplier * delta in fp32, that
`SaraNetwork.merge_into_base` computes. Host glue (integrations/) only calls into this module.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from . import dit_names, fileformat, ldm_names
from .fileformat import ModuleDelta, SaraFileError

HostKey = Union[str, tuple]  # Forge / ComfyUI: "x.weight", or (key, offset[, function])


def module_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The kohya names of the SaRA modules in a state dict (keys `<name>.sara_values`)."""
    return sorted(key[:-len(".sara_values")] for key in tensors if key.endswith(".sara_values"))


def module_keys(tensors: Mapping[str, torch.Tensor], name: str) -> list[str]:
    return [f"{name}.{suffix}" for suffix in fileformat.SUFFIXES if f"{name}.{suffix}" in tensors]


def module_from_state_dict(tensors: Mapping[str, torch.Tensor], name: str,
                           path: str = "<state dict>") -> Optional[ModuleDelta]:
    """One module of a bare state dict (what Forge and ComfyUI hand to a loader), validated;
    None when the state dict has no SaRA tensors under that name."""
    if f"{name}.sara_values" not in tensors:
        return None
    parts = {key.split(".", 1)[1]: tensors[key] for key in module_keys(tensors, name)}
    return fileformat.parse_module(name, parts, path)


def _fit(tensor: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    """The delta in the host's shape: a 2-D delta fits a 1x1 conv and back (same numel)."""
    if math.prod(shape) != tensor.numel():
        raise SaraFileError(f"{name}: the delta has shape {tuple(tensor.shape)} but the model's weight has "
                            f"{tuple(shape)}; the file was trained on another base architecture")
    return tensor.reshape(shape)


def weight_delta(delta: ModuleDelta, host_weight_shape: Optional[tuple] = None, multiplier: float = 1.0,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """multiplier * the dense fp32 weight delta, shaped like the host's weight."""
    flat = torch.zeros(delta.numel, dtype=torch.float32, device=device)
    flat[delta.indices.to(device=flat.device, dtype=torch.long)] = delta.values.to(flat.device, torch.float32)
    return _fit(flat * multiplier if multiplier != 1.0 else flat, tuple(host_weight_shape or delta.shape), delta.name)


def bias_delta(delta: ModuleDelta, multiplier: float = 1.0,
               device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """multiplier * the dense fp32 bias delta, or None when the file trains no bias of this module."""
    if delta.bias_indices is None:
        return None
    dense = torch.zeros(delta.shape[0], dtype=torch.float32, device=device)
    dense[delta.bias_indices.to(device=dense.device, dtype=torch.long)] = delta.bias_values.to(dense.device,
                                                                                              torch.float32)
    return dense * multiplier if multiplier != 1.0 else dense


def module_delta(delta: ModuleDelta, host_weight_shape: Optional[tuple] = None, multiplier: float = 1.0,
                 device: Optional[torch.device] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight delta shaped for the host, bias delta or None), both fp32 and scaled by multiplier."""
    return weight_delta(delta, host_weight_shape, multiplier, device), bias_delta(delta, multiplier, device)


def output_delta(delta: ModuleDelta, x: torch.Tensor, multiplier: float = 1.0,
                 conv: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """What multiplier * delta adds to the layer's output for input x (no bias): for hosts that run
    it beside the untouched layer (ComfyUI's bypass mode) instead of patching the weight. `conv`:
    the layer's kernel_size, stride, padding, dilation and groups when it is a Conv2d."""
    if conv is None:
        shape = (delta.shape[0], delta.numel // delta.shape[0])
        return torch.nn.functional.linear(x, weight_delta(delta, shape, multiplier, x.device).to(x.dtype))
    kernel = tuple(conv["kernel_size"])
    shape = (delta.shape[0], delta.numel // (delta.shape[0] * math.prod(kernel)), *kernel)
    weight = weight_delta(delta, shape, multiplier, x.device).to(x.dtype)
    return torch.nn.functional.conv2d(x, weight, stride=conv.get("stride", 1), padding=conv.get("padding", 0),
                                      dilation=conv.get("dilation", 1), groups=conv.get("groups", 1))


def add_delta_(weight: torch.Tensor, delta: ModuleDelta, multiplier: float = 1.0) -> torch.Tensor:
    """weight += multiplier * delta at the selected entries only, in place, in the weight's dtype
    (no dense delta is built: Forge's fp32 merge copy of an SDXL layer stays the only big tensor)."""
    _fit(weight.reshape(-1), delta.shape, delta.name)
    flat = weight.view(-1) if weight.is_contiguous() else weight.reshape(-1)
    values = delta.values.to(device=weight.device, dtype=torch.float32) * multiplier
    flat.index_add_(0, delta.indices.to(device=weight.device, dtype=torch.long), values.to(weight.dtype))
    if flat.data_ptr() != weight.data_ptr():
        weight.copy_(flat.view(weight.shape))
    return weight


def native_to_dense_patches(source: Union[str, Iterable[ModuleDelta]]
                            ) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """{kohya name: (dense weight delta, dense bias delta or None)} of a native file (a path or its
    deltas), in the file's own shapes: the content of an equivalent LyCORIS `diff` / `diff_b` file."""
    deltas = fileformat.load_native(source)[0] if isinstance(source, str) else source
    return {delta.name: module_delta(delta) for delta in deltas}


# ---------------------------------------------------------------------------------------------
# Forge / ComfyUI: patch dictionaries keyed by the host's parameter names
def deltas_for(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, ModuleDelta]:
    """The SaRA modules of a bare state dict among `names` (a host key map's kohya names)."""
    found = {}
    for name in names:
        delta = module_from_state_dict(tensors, name)
        if delta is not None:
            found[name] = delta
    return found


def bias_patches(deltas: Iterable[ModuleDelta], key_map: Mapping[str, HostKey]) -> dict[str, tuple]:
    """("diff", (dense bias,)) patches for the biases the deltas train (small, so dense is fine)."""
    patches = {}
    for delta in deltas:
        bias = bias_delta(delta)
        target = key_map.get(delta.name)
        if bias is not None and isinstance(target, str) and target.endswith(".weight"):
            patches[target[:-len(".weight")] + ".bias"] = ("diff", (bias,))
    return patches


def host_patches(deltas: Iterable[ModuleDelta], key_map: Mapping[str, HostKey],
                 weight_patch: Callable[[ModuleDelta], Any]) -> tuple[dict, list[str]]:
    """({host key: weight_patch(delta)} plus bias patches, names the key map does not know)."""
    deltas = list(deltas)
    patches = {key_map[d.name]: weight_patch(d) for d in deltas if d.name in key_map}
    patches.update(bias_patches(deltas, key_map))
    return patches, [d.name for d in deltas if d.name not in key_map]


def model_title(names: Iterable[str]) -> str:
    """Which model kohya names are for, for messages: 'FLUX.1', 'SD3', 'SDXL', 'SD1/SD2' or 'unknown'.
    Works on a file's names and on a host's key map (which also holds other spellings of each layer)."""
    names = [n for n in names if isinstance(n, str)]
    dit = dit_names.arch_of_names(names)
    if dit:
        return ldm_names.ARCHS[dit].title

    def has(*prefixes):
        return any(n.startswith(prefixes) for n in names)

    if has("lora_te2_", "lora_unet_label_emb_"):
        return "SDXL"
    if has("lora_te_"):
        return "SD1/SD2"
    if has("lora_te1_") or (has("lora_unet_input_blocks_", "lora_unet_output_blocks_")
                            and not has("lora_unet_down_blocks_")):
        return "SDXL"
    return "SD1/SD2" if has("lora_unet_down_blocks_", "lora_unet_up_blocks_") else "unknown"


def module_shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, Optional[tuple]]:
    """{kohya name: weight shape (None if unreadable)} of the SaRA modules in a state dict."""
    shapes = {}
    for name in module_names(tensors):
        shape = tensors.get(f"{name}.sara_shape")
        shapes[name] = tuple(int(x) for x in shape.tolist()) if shape is not None and shape.dim() == 1 else None
    return shapes


def check_fits(shapes: Mapping[str, Optional[tuple]], key_map: Mapping[str, HostKey],
               host_shapes: Optional[Mapping[str, tuple]] = None, file: str = "the SaRA file") -> None:
    """Refuse, before anything is applied, a native file made for another model. `shapes`: the file's
    {kohya name: weight shape}. Every module of a model part the host has (its key map names U-Net /
    transformer or text-encoder layers of that kohya prefix) must be in the key map, with the host
    weight's size when `host_shapes` ({host key: shape}) is given. One error names both models."""
    from .naming import component_of

    if not shapes:
        return
    present = {component_of(k) for k in key_map if isinstance(k, str) and k.startswith(("lora_unet_", "lora_te"))}
    missing = [n for n in shapes if component_of(n) in present and n not in key_map]
    mismatched = [f"{name} {shape} vs {tuple(host_shapes[key])}" for name, shape in shapes.items()
                  for key in [key_map.get(name)] if isinstance(key, str) and host_shapes is not None
                  and key in host_shapes and shape is not None and math.prod(shape) != math.prod(host_shapes[key])]
    if missing or mismatched or not any(n in key_map for n in shapes):
        problems = ([f"{len(missing)} of {len(shapes)} modules have no layer in it ({', '.join(missing[:3])})"]
                    if missing else []) + ([f"{len(mismatched)} have another size ({'; '.join(mismatched[:3])})"]
                                           if mismatched else [])
        raise SaraFileError(f"{file} is a {model_title(shapes)} SaRA file and does not fit this {model_title(key_map)} "
                            f"model: {'; '.join(problems) or 'none of its modules is in it'}. Nothing was applied.")


def without_modules(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The state dict minus the keys of the given SaRA modules (what a host's next loader sees)."""
    consumed = {key for name in names for key in module_keys(tensors, name)}
    return {key: value for key, value in tensors.items() if key not in consumed}


# ---------------------------------------------------------------------------------------------
# single-file LDM checkpoints
@torch.no_grad()
def patch_checkpoint_(state_dict: dict[str, torch.Tensor], deltas: Iterable[ModuleDelta],
                      arch: ldm_names.ArchLike, multiplier: float = 1.0) -> list[str]:
    """Add multiplier * delta to an LDM checkpoint state dict in place (fp32 math, dtypes kept; an
    OpenCLIP q/k/v lands on its third of in_proj_weight). Returns the names with no key in it."""
    deltas, missing, present = list(deltas), [], []
    for delta in deltas:  # every module is checked before the first one is changed
        target = ldm_names.checkpoint_key(delta.name, arch)
        if target.key not in state_dict:
            missing.append(delta.name)
            continue
        if delta.bias_indices is not None and target.bias_key not in state_dict:
            raise SaraFileError(f"{delta.name}: the file trains a bias but the checkpoint has no {target.bias_key}")
        if target.view(state_dict[target.key]).numel() != delta.numel:
            _fit(torch.empty(delta.shape, device="meta"), tuple(target.view(state_dict[target.key]).shape), delta.name)
        present.append((delta, target))
    for delta, target in present:
        weight_update, bias_update = module_delta(delta, multiplier=multiplier)
        for key, update in ((target.key, weight_update), (target.bias_key, bias_update)):
            if update is not None:
                part = target.view(state_dict[key])
                part.copy_((part.to(torch.float32) + _fit(update, tuple(part.shape), delta.name)).to(part.dtype))
    return missing
