"""ComfyUI: our custom node package inside ComfyUI's own model objects, loaders and patcher.

What runs is ComfyUI's code from --path, unmodified:
  - `nodes.load_custom_node` imports integrations/comfyui/comfyui-sara as ComfyUI does at start-up
    (our adapter joins `comfy.weight_adapter.adapters`; "Load SaRA" joins NODE_CLASS_MAPPINGS);
  - the tiny models become ComfyUI models: `supported_models.SD15` / `SDXL` configs (U-Net config from
    `model_detection.detect_unet_config` for the LDM-named SDXL U-Net, written out for the diffusers
    SD1 U-Net, whose weights go through ComfyUI's own `utils.unet_to_diffusers` key map), `get_model`,
    `load_model_weights`, `ModelPatcher`, and `sd.CLIP` (the real SD1 / SDXL CLIP classes, shrunk to
    the tiny text encoders with ComfyUI's `<clip>_model_config` model option);
  - the file goes through the standard `LoraLoader` node (`comfy.sd.load_lora_for_models`: ComfyUI's
    key maps `model_lora_keys_unet` / `model_lora_keys_clip`, `lora_convert`, `load_lora`,
    `add_patches`) and through our "Load SaRA" node; `ModelPatcher.patch_model` writes the patched
    weights (`calculate_weight`), `unpatch_model` restores them; with a low-VRAM budget the patch is
    applied on the fly in each layer's forward (`LowVramPatch`), which is checked on layer outputs;
  - where ComfyUI has it (0.9+), the "Load LoRA (Bypass)" node: `load_bypass_lora_for_models`, whose
    `BypassForwardHook` adds our adapter's `h(x)` to each layer's output (checked on layer outputs).
Every SaRA module must find its key in ComfyUI's own key map, and that key must be the one
`sara_network.ldm_names.comfy_key` predicts; warnings ComfyUI logs while loading (missing or
unexpected weights, "lora key not loaded", "NOT LOADED") count as failures.
Run against ComfyUI 3cd7b32f (2026-01-07) and v0.14.1 (19236edf) on CPU with torch 2.14.1.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import sys
import types

import torch

from tests.models import original_layout_state_dict
from tools.host_checks.common import (EXPORTS, ROOT, TE_MULTIPLIER, UNET_MULTIPLIER, Report, check_weights,
                                      compare_outputs, export_case, host_keys)

KINDS = ("sd1", "sdxl", "flux", "sd3")  # the models this host check builds
CLIP_VOCABULARY = 49408
COMFY_TEXT_ENCODERS = {"sd1": ("clip_l",), "sdxl": ("clip_l", "clip_g"), "flux": ("clip_l", "t5xxl"),
                       "sd3": ("clip_l", "clip_g", "t5xxl")}
SD1_UNET_CONFIG = {  # the tiny diffusers U-Net of tests/models.py in ComfyUI's terms
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 0], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 32, "transformer_depth_output": [1, 1, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


class WarningLog(logging.Handler):
    """Collects what ComfyUI logs at WARNING and above (its way of reporting skipped weights)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        messages, self.messages = self.messages, []
        return [m for m in messages if "torchaudio" not in m]


def hf_key(key: str) -> str:
    """transformers 5 dropped the `text_model.` level from CLIPTextModel's state dict; checkpoints
    (and ComfyUI) keep it."""
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def clip_config(text_encoder) -> dict:
    """ComfyUI's CLIP / T5 config keys for one of our tiny transformers text encoders."""
    config = text_encoder.config
    if config.model_type == "t5":
        return {"d_ff": config.d_ff, "d_kv": config.d_kv, "d_model": config.d_model, "num_heads": config.num_heads,
                "num_layers": config.num_layers, "vocab_size": config.vocab_size}
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
            "projection_dim": config.projection_dim, "hidden_act": config.hidden_act,
            "layer_norm_eps": config.layer_norm_eps}


def comfy_models(case, report: Report):
    """(ModelPatcher, CLIP) holding the case's untouched weights, built the way ComfyUI loads a checkpoint."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    unet_state = {k: v.clone() for k, v in case.models.unet.state_dict().items()}
    if case.kind == "sd1":
        unet_config = dict(SD1_UNET_CONFIG, dtype=torch.float32)
        to_ldm = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> LDM key
        unconverted = sorted(set(unet_state) - set(to_ldm))
        if unconverted:
            report.fail(f"comfyui {case.kind}: no LDM key for diffusers weights {unconverted[:4]}")
        unet_state = {to_ldm[k]: v for k, v in unet_state.items() if k in to_ldm}
        model_config = comfy.supported_models.SD15(unet_config)
    elif case.kind == "sdxl":
        unet_config = comfy.model_detection.detect_unet_config(unet_state, "")
        model_config = comfy.supported_models.SDXL(unet_config)
    else:  # FLUX / SD3: kohya's layout is ComfyUI's; the q/k norms (and SD3's position table) come along
        unet_state = original_layout_state_dict(case.models)
        unet_config = comfy.model_detection.detect_unet_config(unet_state, "")
        if case.kind == "flux":  # ComfyUI's detection takes FLUX.1's widths as given: the tiny ones here
            patch = unet_config["patch_size"]
            unet_config.update(hidden_size=unet_state["img_in.weight"].shape[0],
                               num_heads=unet_state["img_in.weight"].shape[0]
                               // unet_state["double_blocks.0.img_attn.norm.key_norm.scale"].shape[0],
                               context_in_dim=unet_state["txt_in.weight"].shape[1],
                               out_channels=unet_state["final_layer.linear.weight"].shape[0] // patch ** 2)
        model_config = (comfy.supported_models.Flux if case.kind == "flux" else comfy.supported_models.SD3)(unet_config)
    encoders = dict(zip(COMFY_TEXT_ENCODERS[case.kind], case.models.text_encoders))
    model_config.set_inference_dtype(torch.float32, None)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet_state.items()}
    model = model_config.get_model(checkpoint, "model.diffusion_model.", device=torch.device("cpu"))
    model.load_model_weights(checkpoint, "model.diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    clip_state = {f"{prefix}.transformer.{k if prefix == 't5xxl' else hf_key(k)}": v.clone()
                  for prefix, encoder in encoders.items() for k, v in encoder.state_dict().items()
                  if k != "encoder.embed_tokens.weight"}  # HF T5's tied copy of `shared`; ComfyUI has one
    for key, value in clip_state.items():  # ComfyUI's CLIP has the real 49408-token vocabulary
        if key.endswith("token_embedding.weight"):
            clip_state[key] = torch.cat([value, value.new_zeros(CLIP_VOCABULARY - len(value), value.shape[1])])
    options = {f"{prefix}_model_config": clip_config(encoder) for prefix, encoder in encoders.items()}
    detected = {f"text_encoders.{k}": v for k, v in clip_state.items()}  # how a checkpoint names them
    target, model_options = model_config.clip_target(state_dict=detected), dict(options, dtype=torch.float32)
    if "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
        clip = comfy.sd.CLIP(target, state_dict=clip_state, model_options=model_options)
    else:  # ComfyUI before late 2025: loaded after construction, as its load_checkpoint_guess_config does
        clip = comfy.sd.CLIP(target, model_options=model_options)
        missing, unexpected = clip.load_sd(clip_state, full_model=True)
        # ComfyUI's CLIP-L has an (identity) text_projection that HF's CLIPTextModel lacks; it fills it in
        for key in [k for k in missing if not k.endswith(("logit_scale", "clip_l.transformer.text_projection.weight"))
                    ] + unexpected:
            report.fail(f"comfyui {case.kind} CLIP: {'missing' if key in missing else 'unexpected'} weight {key}")
    return patcher, clip


def torchvision_stand_in() -> bool:
    """ComfyUI's model_base imports torchvision.transforms for one model (Cosmos) that nothing here
    builds. Where torchvision does not load (no build for this torch here), an empty module stands in."""
    try:
        import torchvision.transforms  # noqa: F401
        return False
    except (ImportError, RuntimeError):
        import transformers

        transformers.utils.is_torchvision_available()  # decided (absent) before the stand-in exists
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        package, transforms = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        package.transforms = transforms
        sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})
        return True


def target_of(model_patcher_or_clip, key: str):
    import comfy.utils

    owner = getattr(model_patcher_or_clip, "cond_stage_model", None) or model_patcher_or_clip.model
    return comfy.utils.get_attr(owner, key.rsplit(".", 1)[0])


def check(path: str, cases, report: Report) -> None:
    sys.argv = sys.argv[:1] + ["--cpu"]
    sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing()  # as main.py does, so that --cpu is read
    if torchvision_stand_in():
        print("  torchvision does not load here: an empty torchvision.transforms stands in (only Cosmos uses it)")
    log = WarningLog()
    logging.getLogger().addHandler(log)
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import folder_paths
    import nodes

    log.take()
    package = os.path.join(ROOT, "integrations", "comfyui", "comfyui-sara")
    if not asyncio.run(nodes.load_custom_node(package)) or "LoadSaRA" not in nodes.NODE_CLASS_MAPPINGS:
        report.fail(f"ComfyUI did not load the custom node package {package}")
        return
    built = {}
    for case in cases:
        folder_paths.add_model_folder_path("loras", os.path.dirname(case.path))
        filename = os.path.basename(case.path)
        if filename not in folder_paths.get_filename_list("loras"):
            report.fail(f"{filename} is not listed in ComfyUI's loras")
        model, clip = comfy_models(case, report)
        built[case.kind] = (case, model, clip)
        for message in log.take():
            report.fail(f"comfyui {case.kind} model load: {message[:300]}")
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        keys, base_unet, base_clip = host_keys(f"comfyui {case.kind}", case, key_map, model.model.state_dict(),
                                               clip.cond_stage_model.state_dict(), report)

        loaders = {"LoraLoader": nodes.LoraLoader().load_lora,
                   "Load SaRA": nodes.NODE_CLASS_MAPPINGS["LoadSaRA"]().load_sara}
        for label, load in loaders.items():
            patched_model, patched_clip = load(model, clip, filename, UNET_MULTIPLIER, TE_MULTIPLIER)
            for message in log.take():
                report.fail(f"comfyui {case.kind} {label}: {message[:300]}")
            comfy.model_management.load_models_gpu([patched_model])  # what sampling does first
            patched_clip.load_model()  # what CLIPTextEncode does first
            check_weights(f"comfyui {case.kind} {label}", case, keys, patched_model.model.state_dict(),
                          patched_clip.cond_stage_model.state_dict(), base_unet, base_clip, report)
            comfy.model_management.unload_all_models()
            check_weights(f"comfyui {case.kind} {label} unpatched", case, {}, model.model.state_dict(),
                          clip.cond_stage_model.state_dict(), base_unet, base_clip, report)

        if hasattr(comfy.sd, "load_bypass_lora_for_models"):  # ComfyUI 0.9+: "Load LoRA (Bypass)"
            check_bypass(case, keys, model, clip, filename, log, report)

        if case.kind in ("flux", "sd3"):  # the exports, through the stock LoraLoader (ComfyUI's own adapters)
            for export in EXPORTS:
                exported = export_case(case, export, os.path.dirname(case.path))
                label = f"comfyui {case.kind} LoraLoader {export}"
                patched_model, patched_clip = nodes.LoraLoader().load_lora(
                    model, clip, os.path.basename(exported.path), UNET_MULTIPLIER, TE_MULTIPLIER)
                for message in log.take():
                    report.fail(f"{label}: {message[:300]}")
                comfy.model_management.load_models_gpu([patched_model])
                patched_clip.load_model()
                check_weights(label, exported, keys, patched_model.model.state_dict(),
                              patched_clip.cond_stage_model.state_dict(), base_unet, base_clip, report,
                              exact=EXPORTS[export][1])
                comfy.model_management.unload_all_models()

        # Low VRAM: ComfyUI leaves a U-Net layer's weight alone and patches it in each forward
        patched_model, _ = nodes.LoraLoader().load_lora(model, clip, filename, UNET_MULTIPLIER, TE_MULTIPLIER)
        patched_model.patch_model(lowvram_model_memory=1)  # a 1-byte budget: no layer fits
        generator = torch.Generator().manual_seed(3)
        for name, key in keys.items():
            if not name.startswith("lora_unet_"):
                continue
            layer, want = target_of(patched_model, key), case.expected[name]
            if not any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in getattr(layer, "weight_function", [])):
                report.fail(f"comfyui {case.kind} low-vram: {key} has no LowVramPatch")
                continue
            compare_outputs(f"comfyui {case.kind} low-vram forward {key}", layer, want, generator, report)
        patched_model.unpatch_model()
        check_weights(f"comfyui {case.kind} low-vram unpatched", case, {}, model.model.state_dict(),
                      clip.cond_stage_model.state_dict(), base_unet, base_clip, report)
    check_other_models_files(built, nodes, report)
    logging.getLogger().removeHandler(log)


def check_other_models_files(built, nodes, report: Report) -> None:
    """A file for another model (a FLUX file on the SDXL model ...) through LoraLoader and Load SaRA:
    one error naming both models, and the model's weights untouched."""
    import comfy.model_management

    titles = {"sd1": "SD1/SD2", "sdxl": "SDXL", "flux": "FLUX.1", "sd3": "SD3"}
    pairs = [(a, b) for a in built for b in built if a != b and "sd1" not in (a, b)]
    for file_kind, model_kind in pairs:
        filename = os.path.basename(built[file_kind][0].path)
        case, model, clip = built[model_kind]
        before = {k: v.clone() for k, v in model.model.state_dict().items()}
        for label, load in (("LoraLoader", nodes.LoraLoader().load_lora),
                            ("Load SaRA", nodes.NODE_CLASS_MAPPINGS["LoadSaRA"]().load_sara)):
            try:
                patched, _ = load(model, clip, filename, UNET_MULTIPLIER, TE_MULTIPLIER)
                comfy.model_management.load_models_gpu([patched])
                report.fail(f"comfyui {label}: a {file_kind} file on the {model_kind} model was not refused")
            except Exception as error:  # what ComfyUI shows on the node
                report.checked += 1
                message = str(error)
                wanted = f"is a {titles[file_kind]} SaRA file and does not fit this {titles[model_kind]} model"
                if wanted not in message:
                    report.fail(f"comfyui {label}: {file_kind} file on {model_kind}: {message[:300]}")
            comfy.model_management.unload_all_models()
        changed = [k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])]
        if changed:
            report.fail(f"comfyui: a refused {file_kind} file changed the {model_kind} model: {changed[:3]}")
    print(f"  comfyui: {len(pairs)} files for another model refused by LoraLoader and Load SaRA, nothing applied")


def check_bypass(case, keys, model, clip, filename, log, report: Report) -> None:
    """ComfyUI's bypass loader: weights stay untouched (biases are still patched) and each layer's
    forward adds the adapter's h(x); checked on layer outputs, then restored on unload."""
    import comfy.model_management
    from comfy.weight_adapter.bypass import BypassForwardHook
    from comfy_extras.nodes_lora_debug import LoraLoaderBypass

    label = f"comfyui {case.kind} bypass"
    patched_model, patched_clip = LoraLoaderBypass().load_lora(model, clip, filename, UNET_MULTIPLIER, TE_MULTIPLIER)
    for message in log.take():  # ComfyUI offers every adapter to the U-Net and warns for the CLIP's
        if not re.fullmatch(r"\[BypassLoRA\] Adapter key not in model state_dict: clip_[lg]\.transformer\..*", message):
            report.fail(f"{label}: {message[:300]}")
    comfy.model_management.load_models_gpu([patched_model])
    patched_clip.load_model()
    generator = torch.Generator().manual_seed(4)
    for name, key in keys.items():
        layer = target_of(patched_model if name.startswith("lora_unet_") else patched_clip, key)
        if not isinstance(getattr(layer.forward, "__self__", None), BypassForwardHook):
            report.fail(f"{label}: {key} has no bypass hook")
            continue
        compare_outputs(f"{label} forward {key}", layer, case.expected[name], generator, report)
    print(f"  {label}: {len(keys)} layer outputs compared")
    comfy.model_management.unload_all_models()
