"""The sparse-delta Linear / Conv2d functions against a dense masked reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from sara_network import ops
from sara_network.ops import conv_padding, sparse_delta_conv2d, sparse_delta_linear


@pytest.fixture(params=["dense", "sampled"])
def grad_path(request, monkeypatch):
    """Run a test with the delta gradient from the dense GEMM + gather, or forced onto the SDDMM."""
    path = {"sampled": request.param == "sampled", "calls": []}
    calls = path["calls"]
    if request.param == "sampled":
        monkeypatch.setattr(ops, "SAMPLED_GRAD_MAX_DENSITY", 1.0)
        monkeypatch.setattr(ops, "SAMPLED_GRAD_MAX_OPERAND", float("inf"))
        real = ops.sampled_grad
        monkeypatch.setattr(ops, "sampled_grad", lambda *args: calls.append(1) or real(*args))
    else:
        monkeypatch.setattr(ops, "SAMPLED_GRAD_MAX_DENSITY", 0.0)
    yield path  # a test sets path["sampled"] = False where the dense path must be taken anyway
    assert bool(calls) == path["sampled"]


def random_support(numel, density, seed):
    generator = torch.Generator().manual_seed(seed)
    count = max(1, int(numel * density))
    return torch.randperm(numel, generator=generator)[:count].sort().values.to(torch.int32)


def dense_reference_weight(weight, values, indices, multiplier):
    """W + m * scatter(values): plain autograd, the independent reference."""
    flat = torch.zeros(weight.numel(), dtype=torch.float32).index_put((indices.long(),), values)
    return weight.float() + multiplier * flat.view(weight.shape)


def make_leaf(*shape, seed, scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("in_features,out_features,bias,multiplier",
                         [(7, 5, True, 1.0), (16, 3, False, 0.5), (33, 40, True, -1.3)])
def test_linear_matches_dense_reference_fp32(in_features, out_features, bias, multiplier, grad_path):
    weight = torch.randn(out_features, in_features)
    indices = random_support(weight.numel(), 0.2, 0)
    values = make_leaf(indices.numel(), seed=1)
    x = make_leaf(2, 3, in_features, seed=2)
    b = make_leaf(out_features, seed=3) if bias else None

    out = sparse_delta_linear(x, weight, b, values, indices, multiplier)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, values] + ([b] if bias else []), grad)

    ref_values = values.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_b = b.detach().clone().requires_grad_(True) if bias else None
    ref = F.linear(ref_x, dense_reference_weight(weight, ref_values, indices, multiplier), ref_b)
    expected = torch.autograd.grad(ref, [ref_x, ref_values] + ([ref_b] if bias else []), grad)

    torch.testing.assert_close(out, ref)
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted)


CONV_CASES = [
    # in, out, kernel, stride, padding, dilation, groups
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 1, 1, 2),
    (6, 6, 3, 1, 2, 2, 3),
    (3, 5, 1, 1, 0, 1, 1),
    (4, 4, (3, 1), (2, 1), (1, 0), 1, 4),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_dense_reference_fp32(case, bias, grad_path):
    cin, cout, kernel, stride, padding, dilation, groups = case
    grad_path["sampled"] &= groups == 1  # grouped convs always take the dense path
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    weight = torch.randn(cout, cin // groups, *kernel)
    indices = random_support(weight.numel(), 0.3, 4)
    values = make_leaf(indices.numel(), seed=5)
    x = make_leaf(2, cin, 9, 8, seed=6)
    b = make_leaf(cout, seed=7) if bias else None

    out = sparse_delta_conv2d(x, weight, b, values, indices, 0.8, stride, padding, dilation, groups)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, values] + ([b] if bias else []), grad)

    ref_values = values.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_b = b.detach().clone().requires_grad_(True) if bias else None
    ref = F.conv2d(ref_x, dense_reference_weight(weight, ref_values, indices, 0.8), ref_b,
                   stride, padding, dilation, groups)
    expected = torch.autograd.grad(ref, [ref_x, ref_values] + ([ref_b] if bias else []), grad)
    torch.testing.assert_close(out, ref)
    for actual, wanted in zip(got, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding,mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"), (1, "circular")])
def test_conv_padding_modes_match_module(padding, mode):
    conv = torch.nn.Conv2d(3, 4, (3, 2), padding=padding, padding_mode=mode)
    x = torch.randn(1, 3, 7, 6)
    padded, int_padding = conv_padding(conv, x)
    indices = random_support(conv.weight.numel(), 0.5, 8)
    values = torch.zeros(indices.numel())
    out = sparse_delta_conv2d(padded, conv.weight, conv.bias, values, indices, 1.0, conv.stride, int_padding,
                              conv.dilation, conv.groups)
    torch.testing.assert_close(out, conv(x))


@pytest.mark.parametrize("autocast_dtype,base_dtype", list(itertools.product(
    [torch.bfloat16, torch.float16], [torch.float32, torch.float16, torch.bfloat16])))
def test_mixed_precision_within_tolerance(autocast_dtype, base_dtype):
    """Under autocast the layer computes in the autocast dtype, like a frozen layer would."""
    weight32 = torch.randn(24, 20) * 0.05
    weight = weight32.to(base_dtype)
    indices = random_support(weight.numel(), 0.25, 9)
    values = make_leaf(indices.numel(), seed=10, scale=0.01)
    x = make_leaf(4, 20, seed=11)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = sparse_delta_linear(x, weight, None, values, indices, 1.0)
    assert out.dtype == autocast_dtype
    out.float().square().sum().backward()
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    ref_values = values.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, dense_reference_weight(weight, ref_values, indices, 1.0))
    ref.square().sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(values.grad, ref_values.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=5e-2, atol=5e-2)


def test_fp8_base_weight_under_autocast():
    weight = (torch.randn(16, 12) * 0.1).to(torch.float8_e4m3fn)
    indices = random_support(weight.numel(), 0.3, 12)
    values = make_leaf(indices.numel(), seed=13, scale=0.01)
    x = make_leaf(3, 12, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_delta_linear(x, weight, None, values, indices, 1.0)
    out.float().sum().backward()
    ref_values = values.detach().clone().requires_grad_(True)
    ref = F.linear(x.detach(), dense_reference_weight(weight.float(), ref_values, indices, 1.0))
    ref.sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(values.grad, ref_values.grad, rtol=3e-2, atol=3e-2)


def test_frozen_entries_use_frozen_values_and_get_no_gradient(grad_path):
    weight = torch.randn(6, 5)
    indices = random_support(weight.numel(), 0.5, 15)
    values = make_leaf(indices.numel(), seed=16)
    frozen_positions = torch.tensor([0, 3], dtype=torch.int32)
    frozen_values = torch.tensor([0.25, -0.5])
    x = torch.randn(4, 5)
    out = sparse_delta_linear(x, weight, None, values, indices, 1.0, frozen_positions, frozen_values)
    out.sum().backward()
    pinned = values.detach().clone()
    pinned[[0, 3]] = frozen_values
    torch.testing.assert_close(out, F.linear(x, dense_reference_weight(weight, pinned, indices, 1.0)))
    assert values.grad[[0, 3]].abs().sum() == 0
    assert values.grad.abs().sum() > 0


def test_no_weight_sized_tensor_is_saved_per_layer():
    """Only the base weight itself (by reference) may be weight-sized among saved tensors."""
    layers = [torch.nn.Linear(64, 64) for _ in range(3)] + [torch.nn.Conv2d(8, 8, 3, padding=1)]
    supports = [random_support(layer.weight.numel(), 0.1, 20 + i) for i, layer in enumerate(layers)]
    deltas = [torch.zeros(s.numel(), requires_grad=True) for s in supports]
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = torch.randn(2, 64, requires_grad=True)
        for layer, support, delta in zip(layers[:3], supports, deltas):
            h = torch.relu(sparse_delta_linear(h, layer.weight, layer.bias, delta, support))
        image = h.view(2, 8, 8, 1).expand(2, 8, 8, 4).contiguous()
        out = sparse_delta_conv2d(image, layers[3].weight, layers[3].bias, deltas[3], supports[3], padding=1)
    weight_ptrs = {layer.weight.data_ptr() for layer in layers}
    for tensor in saved:
        for layer in layers:
            if tensor.numel() == layer.weight.numel() and tensor.dim() == layer.weight.dim():
                assert tensor.data_ptr() in weight_ptrs, "a weight-sized copy was kept for backward"
    out.sum().backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weight_restored_bit_for_bit(dtype):
    """In the weight's own dtype the selected entries are written in place and put back."""
    layer = torch.nn.Conv2d(6, 5, 3, padding=1).to(dtype).requires_grad_(False)
    linear = torch.nn.Linear(9, 7).to(dtype).requires_grad_(False)
    before = [layer.weight.clone(), linear.weight.clone()]
    versions = [layer.weight._version, linear.weight._version]
    conv_support = random_support(layer.weight.numel(), 0.2, 30)
    linear_support = random_support(linear.weight.numel(), 0.2, 31)
    conv_delta = make_leaf(conv_support.numel(), seed=32, scale=0.1)
    linear_delta = make_leaf(linear_support.numel(), seed=33, scale=0.1)
    x = make_leaf(2, 6, 4, 4, seed=34, dtype=dtype)
    hidden = sparse_delta_conv2d(x, layer.weight, layer.bias, conv_delta, conv_support, padding=1)
    out = sparse_delta_linear(hidden.flatten(1)[:, :9], linear.weight, linear.bias, linear_delta, linear_support)
    assert torch.equal(layer.weight, before[0]) and torch.equal(linear.weight, before[1])
    out.float().square().sum().backward()
    assert torch.equal(layer.weight, before[0]) and torch.equal(linear.weight, before[1])
    assert [layer.weight._version, linear.weight._version] == versions
    assert conv_delta.grad.abs().sum() > 0 and linear_delta.grad.abs().sum() > 0

    ref_delta = linear_delta.detach().clone().requires_grad_(True)
    ref_hidden = hidden.detach().flatten(1)[:, :9].float()
    ref = F.linear(ref_hidden, dense_reference_weight(linear.weight, ref_delta, linear_support, 1.0).to(dtype).float(),
                   linear.bias.float())
    tolerance = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float(), ref, **tolerance)


def test_base_weight_restored_when_the_matmul_fails():
    weight = torch.randn(5, 4)
    before = weight.clone()
    support = random_support(weight.numel(), 0.5, 40)
    delta = make_leaf(support.numel(), seed=41)
    with pytest.raises(RuntimeError):
        sparse_delta_linear(torch.randn(3, 6), weight, None, delta, support)  # wrong in_features
    assert torch.equal(weight, before)


def test_sampled_grad_is_chosen_only_where_it_pays():
    """The default rule: CPU fp32, low density, sorted indices, operand no larger than the gradient."""
    weight_numel = 1280 * 1280
    low = random_support(weight_numel, 0.005, 50)
    assert ops.use_sampled_grad(low, weight_numel, torch.float32, 0)
    assert not ops.use_sampled_grad(random_support(weight_numel, 0.1, 51), weight_numel, torch.float32, 0)
    assert not ops.use_sampled_grad(low, weight_numel, torch.bfloat16, 0)
    assert not ops.use_sampled_grad(low.flip(0), weight_numel, torch.float32, 0)
    assert not ops.use_sampled_grad(low, weight_numel, torch.float32, 2 * weight_numel)


def test_sampled_grad_matches_gemm_and_ignores_stale_memory():
    """The SDDMM equals (gᵀx)[indices] even when freed memory held NaNs (beta=0 reads its input)."""
    grad_rows, input_rows = torch.randn(6, 40), torch.randn(6, 30)
    indices = random_support(40 * 30, 0.3, 60)
    expected = (grad_rows.t() @ input_rows).view(-1)[indices.long()]
    for _ in range(5):
        stale = torch.full((indices.numel(),), float("nan"))
        del stale
        torch.testing.assert_close(ops.sampled_grad(grad_rows, input_rows, indices), expected)


def test_conv2d_channels_last_input(grad_path):
    """channels_last activations give a non-contiguous dense weight gradient."""
    weight = torch.randn(6, 4, 3, 3)
    indices = random_support(weight.numel(), 0.3, 70)
    values = make_leaf(indices.numel(), seed=71)
    x = make_leaf(2, 4, 5, 5, seed=72).detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = sparse_delta_conv2d(x, weight, None, values, indices, 1.0, 1, 1)
    out.square().sum().backward()
    ref_values = values.detach().clone().requires_grad_(True)
    F.conv2d(x.detach(), dense_reference_weight(weight, ref_values, indices, 1.0), None, 1, 1).square().sum().backward()
    torch.testing.assert_close(values.grad, ref_values.grad, rtol=1e-4, atol=1e-4)


def patched_reference_weight(weight, values, indices, multiplier, dtype):
    """W in `dtype` with only the selected entries replaced by fp32(W + m*delta) rounded once."""
    reference = weight.detach().to(dtype).clone()
    flat = reference.view(-1)
    selected = flat[indices.long()].float() + multiplier * values.detach().float()
    flat[indices.long()] = selected.to(dtype)
    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_channels_last"])
@pytest.mark.parametrize("cached", [False, True])
def test_patch_with_kept_base_values_is_bit_exact(dtype, kind, cached):
    """Forward, input gradient and delta gradient equal, bit for bit, the same ops on a patched
    copy of the weight, with or without the caller's base values; the weight is restored exactly."""
    generator = torch.Generator().manual_seed(60)
    if kind == "linear":
        weight = torch.randn(12, 10, generator=generator).to(dtype)
        x = torch.randn(3, 4, 10, generator=generator).to(dtype)
    else:
        weight = torch.randn(6, 4, 3, 3, generator=generator).to(dtype)
        x = torch.randn(2, 4, 5, 5, generator=generator).to(dtype)
        if kind == "conv_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    before = weight.clone()
    support = random_support(weight.numel(), 0.3, 61)
    delta = make_leaf(support.numel(), seed=62, scale=0.05)
    base = weight.view(-1)[support.long()].clone() if cached else None
    if kind == "linear":
        out = sparse_delta_linear(x, weight, None, delta, support, 0.7, base_at_indices=base)
    else:
        out = sparse_delta_conv2d(x, weight, None, delta, support, 0.7, padding=1, base_at_indices=base)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    grad_x, grad_delta = torch.autograd.grad(out, [x, delta], grad)
    assert torch.equal(weight, before)

    ref_weight = patched_reference_weight(weight, delta, support, 0.7, dtype).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, ref_weight) if kind == "linear" else F.conv2d(ref_x, ref_weight, padding=1)
    ref_grad_x, ref_grad_w = torch.autograd.grad(ref, [ref_x, ref_weight], grad)
    assert torch.equal(out, ref)
    assert torch.equal(grad_x, ref_grad_x)
    expected = (0.7 * ref_grad_w.reshape(-1)[support.long()].float()) if dtype != torch.float32 else \
        ref_grad_w.reshape(-1)[support.long()] * 0.7
    torch.testing.assert_close(grad_delta, expected, rtol=0, atol=0)
