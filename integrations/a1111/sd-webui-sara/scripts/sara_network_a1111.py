"""SaRA files through A1111's `<lora:name:te:unet>`: a module type for the built-in Lora extension.

Only glue: the delta arithmetic is sara_network.host_patch, shared with Forge, ComfyUI and the tools.
"""
import network
import networks
import torch
from sara_network import fileformat, host_patch, ldm_names


class NetworkModuleSara(network.NetworkModule):
    """One module's sparse delta. A1111 adds finalize_updown(calc_updown(w)) to the weight (merge),
    or calls forward() next to the layer when "Lora functional" is on."""

    def __init__(self, net, weights, delta):
        super().__init__(net, weights)
        self.delta = delta

    def calc_updown(self, orig_weight):
        # fp32: A1111 merges as weight.to(updown.dtype) + updown, then casts back to the layer dtype
        updown, bias = host_patch.module_delta(self.delta, orig_weight.shape, device=orig_weight.device)
        updown, bias = self.finalize_updown(updown, orig_weight, orig_weight.shape, bias)
        part = fused_part(self)
        if part is not None and bias is not None:  # A1111's fused path drops a q/k/v bias: add it here
            add_in_proj_bias(self.sd_module, part, bias)
        return updown, bias

    def forward(self, x, y):
        updown, bias = self.calc_updown(self.sd_module.weight)
        bias = None if bias is None else bias.to(x.dtype)
        return y + self.ops(x, weight=updown.to(x.dtype), bias=bias, **self.extra_kwargs)


class ModuleTypeSara(network.ModuleType):
    def create_module(self, net, weights):
        if "sara_values" not in weights.w:
            return None
        name = weights.network_key.split(".", 1)[0]
        delta = fileformat.parse_module(name, weights.w, net.network_on_disk.filename)
        # an OpenCLIP attention is patched only when q, k, v and out all exist: zero fillers for the
        # parts this file did not select (a real part replaces its filler when A1111 reaches it)
        for sibling in ldm_names.a1111_attention_siblings(weights.sd_key):
            if sibling != weights.sd_key and sibling not in net.modules:
                empty = fileformat.ModuleDelta(sibling, tuple(attention_part_shape(weights.sd_module)),
                                               torch.zeros(0, dtype=torch.int32), torch.zeros(0))
                net.modules[sibling] = NetworkModuleSara(net, weights._replace(sd_key=sibling), empty)
        return NetworkModuleSara(net, weights, delta)


def fused_part(module):
    """0, 1, 2 for the q, k, v part of an OpenCLIP MultiheadAttention (one third of in_proj), else None."""
    siblings = ldm_names.a1111_attention_siblings(module.sd_key)
    if not isinstance(module.sd_module, torch.nn.MultiheadAttention) or module.sd_key not in siblings[:3]:
        return None
    return siblings.index(module.sd_key)


def add_in_proj_bias(attention, part, bias):
    """A1111 backs up and restores in_proj_weight but never in_proj_bias; keep its base here (restored
    with A1111's backups, below) and add the delta to the part's third."""
    with torch.no_grad():
        if getattr(attention, "sara_in_proj_bias_backup", None) is None:
            attention.sara_in_proj_bias_backup = attention.in_proj_bias.detach().clone()
        attention.in_proj_bias.chunk(3)[part].add_(bias.to(attention.in_proj_bias))


def _restore_in_proj_bias(restore):
    def network_restore_weights_from_backup(self):
        restore(self)
        backup = getattr(self, "sara_in_proj_bias_backup", None)
        if backup is not None:
            with torch.no_grad():
                self.in_proj_bias.copy_(backup)
    network_restore_weights_from_backup.sara = True
    return network_restore_weights_from_backup


def _forget_in_proj_bias(reset):
    def network_reset_cached_weight(self):  # new weights loaded into the layer: its backup is stale
        reset(self)
        self.sara_in_proj_bias_backup = None
    network_reset_cached_weight.sara = True
    return network_reset_cached_weight


def attention_part_shape(module):
    """The shape of each q/k/v/out part of an OpenCLIP attention (A1111 assumes they all match)."""
    return (module.out_proj if isinstance(module, torch.nn.MultiheadAttention) else module).weight.shape


for _name, _wrap in (("network_restore_weights_from_backup", _restore_in_proj_bias),
                     ("network_reset_cached_weight", _forget_in_proj_bias)):
    if not getattr(getattr(networks, _name), "sara", False):
        setattr(networks, _name, _wrap(getattr(networks, _name)))
networks.module_types[:] = [t for t in networks.module_types if type(t).__name__ != ModuleTypeSara.__name__]
networks.module_types.insert(0, ModuleTypeSara())
