"""Selection: strict fp32 threshold, exact budgets without torch.quantile, options parsing."""
import pytest
import torch

from sara_network import selection
from sara_network.options import SaraOptionError, auto_lr, parse_network_args
from sara_network.presets import PresetError, load_preset


def test_select_below_is_strict_and_fp32():
    weight = torch.tensor([[0.001, -0.002, 0.0019999], [0.5, -0.0005, 0.002]])
    indices = selection.select_below(weight, 2e-3)
    assert indices.dtype == torch.int32
    assert indices.tolist() == [0, 2, 4]


def test_select_below_uses_fp32_even_for_half_weights():
    """fp16 weights are compared after upcasting, against the fp32 threshold: same as fp32 weights
    rounded to fp16 and compared in fp32 (no tie bucket from comparing in fp16)."""
    weights32 = torch.randn(4096) * 0.01
    weights16 = weights32.half()
    expected = (weights16.float().abs() < torch.tensor(2e-3, dtype=torch.float32)).nonzero().reshape(-1)
    assert torch.equal(selection.select_below(weights16, 2e-3).long(), expected)


@pytest.mark.parametrize("count", [1, 7, 1000, 4999])
def test_threshold_for_count_is_exact_across_tensors(count):
    torch.manual_seed(0)
    weights = [torch.randn(50, 40), torch.randn(3000) * 0.1, torch.randn(10, 10, 3, 3) * 0.01]
    threshold = selection.threshold_for_count(weights, count)
    assert selection.count_below(weights, threshold) == count
    # The threshold is the (count+1)-th smallest |w|: reference by a full sort.
    everything = torch.cat([w.reshape(-1).abs() for w in weights]).sort().values
    assert threshold == everything[count].item()


def test_threshold_for_count_with_ties_never_overshoots():
    weights = [torch.tensor([0.1, 0.1, 0.1, 0.2, 0.3])]
    threshold = selection.threshold_for_count(weights, 2)
    assert selection.count_below(weights, threshold) == 0  # the tie at 0.1 cannot be split
    assert selection.count_below(weights, selection.threshold_for_count(weights, 3)) == 3


def test_threshold_for_count_everything():
    weights = [torch.randn(10)]
    assert selection.count_below(weights, selection.threshold_for_count(weights, 10)) == 10


def test_large_tensor_budget_without_quantile():
    """torch.quantile refuses > 16M elements; the radix select does not."""
    big = torch.randn(17_000_000)
    threshold = selection.threshold_for_count([big], 1_000_000)
    assert selection.count_below([big], threshold) == 1_000_000


def test_parse_network_args_strict():
    config = parse_network_args({"threshold": "1e-3", "budget": "50M", "include_bias": "true",
                                 "progressive_iter": "0.5", "lr": "auto"})
    assert config.budget == 50_000_000 and config.include_bias and config.lr == "auto"
    assert parse_network_args({"progressive_iter": "off"}).progressive_iter is None
    assert parse_network_args({"budget": "2.5k"}).budget == 2500
    with pytest.raises(SaraOptionError, match="unknown SaRA network arg 'treshold'.*valid keys are: threshold"):
        parse_network_args({"treshold": "1e-3"})
    with pytest.raises(SaraOptionError, match="bad value for network arg threshold='abc'"):
        parse_network_args({"threshold": "abc"})
    with pytest.raises(SaraOptionError, match="include_bias"):
        parse_network_args({"include_bias": "maybe"})
    with pytest.raises(SaraOptionError, match="density"):
        parse_network_args({"density": "1.5"})
    with pytest.raises(SaraOptionError, match="either budget= or density="):
        parse_network_args({"budget": "1M", "density": "0.1"})
    with pytest.raises(SaraOptionError, match="progressive_iter"):
        parse_network_args({"progressive_iter": "10.5"})


def test_auto_lr_matches_paper_values():
    assert auto_lr(2e-3) == pytest.approx(4.97e-4, rel=1e-3)
    assert auto_lr(8e-4) == pytest.approx(7.56e-4, rel=1e-3)


def test_presets(tmp_path):
    full = load_preset("full")
    assert full.unet.matches("down_blocks.0.resnets.0.conv1")
    assert not full.text_encoder.matches("text_projection")
    attn = load_preset("attn-only")
    assert attn.unet.matches("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    assert not attn.unet.matches("down_blocks.0.resnets.0.conv1")
    transformer = load_preset("unet-transformer-only")
    assert transformer.unet.matches("down_blocks.0.attentions.0.proj_in")
    assert not transformer.text_encoder.matches("text_model.encoder.layers.0.mlp.fc1")
    path = tmp_path / "mine.toml"
    path.write_text('[unet]\ninclude = ["*attn2*"]\nexclude = ["*to_out*"]\n')
    mine = load_preset(str(path))
    assert mine.unet.matches("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert not mine.unet.matches("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert mine.text_encoder.matches("text_model.encoder.layers.0.mlp.fc1")  # missing section = full
    with pytest.raises(PresetError, match="unknown preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('[unet]\ninclud = ["*"]\n')
    with pytest.raises(PresetError, match="unknown keys"):
        load_preset(str(bad))


def test_budget_on_tied_weights_is_exact_and_takes_ties_by_position(caplog):
    """An fp8 base rounds many weights to one value (exact zeros above all): a budget whose cut falls
    inside such a group takes the group's first entries, in module order, and meets the budget."""
    from sara_network.network import SaraNetwork, collect_targets
    from sara_network.options import SaraConfig

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(torch.float8_e4m3fn)
    layers[0].weight.data.view(-1)[:40] = 0  # make sure the group at 0 is larger than the budget
    zeros = sum(int((layer.weight.float() == 0).sum()) for layer in layers)
    budget = zeros // 2
    network = SaraNetwork(SaraConfig(budget=budget, progressive_iter=None))
    with caplog.at_level("WARNING", logger="sara_network"):
        network.select(collect_targets(layers, [], [], "full"))
    modules = network.sara_modules()
    assert sum(m.indices.numel() for m in modules) == budget
    chosen = torch.cat([m.base.weight.float().reshape(-1)[m.indices.long()] for m in modules])
    assert torch.all(chosen == 0)
    first_zeros = (layers[0].weight.float().reshape(-1) == 0).nonzero().reshape(-1)[:budget]
    assert torch.equal(modules[0].indices.long(), first_zeros)  # lowest positions of the first module first
    assert network.thresholds["unet"] > 0  # the taken entries count as below the recorded threshold
    assert any("taken in module order to meet the budget exactly" in r.getMessage() for r in caplog.records)
