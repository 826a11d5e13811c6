"""selection=magnitude|gradient|gradient_small|random: counts, determinism, the calibration against a
dense reference, its memory and base-model guarantees, files, the kohya and diffusers paths, bad input."""
import copy
import json
import math
import types
import weakref

import pytest
import torch
from torch import nn

import models
import sara_network
from kohya_driver import freeze_and_cast, make_network, make_optimizer, text_encoder_arg, train_steps
from sara_network import hf
from sara_network.fileformat import read_tensors
from sara_network.naming import UNET_PREFIX
from sara_network.network import SaraModule, SaraNetwork, SaraSelectionError, find_targets
from sara_network.options import SaraConfig, SaraOptionError
from sara_network.presets import TargetRules

MODES = ["magnitude", "random", "gradient", "gradient_small"]


def sd1_loss(unet, text_encoder, seed):
    latents, timesteps, ids, target = models.batch("sd1", seed)
    prediction = unet(latents, timesteps, text_encoder(ids).last_hidden_state).sample
    return nn.functional.mse_loss(prediction.float(), target)


def apply_mode(m, mode, **options):
    """hf.apply_sara on copies of a tiny SD1 model; gradient modes calibrated on batches 0 and 1."""
    unet, text_encoder = copy.deepcopy(m.unet), copy.deepcopy(m.text_encoders[0])
    network = hf.apply_sara(unet, [text_encoder], selection=mode, progressive_iter="off", **options)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if network.calibration_pending():
        network.calibrate(lambda step: sd1_loss(unet, text_encoder, step), steps=2)
    network.unpatch()
    network.detach_optimizer_hooks()
    return network


def layer_indices(network):
    return {name: module.indices.clone() for name, module in network.named_children()}


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_selects_the_paper_count_deterministically(mode):
    m = models.tiny_sd1()
    budget = 20_000
    magnitude = layer_indices(apply_mode(m, "magnitude", budget=budget))
    first = layer_indices(apply_mode(m, mode, budget=budget))
    again = layer_indices(apply_mode(m, mode, budget=budget))
    assert sum(i.numel() for i in magnitude.values()) == budget  # the paper's rule fixes the count
    assert first.keys() == magnitude.keys()
    for name, indices in first.items():
        assert indices.numel() == magnitude[name].numel(), name  # the same count in every layer
        assert indices.dtype == torch.int32 and bool((indices[1:] > indices[:-1]).all())  # sorted, unique
        assert torch.equal(indices, again[name]), f"{mode} is not deterministic on {name}"
    moved = sum(int((first[n] != magnitude[n]).sum()) for n in first)
    if mode == "magnitude":
        assert moved == 0
    else:
        assert moved > budget // 2, f"{mode} chose nearly the magnitude entries ({moved} moved)"
    if mode == "random":
        reseeded = layer_indices(apply_mode(m, mode, budget=budget, seed=1))
        assert any(not torch.equal(reseeded[n], first[n]) for n in first)


def test_candidate_scores_are_lower_bounds_and_exact_when_the_set_covers_the_layer():
    from sara_network import selection

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(500, generator=generator).abs() * torch.rand(500, generator=generator) for _ in range(6)]
    exact = torch.stack(grads).sum(0)
    for capacity in (40, 500):
        indices, scores = torch.zeros(0, dtype=torch.int32), torch.zeros(0)
        for grad in grads:
            indices, scores = selection.accumulate_candidates(indices, scores, grad, capacity, fixed=False)
        assert indices.numel() == capacity == indices.unique().numel()
        assert bool((scores <= exact[indices.long()] + 1e-6).all())  # never more than the true sum
        if capacity == 500:
            torch.testing.assert_close(scores, exact[indices.long()])
            chosen = selection.top_scored(indices, scores, 25)
            assert set(chosen.tolist()) == set(torch.topk(exact, 25).indices.tolist())


# ---------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A conv and two Linear layers, small enough for an exact dense reference."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hidden = nn.Linear(8 * 36, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.hidden(h)))


def tiny_batches(count=4):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 3, 6, 6, generator=generator), torch.randn(6, 4, generator=generator))
            for _ in range(count)]


def reference_scores(model, batches):
    """Accumulated |dL/dW| per layer by plain dense autograd (the definition of selection=gradient)."""
    reference = copy.deepcopy(model)
    layers = {"conv": reference.conv, "hidden": reference.hidden, "out": reference.out}
    scores = {name: torch.zeros(layer.weight.numel()) for name, layer in layers.items()}
    for x, target in batches:
        loss = nn.functional.mse_loss(reference(x), target)
        grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()])
        for name, grad in zip(layers, grads):
            scores[name] += grad.reshape(-1).abs()
    return layers, scores


def top_entries(scores, count, among=None):
    candidates = torch.arange(scores.numel()) if among is None else among
    order = torch.argsort(-scores[candidates], stable=True)[:count]
    return set(candidates[order].tolist())


def calibrated_tiny(mode, candidate_factor=None, **options):
    model = TinyNet()
    network = SaraNetwork(SaraConfig(density=0.1, selection=mode, progressive_iter=None, **options))
    if candidate_factor is not None:
        network.candidate_factor = candidate_factor
    network.select(find_targets(model, UNET_PREFIX, TargetRules()))
    network.patch()
    model.requires_grad_(False)
    batches = tiny_batches()
    record = network.calibrate(lambda step: nn.functional.mse_loss(model(batches[step][0]), batches[step][1]),
                               steps=len(batches))
    return model, network, record, batches


def test_gradient_mode_picks_the_true_top_accumulated_gradient_entries():
    model, exact, record, batches = calibrated_tiny("gradient", candidate_factor=10**6)
    assert record["backward_passes"] == len(batches)
    layers, scores = reference_scores(TinyNet(), batches)
    chosen = {name.rsplit("_", 1)[-1]: module for name, module in exact.named_children()}
    for name in layers:
        count = chosen[name].indices.numel()
        assert set(chosen[name].indices.tolist()) == top_entries(scores[name], count), name

    # with the default bounded candidate set (4 x count per layer): how close it comes
    _, bounded, _, _ = calibrated_tiny("gradient")
    total = agree = 0
    for name, module in bounded.named_children():
        short = name.rsplit("_", 1)[-1]
        count = module.indices.numel()
        agree += len(set(module.indices.tolist()) & top_entries(scores[short], count))
        total += count
    print(f"default candidate_factor={SaraNetwork.candidate_factor}: {agree}/{total} = {agree / total:.1%} "
          "of the exact top-|grad| entries")
    assert agree / total >= 0.9


def test_gradient_small_picks_the_top_gradient_in_the_small_weight_pool():
    model, network, record, batches = calibrated_tiny("gradient_small", pool_factor=3)
    assert record["pool_factor"] == 3
    layers, scores = reference_scores(TinyNet(), batches)
    for name, module in network.named_children():
        short = name.rsplit("_", 1)[-1]
        count = module.indices.numel()
        weight = layers[short].weight.detach().reshape(-1).abs()
        pool = torch.argsort(weight, stable=True)[: math.ceil(3 * count)]
        assert set(module.indices.tolist()) == top_entries(scores[short], count, among=pool), short


def test_progressive_step_freezes_only_entries_that_were_below_the_threshold():
    model = TinyNet()
    network = SaraNetwork(SaraConfig(density=0.3, selection="random", progressive_iter=1))
    network.select(find_targets(model, UNET_PREFIX, TargetRules()))
    network.patch()
    network.attach_optimizer_hooks()
    model.requires_grad_(False)
    optimizer = torch.optim.Adam(network.trainable_parameters(), lr=0.05)
    x, target = tiny_batches(1)[0]
    nn.functional.mse_loss(model(x), target).backward()
    optimizer.step()  # Adam moves every entry by about lr: far past the threshold
    threshold = network.thresholds["unet"]
    frozen = below = 0
    for module in network.sara_modules():
        base = module.base.weight.detach().reshape(-1)[module.indices.long()].float().abs()
        assert bool((base[module.frozen_positions.long()] < threshold).all())
        frozen += module.frozen_positions.numel()
        below += int((base < threshold).sum())
    assert 0 < frozen <= below < network.selected_count()
    network.detach_optimizer_hooks()


# ---------------------------------------------------------------------------------------------
def test_calibration_keeps_the_base_bit_identical_and_one_dense_gradient_at_a_time(monkeypatch):
    m = models.tiny_sd1()
    unet, text_encoder = m.unet, m.text_encoders[0]
    before = {f"{prefix}.{k}": v.clone() for prefix, model in (("unet", unet), ("te", text_encoder))
              for k, v in model.state_dict().items()}
    network = hf.apply_sara(unet, [text_encoder], density=0.05, selection="gradient", progressive_iter="off")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)

    # A layer's dense weight gradient exists from the moment its backward runs (the tensor hook on
    # its output fires just before) until the calibration has scored it. Count those alive at once,
    # and check that a scored gradient is freed before the next layer's is scored.
    produced, scored_refs, peaks = [0], [], {"pending": 0, "alive_after_scoring": 0, "scored": 0}
    original = SaraModule.score_gradient

    def counting_score(self, grad):
        peaks["pending"] = max(peaks["pending"], produced[0])
        peaks["alive_after_scoring"] = max(peaks["alive_after_scoring"],
                                           sum(1 for ref in scored_refs if ref() is not None))
        assert grad.numel() == math.prod(self.weight_shape)
        original(self, grad)
        scored_refs.append(weakref.ref(grad))
        produced[0] -= 1
        peaks["scored"] += 1

    def mark_backward(module, inputs, output):
        if output.requires_grad:
            def started(grad):
                produced[0] += 1
            output.register_hook(started)

    monkeypatch.setattr(SaraModule, "score_gradient", counting_score)
    handles = [module.base.register_forward_hook(mark_backward) for module in network.sara_modules()]
    network.calibrate(lambda step: sd1_loss(unet, text_encoder, step), steps=2)
    for handle in handles:
        handle.remove()
    assert peaks["scored"] == 2 * len(network.sara_modules())
    assert peaks["pending"] == 1, peaks  # the one being scored, no other layer's
    assert peaks["alive_after_scoring"] == 0, peaks  # freed before the next layer's is scored
    assert all(p.grad is None for model in (unet, text_encoder) for p in model.parameters())
    assert all(module.delta.grad is None and not module.delta.any() for module in network.sara_modules())
    after = {f"{prefix}.{k}": v for prefix, model in (("unet", unet), ("te", text_encoder))
             for k, v in model.state_dict().items()}
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"calibration changed {key}"


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gradient", "gradient_small", "random"])
def test_kohya_path_end_to_end_with_adamw(mode, tmp_path):
    m = models.tiny_sd1()
    magnitude = make_network(models.tiny_sd1(), {"density": "0.05", "progressive_iter": "off"})
    network = make_network(m, {"density": "0.05", "progressive_iter": "off", "selection": mode,
                               "calibration_steps": "2"}, max_train_steps=6)
    optimizer = make_optimizer(network, "adamw")
    freeze_and_cast(m, network)
    with torch.no_grad():
        loss_before = float(models.denoising_loss(m, 0))
    gradient_mode = mode != "random"
    train_steps(m, network, optimizer, 2)
    if gradient_mode:  # the calibration steps trained nothing and left the optimizer without state
        assert not network.calibration_pending()
        assert all(not p.any() for p in network.trainable_parameters())
        assert all(not optimizer.state[p] for p in network.trainable_parameters())
    moved = sum(int((mine.indices != theirs.indices).sum())
                for mine, theirs in zip(network.sara_modules(), magnitude.sara_modules()))
    assert moved > network.selected_count() // 2
    for module in network.sara_modules():  # base values follow the new entries
        weight = module.base.weight.detach().reshape(-1)
        assert torch.equal(module.base_values_fp32(), weight[module.indices.long()].float())
    train_steps(m, network, optimizer, 4, batch_seed=0)
    with torch.no_grad():
        assert float(models.denoising_loss(m, 0)) < loss_before - 0.01
    path = str(tmp_path / f"{mode}.safetensors")
    network.save_weights(path, torch.float16, {"ss_base_model_version": "sd_v1"})
    _, metadata = read_tensors(path)
    config = json.loads(metadata["sara_config"])
    assert (config["selection"], config["calibration_steps"], config["pool_factor"]) == (mode, 2, 4.0)
    if gradient_mode:
        calibration = json.loads(metadata["sara_calibration"])
        assert calibration["mode"] == mode and calibration["state"] == "done" and calibration["steps"] == 2
        assert calibration["backward_passes"] == 2
    else:
        assert "sara_calibration" not in metadata

    # --resume: a fresh network of the same args takes the calibrated entries from the state
    state = {k: v.clone() for k, v in network.state_dict().items()}
    fresh = make_network(models.tiny_sd1(), {"density": "0.05", "progressive_iter": "off", "selection": mode,
                                             "calibration_steps": "2"}, max_train_steps=6)
    fresh.load_state_dict(state)
    assert not fresh.calibration_pending()
    for mine, theirs in zip(fresh.sara_modules(), network.sara_modules()):
        assert torch.equal(mine.indices, theirs.indices) and torch.equal(mine.delta, theirs.delta)
        assert torch.equal(mine.base_values_fp32(), theirs.base_values_fp32())
    for net in (network, fresh, magnitude):
        net.detach_optimizer_hooks()


@pytest.mark.parametrize("weight_dtype,autocast_dtype", [(torch.float16, torch.float16),
                                                         (torch.float8_e4m3fn, torch.bfloat16)])
def test_calibration_on_half_and_fp8_base_weights(weight_dtype, autocast_dtype):
    """kohya casts the frozen U-Net after apply_to (--mixed_precision, --fp8_base): the calibration
    computes in the autocast dtype, as the training path does."""
    m = models.tiny_sd1()
    network = make_network(m, {"density": "0.05", "progressive_iter": "off", "selection": "gradient",
                               "calibration_steps": "1"}, max_train_steps=2, train_text_encoder=False)
    magnitude = layer_indices(network)
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    m.unet.to(weight_dtype)
    for module in m.unet.modules():  # norms and embeddings in the compute dtype, as kohya's fp8 path
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(autocast_dtype)
    train_steps(m, network, optimizer, 2, autocast_dtype=autocast_dtype)
    chosen = layer_indices(network)
    assert sum(int((chosen[n] != magnitude[n]).sum()) for n in chosen) > network.selected_count() // 2
    deltas = [module.delta for module in network.sara_modules()]
    assert all(torch.isfinite(d).all() for d in deltas) and any(d.any() for d in deltas)
    network.detach_optimizer_hooks()


def test_diffusers_path_calibrate_and_step_based(tmp_path):
    m = models.tiny_sd1()
    results = {}
    for how in ("calibrate", "steps"):
        unet, text_encoder = copy.deepcopy(m.unet), copy.deepcopy(m.text_encoders[0])
        network = hf.apply_sara(unet, [text_encoder], density=0.05, selection="gradient", calibration_steps=2,
                                progressive_iter="off", total_steps=6)
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        optimizer = torch.optim.AdamW(network.param_groups(1e-3), weight_decay=0.0)
        if how == "calibrate":
            network.calibrate(lambda step: sd1_loss(unet, text_encoder, step))
            assert network.calibration_record["steps_kind"] == "calibrate() batches"
            # a checkpoint taken before any optimizer step still holds the calibrated entries
            early = hf.apply_sara(copy.deepcopy(m.unet), [copy.deepcopy(m.text_encoders[0])], density=0.05,
                                  selection="gradient", calibration_steps=2, progressive_iter="off")
            early.load_checkpoint_state(network.checkpoint_state())
            assert not early.calibration_pending()
            assert all(torch.equal(a.indices, b.indices) for a, b in zip(early.sara_modules(), network.sara_modules()))
            early.unpatch()
            early.detach_optimizer_hooks()
        with torch.no_grad():
            before = float(sd1_loss(unet, text_encoder, 0))
        steps = 4 if how == "calibrate" else 6
        for step in range(steps):
            optimizer.zero_grad()
            sd1_loss(unet, text_encoder, step % 2).backward()
            optimizer.step()
            if how == "steps" and step == 0:
                assert network.calibration_pending()
        assert not network.calibration_pending()
        with torch.no_grad():
            assert float(sd1_loss(unet, text_encoder, 0)) < before - 0.01
        results[how] = layer_indices(network)
        # a checkpoint of the calibrated run resumes into a fresh (not yet calibrated) network
        fresh = hf.apply_sara(copy.deepcopy(m.unet), [copy.deepcopy(m.text_encoders[0])], density=0.05,
                              selection="gradient", calibration_steps=2, progressive_iter="off")
        fresh.load_checkpoint_state(network.checkpoint_state())
        assert not fresh.calibration_pending() and layer_indices(fresh).keys() == results[how].keys()
        assert all(torch.equal(layer_indices(fresh)[n], results[how][n]) for n in results[how])
        path = str(tmp_path / f"{how}.safetensors")
        network.save(path)
        assert json.loads(read_tensors(path)[1]["sara_config"])["selection"] == "gradient"
        loaded = hf.load_sara(copy.deepcopy(m.unet), path)[0]
        assert all(torch.equal(module.indices, results[how][name]) for name, module in loaded.named_children()
                   if name in results[how])
        for net in (network, fresh):
            net.unpatch()
            net.detach_optimizer_hooks()
    # both ways scored the same two batches (0 and 1) before anything trained: the same entries
    for name in results["calibrate"]:
        assert torch.equal(results["calibrate"][name], results["steps"][name]), name


# ---------------------------------------------------------------------------------------------
def test_bad_input_names_the_arg(tmp_path):
    m = models.tiny_sd1()
    te = text_encoder_arg(m)
    with pytest.raises(SaraOptionError, match="selection='largest'"):
        sara_network.create_network(1.0, None, None, None, te, m.unet, selection="largest")
    with pytest.raises(SaraOptionError, match="calibration_steps='0'"):
        sara_network.create_network(1.0, None, None, None, te, m.unet, selection="gradient", calibration_steps="0")
    with pytest.raises(SaraOptionError, match="pool_factor"):
        sara_network.create_network(1.0, None, None, None, te, m.unet, selection="gradient_small", pool_factor="0.5")
    with pytest.raises(SaraOptionError, match=r"calibration_steps=8 .*max_train_steps=8"):
        make_network(m, {"density": "0.05", "selection": "gradient", "calibration_steps": "8"}, max_train_steps=8)

    # max_train_steps known only later (kohya recomputes it from epochs): refused at the first step
    network = sara_network.create_network(1.0, None, None, None, te, m.unet, density="0.05", selection="gradient",
                                          calibration_steps="4", progressive_iter="off")
    args = types.SimpleNamespace(max_train_steps=None)
    network.prepare_network(args)
    network.apply_to(te, m.unet, True, True)
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    args.max_train_steps = 3
    with pytest.raises(SaraOptionError, match=r"calibration_steps=4 .*max_train_steps=3"):
        train_steps(m, network, optimizer, 1)
    network.detach_optimizer_hooks()

    # a file already fixes the entries
    path = str(tmp_path / "file.safetensors")
    magnitude = make_network(models.tiny_sd1(), {"density": "0.05"})
    magnitude.save_weights(path)
    magnitude.detach_optimizer_hooks()
    gradient = make_network(models.tiny_sd1(), {"density": "0.05", "selection": "gradient_small",
                                                "calibration_steps": "2"})
    with pytest.raises(SaraOptionError, match=r"selection=gradient_small .*--network_weights"):
        gradient.load_weights(path)
    gradient.detach_optimizer_hooks()
    with pytest.raises(SaraOptionError, match=r"selection=gradient .*weights file"):
        sara_network.create_network_from_weights(1.0, path, None, te, m.unet, selection="gradient")
    fresh = models.tiny_sd1()
    with pytest.raises(SaraOptionError, match=r"selection=gradient .*weights="):
        hf.apply_sara(fresh.unet, fresh.text_encoders, weights=path, selection="gradient")
    with pytest.raises(SaraOptionError, match=r"calibration_steps=3 .*total_steps=3"):
        hf.apply_sara(fresh.unet, fresh.text_encoders, density=0.05, selection="gradient", calibration_steps=3,
                      total_steps=3)
    plain = hf.apply_sara(fresh.unet, fresh.text_encoders, density=0.05, progressive_iter="off")
    with pytest.raises(SaraSelectionError, match="nothing to calibrate: selection=magnitude"):
        plain.calibrate(lambda step: sd1_loss(fresh.unet, fresh.text_encoders[0], step))
    plain.unpatch()
    plain.detach_optimizer_hooks()


# ---------------------------------------------------------------------------------------------
def test_two_processes_end_with_the_same_calibrated_entries(tmp_path):
    """accelerate launch, 2 gloo processes, each calibrating on its own half of every batch."""
    from safetensors.torch import load_file
    from test_ddp import run

    out = str(tmp_path / "ddp")
    run(out, "sgd", 2, ["--steps", "4", "--network_arg", "selection=gradient", "--network_arg",
                        "calibration_steps=2", "--network_arg", "progressive_iter=off", "--save_indices"])
    rank0, rank1 = load_file(f"{out}.rank0.safetensors"), load_file(f"{out}.rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(key.endswith(".indices") for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
    assert any(bool(value.any()) for key, value in rank0.items() if not key.endswith(".indices")
               and key != "frozen_count")  # trained after the calibration
