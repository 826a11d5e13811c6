"""Which weight entries SaRA trains: pure functions over tensors.

The rule is the paper's: an entry is selected when |w| < threshold, strictly, with both sides in
fp32 and w taken as loaded (before any half-precision cast, which would flip entries near the
threshold). A budget or density is turned into one global threshold by an exact radix select over
the fp32 bit patterns, layer by layer, so it never holds more than one layer's |w| at a time
(`torch.quantile` refuses inputs above 16M elements and sorting 860M floats needs gigabytes).

The other `selection=` modes keep the rule's count per layer and choose other entries of it: at
random, or by gradient scores streamed one layer's dense gradient at a time into a bounded
candidate set (`accumulate_candidates`).
"""
from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import torch

_HIGH_BINS = 1 << 15  # |w| is non-negative: its int32 bit pattern has the sign bit clear
_LOW_BINS = 1 << 16


def canonical_abs(weight: torch.Tensor) -> torch.Tensor:
    """|w| flattened in fp32: the one representation every selection is computed from."""
    return weight.detach().reshape(-1).to(torch.float32).abs()


def fp32(value: float) -> float:
    """Round a Python float to the nearest fp32, the precision thresholds are compared in."""
    return torch.tensor(value, dtype=torch.float32).item()


def next_fp32(value: float) -> float:
    """The smallest fp32 above `value`."""
    return torch.nextafter(torch.tensor(fp32(value)), torch.tensor(float("inf"))).item()


def select_below(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted int32 flat indices of the entries with |w| < threshold (strict, fp32)."""
    below = canonical_abs(weight) < fp32(threshold)
    return below.nonzero().reshape(-1).to(torch.int32)


def select_below_and_ties(weight: torch.Tensor, threshold: float, tie_quota: int) -> tuple[torch.Tensor, int]:
    """select_below plus up to `tie_quota` of the entries with |w| == threshold, lowest positions
    first; returns (sorted int32 indices, ties taken). A budget's cut can fall inside a group of
    equal |w| (an fp8 or half-precision base rounds many weights to one value, exact zeros above
    all): the quota fills the budget exactly instead of stopping short of the whole group."""
    absolute = canonical_abs(weight)
    limit = fp32(threshold)
    chosen = absolute < limit
    taken = 0
    if tie_quota > 0:
        ties = (absolute == limit).nonzero().reshape(-1)[:tie_quota]
        chosen[ties] = True
        taken = int(ties.numel())
    return chosen.nonzero().reshape(-1).to(torch.int32), taken


def count_below(weights: Iterable[torch.Tensor], threshold: float) -> int:
    limit = fp32(threshold)
    return int(sum(int((canonical_abs(w) < limit).sum()) for w in weights))


def _abs_bits(weight: torch.Tensor) -> torch.Tensor:
    return canonical_abs(weight).view(torch.int32)


def kth_smallest_abs(weights: Sequence[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| (0-based) over all tensors, exactly, in two histogram passes."""
    total = sum(w.numel() for w in weights)
    if not 0 <= k < total:
        raise ValueError(f"k={k} is outside 0..{total - 1}")
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for w in weights:
        high += torch.bincount((_abs_bits(w) >> 16).to(torch.int64), minlength=_HIGH_BINS)[:_HIGH_BINS]
    cumulative = high.cumsum(0)
    high_bin = int(torch.searchsorted(cumulative, torch.tensor(k), right=True))
    rank_in_bin = k - (int(cumulative[high_bin - 1]) if high_bin > 0 else 0)
    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for w in weights:
        bits = _abs_bits(w)
        in_bin = bits[(bits >> 16) == high_bin]
        low += torch.bincount((in_bin & 0xFFFF).to(torch.int64), minlength=_LOW_BINS)
    low_bin = int(torch.searchsorted(low.cumsum(0), torch.tensor(rank_in_bin), right=True))
    bits = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32)
    return bits.view(torch.float32).item()


def threshold_for_count(weights: Sequence[torch.Tensor], count: int) -> float:
    """The fp32 threshold t for which |w| < t selects `count` entries (fewer only on exact ties).

    t is the (count+1)-th smallest |w|, so every entry strictly below it is one of the `count`
    smallest. Asking for every entry gives the next float above the largest |w|.
    """
    total = sum(w.numel() for w in weights)
    if count <= 0:
        raise ValueError("a budget must select at least one parameter")
    if count >= total:
        largest = max(float(canonical_abs(w).max()) for w in weights)
        return torch.nextafter(torch.tensor(largest), torch.tensor(float("inf"))).item()
    return kth_smallest_abs(weights, count)


def suggest_threshold(weights: Sequence[torch.Tensor], fraction: float = 0.01) -> float:
    """A threshold that would select about `fraction` of the entries (for error messages)."""
    total = sum(w.numel() for w in weights)
    return threshold_for_count(weights, max(1, int(total * fraction)))


# --- the other selection modes: which entries of a layer, for a count fixed by the paper's rule ------
def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the run's seed and the module name (the same in every process)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (1 << 62)


def random_entries(numel: int, count: int, seed: int) -> torch.Tensor:
    """Sorted int32 flat indices of `count` entries drawn uniformly without replacement."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:count].sort().values.to(torch.int32)


def smallest_entries(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted int32 flat indices of the `count` smallest |w| (fp32; ties go to the lower index)."""
    order = torch.sort(canonical_abs(weight), stable=True).indices[:count]
    return order.sort().values.to(torch.int32)


def accumulate_candidates(indices: torch.Tensor, scores: torch.Tensor, grad_abs: torch.Tensor,
                          capacity: int, fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One backward's |G| (a layer's flattened dense |weight gradient|) added to a bounded candidate set.

    The candidates' scores grow by |G| at their positions. Unless the set is `fixed` (a pool chosen
    in advance), the `capacity` largest entries of |G| join it (a newcomer starts from this |G|
    alone) and the set is cut back to the `capacity` best scores. A score is therefore a lower
    bound of the entry's accumulated |G|, exact for an entry that stays a candidate from the first
    backward on, and exact for every entry when `capacity` covers the layer.
    """
    scores = scores + grad_abs[indices.long()]
    if fixed:
        return indices, scores
    top = torch.topk(grad_abs, min(capacity, grad_abs.numel()))
    known = torch.zeros(grad_abs.numel(), dtype=torch.bool, device=grad_abs.device)
    known[indices.long()] = True
    fresh = ~known[top.indices]
    indices = torch.cat([indices, top.indices[fresh].to(indices.dtype)])
    scores = torch.cat([scores, top.values[fresh]])
    if indices.numel() > capacity:
        keep = torch.topk(scores, capacity).indices
        indices, scores = indices[keep], scores[keep]
    return indices, scores


def top_scored(indices: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted int32 flat indices of the `count` best-scored candidates (ties go to the lower index)."""
    by_position = torch.argsort(indices.long())
    indices, scores = indices[by_position], scores[by_position]
    best = torch.sort(scores, descending=True, stable=True).indices[:count]
    return indices[best].long().sort().values.to(torch.int32)


def block_of(module_path: str) -> str:
    """Group a module path into its block for logs: 'down_blocks.1', 'input_blocks.4', 'conv_in'."""
    parts = module_path.split(".")
    for position, part in enumerate(parts[:4]):
        if part.isdigit():
            return ".".join(parts[: position + 1])
    return parts[0]
