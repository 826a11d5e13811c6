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
        return self.finalize_updown(updown, orig_weight, orig_weight.shape, bias)

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


def attention_part_shape(module):
    """The shape of each q/k/v/out part of an OpenCLIP attention (A1111 assumes they all match)."""
    return (module.out_proj if isinstance(module, torch.nn.MultiheadAttention) else module).weight.shape


networks.module_types[:] = [t for t in networks.module_types if type(t).__name__ != ModuleTypeSara.__name__]
networks.module_types.insert(0, ModuleTypeSara())
