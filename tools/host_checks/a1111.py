"""AUTOMATIC1111 (interim): the webui's network.NetworkModule (finalize_updown, te/unet multipliers)
around our module type, in merge mode and in functional (forward) mode; `modules.*` and `networks`
are stubbed, so name matching is ldm_names.a1111_module_name; an OpenCLIP q/k/v is patched on its
third of a MultiheadAttention's in_proj_weight.
"""
from __future__ import annotations

import os
import sys
import types

import torch

from sara_network import fileformat, host_patch, ldm_names

from tools.host_checks.common import ROOT, TE_MULTIPLIER, UNET_MULTIPLIER, Report, load_file_module


def check(path: str, cases, report: Report) -> None:
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

    for case in cases:
        base, expected, file_path, arch = case.base, case.expected, case.path, case.arch
        tensors, _ = fileformat.read_tensors(file_path)
        net = network.Network("sara", types.SimpleNamespace(filename=file_path))
        net.te_multiplier, net.unet_multiplier = TE_MULTIPLIER, UNET_MULTIPLIER
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
