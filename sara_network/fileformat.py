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
import re
import secrets
import shutil
import stat
import struct
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator, Mapping, Optional

import torch

from .progress import Progress, no_progress

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


# BYTE_BITS[b] is the 8 flags of byte value b (bit j -> column j): unpacking is one table lookup per
# byte, about 5x faster than shifting every byte eight times (measured on a 15M-entry SD1.5 mask).
BYTE_BITS = ((torch.arange(256).reshape(-1, 1) >> torch.arange(8)) & 1).bool()


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 (ceil(count/8),) -> bool (count,), the inverse of pack_bits."""
    return BYTE_BITS.index_select(0, packed.reshape(-1).long()).reshape(-1)[:count]


def indices_to_mask(indices: torch.Tensor, numel: int) -> torch.Tensor:
    flags = torch.zeros(numel, dtype=torch.bool)
    flags[indices.long()] = True
    return pack_bits(flags)


def mask_to_indices(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted int32 positions of the set bits among the first `numel`."""
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


# fp8 formats as (torch name, relative step of the mantissa, smallest subnormal)
FLOAT8_STEPS = (("float8_e5m2", 2.0 ** -2, 2.0 ** -16), ("float8_e4m3fn", 2.0 ** -3, 2.0 ** -9))


def _float8_tolerance(sample: torch.Tensor) -> torch.Tensor:
    """Per sampled value: one step of the coarsest fp8 format that holds it exactly, else 0. A
    fingerprint of a base stored in fp8 (kohya --fp8_base; often only the U-Net / DiT) holds such
    values; a value of another dtype is one by chance now and then, which only loosens that entry."""
    tolerance = torch.zeros_like(sample)
    for name, relative, absolute in FLOAT8_STEPS:
        kind = getattr(torch, name, None)
        if kind is not None:
            exact = sample == sample.to(kind).float()
            tolerance = torch.where(exact, torch.maximum(tolerance, relative * sample.abs() + absolute), tolerance)
    return tolerance


def same_base(first: Optional[str], second: Optional[str], rtol: float = 1e-2, atol: float = 1e-5) -> Optional[bool]:
    """Whether two fingerprints describe the same base model (None when either is missing). A value
    that an fp8 format holds exactly is compared at that format's precision (one step)."""
    if not first or not second:
        return None
    try:
        structure_a, sample_a = first.rsplit(":", 1)
        structure_b, sample_b = second.rsplit(":", 1)
        a = torch.frombuffer(bytearray(base64.b64decode(sample_a)), dtype=torch.float16).float()
        b = torch.frombuffer(bytearray(base64.b64decode(sample_b)), dtype=torch.float16).float()
    except (ValueError, TypeError):
        return first == second
    if structure_a != structure_b or a.shape != b.shape:
        return False
    tolerance = torch.maximum(atol + rtol * b.abs(), torch.maximum(_float8_tolerance(a), _float8_tolerance(b)))
    return bool(((a - b).abs() <= tolerance).all())


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


TEMP_MARK = ".sara-tmp-"  # temporary outputs: ".<name>.sara-tmp-<pid>-<random>"
OLD_MARK = ".sara-old-"  # a replaced output folder, kept until its replacement is in place


def _temp_path(path: str, mark: str = TEMP_MARK) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # alive but another user's (or not a pid at all)
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def reclaim_stale_temps(path: str) -> list[str]:
    """Remove the temporary outputs for `path` left by runs that were killed (their pid is gone);
    a folder kept aside by a killed replace is put back when `path` itself is missing. Returns
    what was removed or restored."""
    folder, name = os.path.split(os.path.abspath(path))
    reclaimed = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return reclaimed
    for entry in entries:
        for mark in (TEMP_MARK, OLD_MARK):
            prefix = f".{name}{mark}"
            pid = entry[len(prefix):].split("-")[0] if entry.startswith(prefix) else ""
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            stale = os.path.join(folder, entry)
            if mark == OLD_MARK and not os.path.lexists(path):
                os.replace(stale, path)
            else:
                _remove(stale)
            reclaimed.append(stale)
    return reclaimed


def _keep_mode(temp_path: str, path: str) -> None:
    """An output replacing an existing file keeps that file's mode, as writing into it would."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.chmod(temp_path, mode)


@contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A stream into a temp file in the same folder, renamed over `path` only when the block succeeds,
    so a crash or an error never leaves half a file (and never touches an existing one). The file
    gets the mode a plain open() would give (0666 & ~umask, or the replaced file's mode); temp files
    of killed runs are removed on the next write to the same path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    reclaim_stale_temps(path)
    temp_path = _temp_path(path)
    handle = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "w+b") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        _keep_mode(temp_path, path)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.lexists(temp_path):
            os.unlink(temp_path)
        raise


def plain_mode(folder: bool = False) -> int:
    """The mode open() / mkdir() give under the current umask (0666 / 0777 & ~umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def give_plain_modes(root: str) -> None:
    """Files and folders under `root` get plain_mode: writers that go through a private temp file
    (diffusers' save_pretrained does) leave 0600, which another user's webui cannot read."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, plain_mode(folder=True))
        for name in files:
            os.chmod(os.path.join(folder, name), plain_mode())


@contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """A temp folder beside `path` to fill; it replaces `path` (a folder or file) only when the block
    succeeds, swapped in one step where the OS can (Linux). Elsewhere the old output is moved aside
    first and removed once the new one is in place; a kill between the two renames leaves it aside,
    and the next write to `path` puts it back."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    reclaim_stale_temps(path)
    staging = _temp_path(path)
    os.mkdir(staging, 0o777)
    try:
        yield staging
        if os.path.lexists(path) and _exchange(staging, path):
            _remove(staging)  # now the old output
            return
        old = None
        if os.path.lexists(path):
            old = _temp_path(path, OLD_MARK)
            os.replace(path, old)
        os.replace(staging, path)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(staging)
        raise


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        rename = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, exchange = -100, 2
    return rename(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0


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
            # clone, not contiguous(): a one-entry slice is "contiguous" with any stride, and view needs 1
            flat = tensors[name].detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)
            data = flat.view(torch.uint8).numpy()
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
# reading: every byte is checked against the file's real size before anything is allocated
MAX_HEADER_BYTES = 100_000_000  # what safetensors itself accepts
# dtypes a file may hold (safetensors name -> torch dtype, bytes per element)
_READ_DTYPES = {name: (dtype, torch.empty(0, dtype=dtype).element_size())
                for dtype, name in _SAFETENSORS_DTYPES.items()}


def _fail(path: str, problem: str) -> SaraFileError:
    return SaraFileError(f"{path}: {problem}")


def _is_int(value: object) -> bool:
    """A JSON integer (13, not 13.0, not true)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(text: str, path: str, what: str) -> dict:
    """Parse JSON text that must be an object; duplicate keys are refused (readers would disagree)."""
    def unique(pairs):
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            raise SaraFileError(f"{path}: {what}: duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError) as error:
        if isinstance(error, SaraFileError):
            raise
        raise _fail(path, f"{what} is not valid JSON ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise _fail(path, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _string_metadata(value: object, path: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _fail(path, "metadata must map strings to strings")
    return value


def read_safetensors_header(path: str, stream: BinaryIO, size: int) -> tuple[dict[str, tuple[str, tuple, int, int]],
                                                                             dict[str, str], int]:
    """({name: (dtype, shape, begin, end)}, metadata, data start) of a safetensors file, all checked
    against the file size: UTF-8 JSON header, known dtypes, byte sizes = shape x element size, data
    offsets contiguous, in order of offset, covering exactly the data section."""
    if size < 8:
        raise _fail(path, f"not a safetensors file: {size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", stream.read(8))
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise _fail(path, f"not a safetensors file, corrupted or truncated: the header claims {length} bytes, "
                          f"the file has {size - 8} after the length")
    raw = stream.read(length)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _fail(path, f"the safetensors header is not UTF-8 (byte {error.start}); the file is damaged") from None
    header = _json_object(text, path, "the safetensors header")
    metadata = _string_metadata(header.pop("__metadata__", {}), path)
    data_size = size - 8 - length
    entries = {}
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"{where}: header entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _READ_DTYPES:
            raise _fail(path, f"{where}: dtype {dtype!r} is not supported ({', '.join(_READ_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise _fail(path, f"{where}: shape must be a list of non-negative integers, got {shape!r:.80}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise _fail(path, f"{where}: data_offsets {offsets!r:.80} outside the {data_size}-byte data section: "
                              "corrupted or truncated")
        if math.prod(shape) * _READ_DTYPES[dtype][1] != offsets[1] - offsets[0]:
            raise _fail(path, f"{where}: shape {tuple(shape)} of {dtype} does not match its "
                              f"{offsets[1] - offsets[0]} bytes")
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise _fail(path, f"tensor {name!r}: data at byte {begin}, expected {position} "
                              "(tensors overlap or leave a gap)")
        position = end
    if position != data_size:
        raise _fail(path, f"the tensors cover {position} of the {data_size} data bytes: corrupted or truncated")
    return entries, metadata, 8 + length


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read into memory, not mmap: a mapped file truncated in place later (an editor, `cp` over
    it) would kill the process with SIGBUS at the next touch of a loaded tensor."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        entries, metadata, start = read_safetensors_header(path, stream, size)
        data = bytearray(size - start)
        if stream.readinto(data) != len(data):
            raise _fail(path, "the file changed while it was read")
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        torch_dtype, itemsize = _READ_DTYPES[dtype]
        if begin == end:
            tensors[name] = torch.zeros(shape, dtype=torch_dtype)
            continue
        storage_dtype = torch.uint8 if torch_dtype == torch.bool else torch_dtype  # a bool byte may be 2..255
        tensor = torch.frombuffer(data, dtype=storage_dtype, count=(end - begin) // itemsize, offset=begin)
        if begin % itemsize:
            tensor = tensor.clone()  # an unaligned tensor: copy it aligned
        tensors[name] = (tensor != 0 if torch_dtype == torch.bool else tensor).reshape(shape)
    return tensors, metadata


def _read_torch_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A tensor-only torch zip file: stored (uncompressed) members only, so memory stays within the
    file size; torch.load(weights_only=True) never runs pickled code."""
    import zipfile

    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _fail(path, "not a torch zip file (torch.save's format since 1.6), corrupted or truncated") from None
    if any(m.compress_type != zipfile.ZIP_STORED for m in members) or sum(m.file_size for m in members) > size:
        raise _fail(path, "a torch file with compressed members (torch.save never writes those)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled objects other than tensors, or damaged
        raise _fail(path, "not a tensor-only torch file: it holds pickled objects other than tensors, or is "
                          f"damaged ({type(error).__name__}); sara-network never unpickles code") from None
    if not isinstance(blob, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        raise _fail(path, "expected a dict of named tensors")
    raw = blob.pop(_METADATA_TENSOR, None)
    metadata: dict[str, str] = {}
    if raw is not None:
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.layout != torch.strided:
            raise _fail(path, f"{_METADATA_TENSOR} must be a 1-D uint8 tensor")
        try:
            text = raw.numpy().tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(path, f"{_METADATA_TENSOR} is not UTF-8") from None
        metadata = _string_metadata(_json_object(text, path, _METADATA_TENSOR), path)
    for key, tensor in blob.items():
        if tensor.layout != torch.strided or tensor.dtype not in _SAFETENSORS_DTYPES:
            raise _fail(path, f"tensor {key!r}: a {tensor.layout} {tensor.dtype} tensor is not supported")
    return blob, metadata


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (or a tensor-only .pt/.ckpt): the header is
    checked against the file size first, so a damaged or hostile file gets a SaraFileError and
    nothing larger than the file is ever allocated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    try:
        if path.lower().endswith(PICKLE_SUFFIXES):
            return _read_torch_file(path)
        return _read_safetensors(path)
    except OSError as error:
        raise _fail(path, f"cannot read: {error.strerror or error}") from None


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


_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+")
# The largest weight a module may declare: flat indices are int32, and no supported base model
# comes near (SDXL's largest Linear/Conv2d has 14.7M entries, Flux's 66M); a dense copy of a
# declared weight is what to-diff / to-lora allocate.
MAX_WEIGHT_ENTRIES = 2 ** 28
_DIGITS = re.compile(r"[0-9]{1,18}")


def _check(condition: bool, path: str, name: str, problem: str) -> None:
    if not condition:
        raise SaraFileError(f"{path}: module {name}: {problem}")


def _check_tensor(tensor: object, path: str, name: str, field: str) -> None:
    _check(isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided, path, name,
           f"{field} must be a dense tensor, got {getattr(tensor, 'layout', type(tensor).__name__)}")


def _validate_indices(indices: torch.Tensor, numel: int, path: str, name: str, what: str) -> None:
    _check(indices.dtype == torch.int32 and indices.dim() == 1, path, name,
           f"{what} must be a 1-D int32 tensor, got {indices.dtype} {tuple(indices.shape)}")
    _check(indices.numel() > 0, path, name, f"{what} is empty (a module holds at least one entry)")
    _check(int(indices.min()) >= 0 and int(indices.max()) < numel, path, name,
           f"{what} out of range for {numel} entries")
    _check(bool((indices[1:] > indices[:-1]).all()), path, name, f"{what} not strictly increasing")


def _validate_values(values: torch.Tensor, count: int, path: str, name: str, what: str,
                     allow_non_finite: bool) -> None:
    _check(values.dtype in FLOAT_DTYPES and values.dim() == 1, path, name,
           f"{what} must be a 1-D fp32/fp16/bf16 tensor, got {values.dtype} {tuple(values.shape)}")
    _check(values.numel() == count, path, name, f"{what} has {values.numel()} entries, indices have {count}")
    if not allow_non_finite:
        bad = int((~torch.isfinite(values)).sum())
        _check(bad == 0, path, name, f"{what}: the file holds NaN or Inf ({bad} of {count} values); "
                                     "refused (load it anyway with allow_non_finite=True / --allow-non-finite)")


def _validate_bitmask(packed: torch.Tensor, count: int, path: str, name: str, what: str) -> None:
    """A packed bitmask over `count` entries: uint8, ceil(count/8) bytes, zero padding bits."""
    _check(packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() == (count + 7) // 8, path, name,
           f"{what} must be a 1-D uint8 bitmask of {(count + 7) // 8} bytes, got {packed.dtype} "
           f"{tuple(packed.shape)}")
    _check(count % 8 == 0 or int(packed[-1]) >> (count % 8) == 0, path, name,
           f"{what} has bits set past its {count} entries")


def parse_module(name: str, parts: Mapping[str, torch.Tensor], path: str = "<memory>",
                 allow_non_finite: bool = False) -> ModuleDelta:
    """Validate one module's tensors ({suffix: tensor}) and return its delta. Hosts that hand over
    a bare state dict without metadata (Forge, ComfyUI) parse modules one by one with this."""
    _check(isinstance(name, str) and bool(_MODULE_NAME.fullmatch(name)), path, repr(name)[:80],
           "a module name is letters, digits and underscores")
    unknown = sorted(set(parts) - set(SUFFIXES))
    _check(not unknown, path, name, f"unknown tensors {unknown[:3]} (expected suffixes {', '.join(SUFFIXES)})")
    for suffix, tensor in parts.items():
        _check_tensor(tensor, path, name, suffix)
    for required in ("sara_values", "sara_shape"):
        _check(required in parts, path, name, f"missing {required}")
    _check(("sara_indices" in parts) != ("sara_mask" in parts), path, name,
           "needs exactly one of sara_indices or sara_mask")
    shape_tensor = parts["sara_shape"]
    _check(shape_tensor.dtype == torch.int64 and shape_tensor.dim() == 1 and shape_tensor.numel() in (2, 4),
           path, name, f"sara_shape must be a 1-D int64 tensor of 2 or 4 sizes (a Linear or Conv2d weight), "
                       f"got {shape_tensor.dtype} {tuple(shape_tensor.shape)}")
    shape = tuple(int(s) for s in shape_tensor.tolist())
    _check(all(0 < s <= MAX_WEIGHT_ENTRIES for s in shape) and math.prod(shape) <= MAX_WEIGHT_ENTRIES, path, name,
           f"sara_shape {shape}: sizes must be positive and hold at most {MAX_WEIGHT_ENTRIES} entries")
    numel = math.prod(shape)
    if "sara_mask" in parts:
        _validate_bitmask(parts["sara_mask"], numel, path, name, "sara_mask")
        indices = mask_to_indices(parts["sara_mask"], numel)
        _check(indices.numel() > 0, path, name, "sara_mask selects no entry (a module holds at least one)")
    else:
        indices = parts["sara_indices"]
        _validate_indices(indices, numel, path, name, "sara_indices")
    _validate_values(parts["sara_values"], indices.numel(), path, name, "sara_values", allow_non_finite)
    frozen = None
    if "sara_frozen" in parts:
        _validate_bitmask(parts["sara_frozen"], indices.numel(), path, name, "sara_frozen")
        frozen = unpack_bits(parts["sara_frozen"], indices.numel())
    bias_indices = bias_values = None
    if "sara_bias_values" in parts or "sara_bias_indices" in parts:
        _check("sara_bias_values" in parts and "sara_bias_indices" in parts, path, name,
               "bias deltas need both sara_bias_values and sara_bias_indices")
        bias_indices = parts["sara_bias_indices"]
        _validate_indices(bias_indices, shape[0], path, name, "sara_bias_indices")
        bias_values = parts["sara_bias_values"]
        _validate_values(bias_values, bias_indices.numel(), path, name, "sara_bias_values", allow_non_finite)
    return ModuleDelta(name, shape, indices, parts["sara_values"], frozen, bias_indices, bias_values)


def _count(text: object, path: str, key: str) -> int:
    """A non-negative integer stored as a decimal string ('13', not '13.0' or ' 13')."""
    if not isinstance(text, str) or not _DIGITS.fullmatch(text):
        raise _fail(path, f"metadata {key} must be a whole number written in digits, got {text!r:.40}")
    return int(text)


def validate_metadata(metadata: Mapping[str, str], module_names: Iterable[str], path: str = "<memory>"
                      ) -> dict[str, int]:
    """Check every sara_* metadata field a reader uses (type, range, consistency with the modules)
    and return the declared {module: entry count}."""
    if "sara_counts" not in metadata:
        raise _fail(path, "metadata sara_counts is missing")
    counts = _json_object(metadata["sara_counts"], path, "metadata sara_counts")
    for name, count in counts.items():
        if not _is_int(count) or count < 1:
            raise _fail(path, f"metadata sara_counts: {name}: the count must be a positive integer, got {count!r:.40}")
    names = set(module_names)
    if set(counts) != names:
        extra, missing = sorted(set(counts) - names), sorted(names - set(counts))
        raise _fail(path, f"metadata lists {len(counts)} modules but the file holds {len(names)} "
                          f"(listed without tensors: {extra[:3]}, tensors not listed: {missing[:3]}); "
                          "the file is damaged or was edited")
    total = _count(metadata.get("sara_total_selected"), path, "sara_total_selected")
    if total != sum(counts.values()):
        raise _fail(path, f"metadata sara_total_selected is {total}, the module counts add up to "
                          f"{sum(counts.values())}")
    if "sara_optimizer_steps" in metadata:
        _count(metadata["sara_optimizer_steps"], path, "sara_optimizer_steps")
    if "sara_config" in metadata:
        _json_object(metadata["sara_config"], path, "metadata sara_config")
    if "sara_thresholds" in metadata:
        for component, value in _json_object(metadata["sara_thresholds"], path, "metadata sara_thresholds").items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise _fail(path, f"metadata sara_thresholds: {component}: must be a finite number >= 0, "
                                  f"got {value!r:.40}")
    return counts


def parse_native(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str = "<memory>",
                 allow_non_finite: bool = False, progress: Progress = no_progress) -> list[ModuleDelta]:
    """Validate a native file's tensors and metadata completely and return its module deltas.
    NaN / Inf deltas are refused unless `allow_non_finite`."""
    if not isinstance(metadata, Mapping) or metadata.get("sara_format") != FORMAT_NAME:
        foreign = describe_foreign(tensors)
        raise _fail(path, "not a native SaRA file" + (f"; it looks like {foreign}" if foreign else ""))
    version = metadata.get("sara_format_version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"SaRA file format version {version!r:.40} is not supported "
                          f"(this sara-network reads version {FORMAT_VERSION}); upgrade sara-network")
    _string_metadata(dict(metadata), path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, suffix = split_key(key)
        if suffix not in SUFFIXES:
            raise _fail(path, f"unknown tensor {key!r:.120} (expected suffixes {', '.join(SUFFIXES)})")
        grouped.setdefault(name, {})[suffix] = tensor
    if not grouped:
        raise _fail(path, "the file holds no modules")
    counts = validate_metadata(metadata, grouped, path)
    deltas = []
    for name in progress(sorted(grouped), desc="read", unit="module"):
        delta = parse_module(name, grouped[name], path, allow_non_finite)
        _check(counts[name] == delta.indices.numel(), path, name,
               f"metadata sara_counts says {counts[name]} entries, the file has {delta.indices.numel()}")
        deltas.append(delta)
    return deltas


def load_native(path: str, allow_non_finite: bool = False,
                progress: Progress = no_progress) -> tuple[list[ModuleDelta], dict[str, str]]:
    """Read and fully validate a native SaRA file (NaN / Inf refused unless `allow_non_finite`)."""
    tensors, metadata = read_tensors(path)
    return parse_native(tensors, metadata, os.fspath(path), allow_non_finite, progress), metadata
