"""The base values SaRA keeps at the selected entries follow every change a host makes to the weight."""
import pytest
import torch
import torch.nn.functional as F

from sara_network.network import SaraNetwork, collect_targets
from sara_network.options import SaraConfig


def patched_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(), torch.nn.Linear(24, 8)).requires_grad_(False)
    network = SaraNetwork(SaraConfig(density=0.3, progressive_iter=None))
    network.select(collect_targets(model, [], [], "full"))
    network.patch()
    with torch.no_grad():
        for index, param in enumerate(network.trainable_parameters()):
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(index)) * 0.1)
    return model, network


def dense_reference(model, network, x):
    """The same model computed with W + scatter(delta) built from the layers' current weights."""
    modules = {m.path: m for m in network.sara_modules()}
    h = x
    for position, layer in enumerate(model):
        if isinstance(layer, torch.nn.Linear):
            module = modules[str(position)]
            weight = layer.weight.detach().float().clone().view(-1)
            weight[module.indices.long()] += module.delta.detach()
            h = F.linear(h, weight.view(layer.weight.shape).to(x.dtype), layer.bias)
        else:
            h = layer(h)
    return h


@pytest.mark.parametrize("change", ["copy_", "load_state_dict", "replace_parameter", "cast"])
def test_forward_follows_a_rewritten_base_weight(change):
    model, network = patched_model()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    model(x)  # the kept values are in use
    new_weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(10))
    if change == "copy_":
        with torch.no_grad():
            model[0].weight.copy_(new_weight)
    elif change == "load_state_dict":
        state = model.state_dict()
        state["0.weight"] = new_weight
        model.load_state_dict(state)
    elif change == "replace_parameter":
        model[0].weight = torch.nn.Parameter(new_weight, requires_grad=False)
    else:
        model.to(torch.float64)
        x = x.double()
    saved = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    out = model(x)
    torch.testing.assert_close(out, dense_reference(model, network, x))
    assert all(torch.equal(layer.weight, before) for layer, before in zip((model[0], model[2]), saved))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_patch_again_uses_the_merged_weights(dtype):
    """merge_into_base writes through .data (no version bump): the kept values must still be renewed."""
    model, network = patched_model()
    model.to(dtype)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
    expected = model(x)
    network.merge_into_base()
    torch.testing.assert_close(model(x), expected, rtol=0.02, atol=0.02)
    merged = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    network.patch()
    out = model(x)
    assert all(torch.equal(layer.weight, before) for layer, before in zip((model[0], model[2]), merged))
    assert torch.equal(out, dense_reference(model, network, x))
