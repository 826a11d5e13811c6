"""Conversions between native SaRA files and the files every UI reads, plus merging.

Pure functions over ModuleDelta lists and state dicts (the CLI in cli.py only reads, calls, writes):

- native -> LyCORIS `full` (`<name>.diff`, `.diff_b`): exact, loads in A1111 / Forge / ComfyUI.
- native -> kohya LoRA (`lora_down` / `lora_up` / `alpha`): a truncated SVD of each delta (randomized,
  on the sparse matrix, unless the rank bound is near the matrix size), the only adapter form
  diffusers' `load_lora_weights` also reads. Rank per module is fixed or chosen from the spectrum
  or a target error; the relative Frobenius error of what is stored is measured, not estimated.
- diff / LoRA -> native: a diff's exact nonzero support, or a LoRA's dense delta projected onto the
  SaRA selection of a base model (so training can start from a LoRA) or onto its top-k entries.
- merges: native + native (union of supports), and native files baked into base weights.

Module names are kohya's throughout (see naming.py), so the same name keys every format.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from typing import Iterable, Mapping, Optional, Sequence

import torch

from . import dit_names, ldm_names
from .fileformat import ModuleDelta, SaraFileError, split_key
from .progress import Progress
from .progress import no_progress as _no_progress  # the CLI passes progress_bars()

DIFF_SUFFIXES = ("diff", "diff_b")
LORA_UP_SUFFIXES = ("lora_up.weight", "lora_B.weight")
LORA_DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight")
LORA_SUFFIXES = (*LORA_UP_SUFFIXES, *LORA_DOWN_SUFFIXES, "alpha", "lora_mid.weight")
NAME_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "oft_": "OFT", "w_norm": "norm",
                "a1.weight": "GLoRA", "on_input": "IA3"}

# ss_base_model_version -> (modelspec architecture, implementation, resolution); `custom` is any
# other model (the demo's digits U-Net, a diffusers model folder): the UIs do not know it, so its
# files carry no modelspec and no Stable Diffusion resolution.
CUSTOM_BASE = "custom"
BASE_MODELS = {
    "sd_v1": ("stable-diffusion-v1/lora", "diffusers", "512x512"),
    "sd_v2": ("stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    "sd_v2_v": ("stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
                       "1024x1024"),
    # kohya's FLUX.1 and SD3 trainers: "flux1", and the MMDiT's model_type for SD3 / SD3.5
    "flux1": ("flux-1-dev/lora", "https://github.com/black-forest-labs/flux", "1024x1024"),
    "medium": ("stable-diffusion-3-medium/lora", "diffusers", "1024x1024"),
    "5-medium": ("stable-diffusion-3-5-medium/lora", "diffusers", "1024x1024"),
    "5-large": ("stable-diffusion-3-5-large/lora", "diffusers", "1024x1024"),
    CUSTOM_BASE: None,
}
ARCH_OF_BASE_MODEL = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2", "sdxl_base_v1-0": "sdxl", "flux1": "flux",
                      "medium": "sd3", "5-medium": "sd3", "5-large": "sd3"}
_MODELSPEC_ARCH_KEYS = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                        "modelspec.resolution")
BASE_KINDS = ("a diffusers pipeline folder (with unet/, or transformer/ for FLUX.1 / SD3), a diffusers model folder "
              "(config.json with _class_name, e.g. a UNet2DModel), a single-file SD1/SD2/SDXL/FLUX.1/SD3 checkpoint, "
              "or the demo base (sara_network/demo/digits_base.safetensors)")
# metadata keys of a native file that describe the native format itself, not the training
_NATIVE_ONLY_KEYS = ("sara_format", "sara_format_version", "sara_counts", "sara_total_selected", "sshs_model_hash",
                     "sshs_legacy_hash")



def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}}; keys split at the first dot, as every UI splits them."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, suffix = split_key(key)
        grouped.setdefault(name, {})[suffix] = tensor
    return grouped


def _check_names(grouped: Mapping[str, object], what: str) -> None:
    foreign = [name for name in grouped if not name.startswith(NAME_PREFIXES)]
    if foreign:
        raise SaraFileError(f"{what}: module names {foreign[:3]} are not kohya-style (lora_unet_..., lora_te_...); "
                            "a diffusers/PEFT LoRA must first be converted to kohya format "
                            "(diffusers.utils.convert_state_dict_to_kohya)")


# ---------------------------------------------------------------------------------------------
# architectures and metadata
def base_model_version(names: Iterable[str], metadata: Mapping[str, str], given: Optional[str] = None) -> str:
    """The ss_base_model_version of a file: given explicitly, from its metadata, or unmistakable from
    its names (kohya's FLUX.1 blocks; SD3.5 Medium's second attention; SDXL's `lora_te1_`/`lora_te2_`,
    LDM U-Net blocks); else an error."""
    version = given or metadata.get("ss_base_model_version")
    if version is None:
        names = list(names)
        dit = dit_names.arch_of_names(names)
        if dit == "flux":
            version = "flux1"
        elif dit == "sd3":
            if not any("_x_block_attn2_" in n for n in names):
                raise ValueError("the file is for SD3 but does not say which one; give --base-model "
                                 "(medium|5-medium|5-large)")
            version = "5-medium"
        elif any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block",
                               "lora_unet_output_blocks")) for n in names):
            version = "sdxl_base_v1-0"
    if version is None:
        raise ValueError("the file does not say which base model it is for; give --base-model "
                         f"({'|'.join(BASE_MODELS)})")
    if version not in BASE_MODELS:
        raise ValueError(f"unknown base model {version!r} (expected one of {', '.join(BASE_MODELS)})")
    return version


def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A native file's training metadata (ss_*, modelspec.*, sara_config ...), minus its format keys."""
    return {k: v for k, v in metadata.items() if k not in _NATIVE_ONLY_KEYS}


def modelspec_metadata(version: str) -> dict[str, str]:
    """modelspec 1.0.1 keys for a kohya base model version: Forge's Lora page takes the SD version of
    an SD1 file only from modelspec.architecture (A1111 and ComfyUI need none). None for `custom`."""
    if BASE_MODELS[version] is None:
        return {}
    architecture, implementation, resolution = BASE_MODELS[version]
    return {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture,
            "modelspec.implementation": implementation, "modelspec.resolution": resolution}


def adapter_metadata(source: Mapping[str, str], version: str, title: str, network_module: str,
                     dim: Optional[int] = None, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The metadata UIs read (consumers.md section 3): ss_* minimum keys and modelspec 1.0.1."""
    metadata = {k: v for k, v in carried_metadata(source).items() if k not in _MODELSPEC_ARCH_KEYS}
    metadata.update({
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_network_module": network_module,
        **modelspec_metadata(version),
        "modelspec.title": source.get("modelspec.title", title),
    })
    if dim is not None:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = str(dim)
    else:
        for key in ("ss_network_dim", "ss_network_alpha"):
            metadata.pop(key, None)
    metadata.update(extra or {})
    return metadata


def open_clip_fillers(shapes: Mapping[str, tuple], version: str) -> dict[str, tuple]:
    """{name: shape} of the missing siblings of partly covered OpenCLIP attention layers (SD2's and
    SDXL's second text encoder): A1111 skips such a layer unless q, k, v and out are all present."""
    if version not in ARCH_OF_BASE_MODEL:
        return {}
    arch = ldm_names.get_arch(ARCH_OF_BASE_MODEL[version])
    open_prefixes = tuple(p + "_" for p, encoder in arch.text_encoders.items() if encoder.open_clip)
    fillers = {}
    for name, shape in shapes.items():
        match = re.fullmatch(r"(.*_self_attn)_(?:q|k|v|out)_proj", name)
        if match and name.startswith(open_prefixes):
            for part in ("q", "k", "v", "out"):
                sibling = f"{match[1]}_{part}_proj"
                if sibling not in shapes:
                    fillers[sibling] = shape  # CLIP attention projections are all (width, width)
    return fillers


# ---------------------------------------------------------------------------------------------
# native <-> diff
def to_diff(deltas: Sequence[ModuleDelta], dtype: torch.dtype = torch.float16,
            progress: Progress = _no_progress) -> dict[str, torch.Tensor]:
    """LyCORIS `full` tensors: `<name>.diff` in the weight's exact shape, `.diff_b` for bias deltas."""
    tensors = {}
    for delta in progress(deltas, desc="diff", unit="module"):
        tensors[f"{delta.name}.diff"] = _cast_finite(delta.dense(torch.float32), dtype, delta.name).contiguous()
        if delta.bias_indices is not None and delta.bias_indices.numel():
            bias = torch.zeros(delta.shape[0], dtype=torch.float32)
            bias[delta.bias_indices.long()] = delta.bias_values.to(torch.float32)
            tensors[f"{delta.name}.diff_b"] = _cast_finite(bias, dtype, delta.name)
    return tensors


def _cast_finite(values: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """values.to(dtype), refused when a finite value would become Inf (beyond fp16's 65504)."""
    cast = values.to(dtype)
    overflow = torch.isfinite(values) & ~torch.isfinite(cast)
    if bool(overflow.any()):
        largest = float(values[overflow].abs().max())
        raise SaraFileError(f"module {name}: a delta of {largest:.4g} does not fit {dtype} (it would be stored as "
                            "Inf); write fp32 (--dtype fp32)")
    return cast


def _support(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = dense.reshape(-1)
    indices = flat.nonzero().reshape(-1)
    return indices.to(torch.int32), flat[indices]


def from_diff(tensors: Mapping[str, torch.Tensor], path: str = "<diff>",
              progress: Progress = _no_progress) -> tuple[list[ModuleDelta], list[str]]:
    """Native deltas holding exactly the nonzero entries of a diff file, and the names of modules
    left out because their weight diff is all zero (a native module needs a weight support)."""
    grouped = group_modules(tensors)
    _check_names(grouped, path)
    deltas, empty = [], []
    for name in progress(sorted(grouped), desc="read diff", unit="module"):
        parts = grouped[name]
        unknown = set(parts) - set(DIFF_SUFFIXES)
        if unknown or "diff" not in parts:
            kind = "a LoRA (use from-lora)" if set(parts) & set(LORA_SUFFIXES) else f"suffixes {sorted(parts)}"
            raise SaraFileError(f"{path}: module {name}: expected .diff (+ .diff_b), found {kind}")
        diff = parts["diff"]
        if not diff.is_floating_point() or not bool(torch.isfinite(diff).all()):
            raise SaraFileError(f"{path}: module {name}: .diff must be finite floating point values")
        indices, values = _support(diff)
        if not indices.numel():
            empty.append(name)
            continue
        bias_indices = bias_values = None
        if "diff_b" in parts:
            if parts["diff_b"].shape != (diff.shape[0],):
                raise SaraFileError(f"{path}: module {name}: .diff_b has shape {tuple(parts['diff_b'].shape)}, "
                                    f"expected ({diff.shape[0]},)")
            bias_indices, bias_values = _support(parts["diff_b"])
            if not bias_indices.numel():
                bias_indices = bias_values = None
        deltas.append(ModuleDelta(name, tuple(diff.shape), indices, values, None, bias_indices, bias_values))
    if not deltas:
        raise SaraFileError(f"{path}: every diff is zero, nothing to convert")
    return deltas, empty


# ---------------------------------------------------------------------------------------------
# low rank: native -> LoRA
@dataclasses.dataclass(frozen=True)
class RankRule:
    """How each module's rank is chosen: a fixed `rank`, or the smallest rank that keeps `energy`
    of the squared singular values / reaches `max_rel_error`, never above `max_rank` nor, when
    given with `energy` / `max_rel_error`, above `rank`."""

    rank: Optional[int] = None
    energy: Optional[float] = None
    max_rel_error: Optional[float] = None
    max_rank: Optional[int] = None

    def __post_init__(self):
        if self.energy is not None and self.max_rel_error is not None:
            raise ValueError("give either --energy or --max-error, not both")
        if self.rank is None and self.energy is None and self.max_rel_error is None:
            raise ValueError("give --rank, --energy or --max-error")
        if self.rank is not None and self.rank < 1 or self.max_rank is not None and self.max_rank < 1:
            raise ValueError("ranks must be >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError("--energy must be in (0, 1]")
        if self.max_rel_error is not None and not 0 <= self.max_rel_error < 1:
            raise ValueError("--max-error must be in [0, 1)")

    @property
    def adaptive(self) -> bool:
        return self.energy is not None or self.max_rel_error is not None

    def cap(self, full_rank: int) -> int:
        """The largest rank the rule can pick (what a randomized SVD must compute)."""
        limit = full_rank if self.max_rank is None else min(self.max_rank, full_rank)
        return min(self.rank, limit) if self.rank is not None else limit

    def choose(self, singular_values: torch.Tensor, total_sq: float, full_rank: int) -> int:
        """The rank for a spectrum (the leading values suffice: the tail comes from total_sq)."""
        cap = self.cap(full_rank)
        if not self.adaptive:
            return cap
        allowed = (1.0 - self.energy) if self.energy is not None else self.max_rel_error ** 2
        if allowed <= 0:
            return cap
        tail = total_sq - torch.cumsum(singular_values.to(torch.float64) ** 2, 0)
        reached = (tail <= allowed * total_sq + 1e-12 * total_sq).nonzero()
        return min(cap, int(reached[0]) + 1 if reached.numel() else cap)


# Randomized SVD settings (Halko et al.'s range finder): `rank + OVERSAMPLE` random probes, then
# POWER_ITERATIONS passes of A A^T, from a fixed seed (the same file gives the same LoRA).
# tests/test_convert.py checks the error against the exact truncated SVD's.
OVERSAMPLE = 10
POWER_ITERATIONS = 2
SEED = 0
# Above this fraction of nonzero entries a module's delta is handled as a dense matrix (BLAS products
# then beat torch's CSR products plus the sort by column that A^T needs; measured on SD1.5 modules).
SPARSE_BELOW_DENSITY = 0.1


def _csr(offsets: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape: tuple) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(offsets, columns, values, shape, check_invariants=False)


def _offsets(sorted_rows: torch.Tensor, count: int) -> torch.Tensor:
    """int32 CSR row offsets of entries sorted by row."""
    offsets = torch.zeros(count + 1, dtype=torch.int32)
    offsets[1:] = torch.bincount(sorted_rows, minlength=count).cumsum(0)
    return offsets


class DeltaMatrix:
    """A module's delta as the matrix (out, in*kh*kw) with the products a randomized SVD needs, in
    fp32: sparse (int32 CSR of A and of A^T) at low density, else dense."""

    def __init__(self, delta: ModuleDelta, dense: bool):
        rows = delta.shape[0]
        cols = delta.numel // rows
        self.shape = (rows, cols)
        self.norm_sq = float(delta.values.to(torch.float64).square().sum())
        self.transposed = self.matrix64 = None
        if dense:
            self.matrix = delta.dense(torch.float32).reshape(rows, cols)
            return
        flat = delta.indices.long()  # sorted row-major: already CSR order
        row, col = (flat // cols).to(torch.int32), (flat % cols).to(torch.int32)
        order = torch.sort(col, stable=True).indices  # rows stay ascending within a column
        values = delta.values.to(torch.float32)
        row_offsets = _offsets(row, rows)
        self.matrix = _csr(row_offsets, col, values, self.shape)
        self.transposed = _csr(_offsets(col, cols), row[order], values[order], (cols, rows))
        self.matrix64 = _csr(row_offsets, col, delta.values.to(torch.float64), self.shape)  # for the error

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """A @ x"""
        return self.matrix @ x

    def rmm(self, x: torch.Tensor) -> torch.Tensor:
        """A^T @ x"""
        return self.matrix.T @ x if self.transposed is None else self.transposed @ x

    def residual_sq(self, up: torch.Tensor, down: torch.Tensor) -> float:
        """||A - up @ down||_F^2: dense directly; sparse as ||A||^2 - 2<A, L> + ||L||^2 in fp64."""
        if self.transposed is None:  # fp32, cascade-summed (vector_norm's fp32 sum is ~1e-4 off)
            return float(torch.addmm(self.matrix, up, down, alpha=-1.0).square_().sum())
        up, down = up.to(torch.float64), down.to(torch.float64)
        cross = float((up * (self.matrix64 @ down.T)).sum())
        own = float(((up.T @ up) * (down @ down.T)).sum())
        return max(self.norm_sq - 2.0 * cross + own, 0.0)


def randomized_svd(matrix: DeltaMatrix, q: int, power_iterations: int = POWER_ITERATIONS,
                   seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of the leading singular triplets from a q-dimensional randomized range (q <= min dim)."""
    generator = torch.Generator().manual_seed(seed)
    probes = torch.randn(matrix.shape[1], q, generator=generator)
    basis = torch.linalg.qr(matrix.mm(probes)).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix.rmm(basis)).Q
        basis = torch.linalg.qr(matrix.mm(basis)).Q
    # Q^T A = (A^T Q)^T = (Q_z R_z)^T: the SVD of the small R_z^T instead of the wide Q^T A
    q_z, r_z = torch.linalg.qr(matrix.rmm(basis))
    u, s, vh = torch.linalg.svd(r_z.T)
    return basis @ u, s, vh @ q_z.T


@dataclasses.dataclass
class LoraModule:
    name: str
    rank: int
    error_sq: float  # ||D - up @ down||_F^2 of the factors as stored
    norm_sq: float  # ||D||_F^2

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq else 0.0


def lora_factors(delta: ModuleDelta, rule: RankRule, method: str = "auto",
                 dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_up, lora_down, ||D - up@down||_F^2) of a module's delta, with alpha = rank (scale 1).

    A conv delta (out, in, kh, kw) is factored as the matrix (out, in*kh*kw): lora_down is a kxk
    conv (r, in, kh, kw), lora_up a 1x1 conv (out, r, 1, 1), LoCon's layout. The singular values
    are split evenly (sqrt) between the factors, which keeps both in fp16 range. `method`: 'exact'
    (dense SVD), 'randomized', or 'auto' (exact when the rank bound is near the matrix size).
    The error is that of the factors as stored (in `dtype`); with `max_rel_error` the rank grows
    past the spectrum's estimate while the stored factors miss the target (up to the cap)."""
    shape = tuple(delta.shape)
    full_rank = min(shape[0], delta.numel // shape[0])
    cap = rule.cap(full_rank)
    exact = method == "exact" or (method == "auto" and 2 * (cap + OVERSAMPLE) >= full_rank)
    matrix = DeltaMatrix(delta, dense=exact or delta.indices.numel() > SPARSE_BELOW_DENSITY * delta.numel)
    if exact:
        u, s, vh = torch.linalg.svd(matrix.matrix, full_matrices=False)
    else:
        u, s, vh = randomized_svd(matrix, min(cap + OVERSAMPLE, full_rank), POWER_ITERATIONS)
    rank = min(max(1, rule.choose(s, matrix.norm_sq, full_rank)), s.numel())
    target_sq = None if rule.max_rel_error is None else rule.max_rel_error ** 2 * matrix.norm_sq
    while True:
        root = s[:rank].sqrt()
        up, down = (u[:, :rank] * root).to(dtype), (root[:, None] * vh[:rank]).to(dtype)
        error_sq = matrix.residual_sq(up.to(torch.float32), down.to(torch.float32))
        if target_sq is None or error_sq <= target_sq or rank >= min(cap, s.numel()):
            break
        rank += 1
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return up.contiguous(), down.contiguous(), error_sq


@dataclasses.dataclass
class LoraResult:
    tensors: dict[str, torch.Tensor]
    modules: list[LoraModule]
    bias_modules: list[str]  # modules whose bias deltas a LoRA cannot carry
    fillers: list[str]  # zero rank-1 modules added for A1111's OpenCLIP attention rule
    unreached: list[str] = dataclasses.field(default_factory=list)  # above max_rel_error at the rank cap

    @property
    def rel_error(self) -> float:
        norm_sq = sum(m.norm_sq for m in self.modules)
        return math.sqrt(sum(m.error_sq for m in self.modules) / norm_sq) if norm_sq else 0.0

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules), default=1)

    def report(self) -> dict:
        return {"rel_error": self.rel_error, "max_rank": self.max_rank,
                "modules": {m.name: {"rank": m.rank, "rel_error": m.rel_error} for m in self.modules},
                "dropped_bias_deltas": self.bias_modules, "zero_fillers": self.fillers,
                "above_max_error": self.unreached}


def pad_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with `rank` components (zero rows / columns added)."""
    extra = rank - down.shape[0]
    up = torch.cat([up, up.new_zeros(up.shape[0], extra, *up.shape[2:])], 1)
    return up, torch.cat([down, down.new_zeros(extra, *down.shape[1:])], 0)


def to_lora(deltas: Sequence[ModuleDelta], rule: RankRule, version: str, method: str = "auto",
            dtype: torch.dtype = torch.float16, progress: Progress = _no_progress, uniform: bool = False) -> LoraResult:
    """kohya LoRA tensors of native deltas (all-zero modules are left out). `uniform` pads every
    module with zeros to the largest rank: diffusers (0.42) loads a kohya file's mid_block attention
    alphas under wrong names and then scales those modules by common_alpha / rank, which is only
    right when every rank is the same."""
    factors, modules = {}, []
    for delta in progress(deltas, desc="SVD", unit="module"):
        norm_sq = float(delta.values.to(torch.float64).square().sum())
        if norm_sq == 0.0:
            continue
        up, down, error_sq = lora_factors(delta, rule, method, dtype)
        factors[delta.name] = (up, down)
        modules.append(LoraModule(delta.name, down.shape[0], error_sq, norm_sq))
    if not modules:
        raise SaraFileError("every delta in the file is zero: there is nothing to convert")
    tensors = {}
    for name, (up, down) in factors.items():
        if uniform:
            up, down = pad_rank(up, down, max(m.rank for m in modules))
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    shapes = {d.name: d.shape for d in deltas}
    fillers = open_clip_fillers({m.name: shapes[m.name] for m in modules}, version)
    for name, shape in fillers.items():
        tensors[f"{name}.lora_up.weight"] = torch.zeros(shape[0], 1, dtype=dtype)
        tensors[f"{name}.lora_down.weight"] = torch.zeros(1, shape[1], dtype=dtype)
        tensors[f"{name}.alpha"] = torch.tensor(1.0, dtype=dtype)
    bias_modules = [d.name for d in deltas if d.bias_indices is not None and d.bias_indices.numel()]
    unreached = [] if rule.max_rel_error is None else \
        [m.name for m in modules if m.rel_error > rule.max_rel_error * (1 + 1e-6)]
    return LoraResult(tensors, modules, bias_modules, sorted(fillers), unreached)


# pipeline parts whose LoRA keys diffusers' FluxPipeline / StableDiffusion3Pipeline.load_lora_weights reads
DIFFUSERS_LORA_PARTS = {"flux": ("transformer", "text_encoder"), "sd3": ("transformer", "text_encoder", "text_encoder_2")}


def diffusers_lora(tensors: Mapping[str, torch.Tensor], version: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A kohya LoRA of a FLUX.1 / SD3 model in diffusers' own keys (`transformer.<layer>.lora_A.weight` /
    `lora_B.weight`, `text_encoder.<path>...`), which FluxPipeline / StableDiffusion3Pipeline load as they
    are (diffusers has no converter for kohya's SD3 names, and its FLUX one assumes FLUX.1's widths).
    A stacked kohya layer becomes one LoRA per diffusers layer: the shared lora_A and that layer's rows
    of lora_B, so the product is unchanged; alpha / rank is folded into lora_B. Returns (tensors,
    modules left out because the pipeline loads no LoRA into their model: T5)."""
    arch = ARCH_OF_BASE_MODEL.get(version)
    if arch not in dit_names.LAYOUTS:
        raise ValueError(f"--format diffusers is for FLUX.1 / SD3 files, this one is {version} "
                         "(diffusers reads kohya's SD1 / SDXL LoRA names itself)")
    converted, left_out = {}, []
    for name, parts in group_modules(tensors).items():
        up, down = parts["lora_up.weight"], parts["lora_down.weight"]
        if "alpha" in parts:
            up = (up.to(torch.float32) * (float(parts["alpha"]) / down.shape[0])).to(up.dtype)
        prefix, path = ldm_names.split_name(name, arch)
        if prefix != ldm_names.UNET:
            folder = dit_names.TEXT_ENCODER_FOLDERS[arch][prefix]
            if folder not in DIFFUSERS_LORA_PARTS[arch]:
                left_out.append(name)
                continue
            layers = {f"{folder}.{path}": up}
        else:
            blocks: dict[str, dict[int, torch.Tensor]] = {}
            row = 0
            for piece in dit_names.pieces(path, (up.shape[0], down.shape[1]), arch):
                blocks.setdefault(piece.path, {})[piece.start] = up[row:row + piece.rows]
                row += piece.rows
            layers = {f"transformer.{layer}": torch.cat([rows[start] for start in sorted(rows)])
                      for layer, rows in blocks.items()}
        for layer, lora_b in layers.items():
            converted[f"{layer}.lora_A.weight"] = down.contiguous()
            converted[f"{layer}.lora_B.weight"] = lora_b.contiguous()
    return converted, sorted(left_out)


# ---------------------------------------------------------------------------------------------
# LoRA -> dense deltas
def lora_module_delta(name: str, parts: Mapping[str, torch.Tensor], path: str = "<lora>") -> torch.Tensor:
    """The dense fp32 delta of one kohya / LyCORIS LoCon module: scale * up @ (mid) @ down."""
    for marker, algo in _UNSUPPORTED.items():
        if any(marker in suffix for suffix in parts):
            raise SaraFileError(f"{path}: module {name} is {algo}; only LoRA / LoCon (lora_up, lora_down, "
                                "alpha, lora_mid) and diff modules can be converted")
    unknown = set(parts) - set(LORA_SUFFIXES)
    up = next((parts[s] for s in LORA_UP_SUFFIXES if s in parts), None)
    down = next((parts[s] for s in LORA_DOWN_SUFFIXES if s in parts), None)
    if unknown or up is None or down is None:
        what = "a diff (use from-diff)" if set(parts) & set(DIFF_SUFFIXES) else f"suffixes {sorted(parts)}"
        raise SaraFileError(f"{path}: module {name}: expected lora_up.weight + lora_down.weight (+ alpha), "
                            f"found {what}")
    alpha_part = parts.get("alpha")
    if not all(t.dim() in (2, 4) and t.is_floating_point() and t.shape[0] > 0 for t in (up, down)) \
            or alpha_part is not None and (alpha_part.numel() != 1 or not alpha_part.is_floating_point()):
        raise SaraFileError(f"{path}: module {name}: lora_up / lora_down must be 2-D or 4-D floating tensors and "
                            f"alpha one floating number; found up {up.dtype} {tuple(up.shape)}, down {down.dtype} "
                            f"{tuple(down.shape)}" + ("" if alpha_part is None else
                                                      f", alpha {alpha_part.dtype} {tuple(alpha_part.shape)}"))
    rank = down.shape[0]
    alpha = float(alpha_part) if alpha_part is not None else float(rank)
    scale = alpha / rank
    up32, down32 = up.to(torch.float32), down.to(torch.float32)
    try:
        if "lora_mid.weight" in parts:  # Tucker: down 1x1 -> mid kxk -> up 1x1
            mid = parts["lora_mid.weight"].to(torch.float32)
            dense = torch.einsum("oa,abhw,bi->oihw", up32.flatten(1), mid, down32.flatten(1))
        else:
            dense = (up32.flatten(1) @ down32.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    except RuntimeError as error:
        raise SaraFileError(f"{path}: module {name}: lora_up {tuple(up.shape)} and lora_down "
                            f"{tuple(down.shape)} do not fit together ({error})") from None
    if not bool(torch.isfinite(dense).all()):
        raise SaraFileError(f"{path}: module {name}: the LoRA holds NaN or Inf")
    return dense * scale


def lora_deltas(tensors: Mapping[str, torch.Tensor], path: str = "<lora>",
                progress: Progress = _no_progress) -> dict[str, torch.Tensor]:
    """{name: dense fp32 delta} of every module of a kohya / LyCORIS LoRA state dict."""
    grouped = group_modules(tensors)
    _check_names(grouped, path)
    if not grouped:
        raise SaraFileError(f"{path}: the file holds no tensors")
    return {name: lora_module_delta(name, grouped[name], path)
            for name in progress(sorted(grouped), desc="expand LoRA", unit="module")}


@dataclasses.dataclass
class Projection:
    deltas: list[ModuleDelta]
    errors: dict[str, float]  # per LoRA module: relative Frobenius error of the projection
    rel_error: float  # overall
    kept: int  # nonzero-support entries kept (budget used)


def _projection_errors(dense: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor]
                       ) -> tuple[dict[str, float], float]:
    """Per module and overall relative Frobenius errors of keeping only the entries `kept` (values)."""
    errors, total_err, total_norm = {}, 0.0, 0.0
    for name, matrix in dense.items():
        norm_sq = float(matrix.to(torch.float64).square().sum())
        kept_sq = float(kept[name].to(torch.float64).square().sum()) if name in kept else 0.0
        error_sq = max(norm_sq - kept_sq, 0.0)  # entries are kept exactly or dropped
        errors[name] = math.sqrt(error_sq / norm_sq) if norm_sq else 0.0
        total_err, total_norm = total_err + error_sq, total_norm + norm_sq
    return errors, (math.sqrt(total_err / total_norm) if total_norm else 0.0)


def project_onto(dense: Mapping[str, torch.Tensor], support: Mapping[str, tuple[tuple, torch.Tensor]],
                 path: str = "<lora>") -> Projection:
    """Native deltas on a given support ({name: (weight shape, sorted int32 indices)}), taking the
    LoRA's values there (zero for modules the LoRA does not touch). Every LoRA module must exist
    in `support`'s model with a matching number of entries (a 2-D delta fits a 1x1 conv)."""
    problems = [name for name in dense if name not in support]
    problems += [f"{name}: shape {tuple(d.shape)} vs the base's {support[name][0]}" for name, d in dense.items()
                 if name in support and d.numel() != math.prod(support[name][0])]
    if problems:
        raise SaraFileError(f"{path} does not fit the base model (is it for another base?): "
                            + "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    deltas, kept = [], {}
    for name, (shape, indices) in sorted(support.items()):
        if not indices.numel():
            continue
        if name in dense:
            values = dense[name].reshape(-1)[indices.long()]
            kept[name] = values
        else:
            values = torch.zeros(indices.numel(), dtype=torch.float32)
        deltas.append(ModuleDelta(name, tuple(shape), indices.to(torch.int32), values))
    errors, rel_error = _projection_errors(dense, kept)
    return Projection(deltas, errors, rel_error, sum(int((v != 0).sum()) for v in kept.values()))


def topk_deltas(dense: Mapping[str, torch.Tensor], budget: int) -> Projection:
    """The `budget` largest-magnitude entries over all modules (one global cut; ties may add a few)."""
    from .selection import kth_smallest_abs

    tensors = list(dense.values())
    total = sum(t.numel() for t in tensors)
    if budget < 1:
        raise ValueError("--topk-budget must be >= 1")
    cut = 0.0 if budget >= total else kth_smallest_abs(tensors, total - budget)
    deltas, kept = [], {}
    for name, matrix in sorted(dense.items()):
        flat = matrix.reshape(-1)
        indices = ((flat.abs() >= cut) & (flat != 0)).nonzero().reshape(-1)
        if indices.numel():
            kept[name] = flat[indices]
            deltas.append(ModuleDelta(name, tuple(matrix.shape), indices.to(torch.int32), flat[indices]))
    if not deltas:
        raise SaraFileError("the LoRA is zero everywhere: nothing to keep")
    errors, rel_error = _projection_errors(dense, kept)
    return Projection(deltas, errors, rel_error, sum(int(v.numel()) for v in kept.values()))


# ---------------------------------------------------------------------------------------------
# merging
def _scaled_union(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted union of index sets and the scaled sum of their values (fp32)."""
    indices = torch.cat([i.long() for i, _, _ in parts])
    values = torch.cat([v.to(torch.float32) * s for _, v, s in parts])
    union, position = torch.unique(indices, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=torch.float32).index_add_(0, position, values)
    return union.to(torch.int32), summed


def merge_natives(files: Sequence[tuple[Sequence[ModuleDelta], float]],
                  progress: Progress = _no_progress) -> list[ModuleDelta]:
    """One native delta list: per module the union of supports and sum(scale * delta).
    Progressive-step frozen flags do not survive a merge (they describe one training run)."""
    by_name: dict[str, list[tuple[ModuleDelta, float]]] = {}
    for deltas, scale in files:
        for delta in deltas:
            by_name.setdefault(delta.name, []).append((delta, float(scale)))
    merged = []
    for name in progress(sorted(by_name), desc="merge", unit="module"):
        items = by_name[name]
        shapes = {tuple(d.shape) for d, _ in items}
        if len(shapes) > 1:
            raise SaraFileError(f"module {name} has different shapes in the merged files: {sorted(shapes)}; "
                                "they were trained on different base models")
        shape = items[0][0].shape
        indices, values = _scaled_union([(d.indices, d.values, s) for d, s in items])
        bias = [(d.bias_indices, d.bias_values, s) for d, s in items if d.bias_indices is not None]
        bias_indices, bias_values = _scaled_union(bias) if bias else (None, None)
        merged.append(ModuleDelta(name, tuple(shape), indices, values, None, bias_indices, bias_values))
    return merged



# ---------------------------------------------------------------------------------------------
# base models: a diffusers folder or a single-file LDM checkpoint, as kohya-named targets
@dataclasses.dataclass
class BaseModel:
    """A base model's Linear / Conv2d weights under kohya names. `models` are the loaded diffusers /
    transformers models of a folder ({subfolder: model}); `state_dict` is a checkpoint's tensors, and
    the targets' weights are views into it (so merging into a target patches the checkpoint)."""

    path: str
    version: str
    targets: list
    models: dict = dataclasses.field(default_factory=dict)
    state_dict: Optional[dict] = None
    metadata: dict = dataclasses.field(default_factory=dict)
    # kohya layers that are several diffusers layers (FLUX.1 / SD3 q/k/v, linear1, final AdaLN): the
    # target holds a stacked copy; [(target module, [(diffusers layer, dit_names.Piece), ...])]
    stacked: list = dataclasses.field(default_factory=list)

    def weights(self) -> dict[str, torch.Tensor]:
        return {t.name: t.module.weight for t in self.targets}

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked targets' (merged) rows back into the diffusers layers they came from."""
        for module, parts in self.stacked:
            row = 0
            for layer, piece in parts:
                for name in ("weight", "bias"):
                    if getattr(module, name) is not None:
                        getattr(layer, name)[piece.start:piece.start + piece.rows] = \
                            getattr(module, name)[row:row + piece.rows]
                row += piece.rows


def _stored_dtype(folder: str) -> Optional[torch.dtype]:
    """The dtype of the first floating tensor of a model subfolder's safetensors (None if unknown)."""
    import glob

    from safetensors import safe_open

    for file in sorted(glob.glob(f"{folder}/*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(tensor.get_dtype())
                if dtype is not None:
                    return dtype
    return None


def _unet_layout(config: Mapping) -> "ldm_names.UNetLayout":
    attention = tuple("CrossAttn" in kind for kind in config["down_block_types"])
    return ldm_names.UNetLayout(int(config["layers_per_block"]), attention)


def load_diffusers_folder(path: str, version: Optional[str] = None) -> BaseModel:
    """The U-Net and text encoders of a diffusers pipeline folder, in their stored dtype. SDXL
    (a text_encoder_2 is present) gets kohya's LDM U-Net names, as kohya's SDXL trainer writes them;
    a FLUX.1 / SD3 folder (transformer/) gets kohya's names too (load_diffusers_dit_folder)."""
    import os

    from diffusers import UNet2DConditionModel

    from .compat import dtype_kwargs
    from .naming import UNET_PREFIX, kohya_name, text_encoder_prefixes
    from .network import Target, all_targets

    if os.path.isdir(os.path.join(path, "transformer")):
        return load_diffusers_dit_folder(path, version)
    if not os.path.isdir(os.path.join(path, "unet")):
        raise SaraFileError(f"{path}: not a diffusers model folder (no unet/ subfolder)")
    models = {"unet": UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", **dtype_kwargs("diffusers", _stored_dtype(os.path.join(path, "unet"))))}
    models.update(_text_encoders(path, ("text_encoder", "text_encoder_2")))
    encoders = [models[s] for s in ("text_encoder", "text_encoder_2") if s in models]
    sdxl = "text_encoder_2" in models
    if version is None:
        version = ("sdxl_base_v1-0" if sdxl else
                   "sd_v2" if models["unet"].config.cross_attention_dim == 1024 else "sd_v1")
    targets = all_targets(models["unet"], encoders, text_encoder_prefixes(encoders) if encoders else [])
    if ARCH_OF_BASE_MODEL.get(version) == "sdxl":
        layout = _unet_layout(models["unet"].config)
        targets = [Target(kohya_name(UNET_PREFIX, path_), path_, t.module, t.component) if t.component == "unet"
                   else t for t, path_ in
                   ((t, ldm_names.diffusers_to_ldm_unet(t.path, layout) if t.component == "unet" else t.path)
                    for t in targets)]
    return BaseModel(path, version, targets, models=models)


def _text_encoders(path: str, subfolders: Iterable[str]) -> dict:
    """The transformers text encoders of a pipeline's subfolders that exist, in their stored dtype."""
    import os

    import transformers

    from .compat import dtype_kwargs

    models = {}
    for sub in subfolders:
        folder = os.path.join(path, sub)
        if os.path.isdir(folder):
            with open(os.path.join(folder, "config.json")) as stream:
                architecture = json.load(stream)["architectures"][0]
            models[sub] = getattr(transformers, architecture).from_pretrained(
                folder, **dtype_kwargs("transformers", _stored_dtype(folder)))
    return models


DIT_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def _sd3_version(qk_norm: bool, dual_attention: bool) -> str:
    """kohya's SD3 model_type: 3.5 Medium has a second attention in some blocks, 3.5 Large only the q/k norms."""
    return "5-medium" if dual_attention else "5-large" if qk_norm else "medium"


def dit_targets(transformer: torch.nn.Module, arch: str) -> tuple[list, list]:
    """(kohya-named targets, stacked copies) of a diffusers FLUX / SD3 transformer: a kohya layer that
    is one whole diffusers layer is that layer; one made of several (or of swapped halves) is a
    stacked copy, which BaseModel.write_back returns to the diffusers layers."""
    from .naming import UNET_PREFIX, kohya_name
    from .network import Target

    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    layout = dit_names.kohya_layout({n: tuple(m.weight.shape) for n, m in layers.items()}, arch)
    uncovered = set(layers) - {p.path for parts in layout.values() for p in parts}
    if uncovered:
        raise SaraFileError(f"diffusers layers with no kohya {arch} counterpart: {sorted(uncovered)[:5]}")
    targets, stacked = [], []
    for path, parts in layout.items():
        first = layers[parts[0].path]
        if len(parts) == 1 and parts[0].rows == first.weight.shape[0]:
            module = first
        else:
            def stack(name):
                tensors = [getattr(layers[p.path], name) for p in parts]
                if any(t is None for t in tensors):
                    return None
                return torch.cat([t.detach()[p.start:p.start + p.rows] for t, p in zip(tensors, parts)])

            module = _weight_module(stack("weight"), stack("bias"))
            stacked.append((module, [(layers[p.path], p) for p in parts]))
        targets.append(Target(kohya_name(UNET_PREFIX, path), path, module, "unet"))
    return targets, stacked


def load_diffusers_dit_folder(path: str, version: Optional[str] = None) -> BaseModel:
    """A FLUX.1 / SD3 diffusers pipeline folder (transformer/, text encoders) under kohya's names."""
    import os

    import diffusers

    from .compat import dtype_kwargs
    from .network import all_targets

    folder = os.path.join(path, "transformer")
    with open(os.path.join(folder, "config.json")) as stream:
        class_name = json.load(stream).get("_class_name")
    arch = DIT_CLASSES.get(str(class_name))
    if arch is None or not hasattr(diffusers, str(class_name)):
        raise SaraFileError(f"{folder}: {class_name!r} is not a FLUX.1 / SD3 transformer this diffusers can load "
                            f"(known: {', '.join(DIT_CLASSES)})")
    transformer = getattr(diffusers, class_name).from_pretrained(
        path, subfolder="transformer", **dtype_kwargs("diffusers", _stored_dtype(folder)))
    models = {"transformer": transformer}
    targets, stacked = dit_targets(transformer, arch)
    folders = dit_names.TEXT_ENCODER_FOLDERS[arch]
    models.update(_text_encoders(path, folders.values()))
    for prefix, sub in folders.items():
        if sub in models:
            targets += all_targets(None, [models[sub]], [prefix])
    if version is None:
        config = transformer.config
        version = "flux1" if arch == "flux" else _sd3_version(bool(config.get("qk_norm")),
                                                              bool(config.get("dual_attention_layers")))
    return BaseModel(path, version, targets, models=models, stacked=stacked)


def _unet_prefix(keys: Iterable[str]) -> str:
    """`model.diffusion_model.`, or "" for a bare transformer file (Black Forest Labs' FLUX.1 release)."""
    return ldm_names.UNET_CHECKPOINT_PREFIX if any(k.startswith(ldm_names.UNET_CHECKPOINT_PREFIX) for k in keys) else ""


def checkpoint_version(keys: Iterable[str]) -> str:
    keys = list(keys)
    blocks = {k.split(".")[0] for k in keys} | {k.split(".")[2] for k in keys if k.startswith("model.diffusion_model.")}
    if "double_blocks" in blocks:
        return "flux1"
    if "joint_blocks" in blocks:
        return _sd3_version(any(".ln_q." in k for k in keys), any(".x_block.attn2." in k for k in keys))
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl_base_v1-0"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd_v2"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd_v1"
    raise SaraFileError("not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)")


def _weight_module(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.nn.Module:
    """A Linear / Conv2d shell whose parameters are the given checkpoint tensors (shared, not copied)."""
    module = (torch.nn.Linear(1, 1, device="meta") if weight.dim() == 2 else torch.nn.Conv2d(1, 1, 1, device="meta"))
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    return module


def checkpoint_targets(state_dict: Mapping[str, torch.Tensor], version: str) -> list:
    """kohya-named targets over an LDM checkpoint state dict: every U-Net Linear / Conv2d weight and
    every text-encoder layer projection (an OpenCLIP fused in_proj gives three targets)."""
    from .naming import component_of
    from .network import Target

    arch = ldm_names.get_arch(ARCH_OF_BASE_MODEL[version])
    unet_prefix = _unet_prefix(state_dict) if arch.unet is None else ldm_names.UNET_CHECKPOINT_PREFIX
    targets = []
    for key, tensor in state_dict.items():
        if tensor.dim() not in (2, 4) or not key.endswith(("weight", "text_projection")):
            continue
        for chunk in ((0, 1, 2) if key.endswith("in_proj_weight") else (None,)):
            try:
                name = ldm_names.kohya_name_for_checkpoint_key(key, arch, chunk, unet_prefix)
                prefix, path = ldm_names.split_name(name, arch)
                target = ldm_names.checkpoint_key(name, arch, unet_prefix)
            except ldm_names.UnknownModuleName:
                continue
            if prefix != ldm_names.UNET and not (path.startswith(("text_model.encoder.layers.", "text_projection",
                                                                  "encoder.block."))
                                                 and "relative_attention_bias" not in path):
                continue  # embeddings and norms are not Linear / Conv2d
            bias = state_dict.get(target.bias_key) if target.bias_key else None
            module = _weight_module(target.view(tensor), None if bias is None else target.view(bias))
            targets.append(Target(name, path, module, component_of(name)))
    return targets


def _model_base(path: str, model: torch.nn.Module, version: Optional[str], **stored) -> BaseModel:
    """A base model that is one diffusers model (not a pipeline): its Linear / Conv2d under U-Net names,
    as SaRA names them when it trains that model (the demo, apply_sara on a bare model)."""
    from .network import all_targets

    return BaseModel(path, version or CUSTOM_BASE, all_targets(model, [], []), **stored)


def load_diffusers_model_folder(path: str, version: Optional[str] = None) -> BaseModel:
    """A diffusers model folder (config.json naming its `_class_name`, e.g. a UNet2DModel)."""
    import os

    import diffusers

    with open(os.path.join(path, "config.json")) as stream:
        class_name = json.load(stream).get("_class_name")
    model_class = getattr(diffusers, str(class_name), None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise SaraFileError(f"{path}: config.json names {class_name!r}, which is not a diffusers model class")
    model = model_class.from_pretrained(path, torch_dtype=_stored_dtype(path))
    return _model_base(path, model, version, models={"": model})


def load_checkpoint(path: str, version: Optional[str] = None) -> BaseModel:
    from .demo import BASE_METADATA_KEY
    from .fileformat import describe_foreign, read_tensors

    state_dict, metadata = read_tensors(path)
    if BASE_METADATA_KEY in metadata:
        from .demo.model import load_base as load_demo_base

        unet = load_demo_base(path)
        return _model_base(path, unet, version, state_dict=unet.state_dict(), metadata=metadata)
    if version is None:
        try:
            version = checkpoint_version(state_dict)
        except SaraFileError as error:
            adapter = "a native SaRA file" if "sara_format" in metadata else describe_foreign(state_dict)
            found = f"it looks like {adapter}, not a base model" if adapter else "no model sara can read"
            raise SaraFileError(f"{path}: {error}; {found}. A base model is {BASE_KINDS}") from None
    return BaseModel(path, version, checkpoint_targets(state_dict, version), state_dict=state_dict, metadata=metadata)


def load_base(path: str, version: Optional[str] = None) -> BaseModel:
    """A base model: see BASE_KINDS (a .ckpt must hold tensors only)."""
    import os

    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "unet")) or os.path.isdir(os.path.join(path, "transformer")):
            return load_diffusers_folder(path, version)
        if os.path.isfile(os.path.join(path, "config.json")):
            return load_diffusers_model_folder(path, version)
        raise SaraFileError(f"{path}: a folder without unet/ or config.json; a base model is {BASE_KINDS}")
    return load_checkpoint(path, version)


def preset_support(base: BaseModel, config, progress: Progress = _no_progress
                   ) -> tuple[dict[str, tuple[tuple, torch.Tensor]], dict]:
    """The SaRA selection of `config` (threshold / budget / density / preset) on a base model:
    ({name: (weight shape, indices)}, the network's file metadata: thresholds, base hash, config)."""
    from .network import SaraNetwork
    from .presets import load_preset

    rules = load_preset(config.preset)
    targets = [t for t in base.targets if (rules.unet if t.component == "unet" else rules.text_encoder).matches(t.path)]
    network = SaraNetwork(config)
    network.select(targets, progress)
    support = {m.sara_name: (m.weight_shape, m.indices) for m in network.sara_modules()}
    return support, network.file_metadata()


@torch.no_grad()
def bake(base: BaseModel, deltas: Sequence[ModuleDelta], source: str = "the SaRA files",
         progress: Progress = _no_progress) -> None:
    """Add the deltas (scales already folded in) into the base weights: fp32 math, dtypes kept.
    All-or-nothing: every module must exist in the base with the same shape."""
    from .network import SaraNetwork

    network = SaraNetwork()
    network.adopt_deltas(base.targets, deltas, source)
    network.merge_into_base(1.0, progress)
    for module in network.sara_modules():
        if not bool(torch.isfinite(module.base.weight).all()):
            raise SaraFileError(f"{source}: module {module.sara_name}: the merged weight holds NaN or Inf (the deltas "
                                f"overflow the base's {module.base.weight.dtype}, or the base already held them)")
    base.write_back()


def write_merged(base: BaseModel, output: str) -> None:
    """Write a baked base model like its input: a checkpoint file, or a diffusers folder (models
    re-saved as safetensors, every other subfolder copied), atomically (built aside, then renamed)."""
    import os
    import shutil

    from .fileformat import atomic_folder, give_plain_modes, save_tensors

    if base.state_dict is not None:
        save_tensors(output, base.state_dict, base.metadata, with_hash=False)
        return
    with atomic_folder(output) as staging:
        # a model folder ("" in models) is re-saved whole; a pipeline's other subfolders are copied
        for entry in ([] if "" in base.models else os.listdir(base.path)):
            if entry not in base.models:
                source = os.path.join(base.path, entry)
                copy = shutil.copytree if os.path.isdir(source) else shutil.copy2
                copy(source, os.path.join(staging, entry))
        for sub, model in base.models.items():
            model.save_pretrained(os.path.join(staging, sub), safe_serialization=True)
            give_plain_modes(os.path.join(staging, sub))
