"""Forge: our extension inside Forge's own model objects, LoRA key maps, loader and patcher.

What runs is Forge's code from --path, unmodified:
  - scripts/sara_network_forge.py is imported with Forge's backend loaded (our collection goes first
    in `backend.patcher.lora.lora_collection_priority`, our "sara" entry joins `extra_weight_calculators`);
  - the tiny models become Forge models as `backend/loader.py` and the engines build them: the U-Net
    config from huggingface_guess (`detect_unet_config` on the LDM state dict, completed by the
    `model_list.SD15` / `SDXL` class a real checkpoint would match; the diffusers SD1 U-Net's weights
    are renamed first with Forge's `backend.misc.diffusers_state_dict.unet_to_diffusers`),
    `IntegratedUNet2DConditionModel` built under `using_forge_operations` and loaded strict,
    `UnetPatcher.from_model` (a real `KModel`; the scheduler is diffusers' Euler with SD's betas);
    the text encoders as `IntegratedCLIP(CLIPTextModel, ...)` in `backend.patcher.clip.CLIP` under
    `clip_l` (and `clip_g`), as the SD1.5 / SDXL engines build them;
  - the file is read by sd_forge_lora's `networks.load_lora_state_dict` and goes through
    `networks.load_lora_for_models` (Forge's key maps `model_lora_keys_unet` / `model_lora_keys_clip`,
    `load_lora`, `add_patches`), as `<lora:name:weight>` does; `memory_management.load_models_gpu` then
    runs `refresh_loras` (`LoraLoader.refresh`, `merge_lora_to_weight`) as sampling and text encoding do,
    and loading the unpatched objects again restores the weights. In online mode (Forge's choice for
    quantized models) the patch is merged in each layer's forward: checked on layer outputs.
Every SaRA module must find its key in Forge's own key map, and that key must be the one
`sara_network.ldm_names.comfy_key` predicts; Forge's "[LORA]" lines about unmatched, skipped or
mismatched keys count as failures, and so do weights the file does not patch that change.

Stand-ins: networks.py imports `modules.shared`, `sd_models` and `scripts`, which pull in the whole
WebUI (gradio, the options, the checkpoint list). `load_lora_for_models` uses none of them; only
networks.py's import-time scan of `shared.cmd_opts.lora_dir` does. So `modules.sd_models` and
`modules.scripts` are empty modules, and `modules.shared` holds only `cmd_opts.lora_dir` (an empty
folder), `opts.list_hidden_files` and Forge's own `modules.util.walk_files`. `modules.errors`,
`cache` and `hashes` (imported by network.py) are Forge's. Nothing else is replaced.

Run against Forge dfdcbab6 (2025-06-26), with huggingface_guess 84826248 (the commit Forge's launcher
clones into <forge>/repositories/huggingface_guess), on CPU in a venv with Forge's pins
transformers 4.46.1, diffusers 0.31.0, diskcache 5.6.3 and torch 2.13.0+cpu. Under transformers 5
Forge's loader cannot build its CLIP (no `modeling_utils.no_init_weights`) and its CLIP key map finds
no layer (the state dict lost its `text_model.` level), so the check refuses a different major version.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import types

import torch

from tests.models import original_layout_state_dict
from tools.host_checks.common import (EXPORTS, ROOT, TE_MULTIPLIER, UNET_MULTIPLIER, Report, check_listing,
                                      check_weights, compare_outputs, export_case, host_keys, load_file_module,
                                      read_safetensors_metadata)

KINDS = ("sd1", "sdxl", "flux")  # the models this host check builds (Forge has no SD3 Lora version)

SD1_UNET_CONFIG = {  # the tiny diffusers U-Net of tests/models.py in LDM terms, to rename its weights
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1,
}
CLIP_IGNORED = {  # what Forge's loader lets a checkpoint lack (tiny clip_l has no projection)
    "transformer.text_projection.weight", "transformer.text_model.embeddings.position_ids", "logit_scale"}


def install_stand_ins(lora_dir: str) -> None:
    """The three WebUI modules networks.py imports but load_lora_for_models does not use (see docstring)."""
    import modules

    shared = types.ModuleType("modules.shared", "stand-in: only what networks.py reads at import")
    shared.cmd_opts = types.SimpleNamespace(lora_dir=lora_dir)
    shared.opts = types.SimpleNamespace(list_hidden_files=False)
    sys.modules["modules.shared"] = modules.shared = shared
    for name in ("sd_models", "scripts"):
        module = types.ModuleType(f"modules.{name}", "stand-in: unused by load_lora_for_models")
        sys.modules[f"modules.{name}"] = module
        setattr(modules, name, module)
    modules.sd_models.read_metadata_from_safetensors = read_safetensors_metadata  # for the Lora page's listing
    import modules.util  # Forge's; it imports the stand-in shared

    shared.walk_files = modules.util.walk_files


def forge_flux(case):
    """A UnetPatcher holding the case's untouched FLUX transformer (kohya's layout is Forge's), built as
    Forge's loader and Flux engine build one: huggingface_guess's Flux config, IntegratedFluxTransformer2DModel
    under using_forge_operations, loaded strict, and the engine's PredictionFlux."""
    from huggingface_guess import model_list
    from huggingface_guess.detection import detect_unet_config

    from backend import memory_management
    from backend.modules.k_prediction import PredictionFlux
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher

    state = original_layout_state_dict(case.models)
    guess = model_list.Flux(detect_unet_config(state, ""))
    unet_config = dict(guess.unet_config)
    unet_config.pop("image_model", None)
    hidden = state["img_in.weight"].shape[0]  # huggingface_guess takes FLUX.1's sizes as given: the tiny ones
    unet_config.update(hidden_size=hidden, num_heads=hidden // state["double_blocks.0.img_attn.norm.key_norm.scale"].shape[0],
                       context_in_dim=state["txt_in.weight"].shape[1], vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
                       in_channels=state["img_in.weight"].shape[1] // 4,
                       **{depth: 1 + max(int(k.split(".")[1]) for k in state if k.startswith(blocks))
                          for depth, blocks in (("depth", "double_blocks."), ("depth_single_blocks", "single_blocks."))})
    cpu = memory_management.cpu
    with using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=False):
        unet = IntegratedFluxTransformer2DModel(**unet_config).to(device=cpu, dtype=torch.float32)
    unet.load_state_dict(state, strict=True)
    unet.config = unet_config  # as the loader does for a model without _internal_dict
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.initial_device = unet.offload_device = cpu
    predictor = PredictionFlux(seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return UnetPatcher.from_model(unet, diffusers_scheduler=None, k_predictor=predictor, config=guess)


def forge_unet(case, report: Report):
    """A UnetPatcher holding the case's untouched U-Net, built as Forge's loader builds one."""
    if case.kind == "flux":
        return forge_flux(case)
    from diffusers import EulerDiscreteScheduler
    from huggingface_guess import model_list
    from huggingface_guess.detection import detect_unet_config

    from backend import memory_management
    from backend.misc.diffusers_state_dict import unet_to_diffusers
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations
    from backend.patcher.unet import UnetPatcher

    state = {k: v.clone() for k, v in case.models.unet.state_dict().items()}
    if case.kind == "sd1":
        to_ldm = unet_to_diffusers(SD1_UNET_CONFIG)  # diffusers key -> LDM key
        unconverted = sorted(set(state) - set(to_ldm))
        if unconverted:
            report.fail(f"forge {case.kind}: no LDM key for diffusers weights {unconverted[:4]}")
        state = {to_ldm[k]: v for k, v in state.items() if k in to_ldm}
    # the config class huggingface_guess picks for a real SD1.5 / SDXL checkpoint (its `matches` rejects
    # the tiny sizes), on the tiny model's detected config: it adds the attention head layout
    guess = (model_list.SD15 if case.kind == "sd1" else model_list.SDXL)(detect_unet_config(state, ""))
    unet_config = guess.unet_config
    cpu = memory_management.cpu
    with using_forge_operations(device=cpu, dtype=torch.float32, manual_cast_enabled=False):
        unet = IntegratedUNet2DConditionModel.from_config(unet_config).to(device=cpu, dtype=torch.float32)
    unet.load_state_dict(state, strict=True)  # a wrong renaming or config fails here
    unet._internal_dict = unet_config  # as the loader does; Forge's key map reads it
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.initial_device = unet.offload_device = cpu
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return UnetPatcher.from_model(unet, diffusers_scheduler=scheduler, config=guess)  # the engines pass the guess


def forge_clip(case, report: Report):
    """Forge's CLIP object holding the case's untouched text encoders (clip_l, and clip_g for SDXL)."""
    from transformers import CLIPTextModel, modeling_utils

    from backend import memory_management
    from backend.nn.clip import IntegratedCLIP
    from backend.operations import using_forge_operations
    from backend.patcher.clip import CLIP

    names = ("clip_l", "t5xxl") if case.kind == "flux" else ("clip_l", "clip_g")[:len(case.models.text_encoders)]
    models = {}
    for name, encoder in zip(names, case.models.text_encoders):
        to_args = dict(device=memory_management.cpu, dtype=torch.float32)
        with modeling_utils.no_init_weights(), using_forge_operations(**to_args, manual_cast_enabled=True):
            if name == "t5xxl":  # as the loader builds T5EncoderModel components
                from backend.nn.t5 import IntegratedT5

                model = IntegratedT5(encoder.config.to_dict()).to(**to_args)
            else:
                model = IntegratedCLIP(CLIPTextModel, encoder.config, add_text_projection=True).to(**to_args)
        state = {f"transformer.{k}": v.clone() for k, v in encoder.state_dict().items()
                 if k != "encoder.embed_tokens.weight"}  # HF T5's tied copy of `shared`, which the loader ignores
        missing, unexpected = model.load_state_dict(state, strict=False)
        for key in sorted(set(missing + unexpected) - CLIP_IGNORED):
            report.fail(f"forge {case.kind} {name}: {'missing' if key in missing else 'unexpected'} weight {key}")
        models[name] = model
    return CLIP(model_dict=models, tokenizer_dict={})


def forge_lines(lines: list[str]) -> list[str]:
    """Forge's "[LORA]" console lines that report keys it could not place."""
    return [line for line in lines if re.search(r"mismatch|unmatched", line, re.I)
            or re.search(r"skipped [1-9]\d* keys", line)]


def transformers_pin_problem(path: str) -> str | None:
    """Forge's CLIP key map needs the state dict layout of the transformers major version Forge pins."""
    import transformers

    with open(os.path.join(path, "requirements_versions.txt")) as f:
        pins = dict(line.split("#")[0].strip().split("==") for line in f if "==" in line)
    pinned = pins.get("transformers")
    if pinned and pinned.split(".")[0] != transformers.__version__.split(".")[0]:
        return (f"Forge pins transformers=={pinned}, this Python has {transformers.__version__}: Forge's loader needs "
                "modeling_utils.no_init_weights and its CLIP key map the `text_model.` level of CLIPTextModel's "
                "state dict, both gone in transformers 5. Run in a venv with Forge's pins.")
    return None


def check(path: str, cases, report: Report) -> None:
    problem = transformers_pin_problem(path)
    if problem:
        report.fail(problem)
        return
    sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args parses the command line at import
    sys.path[:0] = [path, os.path.join(path, "repositories", "huggingface_guess"),
                    os.path.join(path, "extensions-builtin", "sd_forge_lora")]  # as launch / the script loader do
    from backend import memory_management
    from backend.patcher import lora as forge_lora

    lora_dir = tempfile.mkdtemp(prefix="forge-lora-")
    install_stand_ins(lora_dir)
    import networks  # sd_forge_lora's, as its lora_script imports it (built-in extensions load first)

    load_file_module("sara_network_forge", os.path.join(ROOT, "integrations/forge/sd-forge-sara/scripts/sara_network_forge.py"))

    built = {}
    for case in cases:
        check_listing(case, lora_dir, networks, report, f"forge {case.kind} listing")
        unet, clip = forge_unet(case, report), forge_clip(case, report)
        key_map = forge_lora.model_lora_keys_unet(unet.model, {})
        key_map = forge_lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        keys, base_unet, base_clip = host_keys(f"forge {case.kind}", case, key_map, unet.model.state_dict(),
                                               clip.cond_stage_model.state_dict(), report)

        lora = networks.load_lora_state_dict(case.path)
        for online in (False, True):
            label = f"forge {case.kind}{' online' if online else ''}"
            console = io.StringIO()
            with contextlib.redirect_stdout(console):
                patched_unet, patched_clip = networks.load_lora_for_models(
                    unet, clip, lora, UNET_MULTIPLIER, TE_MULTIPLIER, filename=case.path, online_mode=online)
                memory_management.load_models_gpu([patched_unet, patched_clip.patcher])  # what sampling and text encoding do
            lora_lines = [line for line in console.getvalue().splitlines() if line.startswith("[LORA]")]
            print("".join(f"  {label}: {line}\n" for line in lora_lines), end="")
            for line in forge_lines(lora_lines):
                report.fail(f"{label}: {line}")
            if patched_unet is unet or patched_clip is clip:
                report.fail(f"{label}: load_lora_for_models returned the unpatched model or CLIP")
            if online:
                check_online(label, case, keys, patched_unet, patched_clip, report)
            else:
                check_weights(label, case, keys, unet.model.state_dict(), clip.cond_stage_model.state_dict(),
                              base_unet, base_clip, report)
            with contextlib.redirect_stdout(io.StringIO()):
                memory_management.load_models_gpu([unet, clip.patcher])  # the unpatched objects: Forge restores
            check_weights(f"{label} restored", case, {}, unet.model.state_dict(), clip.cond_stage_model.state_dict(),
                          base_unet, base_clip, report)
            if any(hasattr(m, "forge_online_loras") for o in (unet.model, clip.cond_stage_model) for m in o.modules()):
                report.fail(f"{label} restored: a layer still has online patches")
        built[case.kind] = (case, unet, clip)
        if case.kind == "flux":  # the exports, through Forge's own LoRA loaders (our collection passes them on)
            for export in EXPORTS:
                exported = export_case(case, export, os.path.dirname(case.path))
                label = f"forge {case.kind} {export}"
                console = io.StringIO()
                with contextlib.redirect_stdout(console):
                    patched_unet, patched_clip = networks.load_lora_for_models(
                        unet, clip, networks.load_lora_state_dict(exported.path), UNET_MULTIPLIER, TE_MULTIPLIER,
                        filename=exported.path, online_mode=False)
                    memory_management.load_models_gpu([patched_unet, patched_clip.patcher])
                lora_lines = [line for line in console.getvalue().splitlines() if line.startswith("[LORA]")]
                print("".join(f"  {label}: {line}\n" for line in lora_lines), end="")
                for line in forge_lines(lora_lines):
                    report.fail(f"{label}: {line}")
                check_weights(label, exported, keys, unet.model.state_dict(), clip.cond_stage_model.state_dict(),
                              base_unet, base_clip, report, exact=EXPORTS[export][1])
                with contextlib.redirect_stdout(io.StringIO()):
                    memory_management.load_models_gpu([unet, clip.patcher])
        memory_management.unload_all_models()
    check_other_models_files(built, networks, memory_management, report)
    shutil.rmtree(lora_dir)


def check_other_models_files(built, networks, memory_management, report: Report) -> None:
    """A file for another model (a FLUX file on the SDXL model ...) through `<lora:...>`'s loader: one
    error naming both models (Forge's load_networks shows it and goes on without the file), nothing applied."""
    titles = {"sd1": "SD1/SD2", "sdxl": "SDXL", "flux": "FLUX.1"}
    pairs = [(a, b) for a in built for b in built if a != b and "sd1" not in (a, b)]
    for file_kind, model_kind in pairs:
        case, unet, clip = built[model_kind]
        before = {k: v.clone() for k, v in unet.model.state_dict().items()}
        path = built[file_kind][0].path
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                patched_unet, patched_clip = networks.load_lora_for_models(
                    unet, clip, networks.load_lora_state_dict(path), UNET_MULTIPLIER, TE_MULTIPLIER, filename=path)
                memory_management.load_models_gpu([patched_unet, patched_clip.patcher])
            report.fail(f"forge: a {file_kind} file on the {model_kind} model was not refused")
        except Exception as error:
            report.checked += 1
            wanted = f"is a {titles[file_kind]} SaRA file and does not fit this {titles[model_kind]} model"
            if wanted not in str(error):
                report.fail(f"forge: {file_kind} file on {model_kind}: {str(error)[:300]}")
        with contextlib.redirect_stdout(io.StringIO()):
            memory_management.load_models_gpu([unet, clip.patcher])
        changed = [k for k, v in unet.model.state_dict().items() if not torch.equal(v, before[k])]
        if changed:
            report.fail(f"forge: a refused {file_kind} file changed the {model_kind} model: {changed[:3]}")
        memory_management.unload_all_models()
    print(f"  forge: {len(pairs)} files for another model refused by load_lora_for_models, nothing applied")


def check_online(label, case, keys, unet, clip, report: Report) -> None:
    """Online mode leaves the weights alone and merges the patch in each layer's forward."""
    from backend import utils

    generator = torch.Generator().manual_seed(3)
    for name, key in keys.items():
        owner = unet.model if name.startswith("lora_unet_") else clip.cond_stage_model
        layer, want = utils.get_attr(owner, key.rsplit(".", 1)[0]), case.expected[name]
        if "weight" not in getattr(layer, "forge_online_loras", {}):
            report.fail(f"{label}: {key} has no online patch")
            continue
        compare_outputs(f"{label} forward {key}", layer, want, generator, report)
    print(f"  {label}: {len(keys)} layer outputs compared")
