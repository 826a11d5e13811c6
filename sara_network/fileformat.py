"""The native SaRA file, format v1 (documented in docs/file-format.md).

A safetensors file; per module `<kohya name>` it holds
  `.sara_values`   1-D deltas (save dtype),
  `.sara_indices`  sorted int32 flat indices, or `.sara_mask` a packed uint8 bitmask (whichever is
                   smaller; bit j of byte i is entry 8*i+j),
  `.sara_shape`    int64 weight shape,
  `.sara_frozen`   optional packed bitmask over the deltas: entries frozen by the progressive step,
  `.sara_bias_values` / `.sara_bias_indices` optional bias deltas,
plus string metadata (format name and version, selection settings, per-module counts, base hash,
and the trainer's ss_* / modelspec.* keys). Writes are atomic; reads validate everything before
anything is returned, and never unpickle.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator, Mapping, Optional

import torch

FORMAT_NAME = "sara-network/native"
FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_METADATA_TENSOR = "__sara_metadata__"  # .pt/.ckpt files carry metadata as a uint8 JSON tensor
SUFFIXES = ("sara_values", "sara_indices", "sara_mask", "sara_shape", "sara_frozen",
            "sara_bias_values", "sara_bias_indices")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "hada_w1_a",
                 "lokr_w1", "lora_A.weight", "lora_B.weight", "dora_scale")


class SaraFileError(ValueError):
    """A file that is not a valid native SaRA file, with what is wrong and where."""


@dataclasses.dataclass
class ModuleDelta:
    """One module's sparse delta, independent of any model."""

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor  # int32, sorted, unique
    values: torch.Tensor  # float, same length
    frozen: Optional[torch.Tensor] = None  # bool over values, or None
    bias_indices: Optional[torch.Tensor] = None
    bias_values: Optional[torch.Tensor] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta of the weight (zeros outside the support)."""
        flat = torch.zeros(self.numel, dtype=dtype, device=self.values.device)
        flat.index_put_((self.indices.to(self.values.device),), self.values.to(dtype))
        return flat.view(self.shape)


# ---------------------------------------------------------------------------------------------
# bit packing
def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n/8),), bit j of byte i is flags[8*i+j]."""
    flags = flags.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flags, (0, (-flags.numel()) % 8))
    weights = (1 << torch.arange(8, dtype=torch.uint8))
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:count].bool()


def indices_to_mask(indices: torch.Tensor, numel: int) -> torch.Tensor:
    flags = torch.zeros(numel, dtype=torch.bool)
    flags[indices.long()] = True
    return pack_bits(flags)


def mask_to_indices(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return unpack_bits(packed, numel).nonzero().reshape(-1).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# hashes
def base_fingerprint(named_weights: Iterable[tuple[str, torch.Tensor]], samples: int = 8) -> str:
    """A cheap identity of base weights: a hash of names and shapes, plus a few strided values of
    each weight (fp16, base64), compared with a tolerance by `same_base`.

    Exact hashes of values cannot work across dtypes (an fp32, fp16 and bf16 copy of one model round
    differently); a warning aid, not a cryptographic commitment.
    """
    digest = hashlib.sha256()
    values = []
    for name, weight in sorted(named_weights, key=lambda item: item[0]):
        flat = weight.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        values.append(flat[::step][:samples].to(torch.float32).cpu())
        digest.update(f"{name}:{tuple(weight.shape)};".encode())
    sample = torch.cat(values).to(torch.float16) if values else torch.zeros(0, dtype=torch.float16)
    encoded = base64.b64encode(sample.view(torch.int16).numpy().tobytes()).decode()
    return f"sha256:{digest.hexdigest()[:32]}:{encoded}"


def same_base(first: Optional[str], second: Optional[str], rtol: float = 1e-2, atol: float = 1e-5) -> Optional[bool]:
    """Whether two fingerprints describe the same base model (None when either is missing)."""
    if not first or not second:
        return None
    try:
        structure_a, sample_a = first.rsplit(":", 1)
        structure_b, sample_b = second.rsplit(":", 1)
        a = torch.frombuffer(bytearray(base64.b64decode(sample_a)), dtype=torch.float16).float()
        b = torch.frombuffer(bytearray(base64.b64decode(sample_b)), dtype=torch.float16).float()
    except (ValueError, TypeError):
        return first == second
    return structure_a == structure_b and a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


# ---------------------------------------------------------------------------------------------
# writing
def to_tensors(deltas: Iterable[ModuleDelta], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    tensors = {}
    for delta in deltas:
        values = delta.values.detach().cpu()
        tensors[f"{delta.name}.sara_values"] = values.to(dtype) if dtype is not None else values
        indices = delta.indices.detach().cpu().to(torch.int32)
        if indices.numel() * 32 > delta.numel:  # bitmask is smaller above 1/32 density
            tensors[f"{delta.name}.sara_mask"] = indices_to_mask(indices, delta.numel)
        else:
            tensors[f"{delta.name}.sara_indices"] = indices
        tensors[f"{delta.name}.sara_shape"] = torch.tensor(delta.shape, dtype=torch.int64)
        if delta.frozen is not None and bool(delta.frozen.any()):
            tensors[f"{delta.name}.sara_frozen"] = pack_bits(delta.frozen.cpu())
        if delta.bias_indices is not None and delta.bias_indices.numel():
            bias_values = delta.bias_values.detach().cpu()
            tensors[f"{delta.name}.sara_bias_values"] = bias_values.to(dtype) if dtype is not None else bias_values
            tensors[f"{delta.name}.sara_bias_indices"] = delta.bias_indices.detach().cpu().to(torch.int32)
    return {key: value.contiguous() for key, value in tensors.items()}


def format_metadata(deltas: list[ModuleDelta], extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    metadata = {str(k): str(v) for k, v in (extra or {}).items() if v is not None}
    metadata.update({
        "sara_format": FORMAT_NAME,
        "sara_format_version": FORMAT_VERSION,
        "sara_counts": json.dumps({d.name: int(d.indices.numel()) for d in deltas}, separators=(",", ":")),
        "sara_total_selected": str(sum(int(d.indices.numel()) for d in deltas)),
    })
    return metadata


@contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A stream into a temp file in the same folder, renamed over `path` only when the block succeeds,
    so a crash or an error never leaves half a file (and never touches an existing one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(handle, "w+b") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def atomic_write_bytes(path: str, payload: bytes) -> None:
    with atomic_output(path) as stream:
        stream.write(payload)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_HASH_PLACEHOLDER = "?" * 64  # as long as the sha256 hex digest that replaces it (kohya writes no "0x")


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      with_hash: bool = True) -> None:
    """Atomically write a safetensors file one tensor at a time (memory: one tensor, not the file).

    Tensors are laid out by element size then name, as safetensors does, so each one is aligned.
    With `with_hash`, `sshs_model_hash` (sha256 of the data section, what A1111 and kohya show) is
    computed while the data streams out and written over a same-length placeholder in the header.
    """
    metadata = {str(key): str(value) for key, value in metadata.items()}
    for stale in ("sshs_model_hash", "sshs_legacy_hash"):  # describe some other file's data
        metadata.pop(stale, None)
    if with_hash:
        metadata["sshs_model_hash"] = _HASH_PLACEHOLDER
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise SaraFileError(f"{path}: cannot store {name} of dtype {tensor.dtype} in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with atomic_output(path) as stream:
        stream.write(struct.pack("<Q", len(blob)))
        stream.write(blob)
        for name in names:
            data = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            stream.write(data)
            digest.update(data)
        if with_hash:
            stream.seek(8 + blob.index(_HASH_PLACEHOLDER.encode()))
            stream.write(digest.hexdigest().encode())


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
                 with_hash: bool = True) -> None:
    """Atomically write tensors + metadata: safetensors, or a tensor-only torch file for .pt/.ckpt."""
    metadata = dict(metadata)
    if path.lower().endswith(PICKLE_SUFFIXES):
        import io

        blob = dict(tensors)
        blob[_METADATA_TENSOR] = torch.frombuffer(bytearray(json.dumps(metadata).encode()), dtype=torch.uint8)
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return
    write_safetensors(path, tensors, metadata, with_hash)


def save_native(path: str, deltas: list[ModuleDelta], dtype: Optional[torch.dtype] = None,
                metadata: Optional[Mapping[str, str]] = None) -> None:
    if not deltas:
        raise SaraFileError("nothing to save: the network has no selected parameters")
    save_tensors(path, to_tensors(deltas, dtype), format_metadata(deltas, metadata))


# ---------------------------------------------------------------------------------------------
# reading
def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (or a tensor-only .pt/.ckpt), with clear errors."""
    if not os.path.isfile(path):
        raise SaraFileError(f"{path}: no such file")
    if path.lower().endswith(PICKLE_SUFFIXES):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupted, truncated, or holds non-tensor objects
            raise SaraFileError(f"{path}: not a tensor-only torch file ({error})") from None
        if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
            raise SaraFileError(f"{path}: expected a dict of tensors")
        raw = blob.pop(_METADATA_TENSOR, None)
        metadata = json.loads(bytes(raw.tolist()).decode()) if raw is not None else {}
        return blob, metadata
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise SaraFileError(f"{path}: not a readable safetensors file, corrupted or truncated ({error})") from None
    return tensors, metadata


def split_key(key: str) -> tuple[str, str]:
    name, _, suffix = key.partition(".")
    return name, suffix


def describe_foreign(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name the kind of adapter file this is when it is not native SaRA (for error messages)."""
    suffixes = {split_key(key)[1] for key in tensors}
    if suffixes & set(LORA_SUFFIXES):
        return "a LoRA/LyCORIS file (convert it with `sara from-lora`)"
    if suffixes & {"diff", "diff_b"}:
        return "a LyCORIS diff file (convert it with `sara from-diff`)"
    if any(key.startswith(("model.diffusion_model.", "down_blocks.", "input_blocks.")) for key in tensors):
        return "a model checkpoint, not an adapter"
    return None


def _check(condition: bool, path: str, name: str, problem: str) -> None:
    if not condition:
        raise SaraFileError(f"{path}: module {name}: {problem}")


def _validate_indices(indices: torch.Tensor, numel: int, path: str, name: str, what: str) -> None:
    _check(indices.dtype == torch.int32 and indices.dim() == 1, path, name,
           f"{what} must be a 1-D int32 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel():
        _check(int(indices.min()) >= 0 and int(indices.max()) < numel, path, name,
               f"{what} out of range for {numel} entries")
        _check(bool((indices[1:] > indices[:-1]).all()), path, name, f"{what} not strictly increasing")


def _validate_values(values: torch.Tensor, count: int, path: str, name: str, what: str) -> None:
    _check(values.dtype in FLOAT_DTYPES and values.dim() == 1, path, name,
           f"{what} must be a 1-D fp32/fp16/bf16 tensor, got {values.dtype} {tuple(values.shape)}")
    _check(values.numel() == count, path, name, f"{what} has {values.numel()} entries, indices have {count}")
    _check(bool(torch.isfinite(values).all()), path, name, f"{what} contain NaN or Inf")


def parse_module(name: str, parts: Mapping[str, torch.Tensor], path: str = "<memory>") -> ModuleDelta:
    """Validate one module's tensors ({suffix: tensor}) and return its delta. Hosts that hand over
    a bare state dict without metadata (Forge, ComfyUI) parse modules one by one with this."""
    for required in ("sara_values", "sara_shape"):
        _check(required in parts, path, name, f"missing {required}")
    _check(("sara_indices" in parts) != ("sara_mask" in parts), path, name,
           "needs exactly one of sara_indices or sara_mask")
    shape_tensor = parts["sara_shape"]
    _check(shape_tensor.dtype == torch.int64 and shape_tensor.dim() == 1 and bool((shape_tensor > 0).all()),
           path, name, "sara_shape must be a 1-D int64 tensor of positive sizes")
    shape = tuple(int(s) for s in shape_tensor.tolist())
    numel = math.prod(shape)
    if "sara_mask" in parts:
        mask = parts["sara_mask"]
        _check(mask.dtype == torch.uint8 and mask.shape == ((numel + 7) // 8,), path, name,
               f"sara_mask must be uint8 of {(numel + 7) // 8} bytes")
        _check(not bool(unpack_bits(mask, mask.numel() * 8)[numel:].any()), path, name,
               "sara_mask has bits set past the end of the weight")
        indices = mask_to_indices(mask, numel)
    else:
        indices = parts["sara_indices"]
        _validate_indices(indices, numel, path, name, "sara_indices")
    _validate_values(parts["sara_values"], indices.numel(), path, name, "sara_values")
    frozen = None
    if "sara_frozen" in parts:
        packed = parts["sara_frozen"]
        _check(packed.dtype == torch.uint8 and packed.shape == ((indices.numel() + 7) // 8,), path, name,
               "sara_frozen must be a uint8 bitmask over the deltas")
        frozen = unpack_bits(packed, indices.numel())
    bias_indices = bias_values = None
    if "sara_bias_values" in parts or "sara_bias_indices" in parts:
        _check("sara_bias_values" in parts and "sara_bias_indices" in parts, path, name,
               "bias deltas need both sara_bias_values and sara_bias_indices")
        bias_indices = parts["sara_bias_indices"]
        _validate_indices(bias_indices, shape[0], path, name, "sara_bias_indices")
        bias_values = parts["sara_bias_values"]
        _validate_values(bias_values, bias_indices.numel(), path, name, "sara_bias_values")
    return ModuleDelta(name, shape, indices, parts["sara_values"], frozen, bias_indices, bias_values)


def parse_native(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str = "<memory>"
                 ) -> list[ModuleDelta]:
    """Validate a native file's tensors and metadata completely and return its module deltas."""
    if metadata.get("sara_format") != FORMAT_NAME:
        foreign = describe_foreign(tensors)
        raise SaraFileError(f"{path}: not a native SaRA file" + (f"; it looks like {foreign}" if foreign else ""))
    version = metadata.get("sara_format_version")
    if version != FORMAT_VERSION:
        raise SaraFileError(f"{path}: SaRA file format version {version!r} is not supported "
                            f"(this sara-network reads version {FORMAT_VERSION}); upgrade sara-network")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, suffix = split_key(key)
        if suffix not in SUFFIXES:
            raise SaraFileError(f"{path}: unknown tensor {key!r} (expected suffixes {', '.join(SUFFIXES)})")
        grouped.setdefault(name, {})[suffix] = tensor
    try:
        counts = json.loads(metadata.get("sara_counts", "{}"))
    except json.JSONDecodeError:
        raise SaraFileError(f"{path}: metadata sara_counts is not valid JSON") from None
    if set(counts) != set(grouped):
        raise SaraFileError(f"{path}: metadata lists {len(counts)} modules but the file holds {len(grouped)}; "
                            "the file is damaged or was edited")
    deltas = []
    for name in sorted(grouped):
        delta = parse_module(name, grouped[name], path)
        _check(int(counts[name]) == delta.indices.numel(), path, name,
               f"metadata says {counts[name]} selected entries, the file has {delta.indices.numel()}")
        deltas.append(delta)
    if not deltas:
        raise SaraFileError(f"{path}: the file holds no modules")
    return deltas


def load_native(path: str) -> tuple[list[ModuleDelta], dict[str, str]]:
    """Read and fully validate a native SaRA file."""
    tensors, metadata = read_tensors(path)
    return parse_native(tensors, metadata, path), metadata
