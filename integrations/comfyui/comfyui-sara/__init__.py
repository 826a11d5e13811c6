"""SaRA for ComfyUI: native files load through the standard LoraLoader, and a "Load SaRA" node.

The standard path: ComfyUI's `load_lora` asks every class in `comfy.weight_adapter.adapters`
whether it reads a module; SaraAdapter reads the `.sara_*` keys. A trained bias has no adapter
hook, so `comfy.lora.load_lora` is wrapped to add it as a ("diff", bias) patch. Only glue: the
arithmetic is sara_network.host_patch, shared with A1111, Forge and the tools.
"""
import logging

import comfy.lora
import comfy.weight_adapter
import folder_paths
import torch
from sara_network import fileformat, host_patch


class SaraAdapter(comfy.weight_adapter.WeightAdapterBase):
    name = "sara"

    def __init__(self, loaded_keys, delta):
        self.loaded_keys = loaded_keys
        self.delta = delta
        self.weights = [delta.values, delta.indices]

    @classmethod
    def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
        delta = host_patch.module_from_state_dict(lora, x)
        return None if delta is None else cls(set(host_patch.module_keys(lora, x)), delta)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        update = host_patch.weight_delta(self.delta, weight.shape, strength, weight.device)
        weight += function(update.to(weight.dtype))
        return weight

    def h(self, x, base_out):
        """Bypass mode (newer ComfyUI): the delta's share of the layer output, added beside the
        untouched layer; ComfyUI's BypassForwardHook sets multiplier, is_conv, kernel_size, kw_dict."""
        conv = dict(self.kw_dict, kernel_size=self.kernel_size) if getattr(self, "is_conv", False) else None
        return host_patch.output_delta(self.delta, x, getattr(self, "multiplier", 1.0), conv)


def _with_sara_biases(load_lora):
    """Also refuses a SaRA file made for another model (a FLUX file on SDXL ...) before any patch exists."""
    def wrapped(lora, to_load, *args, **kwargs):
        host_patch.check_fits(host_patch.module_shapes(lora), to_load)
        patches = load_lora(lora, to_load, *args, **kwargs)
        biased = [name for name in to_load if f"{name}.sara_bias_values" in lora]
        patches.update(host_patch.bias_patches(host_patch.deltas_for(lora, biased).values(), to_load))
        return patches

    wrapped.sara_original = load_lora
    return wrapped


comfy.weight_adapter.adapters[:] = [a for a in comfy.weight_adapter.adapters if a.__name__ != SaraAdapter.__name__]
comfy.weight_adapter.adapters.append(SaraAdapter)
comfy.lora.load_lora = _with_sara_biases(getattr(comfy.lora.load_lora, "sara_original", comfy.lora.load_lora))


class LoadSaRA:
    """Applies a native SaRA file to the model and CLIP: validated as a whole file (and against the
    model: names and sizes), errors name it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "sara_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load_sara"
    CATEGORY = "loaders"

    def load_sara(self, model, clip, sara_name, strength_model, strength_clip):
        path = folder_paths.get_full_path_or_raise("loras", sara_name)
        deltas, _ = fileformat.load_native(path)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        host_shapes = {k: tuple(v.shape) for owner in (model.model, clip.cond_stage_model)
                       for k, v in owner.state_dict().items()}
        host_patch.check_fits({d.name: d.shape for d in deltas}, key_map, host_shapes, sara_name)
        patches, unknown = host_patch.host_patches(
            deltas, key_map, lambda delta: SaraAdapter(set(), delta))
        model, clip = model.clone(), clip.clone()
        applied = set(model.add_patches(patches, strength_model)) | set(clip.add_patches(patches, strength_clip))
        unknown += [str(key) for key in patches if key not in applied]
        if unknown:
            logging.warning(f"[SaRA] {sara_name}: {len(unknown)} modules not in this model: {unknown[:8]}")
        return model, clip


NODE_CLASS_MAPPINGS = {"LoadSaRA": LoadSaRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadSaRA": "Load SaRA"}
