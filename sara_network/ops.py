"""Sparse-delta Linear and Conv2d: the paper's "unstructured backprop" as autograd functions.

The effective weight W + m * scatter(delta) exists only for the duration of one matmul/conv, in
forward and again in backward; only what a frozen layer keeps is saved (the input, the base weight
by reference) plus the 1-D deltas and their int32 indices. When the layer computes in the weight's
own dtype, the selected entries are written into the base weight's storage and restored bit for bit
right after (no dense copy: O(selected) work instead of O(weight)); otherwise a cast copy is made,
as a frozen layer under autocast would. The caller may pass the base values at the selected entries
(SaraModule keeps them): patch and restore are then two scattered writes with no gather.

The delta gradient is (gᵀx) at the selected positions. By default the dense weight gradient is
formed for one layer at a time, inside backward, and gathered down to the selected entries before
the function returns. On the CPU in fp32 at low density it is computed only at the selected
positions (`torch.sparse.sampled_addmm`, an SDDMM: about k·L work instead of out·in·L), which is
several times faster there; `torch.sparse.sampled_addmm` takes only fp32/fp64 on the CPU and the
GPU case is unmeasured, so other devices and dtypes keep the dense GEMM (see `use_sampled_grad`).

Mixed precision: under autocast the layer computes in the autocast dtype, like `F.linear` would;
the selected entries are formed as fp32 (base + delta) and rounded once. The dense weight gradient
is computed in that dtype (as for any half-precision layer), gathered and returned in fp32.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import warnings

import torch
import torch.nn.functional as F

SAMPLED_GRAD_MAX_DENSITY = 0.05  # CPU crossover measured at 5-8% (benchmarks/README.md): dense GEMM wins above
SAMPLED_GRAD_MAX_OPERAND = 1.0  # the SDDMM's extra operand (unfolded conv input) / the dense weight grad
# Where the SDDMM is used, by device type: only where it was measured to pay. CUDA is unmeasured
# (benchmarks/memory_speed.py --device cuda --sampled_grad on measures it) and keeps the dense GEMM.
SAMPLED_GRAD_DTYPES: dict[str, tuple[torch.dtype, ...]] = {"cpu": (torch.float32,)}


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
    """Deltas with the entries frozen by the progressive step pinned to their frozen values.

    frozen_values=None: the caller guarantees the deltas already hold them (SaraModule re-pins after
    every optimizer step), so no O(selected) copy is made; the frozen positions still get no gradient.
    """
    if frozen_positions is None or frozen_positions.numel() == 0 or frozen_values is None:
        return values
    return values.index_put((frozen_positions,), frozen_values.to(values.dtype))


def effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     multiplier: float, dtype: torch.dtype,
                     base_at_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A fresh copy of W in `dtype` with the selected entries set to fp32(W + m*delta), rounded once.

    `base_at_indices`, when given, are W's own values at `indices` (in W's dtype): it saves the gather.
    """
    rebuilt = weight.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    positions = indices.long()
    original = weight.detach().reshape(-1).index_select(0, positions) if base_at_indices is None else base_at_indices
    rebuilt.view(-1).index_copy_(0, positions, _patched_entries(original, values, multiplier, dtype))
    return rebuilt


def _patched_entries(original: torch.Tensor, values: torch.Tensor, multiplier: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """fp32(base + m*delta) rounded once to `dtype`."""
    delta = values.detach().to(torch.float32)
    return (original.to(torch.float32) + (delta * multiplier if multiplier != 1.0 else delta)).to(dtype)


def _patchable_in_place(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    return (weight.dtype == dtype and weight.is_contiguous()
            and not (weight.is_inference() and not torch.is_inference_mode_enabled()))


@contextmanager
def weight_with_delta(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                      multiplier: float, dtype: torch.dtype,
                      base_at_indices: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """W + m*scatter(values) in `dtype` for the body of the `with` block.

    Same entries as `effective_weight`; in the weight's own dtype they are written into the base
    weight in place (through `.data`, so autograd's version counters are untouched) and the original
    entries are put back on exit, also on an exception. `base_at_indices` (W's values at `indices`,
    in W's dtype, kept by the caller) spares the gather: two scattered passes per call instead of
    three. Callers must not let the yielded tensor escape.
    """
    if not _patchable_in_place(weight, dtype):
        yield effective_weight(weight, values, indices, multiplier, dtype, base_at_indices)
        return
    flat = weight.data.view(-1)
    positions = indices.long()
    original = flat.index_select(0, positions) if base_at_indices is None else base_at_indices
    flat.index_copy_(0, positions, _patched_entries(original, values, multiplier, dtype))
    try:
        yield weight.data
    finally:
        flat.index_copy_(0, positions, original)


def use_sampled_grad(indices: torch.Tensor, weight_numel: int, dtype: torch.dtype,
                     operand_numel: int) -> bool:
    """Whether to compute the delta gradient by SDDMM instead of a dense GEMM + gather.

    Only for the devices and dtypes in SAMPLED_GRAD_DTYPES (today the CPU in fp32), below
    SAMPLED_GRAD_MAX_DENSITY, when the indices are sorted (the SDDMM returns values in row-major
    order) and when its operand (for a conv, the unfolded input) is no larger than the dense
    gradient it replaces, so peak memory never grows.
    """
    count = indices.numel()
    return (dtype in SAMPLED_GRAD_DTYPES.get(indices.device.type, ()) and 0 < count
            and count <= SAMPLED_GRAD_MAX_DENSITY * weight_numel
            and operand_numel <= SAMPLED_GRAD_MAX_OPERAND * weight_numel
            and bool((indices[1:] > indices[:-1]).all()))


def sampled_grad(grad_rows: torch.Tensor, input_rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(grad_rowsᵀ @ input_rows).flatten()[indices] without forming the product.

    grad_rows is (L, out), input_rows is (L, in); indices are sorted flat positions in (out, in).
    """
    n_out, n_in = grad_rows.shape[1], input_rows.shape[1]
    flat = indices.long()
    rows = torch.div(flat, n_in, rounding_mode="floor")
    crow = torch.zeros(n_out + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(rows, minlength=n_out).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta state"
        # zeros, not empty: beta=0 still reads the pattern's values on the CPU (0 * NaN = NaN)
        pattern = torch.sparse_csr_tensor(crow, flat - rows * n_in, torch.zeros(flat.numel(), dtype=grad_rows.dtype, device=flat.device),
                                          (n_out, n_in), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, grad_rows.t(), input_rows, beta=0.0).values()


def _finish_delta_grad(grad: torch.Tensor, multiplier: float, frozen_positions: Optional[torch.Tensor],
                       dtype: torch.dtype) -> torch.Tensor:
    """Scale by the multiplier, zero the frozen entries, return in the deltas' dtype."""
    grad = grad.to(dtype)
    if multiplier != 1.0:
        grad.mul_(multiplier)
    if frozen_positions is not None and frozen_positions.numel():
        grad.index_put_((frozen_positions,), torch.zeros((), dtype=grad.dtype))
    return grad


class SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, frozen_positions, frozen_values, base_at_indices, multiplier):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            pinned = effective_values(values, frozen_positions, frozen_values)
            with weight_with_delta(weight, pinned, indices, multiplier, dtype, base_at_indices) as w_eff:
                out = F.linear(x_c, w_eff, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, weight, values, indices, frozen_positions, frozen_values, base_at_indices)
        ctx.meta = (dtype, multiplier, x.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, values, indices, frozen_positions, frozen_values, base_at_indices = ctx.saved_tensors
        dtype, multiplier, x_dtype, bias_dtype = ctx.meta
        need_x, _, need_bias, need_values = ctx.needs_input_grad[:4]
        grad_x = grad_bias = grad_values = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(dtype)
            if need_x:
                pinned = effective_values(values, frozen_positions, frozen_values)
                with weight_with_delta(weight, pinned, indices, multiplier, dtype, base_at_indices) as w_eff:
                    grad_x = g.matmul(w_eff).to(x_dtype)
            g2 = g.reshape(-1, g.shape[-1])
            if need_values:
                x2 = x_c.reshape(-1, x_c.shape[-1])
                if use_sampled_grad(indices, weight.numel(), dtype, 0):
                    grad = sampled_grad(g2, x2, indices)
                else:
                    grad = g2.t().matmul(x2).view(-1).index_select(0, indices.long())  # one layer's dense gradient, freed here
                grad_values = _finish_delta_grad(grad, multiplier, frozen_positions, values.dtype)
            if need_bias:
                grad_bias = g2.sum(0).to(bias_dtype)
        return grad_x, None, grad_bias, grad_values, None, None, None, None, None


class SparseDeltaConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, frozen_positions, frozen_values, base_at_indices, multiplier,
                stride, padding, dilation, groups):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            pinned = effective_values(values, frozen_positions, frozen_values)
            with weight_with_delta(weight, pinned, indices, multiplier, dtype, base_at_indices) as w_eff:
                out = F.conv2d(x_c, w_eff, None if bias is None else bias.to(dtype),
                               stride, padding, dilation, groups)
        ctx.save_for_backward(x_c, weight, values, indices, frozen_positions, frozen_values, base_at_indices)
        ctx.meta = (dtype, multiplier, x.dtype, None if bias is None else bias.dtype,
                    stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, values, indices, frozen_positions, frozen_values, base_at_indices = ctx.saved_tensors
        dtype, multiplier, x_dtype, bias_dtype, stride, padding, dilation, groups = ctx.meta
        need_x, _, need_bias, need_values = ctx.needs_input_grad[:4]
        grad_values = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(dtype)
            unfolded_numel = x_c.shape[0] * x_c.shape[1] * weight[0, 0].numel() * g[0, 0].numel()
            sampled = need_values and groups == 1 and use_sampled_grad(indices, weight.numel(), dtype, unfolded_numel)
            pinned = effective_values(values, frozen_positions, frozen_values)
            with weight_with_delta(weight, pinned, indices, multiplier, dtype, base_at_indices) as w_eff:
                grad_x, dense, grad_bias = torch.ops.aten.convolution_backward(
                    g, x_c, w_eff, [w_eff.shape[0]] if need_bias else None,
                    list(stride), list(padding), list(dilation), False, [0, 0], groups,
                    [need_x, need_values and not sampled, need_bias])
            if sampled:  # unfold's columns are ordered (in, kh, kw): the weight's own flat order per row
                columns = F.unfold(x_c, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
                grad = sampled_grad(g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]),
                                    columns.transpose(1, 2).reshape(-1, columns.shape[1]), indices)
                del columns
            elif need_values:
                grad = dense.reshape(-1).index_select(0, indices.long())  # one layer's dense gradient, freed here
                del dense
            if need_values:
                grad_values = _finish_delta_grad(grad, multiplier, frozen_positions, values.dtype)
        if grad_x is not None:
            grad_x = grad_x.to(x_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_dtype)
        return (grad_x, None, grad_bias, grad_values, None, None, None, None, None, None, None, None, None)


def sparse_delta_linear(x, weight, bias, values, indices, multiplier=1.0,
                        frozen_positions=None, frozen_values=None, base_at_indices=None):
    """y = x (W + m*scatter(values, indices))^T + b, with gradients for x, b and values only.

    `base_at_indices`: W's values at `indices` in W's dtype, if the caller keeps them (saves a gather)."""
    return SparseDeltaLinear.apply(x, weight, bias, values, indices, frozen_positions, frozen_values,
                                   base_at_indices, float(multiplier))


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def sparse_delta_conv2d(x, weight, bias, values, indices, multiplier=1.0, stride=1, padding=0,
                        dilation=1, groups=1, frozen_positions=None, frozen_values=None, base_at_indices=None):
    """conv2d with weight W + m*scatter(values, indices); integer padding only (see conv_padding)."""
    return SparseDeltaConv2d.apply(x, weight, bias, values, indices, frozen_positions, frozen_values,
                                   base_at_indices, float(multiplier), _pair(stride), _pair(padding), _pair(dilation),
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
