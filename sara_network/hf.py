"""SaRA for diffusers / transformers models: training set-up, checkpoints and inference.

The same host-neutral `SaraNetwork` the kohya adapter drives, applied to a diffusers
`UNet2DConditionModel` / `UNet2DModel` (or any nn.Module) and its text encoders:

    network = apply_sara(unet, [text_encoder], threshold=2e-3)          # training
    optimizer = torch.optim.AdamW(network.param_groups(1e-4))
    register_accelerate_hooks(accelerator, network)                     # save_state / load_state
    network.save("sara.safetensors")

    load_sara(pipe, ["style.safetensors", "subject.safetensors"], scale=0.8)  # inference
    set_sara_scale(pipe, 0.5); fuse_sara(pipe); unfuse_sara(pipe); unload_sara(pipe)

Module names are kohya's (`lora_unet_...`, `lora_te_...`), so files written here and by the kohya
`--network_module sara_network` path are the same format and load through either side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import fileformat
from .convert import CUSTOM_BASE
from .fileformat import SaraFileError
from .naming import component_of, text_encoder_prefixes
from .network import SaraNetwork, all_targets, collect_targets
from .options import OPTION_NAMES, OPTIONS, SaraConfig, SaraOptionError, parse_network_args

logger = logging.getLogger("sara_network")

CHECKPOINT_WEIGHTS_NAME = "sara_weights.safetensors"  # the native file, readable by any SaRA loader
CHECKPOINT_STATE_NAME = "sara_network_state.safetensors"  # the exact network state for resuming
TEXT_ENCODER_ATTRIBUTES = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_ATTRIBUTES = ("unet", "transformer", "prior")


# ---------------------------------------------------------------------------------------------
# the network for diffusers hosts
class SaraDiffusersNetwork(SaraNetwork):
    """A SaraNetwork that remembers the models it was applied to (never as children)."""

    def __init__(self, config: SaraConfig, multiplier: float, unet: Optional[nn.Module],
                 text_encoders: Sequence[nn.Module]):
        super().__init__(config, multiplier)
        text_encoders = [encoder for encoder in text_encoders if encoder is not None]
        # a tuple attribute: nn.Module does not register the models as our children
        self._models = (unet, text_encoders, text_encoder_prefixes(text_encoders) if text_encoders else [])

    @property
    def unet(self) -> Optional[nn.Module]:
        return self._models[0]

    @property
    def text_encoders(self) -> list[nn.Module]:
        return self._models[1]

    def host_components(self) -> list[str]:
        """'unet' and the text-encoder prefixes of the models this network is applied to."""
        return (["unet"] if self.unet is not None else []) + list(self._models[2])

    def file_targets(self):
        """Every Linear / Conv2d of the models: a file decides which ones it patches."""
        unet, text_encoders, prefixes = self._models
        return all_targets(unet, text_encoders, prefixes)

    # --- files --------------------------------------------------------------------------------
    def load_file(self, path: str, skip_missing_components: bool = False) -> str:
        """Replace the selection and deltas with those of a native file (kohya's or ours).

        With `skip_missing_components`, modules of a text encoder (or U-Net) this host does not
        have are left out with a warning, instead of being an error."""
        deltas, metadata = fileformat.load_native(path)
        if skip_missing_components:
            present = set(self.host_components())
            skipped = sorted({component_of(d.name) for d in deltas} - present)
            deltas = [d for d in deltas if component_of(d.name) in present]
            if skipped:
                logger.warning(f"{path}: skipping its modules for {', '.join(skipped)}, which this model does not have")
            if not deltas:
                raise SaraFileError(f"{path}: none of its modules belong to this model "
                                    f"(the model has {', '.join(sorted(present)) or 'nothing'})")
        self.adopt_deltas(self.file_targets(), deltas, path)
        self.adopt_file_settings(metadata)
        matches = self.check_base_hash(metadata.get("sara_base_hash"), path)
        info = (f"loaded {len(deltas)} SaRA modules, {sum(d.indices.numel() for d in deltas):,d} deltas from {path}"
                + ("" if matches else " (base model differs)"))
        logger.info(info)
        return info

    def save(self, path: str, dtype: Optional[torch.dtype] = None, metadata: Optional[dict] = None) -> None:
        metadata = dict(metadata or {})
        metadata.setdefault("ss_network_module", "sara_network")
        metadata.setdefault("sara_trainer", "diffusers")
        if self.unet is not None and not self.text_encoders and type(self.unet).__name__ != "UNet2DConditionModel":
            metadata.setdefault("ss_base_model_version", CUSTOM_BASE)  # no Stable Diffusion model: say so
        super().save(path, dtype, metadata)

    # --- optimizer ----------------------------------------------------------------------------
    def param_groups(self, learning_rate: Optional[float] = None,
                     text_encoder_lr: Optional[float] = None) -> list[dict]:
        """One optimizer group per component ('unet', 'lora_te', ...), named by its 'component' key.

        The `lr` option ('auto' or a number) wins over the given rates; text encoders default to
        `learning_rate`. A component whose rate is 0 is not trained (requires_grad off)."""
        groups = []
        for component in self.components():
            given = text_encoder_lr if component != "unet" and text_encoder_lr is not None else learning_rate
            lr = self.component_lr(component, given)
            params = self.trainable_parameters(component)
            for param in params:
                param.requires_grad_(lr != 0)
            if lr == 0:
                logger.info(f"SaRA: learning rate 0 for {component}: not trained")
                continue
            group = {"params": params, "component": component}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        return groups

    # --- checkpoint state ---------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The network's state_dict (deltas, selection, frozen entries, step count), on the CPU."""
        return {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> None:
        """Load a checkpoint_state() in place, so an optimizer keeps pointing at our parameters.

        The selection must be the one this network made (same base model and SaRA options)."""
        ours = dict(self.named_children())
        saved = {key.rsplit(".", 1)[0] for key in state if "." in key}
        missing, unexpected = sorted(set(ours) - saved), sorted(saved - set(ours))
        problems = [f"{len(missing)} modules missing (first: {missing[0]})"] if missing else []
        problems += [f"{len(unexpected)} unknown modules (first: {unexpected[0]})"] if unexpected else []
        calibrated_later = self.calibration_pending()  # a gradient selection: the checkpoint holds the chosen entries
        for name, module in ours.items():
            indices = state.get(f"{name}.indices")
            if calibrated_later and indices is not None and indices.shape == module.indices.shape:
                continue
            if indices is not None and not torch.equal(indices.to(module.indices.device), module.indices):
                problems.append(f"{name}: the selected entries differ")
        if problems:
            raise SaraFileError(f"{source}: the checkpoint's SaRA selection differs from this run's "
                                f"(another base model or other SaRA options?): {'; '.join(problems[:4])}")
        self.load_state_dict(dict(state))
        for module in self.sara_modules():
            module.pin_frozen_data()


# ---------------------------------------------------------------------------------------------
# configuration
def resolve_config(config: Union[SaraConfig, Mapping[str, Any], None] = None, **options: Any) -> SaraConfig:
    """A SaraConfig from a SaraConfig, a dict of option values (typed or strings) and/or keywords.

    Keywords override the config. Values are checked like kohya's network args; None sets an
    option to None (e.g. progressive_iter=None turns the progressive step off)."""
    if isinstance(config, SaraConfig):
        base = dataclasses.asdict(config)
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise TypeError(f"config must be a SaraConfig, a dict or None, not {type(config).__name__}")
    base.update(options)
    given = {key: value for key, value in base.items() if value is not None}
    cleared = [key for key, value in base.items() if value is None]
    parsed = parse_network_args({key: _as_text(value) for key, value in given.items()})
    for key in cleared:
        if key not in OPTION_NAMES:
            raise SaraOptionError(f"unknown SaRA option {key!r}; valid options are: {', '.join(OPTION_NAMES)}")
        if key not in _NONE_ALLOWED:
            raise SaraOptionError(f"SaRA option {key!r} cannot be None")
    return dataclasses.replace(parsed, **{key: None for key in cleared})


# options whose value may be None: those off by default, and the progressive step
_NONE_ALLOWED = {field.name for field in dataclasses.fields(SaraConfig) if field.default is None} | {"progressive_iter"}


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------------------------
# training set-up
def apply_sara(unet: Optional[nn.Module], text_encoders: Iterable[nn.Module] = (),
               config: Union[SaraConfig, Mapping[str, Any], None] = None, *, multiplier: float = 1.0,
               train_unet: bool = True, train_text_encoder: Optional[bool] = None,
               total_steps: Optional[int] = None, weights: Optional[str] = None,
               **options: Any) -> SaraDiffusersNetwork:
    """Select the trainable entries of `unet` (and `text_encoders`), patch them and return the network.

    - `unet`: a diffusers UNet2DConditionModel, UNet2DModel, SD3/FLUX transformer, or any nn.Module
      (its Linear / Conv2d layers are the targets; module names get kohya's `lora_unet_` prefix).
    - `text_encoders`: transformers text encoders in pipeline order (kohya prefixes `lora_te` for
      one, `lora_te1`, `lora_te2`, ... for several). They are trained unless `train_text_encoder`
      is False.
    - `config` / `**options`: the SaRA options (sara_network.options.OPTIONS), as for kohya's
      `--network_args`: threshold, budget, density, preset, lambda_rank, progressive_iter, ...
    - `total_steps`: optimizer steps of the run, needed for a fractional progressive_iter (the
      default 0.5); it can also be set later on `network.total_steps`.
    - `weights`: start from a native file (its selection and deltas) instead of selecting.
    - `selection="gradient"` / `"gradient_small"`: the entries are chosen by a calibration, either
      `network.calibrate(loss_fn)` before training or, if it is not called, the first
      `calibration_steps` optimizer steps (which then train nothing).

    Call it on the weights as loaded (fp32), before casting the frozen model to half precision: the
    selection |w| < threshold is computed from them. The base model is neither frozen nor moved;
    the deltas are fp32 parameters on the device of each layer (move the network with `.to()`).
    """
    resolved = resolve_config(config, **options)
    text_encoders = [encoder for encoder in text_encoders if encoder is not None]
    if train_text_encoder is None:
        train_text_encoder = bool(text_encoders)
    network = SaraDiffusersNetwork(resolved, multiplier, unet, text_encoders)
    network.total_steps = total_steps
    if weights is not None:
        network.refuse_file(f"weights= ({weights})")
        network.load_file(weights)
        skipped = [m.component for m in network.sara_modules()
                   if (m.component == "unet" and not train_unet) or (m.component != "unet" and not train_text_encoder)]
        if skipped:
            logger.info(f"SaRA: {weights} also holds deltas for {sorted(set(skipped))}; they are applied but not trained")
    else:
        unet_, encoders, prefixes = network._models
        targets = collect_targets(unet_, encoders, prefixes, resolved.preset, train_unet, train_text_encoder)
        network.select(targets)
        network.check_calibration_length(total_steps, "total_steps")
    for module in network.sara_modules():
        trained = train_unet if module.component == "unet" else train_text_encoder
        for param in module.parameters():
            param.requires_grad_(trained)
    fraction = resolved.progressive_iter
    if fraction is not None and fraction < 1 and not total_steps:
        logger.warning("SaRA: progressive_iter is a fraction of training; set network.total_steps "
                       "(or pass total_steps=) or the progressive step is skipped")
    network.patch()
    network.attach_optimizer_hooks()
    network.log_selection()
    return network


def all_reduce_gradients(accelerator, network: SaraNetwork) -> None:
    """Average the deltas' gradients over processes.

    The network is never called as a module, so DistributedDataParallel cannot sync it: call this
    after backward when `accelerator.sync_gradients`, before clipping and `optimizer.step()`."""
    if accelerator.num_processes <= 1 or network.calibration_pending():  # calibration steps have no gradients
        return
    for param in network.trainable_parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad = accelerator.reduce(param.grad, reduction="mean")


def register_accelerate_hooks(accelerator, network: SaraDiffusersNetwork,
                              save_dtype: Optional[torch.dtype] = None) -> None:
    """Make `accelerator.save_state` / `load_state` save and restore the network.

    save_state writes `sara_weights.safetensors` (the native file) and
    `sara_network_state.safetensors` (the exact state: deltas, frozen entries, optimizer-step count)
    into the checkpoint folder; load_state loads the state in place, so the optimizer state that
    accelerate restores afterwards still belongs to the same parameters. If the network was passed
    to `accelerator.prepare`, it is taken out of accelerate's own model saving.
    """

    def is_ours(model) -> bool:
        return accelerator.unwrap_model(model) is network

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            from safetensors.torch import save

            network.save(os.path.join(output_dir, CHECKPOINT_WEIGHTS_NAME), save_dtype)
            payload = save(network.checkpoint_state(), metadata={"sara_format": "sara-network/checkpoint-state"})
            fileformat.atomic_write_bytes(os.path.join(output_dir, CHECKPOINT_STATE_NAME), payload)
        for position in reversed(range(len(models))):
            if is_ours(models[position]):
                models.pop(position)
                if position < len(weights):
                    weights.pop(position)

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, CHECKPOINT_STATE_NAME)
        if not os.path.isfile(path):
            raise SaraFileError(f"{input_dir}: no {CHECKPOINT_STATE_NAME} (not a SaRA training checkpoint)")
        from safetensors.torch import load_file

        network.load_checkpoint_state(load_file(path), path)
        for position in reversed(range(len(models))):
            if is_ours(models[position]):
                models.pop(position)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------
# command-line flags generated from the option table
def _show_default(value: Any) -> str:
    return "off" if value is None else str(value)


def add_sara_args(parser: argparse.ArgumentParser, switch: bool = True) -> argparse.ArgumentParser:
    """Add `--sara_<option>` for every SaRA option (and `--sara` with `switch`) to a parser.

    The flags come from sara_network.options.OPTIONS; values are kept as text and checked by
    `sara_config_from_args`, with the same rules as kohya's network args."""
    group = parser.add_argument_group("SaRA sparse fine-tuning")
    if switch:
        group.add_argument("--sara", action="store_true",
                           help="Train SaRA sparse deltas instead of the script's default adapter.")
    for option in OPTIONS:
        group.add_argument(f"--sara_{option.name}", type=str, default=None, metavar="VALUE",
                           help=f"{option.help} (default: {_show_default(option.default)})")
    return parser


def sara_config_from_args(args: argparse.Namespace) -> SaraConfig:
    """The SaraConfig of the `--sara_*` flags that were given (the others keep their defaults)."""
    values = {}
    for option in OPTIONS:
        raw = getattr(args, f"sara_{option.name}", None)
        if raw is None:
            continue
        text = _as_text(raw)
        try:
            values[option.name] = option.parse(text)
        except (ValueError, TypeError) as error:
            raise SaraOptionError(f"--sara_{option.name}={text!r}: {error}") from None
    try:
        return SaraConfig(**values)
    except SaraOptionError as error:
        raise SaraOptionError(f"--sara_budget / --sara_density: {error}") from None


# ---------------------------------------------------------------------------------------------
# inference: load, scale, fuse, stack
@dataclasses.dataclass
class _SaraState:
    """What load_sara put on a model: the networks in patch order, and the fused entries."""

    networks: list = dataclasses.field(default_factory=list)
    fused: Optional[list] = None  # per network, per module: (module, weight entries, bias entries)


def _host_models(pipe_or_model) -> tuple[Optional[nn.Module], list[nn.Module]]:
    """(denoiser, text encoders) of a pipeline, or (model, []) for a bare model."""
    if isinstance(pipe_or_model, nn.Module):
        return pipe_or_model, []
    denoiser = next((getattr(pipe_or_model, name) for name in DENOISER_ATTRIBUTES
                     if isinstance(getattr(pipe_or_model, name, None), nn.Module)), None)
    encoders = [getattr(pipe_or_model, name) for name in TEXT_ENCODER_ATTRIBUTES
                if isinstance(getattr(pipe_or_model, name, None), nn.Module)]
    if denoiser is None and not encoders:
        raise TypeError(f"{type(pipe_or_model).__name__} is neither an nn.Module nor a pipeline with a "
                        "unet / transformer / text_encoder")
    return denoiser, encoders


def _anchor(pipe_or_model) -> Any:
    """Where the state lives: the denoiser, so a pipeline and its unet share it."""
    denoiser, encoders = _host_models(pipe_or_model)
    return denoiser if denoiser is not None else encoders[0]


def _state(pipe_or_model, create: bool = False) -> Optional[_SaraState]:
    anchor = _anchor(pipe_or_model)
    state = anchor.__dict__.get("_sara_state")
    if state is None and create:
        state = _SaraState()
        anchor.__dict__["_sara_state"] = state
    return state


def get_sara_networks(pipe_or_model) -> list[SaraDiffusersNetwork]:
    state = _state(pipe_or_model)
    return list(state.networks) if state else []


def load_sara(pipe_or_model, path_or_paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
              scale: Union[float, Sequence[float]] = 1.0) -> list[SaraDiffusersNetwork]:
    """Patch a pipeline's unet / transformer and text encoders (or a bare model) with native files.

    Several files (in one call or several) stack: each network adds its delta on top of the
    previous ones. Modules for a text encoder the host lacks are skipped with a warning. Call it
    after moving the pipeline to its device and dtype (the deltas are created there, in fp32).
    Every file is read and checked before the model changes: when one fails, none is loaded.
    Returns the networks this call loaded."""
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    scales = _scales(scale, len(paths))
    denoiser, encoders = _host_models(pipe_or_model)
    loaded = []
    for path, multiplier in zip(paths, scales):  # every file is read and checked before the model changes
        network = SaraDiffusersNetwork(SaraConfig(), multiplier, denoiser, encoders)
        network.load_file(os.fspath(path), skip_missing_components=True)
        try:
            network.config = resolve_config(json.loads(network.source_metadata.get("sara_config", "{}")))
        except (ValueError, TypeError):
            pass  # settings of a file from another version: informative only at inference
        network.requires_grad_(False)
        network.eval()
        loaded.append(network)
    state = _state(pipe_or_model, create=True)
    was_fused = state.fused is not None
    if was_fused:
        unfuse_sara(pipe_or_model)
    for network in loaded:
        network.patch()
        state.networks.append(network)
    if was_fused:
        fuse_sara(pipe_or_model)
    return loaded


def _scales(scale, count: int) -> list[float]:
    if isinstance(scale, (int, float)):
        return [float(scale)] * count
    scales = [float(s) for s in scale]
    if len(scales) != count:
        raise ValueError(f"{len(scales)} scales for {count} SaRA networks")
    return scales


def set_sara_scale(pipe_or_model, scale: Union[float, Sequence[float]]) -> None:
    """Set the multiplier of every loaded network (one value, or one per network in load order).
    On a fused model the weights are re-fused at the new scale."""
    state = _state(pipe_or_model)
    if not state or not state.networks:
        raise ValueError("no SaRA network is loaded on this model (use load_sara first)")
    scales = _scales(scale, len(state.networks))
    was_fused = state.fused is not None
    if was_fused:
        unfuse_sara(pipe_or_model)
    for network, multiplier in zip(state.networks, scales):
        network.set_multiplier(multiplier)
    if was_fused:
        fuse_sara(pipe_or_model)


@torch.no_grad()
def fuse_sara(pipe_or_model) -> None:
    """Merge every loaded network into the base weights (at its scale) and unpatch.

    The original values of just the touched entries are kept, so `unfuse_sara` restores the base
    weights bit for bit."""
    state = _state(pipe_or_model)
    if not state or not state.networks:
        raise ValueError("no SaRA network is loaded on this model (use load_sara first)")
    if state.fused is not None:
        return
    saved = []
    for network in state.networks:  # bottom of the stack first; unfuse restores in reverse
        entries = []
        for module in network.sara_modules():
            weight = module.base.weight.detach().reshape(-1)
            kept_bias = None
            if module.bias_delta is not None and module.base.bias is not None:
                kept_bias = module.base.bias.detach()[module.bias_indices.long()].clone()
            entries.append((module, weight[module.indices.long()].clone(), kept_bias))
        saved.append(entries)
        network.merge_into_base()
    state.fused = saved


@torch.no_grad()
def unfuse_sara(pipe_or_model) -> None:
    """Undo `fuse_sara` exactly and patch the networks again."""
    state = _state(pipe_or_model)
    if not state or state.fused is None:
        return
    for entries in reversed(state.fused):
        for module, weight_entries, bias_entries in entries:
            module.base.weight.data.view(-1)[module.indices.long()] = weight_entries
            if bias_entries is not None:
                module.base.bias.data[module.bias_indices.long()] = bias_entries
    state.fused = None
    for network in state.networks:
        network.patch()


def unload_sara(pipe_or_model) -> None:
    """Remove every loaded network (unfusing first), leaving the model as it was."""
    state = _state(pipe_or_model)
    if not state:
        return
    unfuse_sara(pipe_or_model)
    for network in reversed(state.networks):
        network.unpatch()
    state.networks.clear()


__all__ = ["SaraDiffusersNetwork", "apply_sara", "resolve_config", "register_accelerate_hooks",
           "all_reduce_gradients", "add_sara_args", "sara_config_from_args", "load_sara", "set_sara_scale",
           "fuse_sara", "unfuse_sara", "unload_sara", "get_sara_networks", "CHECKPOINT_WEIGHTS_NAME",
           "CHECKPOINT_STATE_NAME"]
