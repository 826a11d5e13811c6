"""What is in a base model and in an adapter file: numbers for `sara analyze` and `sara inspect`.

analyze: the |w| distribution over a base model's Linear / Conv2d weights, per block, the fraction
a threshold selects, the threshold a budget needs (exact radix select, as training computes it),
and a plot. inspect: a native / LoRA / diff file's modules, sizes, densities and values, and
whether a base model fits it.
"""
from __future__ import annotations

import dataclasses
import io
import math
from collections import OrderedDict
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from . import convert, fileformat, ldm_names, selection
from .naming import component_of

HISTOGRAM_RANGE = (-10.0, 1.0)  # log10 |w|
HISTOGRAM_BINS = 220


def block_name(kohya_name: str) -> str:
    """'unet:down_blocks.1', 'lora_te1:text_model.encoder' ... of a kohya module name."""
    component = component_of(kohya_name)
    prefix = "lora_unet" if component == "unet" else component
    return f"{component}:{selection.block_of(ldm_names.dotted(kohya_name[len(prefix) + 1:]))}"


def named_weights(source: Union["convert.BaseModel", torch.nn.Module, Mapping[str, torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    """{block-able name: weight} of every Linear / Conv2d weight of a base model, a torch module
    (names are module paths) or a state dict (2-D / 4-D `.weight` tensors)."""
    if isinstance(source, convert.BaseModel):
        return source.weights()
    if isinstance(source, torch.nn.Module):
        return {path: m.weight for path, m in source.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return {key[:-len(".weight")]: t for key, t in source.items() if key.endswith(".weight") and t.dim() in (2, 4)}


def _block(name: str) -> str:
    return block_name(name) if name.startswith(convert.NAME_PREFIXES) else selection.block_of(name)


@dataclasses.dataclass
class Analysis:
    thresholds: list[float]
    blocks: dict[str, dict]  # block -> {"weights": n, "below": [count per threshold], "selected": n}
    total: int
    below: list[int]  # per threshold, overall
    selected_threshold: float  # the budget's threshold, else the given threshold (the training default)
    selected: int
    budget: Optional[int]
    histogram: torch.Tensor  # counts over log10|w| bins in HISTOGRAM_RANGE
    zeros: int

    def to_dict(self) -> dict:
        return {"thresholds": self.thresholds, "total": self.total,
                "fraction_below": {f"{t:.6g}": b / self.total for t, b in zip(self.thresholds, self.below)},
                "budget": self.budget, "selected_threshold": self.selected_threshold,
                "selected_fraction": self.selected / self.total, "zeros": self.zeros,
                "blocks": {name: {"weights": b["weights"],
                                  "fraction_below": {f"{t:.6g}": c / b["weights"] for t, c in zip(self.thresholds, b["below"])},
                                  "selected_fraction": b["selected"] / b["weights"]}
                           for name, b in self.blocks.items()}}


def analyze(source, thresholds: Sequence[float] = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
            budget: Optional[int] = None, progress: Callable = convert._no_progress,
            threshold: float = 2e-3) -> Analysis:
    """|w| statistics of a base model (see named_weights for what `source` may be); 'selected' is
    what `budget` selects, else what `threshold` selects (default: the training default)."""
    weights = named_weights(source)
    if not weights:
        raise ValueError("no Linear / Conv2d weights found")
    thresholds = sorted(float(t) for t in thresholds)
    total = sum(w.numel() for w in weights.values())
    if budget is not None and not 0 < budget <= total:
        raise ValueError(f"--budget must be in 1..{total} (the model's Linear/Conv2d weight count)")
    chosen = selection.threshold_for_count(list(weights.values()), budget) if budget else float(threshold)
    limits = [selection.fp32(t) for t in thresholds]
    blocks: dict[str, dict] = OrderedDict()
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
    zeros = 0
    for name, weight in progress(weights.items(), desc="analyze", unit="module"):
        magnitude = selection.canonical_abs(weight)
        block = blocks.setdefault(_block(name), {"weights": 0, "below": [0] * len(limits), "selected": 0})
        block["weights"] += magnitude.numel()
        for position, limit in enumerate(limits):
            block["below"][position] += int((magnitude < limit).sum())
        block["selected"] += int((magnitude < selection.fp32(chosen)).sum())
        nonzero = magnitude[magnitude > 0]
        zeros += magnitude.numel() - nonzero.numel()
        histogram += torch.histc(nonzero.log10(), HISTOGRAM_BINS, *HISTOGRAM_RANGE).to(torch.float64)
    below = [sum(b["below"][i] for b in blocks.values()) for i in range(len(limits))]
    selected = sum(b["selected"] for b in blocks.values())
    return Analysis(thresholds, blocks, total, below, chosen, selected, budget, histogram, zeros)


def plot_analysis(result: Analysis, path: str, title: str = "") -> None:
    """A PNG: the histogram of log10|w| with the thresholds marked, and the selected fraction per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = HISTOGRAM_RANGE
    width = (high - low) / HISTOGRAM_BINS
    centers = [low + (i + 0.5) * width for i in range(HISTOGRAM_BINS)]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 9), gridspec_kw={"height_ratios": [1, 1.3]})
    top.bar(centers, (result.histogram / result.total).tolist(), width=width, color="#4477aa")
    top.set_yscale("log")
    occupied = result.histogram.nonzero().reshape(-1)
    top.set_xlim(low + (int(occupied[0]) - 2) * width, low + (int(occupied[-1]) + 3) * width)
    top.set_xlabel("log10 |w|")
    top.set_ylabel("fraction of weights")
    for threshold, count in zip(result.thresholds, result.below):
        top.axvline(math.log10(threshold), color="#999999", linestyle=":", linewidth=1)
        top.text(math.log10(threshold), 0.97, f" {threshold:g}: {count / result.total:.2%}", rotation=90,
                 transform=top.get_xaxis_transform(), ha="right", va="top", fontsize=7)
    top.axvline(math.log10(result.selected_threshold), color="#cc3311", linewidth=1.5,
                label=f"selection threshold {result.selected_threshold:.4g} "
                      f"({result.selected / result.total:.2%} of {result.total:,d})")
    top.legend(loc="upper left", fontsize=8)
    names = list(result.blocks)
    fractions = [b["selected"] / b["weights"] for b in result.blocks.values()]
    bottom.bar(range(len(names)), fractions, color="#228833")
    bottom.axhline(result.selected / result.total, color="#cc3311", linewidth=1, label="overall")
    bottom.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    bottom.set_ylabel(f"fraction with |w| < {result.selected_threshold:.4g}")
    bottom.legend(fontsize=8)
    figure.suptitle(title or "SaRA: |w| distribution of the base model")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    fileformat.atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# inspect
def file_kind(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """'native', 'lora', 'diff' or 'unknown'."""
    if isinstance(metadata, Mapping) and metadata.get("sara_format") == fileformat.FORMAT_NAME:
        return "native"
    suffixes = {fileformat.split_key(key)[1] for key in tensors}
    if suffixes & set(fileformat.LORA_SUFFIXES):
        return "lora"
    if suffixes and suffixes <= set(convert.DIFF_SUFFIXES):
        return "diff"
    return "unknown"


def value_stats(values: torch.Tensor) -> dict:
    values = values.to(torch.float32)
    if not values.numel():
        return {"count": 0}
    is_finite = torch.isfinite(values)
    finite = values if bool(is_finite.all()) else values[is_finite]  # a copy only when something is not
    if not finite.numel():
        return {"count": values.numel(), "nonfinite": values.numel()}
    low, high = torch.aminmax(finite)
    return {"count": values.numel(), "nonfinite": values.numel() - finite.numel(),
            "min": float(low), "max": float(high), "mean_abs": float(finite.abs().mean()),
            "rms": float(torch.linalg.vector_norm(finite) / finite.numel() ** 0.5), "zeros": int((finite == 0).sum())}


def module_summaries(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str,
                     progress: Callable = convert._no_progress,
                     allow_non_finite: bool = False) -> tuple[str, dict[str, dict], torch.Tensor]:
    """(kind, {name: {"shape", "stored", "entries"}}, all delta values) of an adapter file; a native
    or diff file is fully validated / decoded, a LoRA is expanded module by module."""
    kind = file_kind(tensors, metadata)
    modules, values = {}, []
    if kind == "native":
        for delta in fileformat.parse_native(tensors, metadata, path, allow_non_finite, progress):
            modules[delta.name] = {"shape": delta.shape, "stored": int(delta.indices.numel()), "entries": delta.numel}
            values.append(delta.values)
    elif kind == "diff":
        for delta in convert.from_diff(tensors, path, progress)[0]:
            modules[delta.name] = {"shape": delta.shape, "stored": int(delta.indices.numel()), "entries": delta.numel}
            values.append(delta.values)
    elif kind == "lora":
        grouped = convert.group_modules(tensors)
        for name, dense in convert.lora_deltas(tensors, path, progress).items():
            rank = next(t.shape[0] for s, t in grouped[name].items() if s in convert.LORA_DOWN_SUFFIXES)
            modules[name] = {"shape": tuple(dense.shape), "rank": int(rank), "entries": dense.numel(),
                             "stored": sum(t.numel() for t in grouped[name].values())}
            values.append(dense.reshape(-1))
    else:
        foreign = fileformat.describe_foreign(tensors)
        raise fileformat.SaraFileError(f"{path}: not a SaRA, LoRA or diff adapter file"
                                       + (f"; it looks like {foreign}" if foreign else ""))
    return kind, modules, torch.cat([v.to(torch.float32).reshape(-1) for v in values])


def base_match(modules: Mapping[str, dict], metadata: Mapping[str, str], base: "convert.BaseModel") -> dict:
    """Whether a base model fits a file: missing modules, shape mismatches, base-hash agreement."""
    weights = base.weights()
    missing = [n for n in modules if n not in weights]
    mismatched = [f"{n}: file {tuple(m['shape'])}, base {tuple(weights[n].shape)}" for n, m in modules.items()
                  if n in weights and weights[n].numel() != math.prod(m["shape"])]
    file_hash = metadata.get("sara_base_hash") or None
    fits = not missing and not mismatched
    base_hash = fileformat.base_fingerprint((n, weights[n]) for n in modules) if fits else None
    return {"fits": fits, "missing": missing, "shape_mismatches": mismatched, "file_base_hash": file_hash,
            "base_hash": base_hash, "hash_matches": fileformat.same_base(file_hash, base_hash)}


def inspect_file(path: str, base: Optional["convert.BaseModel"] = None,
                 progress: Callable = convert._no_progress, allow_non_finite: bool = False) -> dict:
    """Everything `sara inspect` prints about an adapter file."""
    tensors, metadata = fileformat.read_tensors(path)
    kind, modules, values = module_summaries(tensors, metadata, path, progress, allow_non_finite)
    blocks: dict[str, list[int]] = OrderedDict()
    for name, module in modules.items():
        counts = blocks.setdefault(block_name(name), [0, 0])
        counts[0] += module["stored"]
        counts[1] += module["entries"]
    stored, covered = sum(c for c, _ in blocks.values()), sum(n for _, n in blocks.values())
    report = {
        "path": path, "kind": kind, "metadata": dict(metadata), "modules": len(modules),
        "stored_parameters": stored, "covered_weights": covered, "density": stored / covered,
        "blocks": {b: {"stored": c, "weights": n, "density": c / n} for b, (c, n) in blocks.items()},
        "values": value_stats(values),
        "base_hash": metadata.get("sara_base_hash"), "file_hash": metadata.get("sshs_model_hash"),
    }
    if kind == "lora":
        report["ranks"] = sorted({m["rank"] for m in modules.values()})
    if base is not None:
        report["base"] = base_match(modules, metadata, base)
    return report
