"""Run our UI extension inside a host's own loader code, on tiny random SD1 and SDXL models (CPU).

    python tools/check_in_host.py --host a1111   --path ~/stable-diffusion-webui
    python tools/check_in_host.py --host forge   --path ~/stable-diffusion-webui-forge
    python tools/check_in_host.py --host comfyui --path ~/ComfyUI

It trains nothing: a SaRA network gets random deltas and is saved as a native file; its own
merge_into_base gives the expected weights. Then the host's code loads the file with our extension
registered and patches copies of the base weights:
  a1111   the webui's network.NetworkModule (finalize_updown, te/unet multipliers) around our module
          type, in merge mode and in functional (forward) mode; `modules.*` and `networks` are
          stubbed because they need the whole webui, so name matching is ldm_names.a1111_module_name;
          an OpenCLIP q/k/v is patched on its third of a MultiheadAttention's in_proj_weight.
  forge   backend.patcher.lora.load_lora (our collection first, Forge's own after it) and
          merge_lora_to_weight with our extra_weight_calculators entry.
  comfyui comfy.lora.load_lora with our adapter in comfy.weight_adapter.adapters, and
          comfy.lora.calculate_weight.
Forge's and ComfyUI's key maps come from their model objects, which need real checkpoints; the same
maps are built here with ldm_names.comfy_key (checked in CI against diffusers' converters).
Exit status 0 when every patched weight equals base + multiplier * delta.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sara_network  # noqa: E402
from sara_network import fileformat, host_patch, ldm_names  # noqa: E402
from sara_network.naming import text_encoder_prefixes  # noqa: E402
from sara_network.network import all_targets  # noqa: E402
from tests.models import tiny_sd1, tiny_sdxl  # noqa: E402

MULTIPLIER = 0.7
TINY_SD1 = ldm_names.Arch("sd1", ldm_names.UNetLayout(1, (True, False)), ldm_names.ARCHS["sd1"].text_encoders)


def load_file_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_case(kind: str, folder: str):
    """(base modules by name, expected modules by name, native file path, arch) for one tiny model."""
    models = tiny_sd1() if kind == "sd1" else tiny_sdxl()
    base = copy.deepcopy(models)
    te = models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]
    net = sara_network.create_network(1.0, None, None, None, te, models.unet, density="0.05", include_bias="true")
    net.apply_to(te, models.unet, True, True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in net.trainable_parameters():
            parameter.copy_((torch.randn(parameter.shape, generator=generator) * 0.1).half().float())
    path = os.path.join(folder, f"{kind}.safetensors")
    net.save(path, torch.float16, {"ss_base_model_version": "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1"})
    net.merge_into_base(MULTIPLIER)

    def modules(m):
        prefixes = text_encoder_prefixes(m.text_encoders)
        return {t.name: t.module for t in all_targets(m.unet, m.text_encoders, prefixes)}

    return modules(base), modules(models), path, (TINY_SD1 if kind == "sd1" else "sdxl")


class Report:
    def __init__(self):
        self.checked = self.failed = 0

    def compare(self, label: str, got: torch.Tensor, expected: torch.Tensor, exact: bool = True) -> None:
        self.checked += 1
        same = torch.equal(got, expected) if exact else torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        if not same:
            self.failed += 1
            print(f"  MISMATCH {label}: max |diff| {float((got - expected).abs().max()):.3g}")


# ---------------------------------------------------------------------------------------------
def check_a1111(path: str, cases, report: Report) -> None:
    folder = next((p for p in (os.path.join(path, "extensions-builtin", "Lora"), path)
                   if os.path.isfile(os.path.join(p, "network.py"))), None)
    if folder is None:
        sys.exit(f"{path}: no extensions-builtin/Lora/network.py (or network.py) here")
    for name in ("modules", "modules.sd_models", "modules.cache", "modules.errors", "modules.hashes",
                 "modules.shared", "modules.models", "modules.models.sd3", "modules.models.sd3.mmdit"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (torch.nn.Linear,), {})
    for name in ("sd_models", "cache", "errors", "hashes", "shared"):
        setattr(sys.modules["modules"], name, sys.modules[f"modules.{name}"])
    sys.modules["modules"].models = sys.modules["modules.models"]
    sys.modules["modules.models"].sd3 = sys.modules["modules.models.sd3"]
    sys.modules["modules.models.sd3"].mmdit = sys.modules["modules.models.sd3.mmdit"]
    sys.modules["networks"] = types.SimpleNamespace(module_types=[])
    network = load_file_module("network", os.path.join(folder, "network.py"))
    load_file_module("sara_network_a1111", os.path.join(ROOT, "integrations/a1111/sd-webui-sara/scripts/sara_network_a1111.py"))
    module_type = sys.modules["networks"].module_types[0]

    for base, expected, file_path, arch in cases:
        tensors, _ = fileformat.read_tensors(file_path)
        net = network.Network("sara", types.SimpleNamespace(filename=file_path))
        net.te_multiplier = net.unet_multiplier = MULTIPLIER
        attention = {}  # A1111 name of a fused OpenCLIP attention -> {part: (module, expected)}
        for name in host_patch.module_names(tensors):
            sd_key = ldm_names.a1111_module_name(name, arch)
            parts = {key.split(".", 1)[1]: tensors[key] for key in host_patch.module_keys(tensors, name)}
            if ldm_names.checkpoint_key(name, arch).chunk is not None:  # q/k/v: A1111 keys it <attn>_q_proj
                sd_key = f"{sd_key}_{name.rsplit('_', 2)[-2]}_proj"
            weights = network.NetworkWeights(network_key=f"{name}.sara_values", sd_key=sd_key, w=parts,
                                             sd_module=base[name])
            module = module_type.create_module(net, weights)
            net.modules[sd_key] = module
            if ldm_names.a1111_attention_siblings(sd_key):
                attention.setdefault(sd_key.rsplit("_", 2)[0], {})[sd_key.rsplit("_", 2)[1]] = (base[name], name)
                continue
            layer, want = base[name], expected[name]
            updown, ex_bias = module.calc_updown(layer.weight.detach())
            report.compare(f"a1111 merge {name}", (layer.weight.detach().to(updown.dtype) + updown), want.weight)
            if ex_bias is not None:
                report.compare(f"a1111 merge {name} bias", layer.bias.detach() + ex_bias, want.bias)
            x = torch.randn(2, *((layer.in_channels, 4, 4) if isinstance(layer, torch.nn.Conv2d)
                                 else (layer.in_features,)))
            with torch.no_grad():
                report.compare(f"a1111 forward {name}", module.forward(x, layer(x)), want(x), exact=False)
        for attn, parts in attention.items():  # every present part must have got its siblings filled
            for part in ("q", "k", "v", "out"):
                filler = net.modules[f"{attn}_{part}_proj"]
                layer, name = parts.get(part, (None, None))
                if layer is None:
                    updown, _ = filler.calc_updown(torch.zeros(filler.shape))
                    report.compare(f"a1111 filler {attn}_{part}_proj", updown, torch.zeros_like(updown))
                    continue
                updown, _ = filler.calc_updown(layer.weight.detach())
                report.compare(f"a1111 attention {name}", layer.weight.detach() + updown, expected[name].weight)


def check_forge(path: str, cases, report: Report) -> None:
    sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args parses the command line at import
    sys.path.insert(0, path)
    from backend.patcher import lora as forge_lora

    load_file_module("sara_network_forge", os.path.join(ROOT, "integrations/forge/sd-forge-sara/scripts/sara_network_forge.py"))
    for base, expected, file_path, arch in cases:
        tensors, _ = fileformat.read_tensors(file_path)
        key_map = {name: ldm_names.comfy_key(name, arch) for name in base}
        patches, remaining = forge_lora.load_lora(tensors, key_map)
        if remaining:
            report.failed += 1
            print(f"  forge left {len(remaining)} keys unconsumed: {list(remaining)[:4]}")
        check_patches("forge", patches, base, expected, key_map, report,
                      lambda patch, weight, key: forge_lora.merge_lora_to_weight(
                          [[MULTIPLIER, patch, 1.0, None, None]], weight, key))


def check_comfyui(path: str, cases, report: Report) -> None:
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy.cli_args parses the command line at import
    sys.path.insert(0, path)
    import comfy.lora

    load_file_module("comfyui_sara", os.path.join(ROOT, "integrations/comfyui/comfyui-sara/__init__.py"))
    for base, expected, file_path, arch in cases:
        tensors, _ = fileformat.read_tensors(file_path)
        key_map = {name: ldm_names.comfy_key(name, arch) for name in base}
        patches = comfy.lora.load_lora(tensors, key_map)
        check_patches("comfyui", patches, base, expected, key_map, report,
                      lambda patch, weight, key: comfy.lora.calculate_weight(
                          [(MULTIPLIER, patch, 1.0, None, None)], weight, key))


def check_patches(host, patches, base, expected, key_map, report, merge) -> None:
    owner = {key: name for name, key in key_map.items()}
    print(f"  {host}: {len(patches)} patches")
    for key, patch in patches.items():
        is_bias = key.endswith(".bias")
        name = owner[key[:-len(".bias")] + ".weight" if is_bias else key]
        weight = (base[name].bias if is_bias else base[name].weight).detach().clone()
        want = expected[name].bias if is_bias else expected[name].weight
        report.compare(f"{host} {key}", merge(patch, weight, key), want)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", choices=("a1111", "forge", "comfyui"), required=True)
    parser.add_argument("--path", required=True, help="the host's checkout (its root folder)")
    args = parser.parse_args(argv)
    report = Report()
    with tempfile.TemporaryDirectory() as folder:
        cases = [make_case(kind, folder) for kind in ("sd1", "sdxl")]
        {"a1111": check_a1111, "forge": check_forge, "comfyui": check_comfyui}[args.host](
            os.path.abspath(args.path), cases, report)
    print(f"{args.host}: {report.checked} weights checked, {report.failed} mismatches")
    return 1 if report.failed or not report.checked else 0


if __name__ == "__main__":
    sys.exit(main())
