"""The nuclear-norm term: the matmul-only subgradient against an SVD on SD1.5 layer shapes, the
'all layers' scheme in a real training step (plain and accelerate accumulation), and its options."""
from __future__ import annotations

import math

import pytest
import torch

import models
from kohya_driver import freeze_and_cast, make_network
from sara_network.options import SaraOptionError, parse_network_args
from sara_network.regularizers import masked_matrix, nuclear_norm_subgradient, polar_cost, refresh_slots


def sd15_masked_matrix(shape, density, target, seed):
    """A layer initialised as nn.Linear is (uniform in +-1/sqrt(in)), its `density` smallest |w|
    selected, random deltas of 1e-3; the matrix the term sees for `target` ('weights' or 'update')."""
    generator = torch.Generator().manual_seed(seed)
    weight = ((torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(shape[1])).reshape(-1)
    threshold = weight.abs().kthvalue(int(density * weight.numel())).values
    indices = (weight.abs() < threshold).nonzero().reshape(-1)
    entries = torch.randn(indices.numel(), generator=generator) * 1e-3
    if target == "weights":
        entries = entries + weight[indices]
    return indices, masked_matrix(shape, indices, entries)


def reference_subgradient(matrix):
    """U V^T over singular values above 1e-6 s_max, and the nuclear norm (torch.linalg.svd; fp32
    differs from fp64 by ~1e-6 here, far below the bounds tested)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s > 1e-6 * s[0]
    return u[:, keep] @ vh[keep], float(s.double().sum())


# Measured on these cases: relative error of the selected entries at most 7.7e-3 (1280x1280 at 6%,
# whose smallest singular values are ~1e-6 s_max), below 2e-4 elsewhere; nuclear norm within 3e-7.
@pytest.mark.parametrize("shape,density,target", [
    ((320, 320), 0.06, "weights"),      # attention q/k/v/out at 320 channels
    ((320, 768), 0.06, "update"),       # cross-attention k/v (stored out x in = 320 x 768)
    ((640, 640), 0.006, "weights"),     # attention at 640 channels, a 5M-like density
    ((1280, 1280), 0.06, "weights"),    # attention at 1280 channels: the slowest to converge
    ((1280, 5120), 0.006, "update"),    # feed-forward out at 1280 channels
    ((2560, 320), 0.06, "weights"),     # feed-forward in (GEGLU) at 320 channels: a tall matrix
])
def test_newton_schulz_subgradient_matches_svd_on_sd15_shapes(shape, density, target):
    indices, matrix = sd15_masked_matrix(shape, density, target, seed=sum(shape))
    expected, nuclear = reference_subgradient(matrix)
    approx, norm = nuclear_norm_subgradient(matrix, "newton_schulz")
    selected, approx_selected = expected.reshape(-1)[indices], approx.reshape(-1)[indices]
    assert float((approx_selected - selected).norm() / selected.norm()) < 2e-2
    assert abs(norm - nuclear) / nuclear < 1e-5
    assert abs(float((approx * matrix).sum()) - nuclear) / nuclear < 1e-5  # <G, A> = ||A||_*
    if matrix.numel() > 1280 * 1280:
        return  # the 'svd' method is the reference's own computation: checked on the smaller shapes
    exact, exact_norm = nuclear_norm_subgradient(matrix, "svd")
    torch.testing.assert_close(exact.reshape(-1)[indices], selected, rtol=0, atol=1e-5)
    assert abs(exact_norm - nuclear) / nuclear < 1e-6


def test_newton_schulz_leaves_tiny_singular_values_partly_counted():
    """The stated limit: a singular value far below 3^-10 ||A||_F is damped, not counted as 1."""
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    spectrum = torch.ones(64)
    spectrum[-1] = 1e-8
    approx, _ = nuclear_norm_subgradient(u @ torch.diag(spectrum) @ v.T, "newton_schulz")
    gains = torch.diagonal(u.T @ approx @ v)  # the polynomial applied to each singular value
    torch.testing.assert_close(gains[:-1], torch.ones(63), rtol=0, atol=1e-5)
    assert float(gains[-1]) < 1e-2
    zero, norm = nuclear_norm_subgradient(torch.zeros(5, 7), "newton_schulz")
    assert norm == 0.0 and not zero.any()


def eligible_subgradients(network):
    """{module: lambda-free subgradient at the trainable entries}, by fp64 SVD of the masked weights."""
    result = {}
    for module, _ in network.rank_eligible():
        entries = module.pinned_delta().detach() + module.base_values.float()
        rows = module.weight_shape[0]  # a conv as the (out, in*kh*kw) matrix its LoRA export factorises
        matrix = masked_matrix((rows, module.base.weight.numel() // rows), module.indices.long(), entries)
        expected, _ = reference_subgradient(matrix)
        result[module.sara_name] = expected.reshape(-1)[module.indices.long()]
    return result


def one_step_rank_contribution(m, network, optimizer, micro_batches, accelerator=None):
    """Run one optimizer step of SGD(lr=1) over `micro_batches` and return, per module, the part of
    the delta change that is not the data gradient: the rank term as the step applied it."""
    grads, before = {}, {n: mod.delta.detach().clone() for n, mod in network.named_children()}
    for micro in range(micro_batches):
        latents, timesteps, ids, target = models.batch(m.kind, micro, 1)
        context = accelerator.accumulate(m.unet) if accelerator else torch.enable_grad()
        with context:
            loss = torch.nn.functional.mse_loss(models.predict(m, latents, timesteps, ids).float(), target)
            (accelerator.backward(loss) if accelerator else (loss / micro_batches).backward())
            if micro == micro_batches - 1:
                grads = {n: mod.delta.grad.detach().clone() for n, mod in network.named_children()}
            if accelerator or micro == micro_batches - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {n: before[n] - mod.delta.detach() - grads[n] for n, mod in network.named_children()}


@pytest.mark.parametrize("accumulation,method,convs", [("none", "svd", False), ("plain", "newton_schulz", False),
                                                      ("accelerate", "svd", False), ("none", "svd", True)])
def test_rank_layers_all_applies_the_term_once_to_every_eligible_layer(accumulation, method, convs):
    lambda_rank = 0.25
    m = models.tiny_sd1()
    network = make_network(m, {"density": "0.2", "progressive_iter": "off", "lambda_rank": str(lambda_rank),
                               "rank_min_dim": "16", "rank_layers": "all", "rank_method": method,
                               "rank_convs": str(convs).lower()}, train_text_encoder=True)
    freeze_and_cast(m, network)
    groups = network.prepare_optimizer_params(None, 1.0, 1.0)[0]
    optimizer = torch.optim.SGD([{**group, "lr": 1.0} for group in groups], lr=1.0)
    accelerator = None
    if accumulation == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
        optimizer = accelerator.prepare(optimizer)
    # the subgradient is taken at the matrix before the step
    modules = [mod for mod in network.sara_modules()]
    for mod in modules:
        mod.delta.grad = torch.zeros_like(mod.delta)  # rank_eligible() asks for a trained layer
    expected = eligible_subgradients(network)
    for mod in modules:
        mod.delta.grad = None
    assert len(expected) >= 8 and len(expected) < len(modules)  # both kinds of layer are present
    assert any(mod.weight_shape[0] > mod.weight_shape[1] for mod in modules if mod.sara_name in expected)  # tall too
    # convs take part (as (out, in*kh*kw) matrices) exactly when rank_convs is on
    assert any(len(mod.weight_shape) == 4 for mod in modules if mod.sara_name in expected) == convs
    applied = one_step_rank_contribution(m, network, optimizer, 1 if accumulation == "none" else 2, accelerator)
    assert int(network.optimizer_steps) == 1
    for name, change in applied.items():
        if name in expected:
            torch.testing.assert_close(change, lambda_rank * expected[name].float(), rtol=0, atol=2e-5)
        else:
            torch.testing.assert_close(change, torch.zeros_like(change), rtol=0, atol=1e-6)


def test_rank_refresh_recomputes_each_layer_once_per_period_and_reuses_its_last_value_between():
    lambda_rank, period = 0.25, 3
    m = models.tiny_sd1()
    network = make_network(m, {"density": "0.2", "progressive_iter": "off", "lambda_rank": str(lambda_rank),
                               "rank_min_dim": "16", "rank_layers": "all", "rank_refresh": str(period)},
                           train_text_encoder=True)
    freeze_and_cast(m, network)
    groups = network.prepare_optimizer_params(None, 1.0, 1.0)[0]
    optimizer = torch.optim.SGD([{**group, "lr": 1.0} for group in groups], lr=1.0)
    modules = network.sara_modules()

    def step():
        """(the subgradients at the matrices before the step, the rank part of the step's change)"""
        for mod in modules:
            mod.delta.grad = torch.zeros_like(mod.delta)
        fresh = eligible_subgradients(network)
        for mod in modules:
            mod.delta.grad = None
        return fresh, one_step_rank_contribution(m, network, optimizer, 1)

    def recomputed(fresh, applied, last):
        """The layers whose term this step recomputed; every other one must be its last value exactly."""
        names = set()
        for name, expected in fresh.items():
            assert (expected - last[name]).abs().max() > 1e-2  # the two cases are told apart
            if torch.allclose(applied[name], lambda_rank * expected.float(), rtol=0, atol=2e-5):
                names.add(name)
            else:
                torch.testing.assert_close(applied[name], lambda_rank * last[name].float(), rtol=0, atol=2e-5)
        return names

    last, applied = step()  # nothing cached yet: every layer is computed
    assert len(last) >= 8
    for name, expected in last.items():
        torch.testing.assert_close(applied[name], lambda_rank * expected.float(), rtol=0, atol=2e-5)
    seen = []
    for _ in range(period):
        fresh, applied = step()
        names = recomputed(fresh, applied, last)
        last.update({name: fresh[name] for name in names})
        seen.append(names)
    assert all(seen) and sorted(n for names in seen for n in names) == sorted(last)  # each once per period
    for mod in modules:
        mod.indices.add_(0)  # an in-place change of the selection invalidates every cached value
    fresh, applied = step()
    assert recomputed(fresh, applied, last) == set(fresh)


def test_refresh_slots_balance_the_work_over_the_period():
    shapes = [(1280, 5120), (1280, 1280), (1280, 1280), (320, 320), (640, 640), (320, 768), (10240, 1280)]
    costs = [polar_cost(shape) for shape in shapes]
    for period in (1, 2, 3, 7, 20):
        slots = refresh_slots(costs, period)
        assert slots == refresh_slots(costs, period) and all(0 <= s < period for s in slots)
        loads = [sum(c for c, s in zip(costs, slots) if s == slot) for slot in range(period)]
        assert max(loads) <= sum(costs) / period + max(costs)  # the largest-first bound
        if period >= len(costs):
            assert len(set(slots)) == len(costs)  # one layer per step at most
    assert refresh_slots([5, 4, 3, 3, 2, 1], 2) == [0, 1, 1, 0, 1, 0]  # loads 9 and 9


def test_rank_option_parsing():
    assert parse_network_args({"rank_layers": "all", "rank_refresh": "50"}).rank_refresh == 50
    with pytest.raises(SaraOptionError, match="rank_refresh=4 needs rank_layers=all"):
        parse_network_args({"rank_refresh": "4"})
    assert parse_network_args({"rank_layers": "all"}).rank_layers == "all"
    assert parse_network_args({"rank_layers": " ALL "}).rank_layers == "all"
    assert parse_network_args({"rank_layers": "3"}).rank_layers == 3
    assert parse_network_args({}).rank_layers == 1 and parse_network_args({}).rank_method == "svd"
    assert parse_network_args({"rank_method": "Newton_Schulz"}).rank_method == "newton_schulz"
    for key, value in [("rank_layers", "0"), ("rank_layers", "-2"), ("rank_layers", "some"), ("rank_layers", "1.5"),
                       ("rank_method", "qr"), ("rank_method", ""), ("rank_refresh", "0"), ("rank_refresh", "2.5")]:
        with pytest.raises(SaraOptionError, match=key):
            parse_network_args({key: value})
