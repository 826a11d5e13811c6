"""SaRA files through Forge's `<lora:name:weight>`: a loader in front of Forge's LoRA loaders.

Forge resolves `load_lora` through `backend.patcher.lora.lora_collection_priority` on every call;
the collection put first here turns each SaRA module into a ("sara", delta) patch, applied by the
"sara" entry of `extra_weight_calculators` when Forge merges (or, online, at forward), and hands
every other key to Forge's own loader. A SaRA file made for another model is refused whole, naming
both models, before anything is patched. Only glue: the arithmetic is sara_network.host_patch.
"""
import sys

from backend.patcher import lora as forge_lora
from sara_network import host_patch

PATCH_TYPE = "sara"


class SaraCollection:
    """A `lora_collection_priority` entry: only `load_lora`, the key maps come from the next one."""

    is_sara = True

    @staticmethod
    def load_lora(lora, to_load):
        host_patch.check_fits(host_patch.module_shapes(lora), to_load)  # a file for another model: refused whole
        deltas = host_patch.deltas_for(lora, to_load)
        patches, _ = host_patch.host_patches(deltas.values(), to_load, lambda delta: (PATCH_TYPE, delta))
        others = next(c for c in forge_lora.lora_collection_priority
                      if not getattr(c, "is_sara", False) and hasattr(c, "load_lora"))
        more, remaining = others.load_lora(host_patch.without_modules(lora, deltas), to_load)
        return {**more, **patches}, remaining


def calculate_weight(weight, strength, delta):
    """Forge's fp32 merge copy of the weight + strength * delta (sparse, in place)."""
    return host_patch.add_delta_(weight, delta, strength)


def _refusing_other_models(load_lora_for_models):
    """sd_forge_lora's loader, preceded by a check of the whole file against the model (names, sizes) on
    fresh key maps: Forge's own key-map functions share one default dict across calls, so after a FLUX
    model was loaded an SDXL model's map still holds FLUX names."""
    def wrapped(model, clip, lora, *args, **kwargs):
        shapes = host_patch.module_shapes(lora)
        if shapes:
            key_map, host_shapes = {}, {}
            if model is not None:
                key_map = forge_lora.model_lora_keys_unet(model.model, key_map)
                host_shapes.update((k, tuple(v.shape)) for k, v in model.model.state_dict().items())
            if clip is not None:
                key_map = forge_lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
                host_shapes.update((k, tuple(v.shape)) for k, v in clip.cond_stage_model.state_dict().items())
            host_patch.check_fits(shapes, key_map, host_shapes, kwargs.get("filename", "the SaRA file"))
        return load_lora_for_models(model, clip, lora, *args, **kwargs)

    wrapped.sara_original = load_lora_for_models
    return wrapped


forge_lora.extra_weight_calculators[PATCH_TYPE] = calculate_weight
_networks = sys.modules.get("networks")  # sd_forge_lora's, loaded before any user extension
if _networks is not None and hasattr(_networks, "load_lora_for_models"):
    _networks.load_lora_for_models = _refusing_other_models(
        getattr(_networks.load_lora_for_models, "sara_original", _networks.load_lora_for_models))
forge_lora.lora_collection_priority[:] = [c for c in forge_lora.lora_collection_priority
                                          if not getattr(c, "is_sara", False)]
forge_lora.lora_collection_priority.insert(0, SaraCollection)
