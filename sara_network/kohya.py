"""kohya-ss/sd-scripts `--network_module sara_network`: the contract mapped onto SaraNetwork.

kohya calls (train_network.py, sdxl_/flux_/sd3_train_network.py): create_network or
create_network_from_weights -> prepare_network(args) -> apply_to -> load_weights -> [gradient
checkpointing] -> prepare_optimizer_params[_with_multiple_te_lrs] -> cast/freeze of the base model ->
accelerate.prepare -> prepare_grad_etc -> per epoch on_epoch_start, per step on_step_start, grad
all-reduce over network.parameters(), clip over get_trainable_params(), optimizer.step() -> saves
through save_weights, resume through state_dict/load_state_dict. See docs/kohya.md.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from . import fileformat
from .network import SaraNetwork, all_targets, collect_targets
from .naming import component_of, text_encoder_prefixes
from .options import SaraConfig, SaraOptionError, parse_bool, parse_network_args

logger = logging.getLogger("sara_network")

# kohya's FLUX and SD3 networks (lora_flux.py, lora_sd3.py) always name T5-XXL `lora_te3`, and create
# modules in it only with the network arg train_t5xxl=True; the trainers read `network.train_t5xxl`
# to decide whether T5 gets gradients (get_text_encoders_train_flags).
T5_PREFIX = "lora_te3"
# network args this adapter reads itself (besides the SaRA options)
HOST_KEYS = ("train_t5xxl",)


def _as_list(text_encoder) -> list:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _pop_train_t5xxl(kwargs) -> Optional[bool]:
    """The kohya network arg train_t5xxl (FLUX / SD3), or None when not given."""
    raw = kwargs.pop("train_t5xxl", None)
    if raw is None:
        return None
    try:
        return parse_bool(raw)
    except ValueError:
        raise SaraOptionError(f"bad value for network arg train_t5xxl={raw!r}: expected true or false") from None


def _reject_dropout(neuron_dropout, kwargs) -> None:
    for name, value in (("--network_dropout", neuron_dropout), ("dropout", kwargs.pop("dropout", None))):
        if value not in (None, "None", 0, 0.0, "0", "0.0"):
            raise SaraOptionError(f"{name}={value}: SaRA trains sparse deltas and has no dropout; remove it")


class SaraKohyaNetwork(SaraNetwork):
    """SaraNetwork with kohya's method names. Never holds the base models as children."""

    def __init__(self, config: SaraConfig, multiplier: float, text_encoders: Sequence, unet,
                 network_dim: Optional[int] = None, network_alpha: Optional[float] = None, train_t5xxl: bool = False):
        super().__init__(config, multiplier)
        # read unguarded by kohya's FLUX / SD3 trainers; False: T5-XXL gets no deltas and no gradients
        self.train_t5xxl = bool(train_t5xxl)
        self.network_dim = network_dim  # no meaning for SaRA training; kept for metadata only
        self.network_alpha = network_alpha
        self._models = (list(text_encoders), unet)  # a tuple attribute: not registered as children
        self._pending_deltas = None  # from create_network_from_weights, adopted at apply_to
        self._applied = False
        self._selection_deferred = False  # apply_to waits for load_weights(--network_weights)
        self._apply_flags = (True, True)  # (text encoders, U-Net) as kohya's apply_to asked
        self._args = None
        self._optimized: list[torch.nn.Parameter] = []

    # --- accelerate state (--save_state / --resume) ------------------------------------------
    # --- set-up -------------------------------------------------------------------------------
    def prepare_network(self, args) -> None:
        """kohya hands over its args; max_train_steps is read when the progressive step is due
        (kohya may recompute it from --max_train_epochs after this call, so a gradient selection's
        calibration length is checked again at the first optimizer step)."""
        self._args = args
        self.check_calibration_length(getattr(args, "max_train_steps", None), "max_train_steps")

    def known_total_steps(self) -> Optional[int]:
        if self._args is not None and getattr(self._args, "max_train_steps", None):
            return int(self._args.max_train_steps)
        return self.total_steps

    def check_calibration_length(self, total_steps: Optional[int], name: str = "max_train_steps") -> None:
        super().check_calibration_length(total_steps, name)

    def progressive_step(self) -> Optional[int]:
        if self._args is not None and getattr(self._args, "max_train_steps", None):
            self.total_steps = int(self._args.max_train_steps)
        elif self.config.progressive_iter is not None and self.config.progressive_iter < 1 and not self.total_steps:
            logger.warning("progressive_iter is a fraction but the number of training steps is unknown; "
                           "the progressive step is skipped (give progressive_iter as a step count)")
            self.config.progressive_iter = None
        return super().progressive_step()

    def _trained_encoders(self, text_encoders, apply_text_encoder: bool) -> tuple[list, list[str]]:
        """The text encoders this run trains and their prefixes: none without apply_text_encoder,
        T5-XXL only with train_t5xxl (as kohya's FLUX / SD3 trainers decide)."""
        if not apply_text_encoder or not text_encoders:
            return [], []
        pairs = [(encoder, prefix) for encoder, prefix in zip(text_encoders, text_encoder_prefixes(text_encoders))
                 if self.train_t5xxl or prefix != T5_PREFIX]
        return [encoder for encoder, _ in pairs], [prefix for _, prefix in pairs]

    def _is_trained(self, name: str) -> bool:
        apply_text_encoder, apply_unet = self._apply_flags
        component = component_of(name)
        if component == "unet":
            return apply_unet
        return apply_text_encoder and (self.train_t5xxl or component != T5_PREFIX)

    def _targets(self, text_encoders, unet, apply_text_encoder: bool, apply_unet: bool, preset: str):
        encoders, prefixes = self._trained_encoders(text_encoders, apply_text_encoder)
        if self._pending_deltas is not None:
            return all_targets(unet if apply_unet else None, encoders, prefixes)
        return collect_targets(unet, encoders, prefixes, preset, apply_unet, bool(encoders))

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: Optional[bool] = None,
                 apply_unet: Optional[bool] = None) -> None:
        text_encoders = _as_list(text_encoder) or self._models[0]
        unet = unet if unet is not None else self._models[1]
        self._models = (text_encoders, unet)
        apply_text_encoder = apply_text_encoder is not False and bool(text_encoders)
        apply_unet = apply_unet is not False and unet is not None
        self._apply_flags = (apply_text_encoder, apply_unet)
        if not self._applied:
            if self._pending_deltas is None and getattr(self._args, "network_weights", None):
                # kohya calls load_weights(--network_weights) right after this: the file fixes the
                # entries, so selecting now (minutes on a large model) would be thrown away.
                logger.info(f"SaRA: selection skipped, the entries come from {self._args.network_weights}")
                self._selection_deferred = True
                self.attach_optimizer_hooks()
                return
            targets = self._targets(text_encoders, unet, apply_text_encoder, apply_unet, self.config.preset)
            if self._pending_deltas is not None:
                deltas = self._applied_deltas(self._pending_deltas, "the weights file")
                self.adopt_deltas(targets, deltas, "the weights file")
                self.check_base_hash(self.source_metadata.get("sara_base_hash"), "the weights file")
                self._pending_deltas = None
            else:
                self.select(targets)
            self._applied = True
            self.log_selection()
        self.patch()
        self.attach_optimizer_hooks()

    def _applied_deltas(self, deltas: list, file: str) -> list:
        """The file's modules of the components this run trains (--network_train_unet_only /
        --network_train_text_encoder_only, T5-XXL only with train_t5xxl): kohya runs the others
        without gradients, so their deltas would be moved by the rank term alone. Like kohya's LoRA,
        leave them out (logged); every kept module must then exist in the model."""
        kept = [d for d in deltas if self._is_trained(d.name)]
        left_out = sorted({component_of(d.name) for d in deltas if not self._is_trained(d.name)})
        if left_out:
            logger.info(f"SaRA: {len(deltas) - len(kept)} modules of {file} ({', '.join(left_out)}) are not loaded: "
                        "not trained in this run")
        if not kept:
            raise fileformat.SaraFileError(f"{file} has no modules for the components trained in this run")
        return kept

    def load_weights(self, file: str) -> str:
        """Load a native file (resume / --network_weights). Its support replaces the selection;
        a file that is damaged or does not fit changes nothing."""
        self.refuse_file(f"--network_weights ({file})")
        deltas, metadata = fileformat.load_native(file)
        text_encoders, unet = self._models
        apply_text_encoder, apply_unet = self._apply_flags
        targets = all_targets(unet if apply_unet else None, *self._trained_encoders(text_encoders, apply_text_encoder))
        deltas = self._applied_deltas(deltas, file)
        self.adopt_deltas(targets, deltas, file)
        self.adopt_file_settings(metadata)
        self._applied = True
        if self._selection_deferred:  # apply_to left the selection to this file: patch now
            self._selection_deferred = False
            self.log_selection()
            self.patch()
        matches = self.check_base_hash(metadata.get("sara_base_hash"), file)
        info = (f"loaded {len(deltas)} SaRA modules, {sum(d.indices.numel() for d in deltas):,d} deltas from {file}"
                + ("" if matches else " (base model differs)"))
        logger.info(info)
        return info

    # --- optimizer ----------------------------------------------------------------------------
    def _groups(self, te_lrs: dict[str, Optional[float]], unet_lr: Optional[float], default_lr: Optional[float]):
        groups, descriptions = [], []
        self._optimized = []
        for component in self.components():
            given = unet_lr if component == "unet" else te_lrs.get(component)
            lr = self.component_lr(component, given if given is not None else default_lr)
            params = self.trainable_parameters(component)
            if lr == 0:
                for param in params:
                    param.requires_grad_(False)
                logger.info(f"SaRA: learning rate 0 for {component}: not trained")
                continue
            group = {"params": params}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
            descriptions.append("unet" if component == "unet" else f"textencoder {component[len('lora_te'):] or ''}".strip())
            self._optimized += params
        for param in self._optimized:
            param.requires_grad_(True)
        if self.config.lr is not None:
            logger.info("SaRA learning rates from network args: "
                        + ", ".join(f"{d}={g.get('lr')}" for d, g in zip(descriptions, groups)))
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        if isinstance(text_encoder_lr, (list, tuple)):
            return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)
        te_lrs = {c: text_encoder_lr for c in self.components() if c != "unet"}
        return self._groups(te_lrs, unet_lr, default_lr)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """kohya >= 0.10: --text_encoder_lr takes one value per text encoder (or one for all)."""
        lrs = list(text_encoder_lr or [])
        te_components = [c for c in self.components() if c != "unet"]
        ordered = sorted(te_components)
        te_lrs = {}
        for position, component in enumerate(ordered):
            te_lrs[component] = (lrs[position] if position < len(lrs) else lrs[0]) if lrs else None
        return self._groups(te_lrs, unet_lr, default_lr)

    def prepare_grad_etc(self, *args) -> None:
        for param in self._optimized or self.trainable_parameters():
            param.requires_grad_(True)

    def on_epoch_start(self, *args) -> None:
        self.train()

    def on_step_start(self, *args) -> None:
        """Nothing per micro-batch: the rank term and progressive step run on optimizer steps."""

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the patched layers recompute correctly under the host's checkpointing."""

    # --- merging, norms, saving ----------------------------------------------------------------
    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Bake m * delta into the base weights (kohya --base_weights, gen_img merge)."""
        if not self._applied:
            self.apply_to(text_encoder, unet)
        self.merge_into_base()
        self.detach_optimizer_hooks()  # a merged network trains nothing; apply_to registered global hooks
        logger.info(f"SaRA: merged {len(self.sara_modules())} modules at multiplier {self.multiplier}")

    def apply_max_norm_regularization(self, max_norm_value, device=None):
        return self.scale_to_max_norm(float(max_norm_value))

    def save_weights(self, file: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> None:
        metadata = dict(metadata or {})
        metadata.setdefault("ss_network_module", "sara_network")
        self.save(file, dtype, metadata)


def create_network(multiplier: float, network_dim: Optional[int], network_alpha: Optional[float], vae,
                   text_encoder, unet, neuron_dropout: Optional[float] = None, **kwargs: Any) -> SaraKohyaNetwork:
    """kohya entry point. `--network_args` arrive as strings in kwargs and are parsed strictly.

    `--network_dim` / `--network_alpha` have no meaning for SaRA training (there is no rank); they
    are accepted, recorded in metadata by kohya, and ignored. `train_t5xxl=true` (FLUX / SD3) also
    selects in T5-XXL, as kohya's own networks do; by default T5-XXL is left alone.
    """
    _reject_dropout(neuron_dropout, kwargs)
    train_t5xxl = _pop_train_t5xxl(kwargs)
    config = parse_network_args(kwargs, host_keys=HOST_KEYS)
    return SaraKohyaNetwork(config, multiplier, _as_list(text_encoder), unet, network_dim, network_alpha,
                            train_t5xxl=bool(train_t5xxl))


def create_network_from_weights(multiplier: float, file: Optional[str], vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs: Any):
    """kohya entry point for resume, --dim_from_weights and --base_weights: the file's support
    is used; training options (lambda_rank, progressive_iter, ...) may still come from kwargs."""
    _reject_dropout(kwargs.pop("neuron_dropout", None), kwargs)
    if weights_sd is None:
        tensors, metadata = fileformat.read_tensors(file)
    else:
        tensors = weights_sd
        metadata = fileformat.read_tensors(file)[1] if file else {"sara_format": fileformat.FORMAT_NAME,
                                                                   "sara_format_version": fileformat.FORMAT_VERSION}
    deltas = fileformat.parse_native(tensors, metadata, file or "<weights_sd>")
    train_t5xxl = _pop_train_t5xxl(kwargs)
    if train_t5xxl is None:  # as kohya's LoRA: a file with T5-XXL modules trains (and merges) T5-XXL
        train_t5xxl = any(component_of(d.name) == T5_PREFIX for d in deltas)
    config = parse_network_args(kwargs, host_keys=HOST_KEYS)
    network = SaraKohyaNetwork(config, multiplier, _as_list(text_encoder), unet, train_t5xxl=train_t5xxl)
    network.refuse_file(f"a weights file ({file or 'weights_sd'})")
    network._pending_deltas = deltas
    network.adopt_file_settings(metadata)
    return network, tensors
