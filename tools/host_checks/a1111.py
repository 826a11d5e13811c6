"""AUTOMATIC1111: its built-in Lora extension, unmodified, loads the native file with our module type
registered and patches the weights of real LDM / SGM module trees.

Checked against stable-diffusion-webui v1.10.1 (82a973c0) with the repositories it clones:
Stability-AI/stablediffusion cf1d67a6 (`ldm`) and Stability-AI/generative-models 45c443b3 (`sgm`).

What runs, from the checkout given with --path (nothing of it is copied here):
- extensions-builtin/Lora: networks.py, network.py, network_*.py, lora_patches.py, lyco_helpers.py,
  lora_logger.py. `list_available_networks` (NetworkOnDisk: alias, SD version, hash from the
  metadata), `LoraPatches()` as scripts/lora_script.py installs it (undone at the end),
  `assign_network_names_to_compvis_modules`, `load_networks` -> `load_network` ->
  `convert_diffusers_name_to_compvis` and its te2 / `_q_proj` fallbacks -> our ModuleTypeSara, then
  the patched Linear / Conv2d / MultiheadAttention forwards (`network_apply_weights`, its fused
  OpenCLIP q/k/v path, `network_forward` in "Lora functional" mode, restoring from the backups).
- webui modules that import without the UI: modules.errors, devices (+ npu_specific), patches,
  hashes, util (walk_files), paths_internal, models.sd3.mmdit (+ other_impls).
- the models: SD1 = ldm UNetModel + ldm FrozenCLIPEmbedder; SDXL = sgm UNetModel in sgm's
  OpenAIWrapper + sgm GeneralConditioner built from sd_xl_base.yaml's embedder list
  (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2 around an open_clip CLIP, two
  ConcatTimestepEmbedderND), holding the tiny models' weights (loaded strict).

Stand-ins (labelled below), for what needs the whole webui, a download, or a package missing here:
- modules.shared (opts, cmd_opts, sd_model), sd_models (safetensors header and load_file only),
  cache (no disk cache), scripts, sd_hijack (embedding db, comments), textual_inversion; `gradio`
  when absent (networks.py only calls gr.Warning); the sd_hijack wrappers that give each text
  encoder its `.wrapped` (all the Lora code reads); the LatentDiffusion / DiffusionWrapper shells
  (ldm.models.diffusion.ddpm needs pytorch_lightning).
- from_pretrained downloads: the CLIP embedders load the tiny CLIPTextModels from a folder they were
  saved to (tiny tokenizer vocabulary); open_clip.create_model_and_transforms returns an open_clip
  CLIP built at tiny size with the tiny HF text encoder's weights converted to OpenCLIP layout.
- package imports: `sgm/__init__.py` and `sgm/modules/diffusionmodules/__init__.py` are skipped
  (they import the training engine: pytorch_lightning, torchvision); open_clip's `__init__` is skipped
  and `torchvision.ops.misc` stood in while open_clip.model imports, when torchvision does not import
  (no CPU build matching this torch here); `kornia` and `omegaconf` when absent (unused on this path).

Checked: every module in the file is loaded onto the module A1111 chose (and
ldm_names.a1111_module_name agrees), merged weights and biases equal the expected ones exactly,
"Lora functional" outputs match (an attention as a whole), and unloading restores the base exactly.
An extra SDXL file keeps only q of te2's first attention (our zero fillers for k, v, out).
The tiny text encoders get transformers 4's `.text_model` level back (webui pins 4.30.2).

The SD1 case is rebuilt with two ResBlocks per level: A1111's diffusers->LDM name conversion assumes
SD1's block arithmetic (input_blocks 1 + 3 * level + i), which the one-block tiny U-Net lacks.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import types

import safetensors
import safetensors.torch
import torch

from sara_network import fileformat, ldm_names

from tools.host_checks import common
from tools.host_checks.common import ROOT, TE_MULTIPLIER, UNET_MULTIPLIER, Case, Report, load_file_module

KINDS = ("sd1", "sdxl")  # the models this host check builds

EXTENSION = os.path.join(ROOT, "integrations/a1111/sd-webui-sara/scripts/sara_network_a1111.py")
REPOSITORIES = ("stable-diffusion-stability-ai", "generative-models")


# ---------------------------------------------------------------------------------------------
# Stand-ins for webui infrastructure (the real modules need the whole webui: gradio, the UI,
# the settings, the checkpoint loader).
def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:  # the real parent package (webui's `modules` has no __init__), or a stand-in
        setattr(sys.modules.get(parent) or importlib.import_module(parent), child, module)
    return module


def _install_webui_stand_ins(lora_dir: str) -> types.ModuleType:
    options = dict(lora_functional=False, lora_preferred_name="Alias from file", lora_add_hashes_to_infotext=True,
                   lora_bundled_ti_to_infotext=True, lora_show_all=False, lora_hide_unknown_for_versions=[],
                   lora_in_memory_limit=0, lora_not_found_warning_console=True, lora_not_found_gradio_warning=False,
                   list_hidden_files=True, hide_ldm_prints=True)
    cmd_opts = types.SimpleNamespace(lora_dir=lora_dir, lyco_dir_backcompat=os.path.join(lora_dir, "LyCORIS"),
                                     use_ipex=False, device_id=None, use_cpu=[], disable_nan_check=True,
                                     no_half=True, no_half_vae=True, precision="full", upcast_sampling=False)
    shared = _module("modules.shared", opts=types.SimpleNamespace(**options), cmd_opts=cmd_opts, sd_model=None,
                     state=types.SimpleNamespace(interrupted=False), options_templates={})
    shared.walk_files = importlib.import_module("modules.util").walk_files  # the real one
    _module("modules.sd_models", read_metadata_from_safetensors=common.read_safetensors_metadata,
            read_state_dict=lambda filename, *args, **kwargs: safetensors.torch.load_file(filename, device="cpu"))
    _module("modules.cache", cache=lambda subsection: {}, dump_cache=lambda: None,
            cached_data_for_file=lambda subsection, title, filename, func: func())
    _module("modules.scripts")
    embedding_db = types.SimpleNamespace(word_embeddings={}, skipped_embeddings={}, expected_shape=-1,
                                         register_embedding=lambda *a: None,
                                         register_embedding_by_name=lambda *a: None)
    _module("modules.sd_hijack", model_hijack=types.SimpleNamespace(embedding_db=embedding_db, comments=[]))
    _module("modules.textual_inversion.textual_inversion")  # bundled embeddings only; a SaRA file has none
    if importlib.util.find_spec("gradio") is None:
        _module("gradio", Warning=lambda message: print(f"gradio warning: {message}"))
    return shared


class WithCustomWords(torch.nn.Module):
    """Stand-in for modules.sd_hijack_clip / sd_hijack_open_clip's wrappers: A1111 replaces each text
    encoder with one whose `.wrapped` is the ldm / sgm embedder; the Lora code names modules by it."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


class ModelShell(torch.nn.Module):
    """Stand-in for LatentDiffusion / DiffusionEngine: only the attributes networks.py reads."""


# ---------------------------------------------------------------------------------------------
# Third-party imports the host's model code needs.
def _bare_package(name: str, folder: str) -> None:
    """Registers a package without running its __init__ (which imports modules not used here)."""
    _module(name, __path__=[folder])


def _import_host_models(path: str) -> None:
    if importlib.util.find_spec("kornia") is None:  # imported by the encoders' modules, unused here
        _module("kornia")
    if importlib.util.find_spec("omegaconf") is None:  # isinstance checks on config lists only
        list_config = type("ListConfig", (list,), {})
        _module("omegaconf", __path__=[], ListConfig=list_config)
        _module("omegaconf.listconfig", ListConfig=list_config)
    try:
        import open_clip.model  # noqa: F401
    except (ImportError, RuntimeError):  # torchvision missing or not loadable: the text tower needs none
        for name in [name for name in sys.modules if name.split(".")[0] in ("open_clip", "torchvision")]:
            del sys.modules[name]
        import transformers  # decide "torchvision is absent" before the stand-in exists
        transformers.utils.is_torchvision_available()
        _bare_package("open_clip", importlib.util.find_spec("open_clip").submodule_search_locations[0])
        _bare_package("torchvision", "")
        _bare_package("torchvision.ops", "")
        _module("torchvision.ops.misc", FrozenBatchNorm2d=type("FrozenBatchNorm2d", (torch.nn.Module,), {}))
        import open_clip.model  # noqa: F401,F811
        for name in ("torchvision.ops.misc", "torchvision.ops", "torchvision"):
            del sys.modules[name]
    sgm = os.path.join(path, "repositories", "generative-models", "sgm")
    _bare_package("sgm", sgm)
    _bare_package("sgm.modules.diffusionmodules", os.path.join(sgm, "modules", "diffusionmodules"))
    importlib.import_module("sgm.modules")  # first, as sgm's own import order has it (a cycle otherwise)
    for name in ("sgm.modules.diffusionmodules.openaimodel", "sgm.modules.diffusionmodules.wrappers",
                 "ldm.modules.diffusionmodules.openaimodel", "ldm.modules.encoders.modules"):
        importlib.import_module(name)


def import_host(path: str, lora_dir: str):
    """A1111's Lora extension (networks, lora_patches) with our module type registered."""
    folder = os.path.join(path, "extensions-builtin", "Lora")
    if not os.path.isfile(os.path.join(folder, "networks.py")):
        sys.exit(f"{path}: no extensions-builtin/Lora/networks.py here (give the webui's root folder)")
    for name in REPOSITORIES:
        if not os.path.isdir(os.path.join(path, "repositories", name)):
            sys.exit(f"{path}: no repositories/{name} (the webui clones it on first launch)")
    sys.path[:0] = [folder, path] + [os.path.join(path, "repositories", name) for name in REPOSITORIES]
    shared = _install_webui_stand_ins(lora_dir)
    _import_host_models(path)
    networks = importlib.import_module("networks")
    lora_patches = importlib.import_module("lora_patches")
    networks.extra_network_lora = types.SimpleNamespace(errors={})  # set in lora_script's before_ui
    load_file_module("sara_network_a1111", EXTENSION)
    return shared, networks, lora_patches


# ---------------------------------------------------------------------------------------------
# The tiny models in A1111's module trees.
def _sd1_case(folder: str) -> Case:
    """The SD1 case with two ResBlocks per level (A1111's name conversion assumes SD1's layout);
    expected weights as common.make_case computes them."""
    from diffusers import UNet2DConditionModel
    from tests.models import random_sara_file, tiny_text_encoder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    models = types.SimpleNamespace(unet=unet, text_encoders=[tiny_text_encoder(1)], kind="sd1")
    base = copy.deepcopy(models)
    path = os.path.join(folder, "sara_tiny_sd1_two_blocks.safetensors")
    net = random_sara_file(models, path, seed=7, metadata={"ss_output_name": "tiny sd1 alias"})
    te_models, te_net = copy.deepcopy((models, net))
    net.merge_into_base(UNET_MULTIPLIER)
    te_net.merge_into_base(TE_MULTIPLIER)
    expected = {n: m for n, m in common._modules(models).items() if n.startswith("lora_unet_")}
    expected.update({n: m for n, m in common._modules(te_models).items() if not n.startswith("lora_unet_")})
    arch = ldm_names.Arch("sd1", ldm_names.UNetLayout(2, (True, False)), ldm_names.ARCHS["sd1"].text_encoders)
    return Case("sd1", base, common._modules(base), expected, path, arch)


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_key(key: str, up_with_attention: set) -> str:
    """A diffusers U-Net key of the two-level SD1 layout (two ResBlocks per level) in LDM naming:
    input_blocks 0 = conv_in, 1 + 3 * level + i, downsampler 3 + 3 * level; output_blocks
    3 * level + i, upsampler after the last (slot 2 when the block has attention)."""
    def part(kind, i, rest):
        if kind == "resnets":
            first, _, tail = rest.partition(".")
            return f"0.{_RESNET[first]}.{tail}"
        return f"1.{rest}"

    rules = (
        (r"conv_in\.(.+)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"time_embedding\.linear_(\d)\.(.+)", lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)",
         lambda m: f"input_blocks.{1 + 3 * int(m[1]) + int(m[3])}.{part(m[2], m[3], m[4])}"),
        (r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", lambda m: f"input_blocks.{3 + 3 * int(m[1])}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d)\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{part('resnets', 0, m[2])[2:]}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)",
         lambda m: f"output_blocks.{3 * int(m[1]) + int(m[3])}.{part(m[2], m[3], m[4])}"),
        (r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)",
         lambda m: f"output_blocks.{3 * int(m[1]) + 2}.{2 if int(m[1]) in up_with_attention else 1}.conv.{m[2]}"),
        (r"conv_norm_out\.(.+)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(.+)", lambda m: f"out.2.{m[1]}"),
    )
    for pattern, replace in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return replace(match)
    raise KeyError(f"{key}: no LDM name in this layout")


def _sd1_ldm_unet(diffusers_unet):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                     num_res_blocks=2, channel_mult=(1, 2), num_heads=8, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32, legacy=False)
    up_with_attention = {i for i, block in enumerate(diffusers_unet.up_blocks) if hasattr(block, "attentions")}
    state = {_ldm_key(k, up_with_attention): v for k, v in diffusers_unet.state_dict().items()}
    unet.load_state_dict(state, strict=True)
    return unet


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _open_clip_state(hf_model) -> dict:
    """An HF CLIPTextModelWithProjection's weights in open_clip's CLIP layout (q/k/v fused into
    in_proj_weight / in_proj_bias, text_projection transposed)."""
    hf = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("position_ids")}
    state = {"token_embedding.weight": hf.pop("text_model.embeddings.token_embedding.weight"),
             "positional_embedding": hf.pop("text_model.embeddings.position_embedding.weight"),
             "ln_final.weight": hf.pop("text_model.final_layer_norm.weight"),
             "ln_final.bias": hf.pop("text_model.final_layer_norm.bias"),
             "text_projection": hf.pop("text_projection.weight").t().contiguous()}
    layers = {int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers.")}
    for n in sorted(layers):
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            state[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for hf_name, oc_name in _OPEN_CLIP_LAYER.items():
                state[f"{dst}{oc_name}.{kind}"] = hf.pop(f"{src}{hf_name}.{kind}")
    if hf:
        raise KeyError(f"HF text-encoder keys without an OpenCLIP place: {sorted(hf)}")
    return state


def _open_clip_model(hf_model):
    """open_clip's CLIP at the tiny text encoder's size, holding its weights (strict load)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = hf_model.config
    text = CLIPTextCfg(context_length=config.max_position_embeddings, vocab_size=config.vocab_size,
                       width=config.hidden_size, heads=config.num_attention_heads, layers=config.num_hidden_layers,
                       mlp_ratio=config.intermediate_size / config.hidden_size)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=8, patch_size=4, image_size=8)
    model = CLIP(config.projection_dim, vision, text, quick_gelu=True)
    state = _open_clip_state(hf_model)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("visual.") or k == "logit_scale"})
    model.load_state_dict(state, strict=True)
    return model


def _save_text_encoder(model, folder: str) -> str:
    """A from_pretrained folder: the tiny model and a tiny tokenizer vocabulary."""
    model.save_pretrained(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as file:
        json.dump({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}, file)
    with open(os.path.join(folder, "merges.txt"), "w") as file:
        file.write("#version: 0.2\n")
    return folder


class TextModelNesting(torch.nn.Module):
    """transformers 5's CLIPTextModel has no `.text_model` level; 4.30.2, which webui v1.10.1 pins,
    names its layers `transformer.text_model.encoder...`: this restores that level around it."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


def _nest_text_model(embedder):
    if not hasattr(embedder.transformer, "text_model"):
        embedder.transformer = TextModelNesting(embedder.transformer)
    return embedder


def build_sd_model(case: Case, folder: str):
    """An A1111-shaped sd_model around the ldm (SD1) or sgm (SDXL) classes, with copies of the
    case's untouched weights."""
    models = copy.deepcopy(case.models)
    sd_model = ModelShell()
    sd_model.is_sdxl = case.kind == "sdxl"
    sd_model.is_sd1, sd_model.is_sd2, sd_model.is_sd3, sd_model.is_ssd = not sd_model.is_sdxl, False, False, False
    sd_model.model = ModelShell()
    if case.kind == "sd1":
        from ldm.modules.encoders.modules import FrozenCLIPEmbedder

        sd_model.model.diffusion_model = _sd1_ldm_unet(models.unet)
        version = _save_text_encoder(models.text_encoders[0], os.path.join(folder, "sd1_te"))
        embedder = _nest_text_model(FrozenCLIPEmbedder(version=version, device="cpu"))
        sd_model.cond_stage_model = WithCustomWords(embedder)
        return sd_model

    import open_clip
    from sgm.modules import GeneralConditioner
    from sgm.modules.diffusionmodules.openaimodel import UNetModel
    from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper

    unet = UNetModel(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
                     channel_mult=(1, 2), num_head_channels=8, use_spatial_transformer=True, transformer_depth=1, context_dim=32,
                     use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=48,
                     spatial_transformer_attn_type="softmax", legacy=False, use_checkpoint=False)
    unet.load_state_dict(models.unet.state_dict(), strict=True)
    sd_model.model = OpenAIWrapper(unet)
    te1, te2 = models.text_encoders
    version = _save_text_encoder(te1, os.path.join(folder, "sdxl_te1"))
    previous = getattr(open_clip, "create_model_and_transforms", None)
    open_clip.create_model_and_transforms = lambda arch, device, pretrained: (_open_clip_model(te2), None, None)
    try:
        conditioner = GeneralConditioner([  # sd_xl_base.yaml's embedders
            {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder", "is_trainable": False, "input_key": "txt",
             "params": {"version": version, "device": "cpu", "layer": "hidden", "layer_idx": 11}},
            {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2", "is_trainable": False, "input_key": "txt",
             "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "device": "cpu", "freeze": True,
                        "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
            *({"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "is_trainable": False,
               "input_key": key, "params": {"outdim": 256}} for key in ("original_size_as_tuple", "crop_coords_top_left")),
        ])
    finally:
        if previous is None:
            del open_clip.create_model_and_transforms
        else:
            open_clip.create_model_and_transforms = previous
    for i, embedder in enumerate(conditioner.embedders):  # what sd_hijack does to the text encoders
        if hasattr(embedder, "transformer"):
            conditioner.embedders[i] = WithCustomWords(_nest_text_model(embedder))
        elif hasattr(embedder, "model"):
            conditioner.embedders[i] = WithCustomWords(embedder)
    sd_model.conditioner = conditioner
    return sd_model


# ---------------------------------------------------------------------------------------------
# The check.
class _NetworkLog(logging.Handler):
    """networks.py reports unmatched keys and failed patches with logging.debug only."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        if record.module in ("networks", "network"):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _network_log():
    root, handler = logging.getLogger(), _NetworkLog()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _input(layer, generator):
    if isinstance(layer, torch.nn.MultiheadAttention):
        return torch.randn(2, 3, layer.embed_dim, generator=generator)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=generator)
    return torch.randn(2, layer.in_features, generator=generator)


def _forward(layer, x):
    """The layer's forward as the model calls it (A1111's patched forward runs inside)."""
    with torch.no_grad():
        if isinstance(layer, torch.nn.MultiheadAttention):
            return layer(x, x, x, need_weights=False)[0]
        return layer(x)


def _part(layer, kohya: str):
    """(weight, bias) of the kohya module in A1111's layer: a third of a fused OpenCLIP in_proj."""
    if isinstance(layer, torch.nn.MultiheadAttention):
        index = "qkv".index(re.search(r"_([qkv])_proj$", kohya)[1])
        bias = None if layer.in_proj_bias is None else layer.in_proj_bias.chunk(3)[index]
        return layer.in_proj_weight.chunk(3)[index], bias
    return layer.weight, layer.bias


def _compare(report: Report, label: str, layer, kohya: str, want) -> None:
    weight, bias = _part(layer, kohya)
    report.compare(f"{label} {kohya}", weight, want.weight)
    if want.bias is not None:
        report.compare(f"{label} {kohya} bias", bias, want.bias)


def _load(networks, names, report: Report, label: str):
    with _network_log() as log:
        networks.load_networks(names, te_multipliers=[TE_MULTIPLIER] * len(names),
                               unet_multipliers=[UNET_MULTIPLIER] * len(names), dyn_dims=[None] * len(names))
    for message in log:
        report.fail(f"{label}: A1111 logged: {message[:300]}")
    if len(networks.loaded_networks) != len(names):
        report.fail(f"{label}: load_networks({names}) loaded {len(networks.loaded_networks)} networks")
        return None
    return networks.loaded_networks[0] if names else None


def _run_layers(layers, report: Report, label: str, networks, generator):
    with _network_log() as log:
        for layer in layers:
            _forward(layer, _input(layer, generator))
    for message in log:
        report.fail(f"{label}: A1111 logged: {message[:300]}")
    errors = networks.extra_network_lora.errors
    if errors:
        report.fail(f"{label}: A1111 counted patch errors {dict(errors)}")
        errors.clear()


def _partial_attention_case(case: Case, folder: str) -> Case:
    """The SDXL file without k, v and out of te2's first attention: A1111 patches a fused attention
    only when it has all four parts, so our module type must fill the absent ones with zeros."""
    tensors = safetensors.torch.load_file(case.path)
    with safetensors.safe_open(case.path, "pt") as file:
        metadata = {**file.metadata(), "ss_output_name": "tiny sdxl, q only in te2 attention 0"}
    prefix = "lora_te2_text_model_encoder_layers_0_self_attn_"
    kept = {k: v for k, v in tensors.items() if not k.startswith(tuple(prefix + p for p in ("k_", "v_", "out_")))}
    path = os.path.join(folder, "sara_tiny_sdxl_q_only.safetensors")
    fileformat.save_tensors(path, kept, metadata)  # with the sshs_model_hash of this file's data
    return dataclasses.replace(case, path=path)


def check_case(case: Case, folder: str, lora_dir: str, shared, networks, report: Report, label: str = "") -> None:
    generator = torch.Generator().manual_seed(3)
    label = f"a1111 {label or case.kind}"
    shared.sd_model = build_sd_model(case, os.path.join(folder, label.replace(" ", "_")))
    shared.opts.lora_functional = False
    networks.assign_network_names_to_compvis_modules(shared.sd_model)  # lora_script's on_model_loaded
    mapping = shared.sd_model.network_layer_mapping
    on_disk = common.check_listing(case, lora_dir, networks, report, label)
    if on_disk is None:
        return
    net = _load(networks, [on_disk.alias], report, f"{label} load")
    if net is None:
        return

    # which module A1111 attached to each of the file's modules (skipping the zero fillers our
    # module type adds for the q/k/v/out parts of an OpenCLIP attention that a file lacks)
    owners = {}
    for key, module in net.modules.items():
        kohya = module.network_key.split(".", 1)[0]
        if module.delta.name == kohya:
            owners[kohya] = (key, module)
    with safetensors.safe_open(case.path, "pt") as file:
        in_file = {key.split(".", 1)[0] for key in file.keys()}
    for kohya in sorted(in_file - set(owners)):
        report.fail(f"{label}: {kohya} was not loaded (A1111 found no module for it)")
    for kohya, (key, module) in sorted(owners.items()):
        ours = ldm_names.a1111_module_name(kohya, case.arch)
        if mapping.get(ours) is not module.sd_module:
            report.fail(f"{label}: ldm_names.a1111_module_name({kohya}) = {ours}; A1111 chose {key}")

    # the layers whose forward patches them: an OpenCLIP out_proj is patched by its attention
    layers = {}
    for key, module in owners.values():
        layer = module.sd_module
        parent = mapping.get(key[:-len("_out_proj")]) if key.endswith("_out_proj") else None
        layer = parent if isinstance(parent, torch.nn.MultiheadAttention) else layer
        layers[id(layer)] = layer
    layers = list(layers.values())
    attentions = [layer for layer in layers if isinstance(layer, torch.nn.MultiheadAttention)]

    # merge mode: the weights themselves become base + multiplier * delta
    _run_layers(layers, report, f"{label} merge", networks, generator)
    for kohya, (_, module) in sorted(owners.items()):
        _compare(report, f"{label} merge", module.sd_module, kohya, case.expected[kohya])
    _load(networks, [], report, f"{label} unload")
    _run_layers(layers, report, f"{label} restore", networks, generator)
    for kohya, (_, module) in sorted(owners.items()):
        _compare(report, f"{label} restore", module.sd_module, kohya, case.base[kohya])

    # functional mode: Linear / Conv2d add the delta's output next to the layer's; an attention
    # (no functional path in A1111) is merged again and compared as a whole against the expected
    references = {}
    for attention in attentions:
        reference = copy.deepcopy(attention)
        for name in [name for name in vars(reference) if name.startswith(("network_", "sara_"))]:
            delattr(reference, name)  # a plain attention: A1111's patched forward leaves it alone
        for kohya, (key, module) in owners.items():
            with torch.no_grad():
                if module.sd_module is attention:
                    weight, bias = _part(reference, kohya)
                    weight.copy_(case.expected[kohya].weight)
                    bias.copy_(case.expected[kohya].bias)
                elif key.endswith("_out_proj") and mapping.get(key[:-len("_out_proj")]) is attention:
                    reference.out_proj.load_state_dict(case.expected[kohya].state_dict())
        references[id(attention)] = reference
    shared.opts.lora_functional = True
    try:
        if _load(networks, [on_disk.alias], report, f"{label} functional load") is None:
            return
        with _network_log() as log:
            for kohya, (key, module) in sorted(owners.items()):
                layer = module.sd_module
                if isinstance(layer, torch.nn.MultiheadAttention) or any(layer is a.out_proj for a in attentions):
                    continue
                x = _input(layer, generator)
                report.compare(f"{label} functional {kohya}", _forward(layer, x),
                               _forward(case.expected[kohya], x), exact=False)
            for attention in attentions:
                x = _input(attention, generator)
                report.compare(f"{label} functional attention {attention.network_layer_name}",
                               _forward(attention, x), _forward(references[id(attention)], x), exact=False)
        for message in log:
            report.fail(f"{label} functional: A1111 logged: {message[:300]}")
        _load(networks, [], report, f"{label} functional unload")
        _run_layers(layers, report, f"{label} functional restore", networks, generator)
    finally:
        shared.opts.lora_functional = False
    for kohya, (_, module) in sorted(owners.items()):
        _compare(report, f"{label} final", module.sd_module, kohya, case.base[kohya])


def check(path: str, cases, report: Report) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        lora_dir = os.path.join(folder, "models", "Lora")
        shared, networks, lora_patches = import_host(path, lora_dir)
        networks.originals = lora_patches.LoraPatches()  # what scripts/lora_script.py does on load
        try:
            for case in cases:
                if case.kind == "sd1":
                    case = _sd1_case(folder)
                check_case(case, folder, lora_dir, shared, networks, report)
                if case.kind == "sdxl":
                    partial = _partial_attention_case(case, folder)
                    check_case(partial, folder, lora_dir, shared, networks, report, "sdxl q-only attention")
        finally:
            networks.originals.undo()  # lora_script's unload()
