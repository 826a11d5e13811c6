"""Sparse-delta Linear and Conv2d: the paper's "unstructured backprop" as autograd functions.

The effective weight W + m * scatter(delta) is rebuilt transiently in forward and again in
backward; only what a frozen layer keeps is saved (the input, the base weight by reference) plus
the 1-D deltas and their int32 indices. The dense weight gradient exists for one layer at a time,
inside backward, and is gathered down to the selected entries before the function returns.

Mixed precision: under autocast the layer computes in the autocast dtype, like `F.linear` would;
the selected entries are formed as fp32 (base + delta) and rounded once. The dense weight gradient
is computed in that dtype (as for any half-precision layer), gathered and returned in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a frozen Linear/Conv2d would compute in for input x (autocast-aware)."""
    device_type = x.device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    elif device_type == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    elif device_type == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    return x.dtype


def effective_values(values: torch.Tensor, frozen_positions: Optional[torch.Tensor],
                     frozen_values: Optional[torch.Tensor]) -> torch.Tensor:
    """Deltas with the entries frozen by the progressive step pinned to their frozen values."""
    if frozen_positions is None or frozen_positions.numel() == 0:
        return values
    return values.index_put((frozen_positions,), frozen_values.to(values.dtype))


def effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     multiplier: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh copy of W in `dtype` with the selected entries set to fp32(W + m*delta), rounded once."""
    rebuilt = weight.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    flat = rebuilt.view(-1)
    selected = flat[indices].to(torch.float32) + multiplier * values.detach().to(torch.float32)
    flat.index_put_((indices,), selected.to(dtype))
    return rebuilt


def _gather_delta_grad(dense_grad: torch.Tensor, indices: torch.Tensor, multiplier: float,
                       frozen_positions: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    grad = dense_grad.reshape(-1)[indices].to(dtype)
    if multiplier != 1.0:
        grad.mul_(multiplier)
    if frozen_positions is not None and frozen_positions.numel():
        grad.index_put_((frozen_positions,), torch.zeros((), dtype=grad.dtype))
    return grad


class SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, frozen_positions, frozen_values, multiplier):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            pinned = effective_values(values, frozen_positions, frozen_values)
            w_eff = effective_weight(weight, pinned, indices, multiplier, dtype)
            out = F.linear(x_c, w_eff, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, weight, values, indices, frozen_positions, frozen_values)
        ctx.meta = (dtype, multiplier, x.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, values, indices, frozen_positions, frozen_values = ctx.saved_tensors
        dtype, multiplier, x_dtype, bias_dtype = ctx.meta
        need_x, _, need_bias, need_values = ctx.needs_input_grad[:4]
        grad_x = grad_bias = grad_values = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(dtype)
            if need_x:
                pinned = effective_values(values, frozen_positions, frozen_values)
                w_eff = effective_weight(weight, pinned, indices, multiplier, dtype)
                grad_x = g.matmul(w_eff).to(x_dtype)
                del w_eff
            g2 = g.reshape(-1, g.shape[-1])
            if need_values:
                dense = g2.t().matmul(x_c.reshape(-1, x_c.shape[-1]))
                grad_values = _gather_delta_grad(dense, indices, multiplier, frozen_positions, values.dtype)
                del dense
            if need_bias:
                grad_bias = g2.sum(0).to(bias_dtype)
        return grad_x, None, grad_bias, grad_values, None, None, None, None


class SparseDeltaConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, frozen_positions, frozen_values, multiplier,
                stride, padding, dilation, groups):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            pinned = effective_values(values, frozen_positions, frozen_values)
            w_eff = effective_weight(weight, pinned, indices, multiplier, dtype)
            out = F.conv2d(x_c, w_eff, None if bias is None else bias.to(dtype),
                           stride, padding, dilation, groups)
        ctx.save_for_backward(x_c, weight, values, indices, frozen_positions, frozen_values)
        ctx.meta = (dtype, multiplier, x.dtype, None if bias is None else bias.dtype,
                    stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, values, indices, frozen_positions, frozen_values = ctx.saved_tensors
        dtype, multiplier, x_dtype, bias_dtype, stride, padding, dilation, groups = ctx.meta
        need_x, _, need_bias, need_values = ctx.needs_input_grad[:4]
        grad_values = None
        with torch.autocast(grad_out.device.type, enabled=False):
            pinned = effective_values(values, frozen_positions, frozen_values)
            w_eff = effective_weight(weight, pinned, indices, multiplier, dtype)
            grad_x, dense, grad_bias = torch.ops.aten.convolution_backward(
                grad_out.to(dtype), x_c, w_eff, [w_eff.shape[0]] if need_bias else None,
                list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [need_x, need_values, need_bias])
            del w_eff
            if need_values:
                grad_values = _gather_delta_grad(dense, indices, multiplier, frozen_positions, values.dtype)
                del dense
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return (grad_x, None, grad_bias, grad_values, None, None, None, None, None, None, None, None)


def sparse_delta_linear(x, weight, bias, values, indices, multiplier=1.0,
                        frozen_positions=None, frozen_values=None):
    """y = x (W + m*scatter(values, indices))^T + b, with gradients for x, b and values only."""
    return SparseDeltaLinear.apply(x, weight, bias, values, indices, frozen_positions, frozen_values,
                                   float(multiplier))


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def sparse_delta_conv2d(x, weight, bias, values, indices, multiplier=1.0, stride=1, padding=0,
                        dilation=1, groups=1, frozen_positions=None, frozen_values=None):
    """conv2d with weight W + m*scatter(values, indices); integer padding only (see conv_padding)."""
    return SparseDeltaConv2d.apply(x, weight, bias, values, indices, frozen_positions, frozen_values,
                                   float(multiplier), _pair(stride), _pair(padding), _pair(dilation),
                                   int(groups))


def conv_padding(conv: torch.nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Turn a Conv2d's padding_mode / string padding into an explicitly padded input + int padding.

    `convolution_backward` takes only symmetric integer padding; this is what `Conv2d._conv_forward`
    does for non-zero modes, extended to 'same' with an odd total.
    """
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0, 0)
        pads = []  # 'same': F.pad order is last dim first
        for dim in (1, 0):
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0, 0)
    return x, _pair(conv.padding)
