"""Module names: a module path inside a model <-> kohya's LoRA name (`lora_unet_...`).

kohya names a module `<prefix>_<dotted path with '.' -> '_'>`; LyCORIS and every UI use the same
names, so a SaRA file maps one-to-one onto LoRA / LyCORIS files of the same model.
"""
from __future__ import annotations

from typing import Sequence

UNET_PREFIX = "lora_unet"


def kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_encoder_prefixes(text_encoders: Sequence[object]) -> list[str]:
    """kohya's prefixes: `lora_te` for one encoder, `lora_te1`.. for several (T5 is always te3).

    SD1/SD2: [CLIP] -> lora_te. SDXL: [CLIP-L, bigG] -> te1, te2. SD3: [L, G, T5] -> te1..te3.
    FLUX: [CLIP-L, T5] -> te1, te3 (kohya's lora_flux naming).
    """
    if len(text_encoders) == 1:
        return ["lora_te"]
    prefixes = []
    for position, encoder in enumerate(text_encoders):
        is_t5 = "T5" in type(encoder).__name__
        prefixes.append("lora_te3" if is_t5 else f"lora_te{position + 1}")
    return prefixes


def component_of(name: str) -> str:
    """'unet' or the text-encoder prefix a kohya name belongs to ('lora_te', 'lora_te1', ...)."""
    if name.startswith(UNET_PREFIX + "_"):
        return "unet"
    head = name.split("_text_model_")[0] if "_text_model_" in name else "_".join(name.split("_")[:2])
    return head


def canonical_root(root: object) -> str:
    """Path prefix that makes module paths version-independent.

    transformers 5 dropped the `text_model` wrapper of CLIPTextModel (4.x and
    CLIPTextModelWithProjection keep it); kohya, LyCORIS and every UI name these layers
    `..._text_model_encoder_layers_N_...`, so a flattened CLIP text model gets `text_model.` back.
    """
    children = dict(root.named_children()) if hasattr(root, "named_children") else {}
    if "text_model" not in children and "encoder" in children and "embeddings" in children:
        return "text_model."
    return ""
