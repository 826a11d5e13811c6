"""The one table of SaRA options.

kohya's `--network_args "key=value"`, the diffusers `--sara_<key>` flags and the README all come from
`OPTIONS`, so an option is added in one place. Values arrive as strings from kohya and are parsed
strictly: an unknown key or a malformed value is an error that names it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional


class SaraOptionError(ValueError):
    """A network argument that is unknown or malformed."""


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive number")
    return value


def parse_non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number >= 0")
    return value


def parse_count(text: str) -> int:
    """'50M', '2.5k', '1e6', '1200000' -> an integer parameter count."""
    stripped = str(text).strip().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(stripped[-1:].lower(), 1)
    number = stripped[:-1] if scale != 1 else stripped
    value = float(number) * scale
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ValueError("expected a whole parameter count such as 50M, 500k or 1200000")
    return int(value)


def parse_density(text: str) -> float:
    value = float(text)
    if not (0 < value <= 1):
        raise ValueError("expected a fraction in (0, 1]")
    return value


def parse_progressive_iter(text: str) -> Optional[float]:
    """A step count (>= 1), a fraction of max_train_steps (< 1), or off."""
    lowered = str(text).strip().lower()
    if lowered in ("off", "none", "false", "-1"):
        return None
    value = float(lowered)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a step count, a fraction of training in (0, 1), or 'off'")
    if value >= 1 and value != int(value):
        raise ValueError("a step count must be a whole number")
    return value


def parse_lr(text: str) -> Optional[float | str]:
    lowered = str(text).strip().lower()
    if lowered == "auto":
        return "auto"
    return parse_positive_float(lowered)


def parse_rank_target(text: str) -> str:
    lowered = str(text).strip().lower()
    if lowered not in ("weights", "update"):
        raise ValueError("expected 'weights' (the paper: masked weights) or 'update' (masked update only)")
    return lowered


SELECTION_MODES = ("magnitude", "gradient", "gradient_small", "random")
GRADIENT_MODES = ("gradient", "gradient_small")  # the modes chosen by a calibration pass


def parse_selection(text: str) -> str:
    lowered = str(text).strip().lower()
    if lowered not in SELECTION_MODES:
        raise ValueError("expected magnitude (the paper, default), gradient, gradient_small or random")
    return lowered


def parse_pool_factor(text: str) -> float:
    value = parse_positive_float(text)
    if value < 1:
        raise ValueError("expected a number >= 1 (the pool is this many times each layer's count)")
    return value


def parse_positive_int(text: str) -> int:
    value = int(str(text).strip())
    if value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


def parse_rank_layers(text: str) -> int | str:
    """A whole number of random eligible layers per step, or 'all'."""
    lowered = str(text).strip().lower()
    if lowered == "all":
        return "all"
    try:
        return parse_positive_int(lowered)
    except ValueError:
        raise ValueError("expected a whole number >= 1 or 'all'") from None


def parse_rank_method(text: str) -> str:
    from .regularizers import RANK_METHODS

    lowered = str(text).strip().lower()
    if lowered not in RANK_METHODS:
        raise ValueError(f"expected one of {', '.join(RANK_METHODS)}")
    return lowered


def parse_int(text: str) -> int:
    return int(str(text).strip())


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("threshold", parse_positive_float, 2e-3,
           "Entries with |w| < threshold (strict, compared in fp32) become trainable. Paper default 2e-3."),
    Option("te_threshold", parse_positive_float, None,
           "Separate threshold for text encoders (default: same as threshold)."),
    Option("budget", parse_count, None,
           "Instead of a threshold: select exactly this many parameters (e.g. 50M) with one global threshold."),
    Option("density", parse_density, None,
           "Instead of a threshold: select this fraction of the targeted weights (e.g. 0.06)."),
    Option("selection", parse_selection, "magnitude",
           "Which entries of each layer train; the per-layer counts always come from threshold/budget/density. "
           "magnitude: |w| < threshold (the paper, default); gradient: the largest accumulated |gradient| over "
           "the first calibration_steps optimizer steps; gradient_small: the largest gradient among the "
           "pool_factor x count smallest-|w| entries; random: uniformly random (control, seeded by seed)."),
    Option("calibration_steps", parse_positive_int, 10,
           "gradient modes: the first N optimizer steps score gradients and train nothing (the lr schedule "
           "still advances); must be shorter than training."),
    Option("pool_factor", parse_pool_factor, 4.0,
           "gradient_small: each layer's pool is the pool_factor x count smallest-|w| entries."),
    Option("preset", str, "full",
           "Target preset: full, attn-only, attn-mlp, unet-transformer-only, or a path to a preset .toml."),
    Option("include_bias", parse_bool, False, "Also train biases whose |b| < threshold."),
    Option("lambda_rank", parse_non_negative_float, 0.0,
           "Weight of the nuclear-norm term (paper eq. 4-5; paper value 5e-3). 0 disables it."),
    Option("rank_target", parse_rank_target, "weights",
           "Matrix whose nuclear norm is penalised: 'weights' (masked weights, the paper) or 'update'."),
    Option("rank_layers", parse_rank_layers, 1,
           "How many random eligible 2-D layers get the term per step (authors: 1), or 'all' of them."),
    Option("rank_refresh", parse_positive_int, 1,
           "With rank_layers=all: recompute each layer's subgradient once every N optimizer steps (the layers "
           "spread over the N steps by cost) and apply the last one computed at every step; 1: every step."),
    Option("rank_method", parse_rank_method, "svd",
           "Subgradient of the term: 'svd' (exact) or 'newton_schulz' (matmuls only, approximate; see "
           "regularizers.py)."),
    Option("rank_min_dim", parse_positive_int, 64, "A 2-D layer is eligible when min(out, in) > this (paper: 64)."),
    Option("rank_convs", parse_bool, False,
           "Also give the term to Conv2d layers, as the (out, in*kh*kw) matrix a LoRA export factorises "
           "(the paper and the authors: Linear layers only). Eligible by the same rank_min_dim rule."),
    Option("progressive_iter", parse_progressive_iter, 0.5,
           "Progressive re-selection step: a step count, a fraction of max_train_steps, or 'off'."),
    Option("lr", parse_lr, None, "'auto' uses the paper's rule lr = 1e-3 * exp(-350 * threshold)."),
    Option("seed", parse_int, 0, "Seed of the layer sampling of the nuclear-norm term and of selection=random "
           "(same on every rank)."),
)

OPTION_NAMES = tuple(option.name for option in OPTIONS)
_BY_NAME = {option.name: option for option in OPTIONS}


@dataclasses.dataclass
class SaraConfig:
    """Parsed SaRA options (see OPTIONS for their meaning)."""

    threshold: float = 2e-3
    te_threshold: Optional[float] = None
    budget: Optional[int] = None
    density: Optional[float] = None
    selection: str = "magnitude"
    calibration_steps: int = 10
    pool_factor: float = 4.0
    preset: str = "full"
    include_bias: bool = False
    lambda_rank: float = 0.0
    rank_target: str = "weights"
    rank_layers: int | str = 1
    rank_refresh: int = 1
    rank_method: str = "svd"
    rank_min_dim: int = 64
    rank_convs: bool = False
    progressive_iter: Optional[float] = 0.5
    lr: Optional[float | str] = None
    seed: int = 0

    def __post_init__(self):
        if self.budget is not None and self.density is not None:
            raise SaraOptionError("give either budget= or density=, not both")
        if self.rank_refresh > 1 and self.rank_layers != "all":
            raise SaraOptionError(f"rank_refresh={self.rank_refresh} needs rank_layers=all (it spreads the "
                                  f"recomputation of every layer's term over steps); got rank_layers={self.rank_layers}")

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_network_args(args: Mapping[str, Any], host_keys: tuple[str, ...] = ()) -> SaraConfig:
    """Strictly parse `key=value` network args (values may be strings, as kohya passes them).
    `host_keys`: the args a host adapter takes out before (e.g. kohya's train_t5xxl), named in the
    error for an unknown key so that a typo of one of them finds its spelling."""
    values = {}
    for key, raw in args.items():
        option = _BY_NAME.get(key)
        if option is None:
            raise SaraOptionError(
                f"unknown SaRA network arg {key!r}; valid keys are: {', '.join(OPTION_NAMES + host_keys)}")
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            raise SaraOptionError(f"network arg {key!r} has no value")
        try:
            values[key] = option.parse(raw) if isinstance(raw, str) else option.parse(str(raw))
        except (ValueError, TypeError) as error:
            raise SaraOptionError(f"bad value for network arg {key}={raw!r}: {error}") from None
    return SaraConfig(**values)


def auto_lr(threshold: float) -> float:
    """The paper's fitted learning-rate rule (App. K): lr = 1e-3 * exp(-350 * threshold)."""
    return 1e-3 * math.exp(-350.0 * threshold)
