"""Forge: backend.patcher.lora.load_lora (our collection first, Forge's own after it) and
merge_lora_to_weight with our extra_weight_calculators entry.

Forge's key map comes from its model objects, which need real checkpoints; the same map is built
here with ldm_names.comfy_key (checked in CI against diffusers' converters).
"""
from __future__ import annotations

import os
import sys

from sara_network import fileformat, ldm_names

from tools.host_checks.common import ROOT, Report, load_file_module


def check(path: str, cases, report: Report) -> None:
    sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args parses the command line at import
    sys.path.insert(0, path)
    from backend.patcher import lora as forge_lora

    load_file_module("sara_network_forge", os.path.join(ROOT, "integrations/forge/sd-forge-sara/scripts/sara_network_forge.py"))
    for case in cases:
        tensors, _ = fileformat.read_tensors(case.path)
        key_map = {name: ldm_names.comfy_key(name, case.arch) for name in case.base}
        patches, remaining = forge_lora.load_lora(tensors, key_map)
        if remaining:
            report.fail(f"forge left {len(remaining)} keys unconsumed: {list(remaining)[:4]}")
        owner = {key: name for name, key in key_map.items()}
        print(f"  forge {case.kind}: {len(patches)} patches")
        for key, patch in patches.items():
            is_bias = key.endswith(".bias")
            name = owner[key[:-len(".bias")] + ".weight" if is_bias else key]
            weight = (case.base[name].bias if is_bias else case.base[name].weight).detach().clone()
            want = case.expected[name].bias if is_bias else case.expected[name].weight
            merged = forge_lora.merge_lora_to_weight([[case.multiplier(name), patch, 1.0, None, None]], weight, key)
            report.compare(f"forge {key}", merged, want)
