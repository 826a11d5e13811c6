"""The host-neutral SaRA network: one nn.Module that owns every sparse delta.

It never registers the base model as a child (hosts freeze and cast the base model after the
network is applied), patches the `forward` of each targeted Linear / Conv2d, and carries the
training-time behaviour of the paper: the nuclear-norm term once per optimizer step and the
progressive re-selection. Both are driven by optimizer step hooks, so they work with any host loop
that calls `optimizer.step()` (kohya, the diffusers scripts, accelerate with accumulation, bnb).
Hosts (kohya.py, diffusers.py) only translate their calls onto this class.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import weakref
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from . import fileformat, selection
from .fileformat import ModuleDelta, SaraFileError
from .naming import UNET_PREFIX, canonical_root, kohya_name
from .ops import compute_dtype, conv_padding, effective_values, sparse_delta_conv2d, sparse_delta_linear
from .options import GRADIENT_MODES, SaraConfig, SaraOptionError, auto_lr
from .presets import TargetRules, load_preset
from .progress import Progress, no_progress, progress_bars
from .regularizers import polar_cost, rank_penalty_grad, refresh_slots

logger = logging.getLogger("sara_network")

# lr=auto gives at most 1e-3 (threshold 0); below this (a threshold above ~0.013) it is a mistake,
# e.g. threshold 0.04 gives 8e-10.
MIN_SANE_AUTO_LR = 1e-5


class SaraSelectionError(ValueError):
    """The selection settings select nothing, or cannot be applied to this model."""


@dataclasses.dataclass
class Target:
    """A Linear / Conv2d of a host model that SaRA may patch."""

    name: str  # kohya name
    path: str  # canonical dotted path inside its root model
    module: nn.Module
    component: str  # "unet" or a text-encoder prefix such as "lora_te1"


def find_targets(root: nn.Module, prefix: str, rules: TargetRules) -> list[Target]:
    """Every Linear / Conv2d (subclasses included) under `root` whose path matches `rules`.

    Paths are canonical (see naming.canonical_root), so names and preset patterns do not depend
    on the transformers version."""
    component = "unet" if prefix == UNET_PREFIX else prefix
    root_path = canonical_root(root)
    targets = []
    for path, module in root.named_modules():
        path = root_path + path
        if isinstance(module, (nn.Linear, nn.Conv2d)) and path != root_path and rules.matches(path):
            if not module.weight.is_floating_point():  # e.g. bitsandbytes Linear4bit / Linear8bitLt
                raise SaraSelectionError(
                    f"{path}: its weight is stored as {module.weight.dtype} (a quantized layer); SaRA selects and "
                    "patches real weight values: load the base model in fp32/fp16/bf16/fp8 instead")
            targets.append(Target(kohya_name(prefix, path), path, module, component))
    return targets


@dataclasses.dataclass
class LayerCalibration:
    """A gradient selection in progress for one layer: candidate positions and their summed |grad|."""

    indices: torch.Tensor  # int32 flat positions
    scores: torch.Tensor  # fp32 accumulated |weight gradient|
    capacity: int
    fixed: bool  # gradient_small: the candidates are a pool fixed in advance
    backwards: int = 0


class _GradientProbe(torch.autograd.Function):
    """The frozen weight, made part of the graph through the (zero) deltas: its backward receives
    the layer's dense weight gradient, hands it to the layer's calibration and lets it go (no
    gradient reaches the deltas or the weight)."""

    @staticmethod
    def forward(ctx, weight, delta, module):
        ctx.module = module
        return weight.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.module.score_gradient(grad)
        return None, None, None


class SaraModule(nn.Module):
    """The sparse delta of one weight (and optionally its bias), and the patched forward."""

    def __init__(self, target: Target, indices: torch.Tensor, bias_indices: Optional[torch.Tensor] = None):
        super().__init__()
        base = target.module
        self.sara_name = target.name
        self.path = target.path
        self.component = target.component
        self.kind = "conv2d" if isinstance(base, nn.Conv2d) else "linear"
        self.weight_shape = tuple(base.weight.shape)
        self._base = [base]  # a plain list: the base module must not become our child
        self._original_forward = None
        self._stacked = False  # the replaced forward is another patch (a second network): add to it
        self.multiplier = 1.0
        device = base.weight.device
        indices = indices.to(device=device, dtype=torch.int32)
        self.delta = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=device))
        self.register_buffer("indices", indices)
        self.register_buffer("frozen_positions", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("frozen_values", torch.zeros(0, dtype=torch.float32, device=device))
        # The base weight's values at the selected entries, in the weight's dtype: the patched
        # forward writes base + delta and restores these without a gather; the progressive step and
        # the 'weights' rank target read them. Re-gathered when the host casts, moves or rewrites the
        # weight (see current_base_values).
        self.register_buffer("base_values", self._gather_base(indices), persistent=False)
        self._base_key = self._weight_key()
        self.calibration: Optional[LayerCalibration] = None  # set while a gradient selection calibrates
        self.resized_on_load: Optional[tuple[int, int]] = None  # (selected, saved) counts, see _load_from_state_dict
        self.bias_delta = None
        self.register_buffer("bias_indices", None)
        if bias_indices is not None and bias_indices.numel():
            self.bias_delta = nn.Parameter(torch.zeros(bias_indices.numel(), dtype=torch.float32, device=device))
            self.bias_indices = bias_indices.to(device=device, dtype=torch.int32)

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def _gather_base(self, indices: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight.detach().reshape(-1)
        return weight.index_select(0, indices.to(device=weight.device, dtype=torch.int64))

    def _weight_key(self) -> Optional[tuple]:
        """What identifies the base weight's current values: storage, dtype, device and autograd's
        version counter (bumped by every in-place write a host makes: copy_, load_state_dict).
        None for inference tensors, which have no version counter."""
        weight = self.base.weight
        if weight.is_inference():
            return None
        return (weight.data_ptr(), weight.dtype, weight.device, weight._version)

    def current_base_values(self) -> Optional[torch.Tensor]:
        """base_values, re-gathered first if the weight changed since they were taken (None where a
        change cannot be detected: the forward then gathers on every call)."""
        key = self._weight_key()
        if key is None:
            return None
        if key != self._base_key:
            self.base_values = self._gather_base(self.indices)
            self._base_key = key
        return self.base_values

    def base_values_fp32(self) -> torch.Tensor:
        base = self.current_base_values()
        return (self._gather_base(self.indices) if base is None else base).to(torch.float32)

    # --- patching -----------------------------------------------------------------------------
    def patch(self) -> None:
        """Replace the layer's forward. Patching over another patch (a second network on the same
        layer) stacks: this module then adds its delta's contribution to the previous forward."""
        if self._original_forward is None:
            self._set_original(self.base.forward)
            self.base.forward = self.forward

    def _set_original(self, forward) -> None:
        self._original_forward = forward
        self._stacked = getattr(forward, "__func__", None) is not type(self.base).forward

    def unpatch(self) -> None:
        """Restore the previous forward; a module in the middle of a stack is spliced out of it."""
        if self._original_forward is None:
            return
        wrapper = _patch_owner(self.base.forward)
        if wrapper is self or wrapper is None:
            self.base.forward = self._original_forward
        else:
            while wrapper is not None and _patch_owner(wrapper._original_forward) is not self:
                wrapper = _patch_owner(wrapper._original_forward)
            if wrapper is None:
                raise RuntimeError(f"{self.sara_name}: the layer's forward was replaced by something else "
                                   "after SaRA patched it; remove that patch first")
            wrapper._set_original(self._original_forward)
        self._original_forward = None
        self._stacked = False

    def pinned_delta(self) -> torch.Tensor:
        """Deltas as the forward uses them: frozen entries at their frozen values."""
        return effective_values(self.delta, self.frozen_positions, self.frozen_values)

    def effective_bias(self, multiplier: float):
        bias = self.base.bias
        if self.bias_delta is None or bias is None:
            return bias
        bias32 = bias.to(torch.float32)
        updated = bias32[self.bias_indices] + multiplier * self.bias_delta.to(torch.float32)
        return bias32.index_put((self.bias_indices,), updated)

    def forward(self, x, *args, **kwargs):
        multiplier = self.multiplier
        if multiplier == 0.0:
            return self._original_forward(x, *args, **kwargs)
        if self.calibration is not None and torch.is_grad_enabled() and self.delta.requires_grad:
            return self.calibration_forward(x)
        if self._stacked:
            return self._original_forward(x, *args, **kwargs) + self.delta_output(x, multiplier)
        base = self.base
        bias = self.effective_bias(multiplier)
        base_values = self.current_base_values()
        # The deltas hold the frozen values already (pin_frozen_data after every optimizer step and
        # on load): frozen_values=None spares a copy of every delta per call; the frozen positions
        # are still passed, so they get no gradient.
        if self.kind == "linear":
            return sparse_delta_linear(x, base.weight, bias, self.delta, self.indices, multiplier,
                                       self.frozen_positions, None, base_values)
        x, padding = conv_padding(base, x)
        return sparse_delta_conv2d(x, base.weight, bias, self.delta, self.indices, multiplier, base.stride,
                                   padding, base.dilation, base.groups, self.frozen_positions, None, base_values)

    # --- calibration of a gradient selection ---------------------------------------------------
    def calibration_forward(self, x):
        """The base layer's output (the deltas are zero), with the weight probed for its gradient."""
        if self._stacked:
            raise SaraSelectionError(f"{self.sara_name}: a gradient selection cannot calibrate a layer that another "
                                     "network also patches; calibrate before stacking networks")
        base = self.base
        dtype = compute_dtype(x)  # as the training path: the layer's autocast dtype (also for fp8 weights)
        with torch.autocast(x.device.type, enabled=False):
            weight = _GradientProbe.apply(base.weight.to(dtype), self.delta, self)
            bias = None if base.bias is None else base.bias.to(dtype)
            if self.kind == "linear":
                return torch.nn.functional.linear(x.to(dtype), weight, bias)
            x, padding = conv_padding(base, x)
            return torch.nn.functional.conv2d(x.to(dtype), weight, bias, base.stride, padding, base.dilation,
                                              base.groups)

    @torch.no_grad()
    def score_gradient(self, grad: torch.Tensor) -> None:
        """Add one backward's dense weight gradient (this layer's only) to the candidate scores."""
        calibration = self.calibration
        if calibration is None:
            return
        grad_abs = grad.detach().reshape(-1).abs().to(torch.float32)
        calibration.indices, calibration.scores = selection.accumulate_candidates(
            calibration.indices.to(grad_abs.device), calibration.scores.to(grad_abs.device), grad_abs,
            calibration.capacity, calibration.fixed)
        calibration.backwards += 1

    @torch.no_grad()
    def replace_indices(self, indices: torch.Tensor) -> None:
        """Move the (still zero) deltas to other entries: same count, buffers updated in place so an
        optimizer, DDP and state_dict keep pointing at the same tensors."""
        indices = indices.to(device=self.indices.device, dtype=torch.int32)
        if indices.shape != self.indices.shape:
            raise ValueError(f"{self.sara_name}: {indices.numel()} entries for {self.indices.numel()} deltas")
        self.indices.copy_(indices)
        self.base_values = self._gather_base(self.indices)

    def delta_output(self, x, multiplier: float):
        """The layer applied with only m * delta as its weight (and m * bias delta as its bias)."""
        dtype = compute_dtype(x)
        flat = torch.zeros(math.prod(self.weight_shape), dtype=torch.float32, device=self.delta.device)
        flat = flat.index_put((self.indices.long(),), self.pinned_delta().to(torch.float32))
        weight = (multiplier * flat).view(self.weight_shape).to(dtype)
        bias = None
        if self.bias_delta is not None:
            bias = torch.zeros(self.weight_shape[0], dtype=torch.float32, device=self.delta.device)
            bias = (multiplier * bias.index_put((self.bias_indices.long(),), self.bias_delta.to(torch.float32))).to(dtype)
        if self.kind == "linear":
            return torch.nn.functional.linear(x.to(dtype), weight, bias)
        base = self.base
        x, padding = conv_padding(base, x)
        return torch.nn.functional.conv2d(x.to(dtype), weight, bias, base.stride, padding, base.dilation, base.groups)

    # --- state --------------------------------------------------------------------------------
    def frozen_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.indices.numel(), dtype=torch.bool, device=self.indices.device)
        mask[self.frozen_positions.long()] = True
        return mask

    def to_delta(self) -> ModuleDelta:
        frozen = self.frozen_mask() if self.frozen_positions.numel() else None
        return ModuleDelta(self.sara_name, self.weight_shape, self.indices.detach(), self.pinned_delta().detach(),
                           frozen, None if self.bias_delta is None else self.bias_indices.detach(),
                           None if self.bias_delta is None else self.bias_delta.detach())

    def freeze_positions(self, positions: torch.Tensor) -> None:
        """Pin the deltas at `positions` (into the delta vector) to their current values for good."""
        positions = positions.to(device=self.indices.device, dtype=torch.int64)
        current = self.frozen_mask()
        current[positions] = True
        all_positions = current.nonzero().reshape(-1)
        values = self.pinned_delta().detach().to(torch.float32)[all_positions]
        self.frozen_positions = all_positions.to(torch.int32)
        self.frozen_values = values
        self.pin_frozen_data()

    @torch.no_grad()
    def pin_frozen_data(self) -> None:
        """Copy the frozen values back into the parameter: the forward reads the parameter as is."""
        if self.frozen_positions.numel():
            self.delta.data.index_put_((self.frozen_positions,), self.frozen_values.to(self.delta.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The frozen set grows at the progressive step: resize before the default copy.

        A missing frozen buffer means "nothing frozen": accelerate's save_state takes all empty
        tensors (storage pointer 0) for aliases of one another and writes only one of them. Indices
        chosen by a calibration differ from a fresh selection's: the base values follow them."""
        for name in ("frozen_positions", "frozen_values"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).new_zeros(0)
            saved = state_dict[prefix + name]
            if saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=self.indices.device))
        before = self.indices.clone()
        saved_indices = state_dict.get(prefix + "indices")
        if saved_indices is not None and saved_indices.shape != self.indices.shape:
            # A state's entries are authoritative: this run selected a different count (another
            # version's selection, or weights rounded differently). The delta keeps its Parameter
            # object (the optimizer holds it; its state is loaded after, at the saved size).
            self.resized_on_load = (self.indices.numel(), saved_indices.numel())  # logged once by the network
            self.indices = torch.empty_like(saved_indices, device=self.indices.device)
            self.delta.data = torch.empty(saved_indices.shape, dtype=self.delta.dtype, device=self.delta.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.pin_frozen_data()
        if not torch.equal(before, self.indices):  # chosen by a calibration: nothing left to calibrate here
            self._base_key = None  # base values re-gathered at the new entries on next use
            self.calibration = None


def _patch_owner(forward) -> Optional["SaraModule"]:
    """The SaraModule whose forward `forward` is, or None."""
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, SaraModule) and getattr(forward, "__func__", None) is SaraModule.forward else None


class SaraNetwork(nn.Module):
    """All SaRA deltas of a model, keyed by kohya module name."""

    # selection=gradient keeps, per layer, this many times its count of candidate entries while
    # calibrating (the memory / exactness trade-off of the streamed scores; see docs/kohya.md)
    candidate_factor = 4

    def __init__(self, config: Optional[SaraConfig] = None, multiplier: float = 1.0):
        super().__init__()
        self.config = config or SaraConfig()
        self.multiplier = float(multiplier)
        self.thresholds: dict[str, float] = {}
        self.total_steps: Optional[int] = None  # for a fractional progressive_iter
        self.last_rank_norm: Optional[float] = None
        self.base_hash: Optional[str] = None
        self.source_metadata: dict[str, str] = {}
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.int64))
        self.calibration_record: dict = {}  # how a gradient selection was calibrated (file metadata)
        self.targeted_entries: Optional[dict[str, int]] = None  # per block, every target (record_targeted)
        self.register_load_state_dict_post_hook(SaraNetwork._after_load_state_dict)
        self._hook_handles = []
        self._optimizer_owns_us = weakref.WeakKeyDictionary()
        self._rank_slots: Optional[tuple] = None  # rank_refresh: (the layers, the step slot of each)
        self._rank_cache: dict[str, tuple] = {}  # rank_refresh: (indices, their version, grad, norm) per layer

    # --- construction -------------------------------------------------------------------------
    def sara_modules(self) -> list[SaraModule]:
        return [m for m in self.children() if isinstance(m, SaraModule)]

    def add_targets(self, targets: Sequence[Target], indices: dict[str, torch.Tensor],
                    bias_indices: Optional[dict[str, torch.Tensor]] = None) -> None:
        for target in targets:
            if target.name in indices and indices[target.name].numel():
                module = SaraModule(target, indices[target.name], (bias_indices or {}).get(target.name))
                module.multiplier = self.multiplier
                self.add_module(target.name, module)

    def select(self, targets: Sequence[Target], progress: Progress = progress_bars()) -> None:
        """Compute the paper's selection for `targets` (fp32, from the weights as they are now); a
        progress bar shows on a terminal when it takes more than a second (large models)."""
        config = self.config
        if not targets:
            raise SaraSelectionError(f"preset {config.preset!r} matches no Linear/Conv2d module of this model")
        unet = [t for t in targets if t.component == "unet"]
        text = [t for t in targets if t.component != "unet"]
        budgeted = config.budget is not None or config.density is not None
        # One global threshold over everything, unless text encoders have their own te_threshold
        # (then a budget/density applies to the U-Net only).
        groups = [(unet + text, config.threshold, budgeted)]
        if config.te_threshold is not None:
            groups = [(unet, config.threshold, budgeted), (text, config.te_threshold, False)]
        indices, bias_indices = {}, {}
        for group, threshold, from_budget in groups:
            if not group:
                continue
            weights = [t.module.weight for t in group]
            if from_budget:
                total = sum(w.numel() for w in weights)
                count = config.budget if config.budget is not None else max(1, round(config.density * total))
                if count > total:
                    raise SaraSelectionError(f"budget={count} exceeds the {total} targeted weights")
                threshold = selection.threshold_for_count(weights, count)
            tie_quota = count - selection.count_below(weights, threshold) if from_budget else 0
            # entries taken at |w| = threshold must count as below it (the progressive step's rule)
            recorded = selection.next_fp32(threshold) if tie_quota > 0 else threshold
            ties_taken = 0
            for target in progress(group, desc="SaRA selection", unit="module"):
                self.thresholds[target.component] = recorded
                indices[target.name], taken = selection.select_below_and_ties(
                    target.module.weight, threshold, tie_quota - ties_taken)
                ties_taken += taken
                if config.selection == "random":  # the paper's count for this layer, at random positions
                    indices[target.name] = selection.random_entries(
                        target.module.weight.numel(), indices[target.name].numel(),
                        selection.layer_seed(config.seed, target.name))
                if config.include_bias and target.module.bias is not None:
                    bias_indices[target.name] = selection.select_below(target.module.bias, threshold)
            if ties_taken:
                logger.warning(
                    f"SaRA selection: the budget's cut falls among entries that all have |w| = {threshold:.4g} "
                    f"(a {weights[0].dtype} base rounds many weights to one value); {ties_taken:,d} of them were "
                    "taken in module order to meet the budget exactly"
                    + ("; with a threshold of 0 the progressive step freezes every entry that moves "
                       "(progressive_iter=off keeps them training)" if threshold == 0 else ""))
            selected = sum(int(indices[t.name].numel()) for t in group)
            if selected == 0:
                suggestion = selection.suggest_threshold(weights, 0.01)
                smallest = min(float(selection.canonical_abs(w).min()) for w in weights)
                raise SaraSelectionError(
                    f"threshold={threshold:.3g} selects no parameters in {len(group)} targeted modules "
                    f"(smallest |w| is {smallest:.3g}); threshold={suggestion:.3g} would select about 1% "
                    "of them, or use budget=/density=")
        self.add_targets(targets, indices, bias_indices)
        self.record_targeted(targets)
        self.base_hash = fileformat.base_fingerprint((m.sara_name, m.base.weight) for m in self.sara_modules())
        if config.selection in GRADIENT_MODES:
            self.start_calibration()

    # --- gradient selections: calibration ----------------------------------------------------------
    def start_calibration(self) -> None:
        """Prepare every layer to score gradients; until the calibration ends the deltas stay zero
        and get no gradient. gradient_small's pool is chosen now, from the weights as loaded."""
        config = self.config
        for module in self.sara_modules():
            count, numel = module.indices.numel(), math.prod(module.weight_shape)
            device = module.indices.device
            if config.selection == "gradient_small":
                pool = selection.smallest_entries(module.base.weight, min(numel, math.ceil(config.pool_factor * count)))
                module.calibration = LayerCalibration(pool.to(device), torch.zeros(pool.numel(), device=device),
                                                      pool.numel(), fixed=True)
            else:
                module.calibration = LayerCalibration(torch.zeros(0, dtype=torch.int32, device=device),
                                                      torch.zeros(0, device=device),
                                                      min(numel, self.candidate_factor * count), fixed=False)
        self.calibration_record = {"mode": config.selection, "state": "pending"}

    def calibration_pending(self) -> bool:
        return any(module.calibration is not None for module in self.sara_modules())

    def known_total_steps(self) -> Optional[int]:
        """Optimizer steps of the whole run, when the host has said (kohya reads its args)."""
        return self.total_steps

    def check_calibration_length(self, total_steps: Optional[int], name: str = "total_steps") -> None:
        """A calibration still to come (before or after the selection) must leave steps to train."""
        steps = self.config.calibration_steps
        to_come = self.config.selection in GRADIENT_MODES and self.calibration_record.get("state", "pending") == "pending"
        if to_come and total_steps and steps >= total_steps:
            raise SaraOptionError(f"calibration_steps={steps} is not shorter than training ({name}={total_steps}): "
                                  "the calibration steps train nothing; lower calibration_steps or train longer")

    def refuse_file(self, source: str) -> None:
        """A file fixes the trained entries: a gradient selection has nothing left to choose."""
        if self.config.selection in GRADIENT_MODES:
            raise SaraOptionError(f"selection={self.config.selection} cannot be combined with {source}: the file "
                                  "already fixes the trained entries; drop the selection arg (or use selection=magnitude)")

    def calibrate(self, loss_fn, steps: Optional[int] = None) -> dict:
        """Calibrate a gradient selection before training: `loss_fn(step)` returns the training loss
        of one batch; each loss is back-propagated and scored, then the entries are chosen."""
        if not self.calibration_pending():
            raise SaraSelectionError(f"nothing to calibrate: selection={self.config.selection} "
                                     "(only gradient and gradient_small calibrate, once, before training)")
        steps = self.config.calibration_steps if steps is None else int(steps)
        if steps < 1:
            raise SaraOptionError(f"calibrate(steps={steps}): at least one step is needed")
        for step in range(steps):
            loss_fn(step).backward()
        return self.finish_calibration(steps_kind="calibrate() batches", steps=steps)

    @torch.no_grad()
    def finish_calibration(self, steps_kind: str = "optimizer steps", steps: Optional[int] = None) -> dict:
        """Re-choose each layer's entries from its scores (same count, deltas still zero); in a
        multi-process run every process then takes rank 0's choice."""
        unseen, backwards = [], 0
        for module in self.sara_modules():
            calibration, module.calibration = module.calibration, None
            if calibration is None:
                continue
            if calibration.backwards == 0:  # never reached by a backward: keeps the magnitude entries
                unseen.append(module.sara_name)
                continue
            backwards = max(backwards, calibration.backwards)
            module.replace_indices(selection.top_scored(calibration.indices, calibration.scores,
                                                        module.indices.numel()))
        world = _broadcast_indices(self.sara_modules())
        config = self.config
        self.calibration_record = {
            "mode": config.selection, "state": "done", "steps": steps if steps is not None else int(self.optimizer_steps),
            "steps_kind": steps_kind, "backward_passes": backwards, "processes": world,
            "chosen_by": "rank 0" if world > 1 else "this process",
            "candidate_factor": None if config.selection == "gradient_small" else self.candidate_factor,
            "pool_factor": config.pool_factor if config.selection == "gradient_small" else None,
            "layers_without_gradient": len(unseen)}
        if unseen:
            logger.warning(f"SaRA: {len(unseen)} layers got no gradient during the calibration and keep their "
                           f"magnitude entries (first: {unseen[0]})")
        logger.info(f"SaRA selection={config.selection}: entries chosen after {self.calibration_record['steps']} "
                    f"{steps_kind} ({backwards} backward passes)")
        return dict(self.calibration_record)

    def _after_load_state_dict(self, *_) -> None:
        """A checkpoint saved after the calibration (by steps or by calibrate()) holds the chosen
        entries: resume on them. One saved inside the step-based calibration continues it."""
        modules = self.sara_modules()
        resized = [m for m in modules if m.resized_on_load]
        if resized:
            selected, saved = (sum(m.resized_on_load[i] for m in resized) for i in (0, 1))
            logger.warning(f"SaRA: the saved state's entries differ from this run's selection in {len(resized)} modules "
                           f"({saved:,d} saved, {selected:,d} selected now): the saved entries are used")
            for module in resized:
                module.resized_on_load = None
        if self.calibration_record.get("state") != "pending" or not modules:
            return
        if int(self.optimizer_steps) >= self.config.calibration_steps or any(m.calibration is None for m in modules):
            for module in modules:
                module.calibration = None
            self.calibration_record = {"mode": self.config.selection, "state": "done", "resumed": True}

    def adopt_deltas(self, targets: Sequence[Target], deltas: Sequence[ModuleDelta], source: str = "<file>") -> None:
        """Replace the selection with the support of `deltas` and load their values, all or nothing.

        Every file module must name a target of this model with the same weight shape; the new
        modules are built completely before the old ones are removed, so nothing is changed when
        any check fails.
        """
        by_name = {t.name: t for t in targets}
        problems, seen = [], set()
        for delta in deltas:
            target = by_name.get(delta.name)
            if delta.name in seen:
                problems.append(f"{delta.name}: given twice")
            elif target is None:
                problems.append(f"{delta.name}: no such module in this model")
            elif tuple(target.module.weight.shape) != tuple(delta.shape):
                problems.append(f"{delta.name}: shape {tuple(delta.shape)} in the file, "
                                f"{tuple(target.module.weight.shape)} in the model")
            elif not delta.indices.numel():
                problems.append(f"{delta.name}: no entries")
            elif delta.bias_indices is not None and target.module.bias is None:
                problems.append(f"{delta.name}: the file has bias deltas but the model layer has no bias")
            elif delta.bias_indices is not None and delta.bias_indices.numel() and \
                    int(delta.bias_indices.max()) >= target.module.bias.numel():
                problems.append(f"{delta.name}: bias indices beyond the model's {target.module.bias.numel()} biases")
            seen.add(delta.name)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise SaraFileError(f"{source} does not fit this model (is it for another base model?): {shown}")
        fresh = []
        with torch.no_grad():
            for delta in deltas:
                module = SaraModule(by_name[delta.name], delta.indices, delta.bias_indices)
                module.multiplier = self.multiplier
                module.delta.copy_(delta.values.to(torch.float32))
                if delta.bias_values is not None and module.bias_delta is not None:
                    module.bias_delta.copy_(delta.bias_values.to(torch.float32))
                if delta.frozen is not None:
                    module.freeze_positions(delta.frozen.nonzero().reshape(-1))
                fresh.append(module)
        was_patched = any(m._original_forward is not None for m in self.sara_modules())
        self.unpatch()
        for module in self.sara_modules():
            delattr(self, module.sara_name)
        for module in fresh:
            self.add_module(module.sara_name, module)
        self.record_targeted(targets)
        self.base_hash = fileformat.base_fingerprint((m.sara_name, m.base.weight) for m in self.sara_modules())
        if was_patched:
            self.patch()

    # --- patching and multiplier ---------------------------------------------------------------
    def patch(self) -> None:
        for module in self.sara_modules():
            module.patch()

    def unpatch(self) -> None:
        for module in self.sara_modules():
            module.unpatch()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for module in self.sara_modules():
            module.multiplier = self.multiplier

    def forward(self, *args, **kwargs):  # hosts call the patched layers, never the network
        raise RuntimeError("SaraNetwork is applied by patching layers; call the model, not the network")

    # --- parameters and counts -------------------------------------------------------------------
    def trainable_parameters(self, component: Optional[str] = None) -> list[nn.Parameter]:
        params = []
        for module in self.sara_modules():
            if component is None or module.component == component:
                params.append(module.delta)
                if module.bias_delta is not None:
                    params.append(module.bias_delta)
        return params

    def components(self) -> list[str]:
        return list(OrderedDict.fromkeys(m.component for m in self.sara_modules()))

    def selected_count(self, component: Optional[str] = None) -> int:
        return sum(p.numel() for p in self.trainable_parameters(component))

    def record_targeted(self, targets: Sequence[Target]) -> None:
        """The targeted entries per block, layers that got no entry included (for log_selection)."""
        self.targeted_entries = OrderedDict()
        for target in targets:
            key = f"{target.component}:{selection.block_of(target.path)}"
            bias = target.module.bias if self.config.include_bias else None
            size = target.module.weight.numel() + (0 if bias is None else bias.numel())
            self.targeted_entries[key] = self.targeted_entries.get(key, 0) + size

    def log_selection(self) -> str:
        """Log (and return) the trainable entries, weights and biases, per block and in total, and their
        share of the targeted entries (a layer's bias counts as targeted where biases are trained)."""
        targeted = self.targeted_entries or {}
        blocks: dict[str, list[int]] = OrderedDict((key, [0, total]) for key, total in targeted.items())
        bias_chosen = bias_total = 0
        for module in self.sara_modules():
            key = f"{module.component}:{selection.block_of(module.path)}"
            counts = blocks.setdefault(key, [0, 0])
            biases = 0 if module.bias_delta is None else module.bias_delta.numel()
            bias_targeted = module.bias_delta is not None or (self.config.include_bias and module.base.bias is not None)
            bias_size = module.weight_shape[0] if bias_targeted else 0
            counts[0] += module.indices.numel() + biases
            if key not in targeted:  # the targets are not known (a network built from a file alone)
                counts[1] += math.prod(module.weight_shape) + bias_size
            bias_chosen += biases
            bias_total += bias_size
        lines = [f"  {block:<40} {chosen:>12,d} / {total:>13,d} ({chosen / total:.2%})"
                 for block, (chosen, total) in blocks.items()]
        chosen = sum(c for c, _ in blocks.values())
        total = sum(t for _, t in blocks.values())
        of_them = f" ({bias_chosen:,d} of them biases)" if bias_total else ""
        targeted = "weights and biases" if bias_total else "weights"
        thresholds = ", ".join(f"{k}: {v:.4g}" for k, v in self.thresholds.items())
        mode = "" if self.config.selection == "magnitude" else f"; selection={self.config.selection}" + (
            f", entries re-chosen after {self.config.calibration_steps} calibration steps"
            if self.calibration_pending() else "")
        report = "\n".join([f"SaRA selection ({len(self.sara_modules())} modules; thresholds {thresholds or 'from file'}{mode}):",
                            *lines,
                            f"  total: {chosen:,d} trainable{of_them} of {total:,d} targeted {targeted} "
                            f"({chosen / max(total, 1):.3%})"])
        logger.info(report)
        return report

    # --- saving -------------------------------------------------------------------------------
    def deltas(self) -> list[ModuleDelta]:
        return [m.to_delta() for m in self.sara_modules()]

    def file_metadata(self) -> dict[str, str]:
        return {
            "sara_config": json.dumps(self.config.to_json_dict()),
            "sara_thresholds": json.dumps(self.thresholds),
            "sara_base_hash": self.base_hash or "",
            "sara_optimizer_steps": str(int(self.optimizer_steps)),
            **({"sara_calibration": json.dumps(self.calibration_record)} if self.calibration_record else {}),
        }

    def save(self, path: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> None:
        """A native file; given a known ss_base_model_version and no modelspec (kohya writes its own),
        the modelspec keys the UIs' Lora pages read are added."""
        from .convert import BASE_MODELS, modelspec_metadata

        merged = dict(metadata or {})
        version = merged.get("ss_base_model_version")
        if version in BASE_MODELS and "modelspec.architecture" not in merged:
            merged.update(modelspec_metadata(version))
        merged.update(self.file_metadata())
        fileformat.save_native(path, self.deltas(), dtype, merged)

    def adopt_file_settings(self, metadata: Mapping[str, str]) -> None:
        """Keep a loaded file's metadata and take over its per-component thresholds (metadata as
        fileformat.validate_metadata accepts it; anything else is refused before a change)."""
        try:
            thresholds = json.loads(metadata.get("sara_thresholds", "{}"))
            thresholds = {str(k): float(v) for k, v in thresholds.items()}
        except (ValueError, TypeError, AttributeError, RecursionError):
            raise SaraFileError(f"metadata sara_thresholds {metadata.get('sara_thresholds')!r:.80} is not a JSON "
                                "object of numbers") from None
        self.source_metadata = dict(metadata)
        self.thresholds.update(thresholds)

    def component_lr(self, component: str, given: Optional[float]) -> Optional[float]:
        """The learning rate of a component: the `lr` option ('auto' or a number) over the host's."""
        if self.config.lr == "auto":
            threshold = self.thresholds.get(component, self.config.threshold)
            lr = auto_lr(threshold)
            logger.info(f"SaRA lr=auto for {component}: {lr:.3g} (threshold {threshold:.4g})")
            if lr < MIN_SANE_AUTO_LR:
                logger.warning(f"SaRA lr=auto for {component}: threshold {threshold:.4g} gives lr {lr:.3g}, "
                               f"below {MIN_SANE_AUTO_LR:g} (1e-3*exp(-350*threshold)): these weights will hardly "
                               f"move; give lr=<number> or select with a smaller threshold")
            return lr
        if isinstance(self.config.lr, float):
            return self.config.lr
        return given

    def check_base_hash(self, file_hash: Optional[str], source: str) -> bool:
        if fileformat.same_base(file_hash, self.base_hash) is False:
            logger.warning(f"{source} was trained on a different base model (base hash {file_hash}, "
                           f"this model {self.base_hash}); the deltas are applied anyway")
            return False
        return True

    # --- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into_base(self, multiplier: Optional[float] = None, progress: Progress = no_progress) -> None:
        """Add m * delta into the base weights for good (fp32 math, base dtype kept) and unpatch.
        `progress` wraps the per-module loop (the CLI passes a tqdm)."""
        scale = self.multiplier if multiplier is None else float(multiplier)
        self.unpatch()
        for module in progress(self.sara_modules(), desc="bake", unit="module"):
            weight = module.base.weight
            merged = weight.detach().to(torch.float32).reshape(-1)
            update = scale * module.pinned_delta().detach().to(device=merged.device, dtype=torch.float32)
            merged.index_put_((module.indices.to(merged.device),), merged[module.indices] + update)
            weight.data.copy_(merged.view(weight.shape).to(weight.dtype))
            module._base_key = None  # written through .data: no version bump to notice it by
            bias = module.effective_bias(scale)
            if module.bias_delta is not None and bias is not None:
                module.base.bias.data.copy_(bias.to(module.base.bias.dtype))

    @torch.no_grad()
    def scale_to_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's --scale_weight_norms for sparse deltas: cap each module's ||delta||_2 at max_norm."""
        norms, scaled = [], 0
        for module in self.sara_modules():
            norm = float(module.pinned_delta().norm())
            if norm > max_norm:
                factor = max_norm / norm
                module.delta.mul_(factor)
                module.frozen_values.mul_(factor)
                scaled += 1
                norm = max_norm
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # --- training-time behaviour: rank term and progressive step ---------------------------------
    def progressive_step(self) -> Optional[int]:
        """The optimizer step after which the progressive re-selection runs, or None."""
        value = self.config.progressive_iter
        if value is None:
            return None
        if value >= 1:
            return int(value)
        if not self.total_steps:
            return None
        return max(1, round(value * self.total_steps))

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer not in self._optimizer_owns_us:
            ours = {id(p) for p in self.trainable_parameters()}
            self._optimizer_owns_us[optimizer] = any(
                id(p) in ours for group in optimizer.param_groups for p in group["params"])
        return self._optimizer_owns_us[optimizer]

    def attach_optimizer_hooks(self) -> None:
        """Run the rank term before, and the step count / progressive step after, each real step.

        Global optimizer hooks see every optimizer (bnb's and accelerate-wrapped ones included); an
        accelerate optimizer only steps when gradients sync, so accumulation counts once per step.
        """
        if self._hook_handles:
            return
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        network_ref = weakref.ref(self)

        def before(optimizer, args, kwargs):
            network = network_ref()
            if network is not None and network.owns(optimizer):
                network.apply_rank_gradients()

        def after(optimizer, args, kwargs):
            network = network_ref()
            if network is not None and network.owns(optimizer):
                network.after_optimizer_step()

        self._hook_handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]

    def detach_optimizer_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def rank_matrix_shape(self, module: SaraModule) -> Optional[tuple[int, int]]:
        """The matrix the rank term sees: a Linear's weight; with rank_convs a Conv2d's weight as the
        (out, in*kh*kw) matrix a LoRA export factorises (the flat indices are the same); else None."""
        shape = module.weight_shape
        if len(shape) == 2 or self.config.rank_convs and len(shape) == 4:
            return shape[0], math.prod(shape[1:])
        return None

    def rank_candidates(self) -> list[tuple[SaraModule, tuple[int, int]]]:
        """The layers the term may act on, with their matrix shapes: min(out, in) > rank_min_dim."""
        shapes = ((module, self.rank_matrix_shape(module)) for module in self.sara_modules())
        return [(module, shape) for module, shape in shapes
                if shape is not None and min(shape) > self.config.rank_min_dim]

    def rank_eligible(self) -> list[tuple[SaraModule, tuple[int, int]]]:
        """The candidates this step trained (a layer the step did not train keeps its deltas)."""
        return [(module, shape) for module, shape in self.rank_candidates()
                if module.delta.requires_grad and module.delta.grad is not None]

    def rank_layers_this_step(self, eligible: list) -> list:
        """Every eligible layer (rank_layers=all), or `rank_layers` random ones drawn from a generator
        seeded by (seed, step): every rank of a multi-GPU run picks the same layers, so the deltas
        stay identical across ranks."""
        if self.config.rank_layers == "all":
            return eligible
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(self.optimizer_steps))
        order = torch.randperm(len(eligible), generator=generator)[: self.config.rank_layers]
        return [eligible[position] for position in order.tolist()]

    def rank_refresh_due(self) -> Optional[set[str]]:
        """With rank_refresh=N > 1: the layers whose subgradient this step recomputes (each layer once
        every N steps, spread by cost: regularizers.refresh_slots); None: every layer, every step."""
        period = self.config.rank_refresh
        if period <= 1:
            return None
        candidates = tuple((module.sara_name, shape) for module, shape in self.rank_candidates())
        if self._rank_slots is None or self._rank_slots[0] != candidates:
            slots = refresh_slots([polar_cost(shape) for _, shape in candidates], period)
            self._rank_slots = (candidates, {name: slot for (name, _), slot in zip(candidates, slots)})
        step_slot = int(self.optimizer_steps) % period
        return {name for name, slot in self._rank_slots[1].items() if slot == step_slot}

    def cached_rank_grad(self, module: SaraModule) -> Optional[tuple[torch.Tensor, float]]:
        """The last subgradient computed for `module`, unless its selected entries changed since."""
        cached = self._rank_cache.get(module.sara_name)
        if cached is None or cached[0] is not module.indices or cached[1] != module.indices._version:
            return None
        return cached[2], cached[3]

    @torch.no_grad()
    def apply_rank_gradients(self) -> None:
        """Add lambda_rank * subgradient of ||masked matrix||_* to the deltas of the chosen eligible layers.

        With rank_refresh > 1 a layer not due this step gets its last computed subgradient (kept for the
        selected entries only: one fp32 value per selected entry); after a restart or a change of the
        selection every layer is recomputed at once."""
        weight = self.config.lambda_rank
        eligible = self.rank_eligible() if weight > 0 else []
        if not eligible:
            return
        due = self.rank_refresh_due()
        norms = []
        for module, shape in self.rank_layers_this_step(eligible):
            cached = None if due is None or module.sara_name in due else self.cached_rank_grad(module)
            if cached is None:
                entries = module.pinned_delta().detach().to(torch.float32)
                if self.config.rank_target == "weights":
                    entries = entries + module.base_values_fp32()
                grad, norm = rank_penalty_grad(shape, module.indices, entries, weight, self.config.rank_method)
                if due is not None:
                    self._rank_cache[module.sara_name] = (module.indices, module.indices._version, grad, norm)
            else:
                grad, norm = cached
            if due is not None:
                grad = grad.clone()  # the cache must not alias a gradient the host zeroes or scales in place
            if module.frozen_positions.numel():
                grad.index_put_((module.frozen_positions,), torch.zeros((), dtype=grad.dtype))
            grad = grad.to(module.delta.dtype)
            if module.delta.grad is None:
                module.delta.grad = grad
            else:
                module.delta.grad.add_(grad)
            norms.append(norm)
        self.last_rank_norm = sum(norms)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        for module in self.sara_modules():
            module.pin_frozen_data()
        if self.calibration_pending():
            self.check_calibration_length(self.known_total_steps())
            if int(self.optimizer_steps) >= self.config.calibration_steps:
                self.finish_calibration()
        if int(self.optimizer_steps) == self.progressive_step():
            self.run_progressive_reselection()

    @torch.no_grad()
    def run_progressive_reselection(self) -> int:
        """Freeze, at their current deltas, the selected entries whose |w0 + delta| left the threshold."""
        frozen_total = selected_total = 0
        for module in self.sara_modules():
            threshold = selection.fp32(self.thresholds.get(module.component, self.config.threshold))
            base = module.base_values_fp32()
            current = base + module.pinned_delta().detach().to(torch.float32)
            leaving = (current.abs() >= threshold) & ~module.frozen_mask()
            if self.config.selection != "magnitude":  # entries chosen above the threshold never were below it
                leaving &= base.abs() < threshold
            module.freeze_positions(leaving.nonzero().reshape(-1))
            frozen_total += int(module.frozen_positions.numel())
            selected_total += int(module.indices.numel())
        logger.info(f"SaRA progressive step at optimizer step {int(self.optimizer_steps)}: froze "
                    f"{frozen_total:,d} of {selected_total:,d} selected entries; "
                    f"{selected_total - frozen_total:,d} keep training")
        return frozen_total


def _broadcast_indices(modules: Sequence[SaraModule]) -> int:
    """Give every process rank 0's indices (torch.distributed, when initialised); returns the world size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 1
    for module in modules:
        dist.broadcast(module.indices, src=0)
        module.base_values = module._gather_base(module.indices)
    return dist.get_world_size()


def collect_targets(unet: Optional[nn.Module], text_encoders: Sequence[nn.Module], text_prefixes: Sequence[str],
                    preset: str, include_unet: bool = True, include_text: bool = True) -> list[Target]:
    """The targets of a U-Net / transformer and its text encoders under a preset."""
    rules = load_preset(preset)
    targets = []
    if include_unet and unet is not None:
        targets += find_targets(unet, UNET_PREFIX, rules.unet)
    if include_text:
        for encoder, prefix in zip(text_encoders, text_prefixes):
            if encoder is not None:
                targets += find_targets(encoder, prefix, rules.text_encoder)
    return targets


def all_targets(unet: Optional[nn.Module], text_encoders: Sequence[nn.Module],
                text_prefixes: Sequence[str]) -> list[Target]:
    """Every Linear / Conv2d of the models, whatever the preset (a file decides what it patches)."""
    everything = TargetRules()
    targets = find_targets(unet, UNET_PREFIX, everything) if unet is not None else []
    for encoder, prefix in zip(text_encoders, text_prefixes):
        if encoder is not None:
            targets += find_targets(encoder, prefix, everything)
    return targets


__all__ = ["SaraNetwork", "SaraModule", "Target", "find_targets", "collect_targets", "all_targets",
           "SaraSelectionError"]
