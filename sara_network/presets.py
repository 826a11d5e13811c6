"""Target presets: which Linear / Conv2d modules of the U-Net and text encoders SaRA may touch.

A preset is a built-in name or a .toml file (format: docs/presets.md):

    [unet]
    include = ["*"]            # fnmatch patterns on the module path, e.g. "*attn*"
    exclude = []
    [text_encoder]
    include = ["*"]
    exclude = ["*text_projection"]

Patterns match the dotted module path inside its model (`down_blocks.0.attentions.0.proj_in`,
`input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `text_model.encoder.layers.0.mlp.fc1`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os

import toml

ATTENTION = ["*attn*", "*Attention*"]
MLP = ["*.ff.*", "*mlp*", "*DenseReluDense*"]


@dataclasses.dataclass(frozen=True)
class TargetRules:
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def matches(self, module_path: str) -> bool:
        return (any(fnmatch.fnmatchcase(module_path, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(module_path, p) for p in self.exclude))


@dataclasses.dataclass(frozen=True)
class Preset:
    unet: TargetRules
    text_encoder: TargetRules


NO_TEXT_ENCODER_PROJECTION = ("*text_projection",)

BUILTIN_PRESETS = {
    "full": Preset(TargetRules(), TargetRules(exclude=NO_TEXT_ENCODER_PROJECTION)),
    "attn-only": Preset(TargetRules(tuple(ATTENTION)), TargetRules(tuple(ATTENTION))),
    "attn-mlp": Preset(TargetRules(tuple(ATTENTION + MLP)), TargetRules(tuple(ATTENTION + MLP))),
    "unet-transformer-only": Preset(TargetRules(("*transformer_blocks*", "*proj_in", "*proj_out")),
                                    TargetRules(include=())),
}


class PresetError(ValueError):
    pass


def _rules(table: dict, where: str) -> TargetRules:
    unknown = set(table) - {"include", "exclude"}
    if unknown:
        raise PresetError(f"{where}: unknown keys {sorted(unknown)} (allowed: include, exclude)")
    parts = {}
    for key in ("include", "exclude"):
        value = table.get(key, ["*"] if key == "include" else [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise PresetError(f"{where}.{key} must be a list of strings")
        parts[key] = tuple(value)
    return TargetRules(**parts)


def load_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a preset .toml file."""
    if name_or_path in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[name_or_path]
    if not name_or_path.endswith(".toml") or not os.path.isfile(name_or_path):
        raise PresetError(f"unknown preset {name_or_path!r}: use one of {', '.join(BUILTIN_PRESETS)} "
                          "or the path of an existing .toml preset file")
    try:
        data = toml.load(name_or_path)
    except toml.TomlDecodeError as error:
        raise PresetError(f"{name_or_path}: invalid TOML ({error})") from None
    unknown = set(data) - {"unet", "text_encoder"}
    if unknown:
        raise PresetError(f"{name_or_path}: unknown sections {sorted(unknown)} (allowed: unet, text_encoder)")
    full = BUILTIN_PRESETS["full"]  # a missing section means "like the full preset"
    unet = _rules(data["unet"], f"{name_or_path} [unet]") if "unet" in data else full.unet
    text_encoder = (_rules(data["text_encoder"], f"{name_or_path} [text_encoder]")
                    if "text_encoder" in data else full.text_encoder)
    return Preset(unet, text_encoder)
