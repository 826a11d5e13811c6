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
from .options import SaraConfig, auto_lr
from .presets import TargetRules, load_preset
from .regularizers import rank_penalty_grad

logger = logging.getLogger("sara_network")


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
        # Base values at the selected entries, taken before the host casts the model: the
        # progressive step and the 'weights' rank target compare/penalise base + delta.
        self.register_buffer("base_values", self._gather_base(indices), persistent=False)
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
        return weight[indices.to(weight.device)].to(torch.float16)

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
        if self._stacked:
            return self._original_forward(x, *args, **kwargs) + self.delta_output(x, multiplier)
        base = self.base
        bias = self.effective_bias(multiplier)
        if self.kind == "linear":
            return sparse_delta_linear(x, base.weight, bias, self.delta, self.indices, multiplier,
                                       self.frozen_positions, self.frozen_values)
        x, padding = conv_padding(base, x)
        return sparse_delta_conv2d(x, base.weight, bias, self.delta, self.indices, multiplier, base.stride,
                                   padding, base.dilation, base.groups, self.frozen_positions, self.frozen_values)

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
        """Copy the frozen values back into the parameter (the forward pins them regardless)."""
        if self.frozen_positions.numel():
            self.delta.data.index_put_((self.frozen_positions,), self.frozen_values.to(self.delta.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The frozen set grows at the progressive step: resize before the default copy.

        A missing frozen buffer means "nothing frozen": accelerate's save_state takes all empty
        tensors (storage pointer 0) for aliases of one another and writes only one of them."""
        for name in ("frozen_positions", "frozen_values"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).new_zeros(0)
            saved = state_dict[prefix + name]
            if saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=self.indices.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _patch_owner(forward) -> Optional["SaraModule"]:
    """The SaraModule whose forward `forward` is, or None."""
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, SaraModule) and getattr(forward, "__func__", None) is SaraModule.forward else None


class SaraNetwork(nn.Module):
    """All SaRA deltas of a model, keyed by kohya module name."""

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
        self._hook_handles = []
        self._optimizer_owns_us = weakref.WeakKeyDictionary()

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

    def select(self, targets: Sequence[Target]) -> None:
        """Compute the paper's selection for `targets` (fp32, from the weights as they are now)."""
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
            for target in group:
                self.thresholds[target.component] = threshold
                indices[target.name] = selection.select_below(target.module.weight, threshold)
                if config.include_bias and target.module.bias is not None:
                    bias_indices[target.name] = selection.select_below(target.module.bias, threshold)
            selected = sum(int(indices[t.name].numel()) for t in group)
            if selected == 0:
                suggestion = selection.suggest_threshold(weights, 0.01)
                smallest = min(float(selection.canonical_abs(w).min()) for w in weights)
                raise SaraSelectionError(
                    f"threshold={threshold:.3g} selects no parameters in {len(group)} targeted modules "
                    f"(smallest |w| is {smallest:.3g}); threshold={suggestion:.3g} would select about 1% "
                    "of them, or use budget=/density=")
        self.add_targets(targets, indices, bias_indices)
        self.base_hash = fileformat.base_fingerprint((m.sara_name, m.base.weight) for m in self.sara_modules())

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

    def log_selection(self) -> str:
        """Log (and return) selected counts per block and in total, and the trainable fraction."""
        blocks: dict[str, list[int]] = OrderedDict()
        for module in self.sara_modules():
            key = f"{module.component}:{selection.block_of(module.path)}"
            counts = blocks.setdefault(key, [0, 0])
            counts[0] += module.indices.numel()
            counts[1] += math.prod(module.weight_shape)
        lines = [f"  {block:<40} {chosen:>12,d} / {total:>13,d} ({chosen / total:.2%})"
                 for block, (chosen, total) in blocks.items()]
        chosen = sum(c for c, _ in blocks.values())
        total = sum(t for _, t in blocks.values())
        thresholds = ", ".join(f"{k}: {v:.4g}" for k, v in self.thresholds.items())
        report = "\n".join([f"SaRA selection ({len(self.sara_modules())} modules; thresholds {thresholds or 'from file'}):",
                            *lines,
                            f"  total: {chosen:,d} trainable of {total:,d} targeted weights ({chosen / max(total, 1):.3%})"])
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
            return auto_lr(self.thresholds.get(component, self.config.threshold))
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
    def merge_into_base(self, multiplier: Optional[float] = None) -> None:
        """Add m * delta into the base weights for good (fp32 math, base dtype kept) and unpatch."""
        scale = self.multiplier if multiplier is None else float(multiplier)
        self.unpatch()
        for module in self.sara_modules():
            weight = module.base.weight
            merged = weight.detach().to(torch.float32).reshape(-1)
            update = scale * module.pinned_delta().detach().to(device=merged.device, dtype=torch.float32)
            merged.index_put_((module.indices.to(merged.device),), merged[module.indices] + update)
            weight.data.copy_(merged.view(weight.shape).to(weight.dtype))
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

    def rank_eligible(self) -> list[SaraModule]:
        min_dim = self.config.rank_min_dim
        return [m for m in self.sara_modules()
                if len(m.weight_shape) == 2 and min(m.weight_shape) > min_dim and m.delta.requires_grad
                and m.delta.grad is not None]  # a layer the step did not train keeps its deltas

    @torch.no_grad()
    def apply_rank_gradients(self) -> None:
        """Add lambda_rank * subgradient of ||masked matrix||_* to the deltas of random eligible layers.

        The layers are drawn from a generator seeded by (seed, step): every rank of a multi-GPU run
        picks the same layers, so the deltas stay identical across ranks.
        """
        weight = self.config.lambda_rank
        eligible = self.rank_eligible() if weight > 0 else []
        if not eligible:
            return
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(self.optimizer_steps))
        order = torch.randperm(len(eligible), generator=generator)[: self.config.rank_layers]
        norms = []
        for position in order.tolist():
            module = eligible[position]
            entries = module.pinned_delta().detach().to(torch.float32)
            if self.config.rank_target == "weights":
                entries = entries + module.base_values.to(torch.float32)
            grad, norm = rank_penalty_grad(module.weight_shape, module.indices, entries, weight)
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
        if int(self.optimizer_steps) == self.progressive_step():
            self.run_progressive_reselection()

    @torch.no_grad()
    def run_progressive_reselection(self) -> int:
        """Freeze, at their current deltas, the selected entries whose |w0 + delta| left the threshold."""
        frozen_total = selected_total = 0
        for module in self.sara_modules():
            threshold = selection.fp32(self.thresholds.get(module.component, self.config.threshold))
            current = module.base_values.to(torch.float32) + module.pinned_delta().detach().to(torch.float32)
            leaving = (current.abs() >= threshold) & ~module.frozen_mask()
            module.freeze_positions(leaving.nonzero().reshape(-1))
            frozen_total += int(module.frozen_positions.numel())
            selected_total += int(module.indices.numel())
        logger.info(f"SaRA progressive step at optimizer step {int(self.optimizer_steps)}: froze "
                    f"{frozen_total:,d} of {selected_total:,d} selected entries; "
                    f"{selected_total - frozen_total:,d} keep training")
        return frozen_total


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
