"""Library differences between kohya sd-scripts' pinned stack (transformers 4.54.1, diffusers 0.32.1)
and current releases, decided at call time so that one code path serves both."""
from __future__ import annotations

import re
from importlib import metadata

# The first release whose `from_pretrained` takes `dtype=`. Earlier ones only know `torch_dtype=`
# (transformers hands an unknown `dtype=` on to the model's __init__, which rejects it); later ones
# still take `torch_dtype=` but warn that it is deprecated.
_DTYPE_KEYWORD_SINCE = {"transformers": (4, 56), "diffusers": (0, 40)}


def release(library: str) -> tuple[int, int]:
    """(major, minor) of an installed library, from its package metadata (no import)."""
    numbers = re.findall(r"\d+", metadata.version(library))
    return int(numbers[0]), int(numbers[1]) if len(numbers) > 1 else 0


def dtype_kwargs(library: str, dtype) -> dict:
    """The dtype keyword of `library`'s `from_pretrained` ('transformers' or 'diffusers'):
    `{"dtype": dtype}` where it is accepted, `{"torch_dtype": dtype}` before."""
    keyword = "dtype" if release(library) >= _DTYPE_KEYWORD_SINCE[library] else "torch_dtype"
    return {keyword: dtype}
