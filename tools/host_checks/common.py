"""What every host check shares: the tiny models, the native files, the expected weights, the report.

A case is one tiny model (SD1-style with diffusers names, SDXL-style with LDM names, or a FLUX.1 /
SD3.5-Medium-style transformer in kohya's layout, see tests/models.py) with a SaRA network of random
deltas saved as a native file. The expected weights come from the network itself
(`SaraNetwork.merge_into_base`), never from the host glue or `host_patch`: U-Net modules at
UNET_MULTIPLIER, text-encoder modules at TE_MULTIPLIER, as the UIs' separate multipliers do.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sara_network import ldm_names  # noqa: E402
from sara_network.naming import text_encoder_prefixes  # noqa: E402
from sara_network.network import all_targets  # noqa: E402
from tests.models import random_sara_file, tiny_flux, tiny_sd1, tiny_sd3, tiny_sdxl  # noqa: E402

UNET_MULTIPLIER = 0.7
TE_MULTIPLIER = 0.4
TINY_SD1 = ldm_names.Arch("sd1", ldm_names.UNetLayout(1, (True, False)), ldm_names.ARCHS["sd1"].text_encoders)


@dataclasses.dataclass
class Case:
    kind: str              # "sd1", "sdxl", "flux" or "sd3"
    models: object         # the untouched tiny models (unet, text_encoders)
    base: dict             # kohya module name -> untouched module
    expected: dict         # kohya module name -> module with base + multiplier * delta merged
    path: str              # the native SaRA file
    arch: object           # ldm_names architecture of the tiny model

    def multiplier(self, name: str) -> float:
        return UNET_MULTIPLIER if name.startswith("lora_unet_") else TE_MULTIPLIER


def load_file_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _modules(models) -> dict:
    prefixes = text_encoder_prefixes(models.text_encoders)
    return {t.name: t.module for t in all_targets(models.unet, models.text_encoders, prefixes)}


def make_case(kind: str, folder: str) -> Case:
    builders = {"sd1": tiny_sd1, "sdxl": lambda: tiny_sdxl(text_layers=3),  # SDXL hosts read the penultimate layer
                "flux": tiny_flux, "sd3": tiny_sd3}
    models = builders[kind]()
    base = copy.deepcopy(models)
    path = os.path.join(folder, f"sara_tiny_{kind}.safetensors")
    net = random_sara_file(models, path, seed=7, metadata={"ss_output_name": f"tiny {kind} alias"})
    te_models, te_net = copy.deepcopy((models, net))  # the same network on a second copy of the model
    net.merge_into_base(UNET_MULTIPLIER)
    te_net.merge_into_base(TE_MULTIPLIER)
    expected = {name: module for name, module in _modules(models).items() if name.startswith("lora_unet_")}
    expected.update({name: module for name, module in _modules(te_models).items() if not name.startswith("lora_unet_")})
    return Case(kind, base, _modules(base), expected, path, TINY_SD1 if kind == "sd1" else kind)


class Report:
    def __init__(self):
        self.checked = self.failed = 0

    def fail(self, message: str) -> None:
        self.failed += 1
        print(f"  FAIL {message}")

    def compare(self, label: str, got: torch.Tensor, expected: torch.Tensor, exact: bool = True) -> None:
        self.checked += 1
        got, expected = got.detach(), expected.detach()
        same = got.shape == expected.shape and (
            torch.equal(got, expected) if exact else torch.allclose(got, expected, atol=1e-5, rtol=1e-4))
        if not same:
            self.failed += 1
            diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("nan")
            print(f"  MISMATCH {label}: shapes {tuple(got.shape)} / {tuple(expected.shape)}, max |diff| {diff:.3g}")


def check_weights(label, case, keys, unet_state, clip_state, base_unet, base_clip, report: Report,
                  exact: bool = True) -> None:
    """Patched modules equal the expected weights (and biases; to fp32 rounding unless `exact`); every
    other tensor equals the base."""
    expected = {}
    for name, key in keys.items():
        expected[key] = case.expected[name].weight
        if case.expected[name].bias is not None:
            expected[key[:-len("weight")] + "bias"] = case.expected[name].bias
    patched = sum(1 for key in expected if not torch.equal(expected[key].detach(), (base_unet | base_clip)[key]))
    for state, base in ((unet_state, base_unet), (clip_state, base_clip)):
        changed = [key for key in base if key not in expected and not torch.equal(state[key], base[key])]
        if changed:
            report.fail(f"{label}: {len(changed)} weights changed that the file does not patch: {changed[:4]}")
        for key in expected.keys() & base.keys():
            report.compare(f"{label} {key}", state[key], expected[key], exact)
    if keys:
        print(f"  {label}: {len(expected)} tensors compared ({patched} changed by the file)")


def compare_outputs(label: str, layer, expected_layer, generator, report: Report) -> None:
    """A host layer patched at run time gives the expected layer's output on a random input."""
    shape = ((2, expected_layer.in_channels, 4, 4) if isinstance(expected_layer, torch.nn.Conv2d)
             else (2, expected_layer.in_features))
    x = torch.randn(shape, generator=generator)
    with torch.no_grad():
        report.compare(label, layer(x), expected_layer(x), exact=False)


def host_keys(label: str, case: Case, key_map: dict, unet_state: dict, clip_state: dict, report: Report):
    """({kohya name: host weight key} for every SaRA module in the file, from the host's own key map,
    host U-Net tensors, host text-encoder tensors). Each key must be the one ldm_names.comfy_key
    predicts and must hold our base weight."""
    with safe_open(case.path, "pt") as f:
        names = sorted(k[:-len(".sara_values")] for k in f.keys() if k.endswith(".sara_values"))
    keys = {}
    for name in names:
        key = key_map.get(name)
        if key is None:
            report.fail(f"{label}: the host's key map has no {name}")
            continue
        if key != ldm_names.comfy_key(name, case.arch):
            report.fail(f"{label}: {name} -> host {key}, ldm_names {ldm_names.comfy_key(name, case.arch)}")
        keys[name] = key
    base_unet = {k: v.clone() for k, v in unet_state.items()}
    base_clip = {k: v.clone() for k, v in clip_state.items()}
    for name, key in keys.items():
        report.compare(f"{label} base {key}", (base_unet | base_clip)[key], case.base[name].weight.detach())
    print(f"  {label}: {len(keys)} of {len(names)} SaRA modules found in the host's key map")
    return keys, base_unet, base_clip


def read_safetensors_metadata(filename: str) -> dict:
    """What the webuis' sd_models.read_metadata_from_safetensors returns: the header's __metadata__
    (a stand-in: the real module needs the whole webui)."""
    with safe_open(filename, "pt") as file:
        metadata = dict(file.metadata() or {})
    for key, value in metadata.items():
        if value[:1] == "{":
            with contextlib.suppress(ValueError):
                metadata[key] = json.loads(value)
    return metadata


def check_listing(case: Case, lora_dir: str, networks, report: Report, label: str):
    """The file as the A1111 / Forge Lora page lists it (their networks.list_available_networks):
    alias, SD version and hash from the metadata. Returns the NetworkOnDisk, or None."""
    for old in os.listdir(lora_dir):
        if old.endswith(".safetensors"):
            os.remove(os.path.join(lora_dir, old))
    name = os.path.splitext(os.path.basename(case.path))[0]
    shutil.copy(case.path, os.path.join(lora_dir, name + ".safetensors"))
    networks.list_available_networks()
    on_disk = networks.available_networks.get(name)
    if on_disk is None:
        report.fail(f"{label}: list_available_networks did not list {name}")
        return None
    with safe_open(case.path, "pt") as file:
        metadata = file.metadata()
    from modules import hashes  # the host's: what it would show for a file without sshs_model_hash

    with open(case.path, "rb") as file:
        own_hash = hashes.addnet_hash_safetensors(file)
    version = {"sd1": "SD1", "sdxl": "SDXL", "flux": "Flux"}[case.kind]
    for what, got, want in (("alias", on_disk.alias, metadata["ss_output_name"]),
                            ("sd_version", on_disk.sd_version.name, version),
                            ("shorthash", on_disk.shorthash, metadata["sshs_model_hash"][:12]),
                            ("hash (the webui's own addnet hash of the file)", on_disk.hash, own_hash),
                            ("alias lookup", networks.available_network_aliases.get(on_disk.alias), on_disk)):
        if got != want:
            report.fail(f"{label}: NetworkOnDisk {what} is {got!r}, expected {want!r}")
    return on_disk


# the exports a UI loads instead of the native file: (sara command line after input and output, exact,
# carries bias deltas, kohya prefixes it leaves out). Full-rank fp32 LoRAs: equal to fp32 rounding.
EXPORTS = {
    "to-diff": (["to-diff", "--dtype", "fp32"], True, True, ()),
    "to-lora": (["to-lora", "--rank", "4096", "--svd", "exact", "--dtype", "fp32", "--show", "0"], False, False, ()),
    "to-lora --format diffusers": (["to-lora", "--rank", "4096", "--svd", "exact", "--dtype", "fp32", "--show", "0", "--format",
                                    "diffusers"], False, False, ("lora_te3_",)),  # FLUX.1 / SD3 only; no T5
}


def export_case(case: Case, export: str, folder: str) -> Case:
    """The case with its native file exported by the `sara` command line, and the weights that export
    must give (a LoRA drops bias deltas; diffusers' format leaves T5 out)."""
    from sara_network import cli

    command, _, keeps_bias, left_out = EXPORTS[export]
    path = os.path.join(folder, f"sara_tiny_{case.kind}_{export.replace(' ', '_').replace('-', '')}.safetensors")
    if cli.main([command[0], case.path, path, *command[1:], "-q", "--overwrite"]) != 0:
        raise RuntimeError(f"sara {' '.join(command)} failed on {case.path}")
    expected = {}
    for name, module in case.expected.items():
        if name.startswith(left_out):
            expected[name] = case.base[name]
        elif keeps_bias or module.bias is None:
            expected[name] = module
        else:
            expected[name] = copy.deepcopy(module)
            expected[name].bias = case.base[name].bias
    return dataclasses.replace(case, path=path, expected=expected)
