"""The kohya `--network_module sara_network` contract, played on tiny SD1 and SDXL (LDM) models and on
stand-ins for what kohya's FLUX.1 and SD3 trainers hand over (kohya_driver.tiny_flux / tiny_sd3)."""
import copy
import hashlib
import json
import struct
import types

import pytest
import torch

import models
import sara_network
import kohya_driver
from kohya_driver import delta_snapshot, freeze_and_cast, make_network, make_optimizer, train_steps
from sara_network.fileformat import SaraFileError, load_native, read_tensors
from sara_network.naming import component_of
from sara_network.network import SaraSelectionError
from sara_network.options import SaraOptionError, auto_lr

KINDS = {"sd1": models.tiny_sd1, "sdxl": models.tiny_sdxl}
ARGS = {"density": "0.05", "progressive_iter": "off"}


def eval_loss(m):
    with torch.no_grad():
        return float(models.denoising_loss(m, 0))


def outputs(m):
    with torch.no_grad():
        latents, timesteps, ids, _ = models.batch(m.kind, 3)
        return models.predict(m, latents, timesteps, ids)


@pytest.mark.parametrize("kind,optimizer_kind", [("sd1", "adamw"), ("sdxl", "adamw8bit")])
def test_training_lowers_the_loss(kind, optimizer_kind):
    m = KINDS[kind]()
    network = make_network(m, ARGS)
    optimizer = make_optimizer(network, optimizer_kind, multi_te_lr=(optimizer_kind == "adamw"))
    freeze_and_cast(m, network)
    before = eval_loss(m)
    train_steps(m, network, optimizer, 5)
    after = eval_loss(m)
    assert after < before - 0.01, (before, after)
    names = [name for name, _ in network.named_children()]
    prefix = ["lora_unet_", "lora_te_"] if kind == "sd1" else ["lora_unet_", "lora_te1_", "lora_te2_"]
    assert all(any(name.startswith(p) for p in prefix) for name in names)
    assert any(name.startswith(prefix[-1]) for name in names)
    if kind == "sd1":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    else:
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in names
        assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names


@pytest.mark.parametrize("threshold,warns", [("1e-3", False), ("0.04", True)])
def test_auto_lr_is_logged_per_component_and_warned_when_tiny(caplog, threshold, warns):
    network = make_network(models.tiny_sdxl(), {"threshold": threshold, "lr": "auto", "progressive_iter": "off"})
    with caplog.at_level("INFO", logger="sara_network"):
        groups, _ = network.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-4], 3e-4, 1e-3)
    lr = auto_lr(float(threshold))
    assert [g["lr"] for g in groups] == [pytest.approx(lr)] * 3
    for component in ("unet", "lora_te1", "lora_te2"):
        logged = [r for r in caplog.records if f"lr=auto for {component}:" in r.getMessage()]
        assert any(r.levelname == "INFO" and f"{lr:.3g}" in r.getMessage() for r in logged)
        warnings = [r for r in logged if r.levelname == "WARNING"]
        assert len(warnings) == warns
        if warns:
            assert f"threshold {float(threshold):.4g}" in warnings[0].getMessage()
            assert f"lr {lr:.3g}" in warnings[0].getMessage()


def test_start_up_count_includes_biases(caplog):
    m = models.tiny_sd1()
    with caplog.at_level("INFO", logger="sara_network"):
        network = make_network(m, {"threshold": "0.02", "include_bias": "true", "progressive_iter": "off"})
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("SaRA selection"))
    bias_params = [s.bias_delta for s in network.sara_modules() if s.bias_delta is not None]
    biases = sum(p.numel() for p in bias_params)
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    targeted = sum(s.base.weight.numel() + (0 if s.base.bias is None else s.base.bias.numel())
                   for s in network.sara_modules())
    assert 0 < biases < trainable
    assert f"total: {trainable:,d} trainable ({biases:,d} of them biases) of {targeted:,d} targeted weights and biases" \
        in report
    unet_rows = [line.split() for line in report.splitlines() if line.strip().startswith("unet:")]
    te_rows = [line.split() for line in report.splitlines() if line.strip().startswith("lora_te:")]
    assert sum(int(row[1].replace(",", "")) for row in unet_rows + te_rows) == trainable


def test_start_up_count_shares_are_of_every_targeted_layer_also_those_given_no_entry(caplog):
    m = models.tiny_sd1()
    with caplog.at_level("INFO", logger="sara_network"):
        network = make_network(m, {"threshold": "3e-4", "progressive_iter": "off"})
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("SaRA selection"))
    layers = [mod for root in (m.unet, m.text_encoders[0]) for mod in root.modules()
              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(network.sara_modules()) < len(layers)  # some layers got no entry
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    targeted = sum(mod.weight.numel() for mod in layers)
    assert f"total: {trainable:,d} trainable of {targeted:,d} targeted weights ({trainable / targeted:.3%})" in report
    rows = [line.split() for line in report.splitlines()[1:-1]]
    assert sum(int(row[3].replace(",", "")) for row in rows) == targeted


def test_optimizer_param_forms_and_learning_rates():
    m = models.tiny_sdxl()
    network = make_network(m, {"density": "0.05", "lr": "auto", "threshold": "1e-3"})
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-4], 3e-4, 1e-3)
    assert descriptions == ["unet", "textencoder 1", "textencoder 2"]
    threshold = network.thresholds["unet"]
    assert groups[0]["lr"] == pytest.approx(1e-3 * torch.exp(torch.tensor(-350 * threshold)).item())
    plain = make_network(models.tiny_sdxl(), ARGS)
    groups, descriptions = plain.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-4], 3e-4, 1e-3)
    assert [g["lr"] for g in groups] == [3e-4, 1e-4, 2e-4]
    groups, _ = plain.prepare_optimizer_params(5e-5, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 5e-5, 5e-5]
    groups, descriptions = plain.prepare_optimizer_params(0.0, 1e-3, 1e-3)  # TE lr 0: not trained
    assert descriptions == ["unet"]
    assert all(not p.requires_grad for p in plain.trainable_parameters("lora_te1"))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_checkpointing_and_accumulation_match_plain_training(kind):
    results = []
    for checkpointing, accumulation in [(False, 1), (True, 1), (False, 2)]:
        m = KINDS[kind]()
        network = make_network(m, ARGS)
        if checkpointing:
            m.unet.enable_gradient_checkpointing()
            network.enable_gradient_checkpointing()
        optimizer = make_optimizer(network, "sgd")
        freeze_and_cast(m, network)
        m.unet.train()
        train_steps(m, network, optimizer, 3, accumulation=accumulation)
        results.append(delta_snapshot(network))
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-7)


def test_multiplier_zero_is_base_and_merge_equals_patched(tmp_path):
    m = models.tiny_sd1()
    base = outputs(m)
    network = make_network(m, ARGS)
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 3)
    patched = outputs(m)
    assert (patched - base).abs().max() > 1e-4
    network.set_multiplier(0.0)
    torch.testing.assert_close(outputs(m), base)
    network.set_multiplier(1.0)
    path = str(tmp_path / "sara.safetensors")
    network.save_weights(path, torch.float32, {"ss_network_module": "sara_network"})

    fresh = models.tiny_sd1()
    merged_net, weights_sd = sara_network.create_network_from_weights(1.0, path, None, fresh.text_encoders[0],
                                                                       fresh.unet, for_inference=True)
    assert merged_net.is_mergeable()
    merged_net.merge_to(fresh.text_encoders[0], fresh.unet, weights_sd, torch.float32, "cpu")
    torch.testing.assert_close(outputs(fresh), patched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("save_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_save_and_reload_in_each_precision(tmp_path, save_dtype):
    m = models.tiny_sdxl()
    network = make_network(m, ARGS)
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 2)
    path = str(tmp_path / "sara.safetensors")
    network.save_weights(path, save_dtype, {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"})
    deltas, metadata = load_native(path)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_module"] == "sara_network"
    by_name = {d.name: d for d in deltas}
    for name, module in network.named_children():
        expected = module.pinned_delta().detach()
        if save_dtype is not None:
            expected = expected.to(save_dtype)
        assert torch.equal(by_name[name].values, expected)
        assert torch.equal(by_name[name].indices, module.indices)

    # resume path: create_network_from_weights (--dim_from_weights) + apply_to + load_weights
    fresh = models.tiny_sdxl()
    loaded, _ = sara_network.create_network_from_weights(1.0, path, None, fresh.text_encoders, fresh.unet,
                                                         lambda_rank="0")
    loaded.apply_to(fresh.text_encoders, fresh.unet, True, True)
    info = loaded.load_weights(path)
    assert "loaded" in info
    tolerance = {None: 1e-6, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[save_dtype]
    torch.testing.assert_close(outputs(fresh), outputs(m), rtol=tolerance, atol=tolerance)


def test_sshs_model_hash_is_the_data_section_hash(tmp_path):
    m = models.tiny_sd1()
    network = make_network(m, ARGS)
    path = tmp_path / "sara.safetensors"
    network.save_weights(str(path), torch.float16, {"ss_output_name": "mine"})
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    metadata = json.loads(raw[8:8 + header])["__metadata__"]
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()


def test_ckpt_is_tensor_only_and_loads_without_pickle(tmp_path):
    m = models.tiny_sd1()
    network = make_network(m, ARGS)
    path = str(tmp_path / "sara.ckpt")
    network.save_weights(path, torch.float16, {"ss_output_name": "mine"})
    blob = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in blob.values())
    deltas, metadata = load_native(path)
    assert metadata["ss_output_name"] == "mine" and len(deltas) == len(list(network.children()))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_resume_equality_across_the_progressive_step(kind):
    """4 straight steps == 2 steps, state save (network + optimizer), fresh process state, 2 steps;
    the progressive step at step 3 falls after the resume."""
    args = {"density": "0.05", "progressive_iter": "3", "lambda_rank": "1e-2", "rank_min_dim": "16"}
    m = KINDS[kind]()
    network = make_network(m, args)
    optimizer = make_optimizer(network, weight_decay=0.05)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 4)
    straight = delta_snapshot(network)

    m = KINDS[kind]()
    network = make_network(m, args)
    optimizer = make_optimizer(network, weight_decay=0.05)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 2)
    state = copy.deepcopy(network.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    # accelerate's save_state keeps only one of several empty tensors (they alias at pointer 0)
    for key in [k for k, v in state.items() if k.endswith(("frozen_positions", "frozen_values")) and not v.numel()]:
        del state[key]

    m = KINDS[kind]()
    resumed = make_network(m, args)
    optimizer = make_optimizer(resumed, weight_decay=0.05)
    freeze_and_cast(m, resumed)
    resumed.load_state_dict(state)
    optimizer.load_state_dict(optimizer_state)
    train_steps(m, resumed, optimizer, 2)
    assert int(resumed.optimizer_steps) == 4
    assert sum(mod.frozen_positions.numel() for mod in resumed.children()) > 0
    for name, value in straight.items():
        assert torch.equal(delta_snapshot(resumed)[name], value), name

    # and resuming from a state saved after the progressive step restores the frozen set
    again = make_network(KINDS[kind](), args)
    again.load_state_dict(resumed.state_dict())
    for (name, module), other in zip(resumed.named_children(), again.children()):
        assert torch.equal(module.frozen_positions, other.frozen_positions)
        assert torch.equal(module.pinned_delta(), other.pinned_delta())


def test_resume_uses_the_saved_entries_when_this_run_selects_others(caplog):
    """kohya resumes after apply_to has selected afresh: a state whose entry counts differ (written
    by another version, or from weights rounded differently) replaces the selection in place (same
    Parameter objects the optimizer holds) and training continues as if uninterrupted."""
    m = models.tiny_sd1()
    network = make_network(m, {"density": "0.05", "progressive_iter": "off"})
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 2)
    state, optimizer_state = copy.deepcopy(network.state_dict()), copy.deepcopy(optimizer.state_dict())
    train_steps(m, network, optimizer, 1)
    straight = delta_snapshot(network)

    fresh = models.tiny_sd1()
    resumed = make_network(fresh, {"density": "0.03", "progressive_iter": "off"})
    params = list(resumed.parameters())
    optimizer = make_optimizer(resumed)
    freeze_and_cast(fresh, resumed)
    with caplog.at_level("WARNING", logger="sara_network"):
        resumed.load_state_dict(state)
    optimizer.load_state_dict(optimizer_state)
    assert all(a is b for a, b in zip(params, resumed.parameters()))
    assert sum("the saved entries are used" in r.getMessage() for r in caplog.records) == 1
    train_steps(fresh, resumed, optimizer, 1)
    for name, value in straight.items():
        assert torch.equal(delta_snapshot(resumed)[name], value), name
    torch.testing.assert_close(outputs(fresh), outputs(m))


def test_progressive_step_freezes_exactly():
    m = models.tiny_sd1()
    network = make_network(m, {"density": "0.05", "progressive_iter": "0.5"}, max_train_steps=6)
    optimizer = make_optimizer(network, weight_decay=0.1)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 3)
    frozen = {name: (mod.frozen_positions.clone(), mod.pinned_delta().detach().clone())
              for name, mod in network.named_children()}
    total_frozen = sum(p.numel() for p, _ in frozen.values())
    assert total_frozen > 0
    # what was frozen is exactly the set whose |w0 + delta| left the threshold
    for name, mod in network.named_children():
        current = base_at_selected(mod) + mod.pinned_delta().detach()
        threshold = network.thresholds[mod.component]
        assert torch.equal((current.abs() >= threshold).nonzero().reshape(-1).to(torch.int32),
                           mod.frozen_positions)
    train_steps(m, network, optimizer, 3)
    still_training = 0
    for name, mod in network.named_children():
        positions, before = frozen[name]
        after = mod.pinned_delta().detach()
        assert torch.equal(after[positions.long()], before[positions.long()]), "a frozen entry moved"
        # the parameter itself is kept equal to the frozen values too
        assert torch.equal(mod.delta.detach()[positions.long()], before[positions.long()])
        moving = torch.ones_like(after, dtype=torch.bool)
        moving[positions.long()] = False
        still_training += int((after[moving] != before[moving]).sum())
    assert still_training > 0


def base_at_selected(mod):
    """The base weight's current values at the module's selected entries, read from the layer itself."""
    return mod.base.weight.detach().reshape(-1)[mod.indices.long()].float()


def nuclear_norm_of_masked(network, include_base: bool):
    """Sum over eligible layers of ||masked update|| (or ||masked weights||) _*, recomputed densely."""
    total = 0.0
    for mod in network.children():
        if len(mod.weight_shape) != 2 or min(mod.weight_shape) <= 16:
            continue
        entries = mod.pinned_delta().detach() + (base_at_selected(mod) if include_base else 0)
        dense = torch.zeros(mod.weight_shape).view(-1).index_put((mod.indices.long(),), entries)
        total += float(torch.linalg.matrix_norm(dense.view(mod.weight_shape), ord="nuc"))
    return total


@pytest.mark.parametrize("target", ["update", "weights"])
def test_nuclear_norm_term_lowers_the_nuclear_norm(target):
    """Same seed and data: lambda_rank > 0 ends with a clearly lower nuclear norm of the penalised
    matrix (the masked update, or the masked weights as in the paper) than lambda_rank = 0."""
    norms = []
    for weight in ["0", "0.5"]:
        m = models.tiny_sd1()
        network = make_network(m, {"density": "0.2", "progressive_iter": "off", "lambda_rank": weight,
                                   "rank_min_dim": "16", "rank_layers": "100", "rank_target": target})
        optimizer = make_optimizer(network)
        freeze_and_cast(m, network)
        train_steps(m, network, optimizer, 4)
        norms.append(nuclear_norm_of_masked(network, include_base=(target == "weights")))
        if weight != "0":
            assert network.last_rank_norm is not None
    assert norms[1] < 0.95 * norms[0], norms


def test_rank_term_counts_once_per_optimizer_step_under_accumulation():
    """With accumulation the term is added once per optimizer step, not once per micro-batch."""
    results = []
    for accumulation in (1, 2):
        m = models.tiny_sd1()
        network = make_network(m, {"density": "0.05", "progressive_iter": "off", "lambda_rank": "1.0",
                                   "rank_min_dim": "16", "rank_layers": "100"})
        optimizer = torch.optim.SGD(network.prepare_optimizer_params(None, 1e-2, 1e-2)[0], lr=1e-2)
        freeze_and_cast(m, network)
        train_steps(m, network, optimizer, 2, accumulation=accumulation)
        assert int(network.optimizer_steps) == 2
        results.append(delta_snapshot(network))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight_dtype,autocast_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                         (torch.float8_e4m3fn, torch.bfloat16)])
def test_half_and_fp8_base_weights_train(weight_dtype, autocast_dtype):
    m = models.tiny_sd1()
    network = make_network(m, ARGS, train_text_encoder=False)
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network, weight_dtype=None)
    m.unet.to(weight_dtype)  # kohya: --fp8_base casts the U-Net, text encoder stays
    for module in m.unet.modules():  # norms and embeddings stay in the compute dtype (as kohya's fp8 path)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.to(autocast_dtype)
    before = delta_snapshot(network)
    train_steps(m, network, optimizer, 2, autocast_dtype=autocast_dtype)
    after = delta_snapshot(network)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any((after[k] != before[k]).any() for k in before)
    assert all(mod.delta.dtype == torch.float32 for mod in network.children())


def test_max_norm_regularization():
    m = models.tiny_sd1()
    network = make_network(m, ARGS)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.normal_(0, 1.0)
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(0.5, "cpu")
    assert scaled > 0 and max_norm == pytest.approx(0.5)
    assert all(float(mod.pinned_delta().norm()) <= 0.5 + 1e-5 for mod in network.children())


def test_unet_only_and_text_encoder_only():
    m = models.tiny_sd1()
    unet_only = make_network(m, ARGS, train_text_encoder=False)
    assert unet_only.components() == ["unet"]
    te_only = make_network(models.tiny_sd1(), ARGS, train_unet=False)
    assert te_only.components() == ["lora_te"]


# --------------------------------------------------------------------------------------------
# bad inputs
def test_bad_network_args():
    m = models.tiny_sd1()
    with pytest.raises(SaraOptionError, match="unknown SaRA network arg 'thresold'"):
        sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, thresold="1e-3")
    with pytest.raises(SaraOptionError, match=r"unknown SaRA network arg 'train_t5xl'.*seed, train_t5xxl$"):
        sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, train_t5xl="true")
    with pytest.raises(SaraOptionError, match="threshold='-1'"):
        sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, threshold="-1")
    with pytest.raises(SaraOptionError, match="no dropout"):
        sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, neuron_dropout=0.1)
    network = sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, threshold="1e-12")
    with pytest.raises(SaraSelectionError, match=r"selects no parameters.*threshold=\S+ would select about 1%"):
        network.apply_to(m.text_encoders[0], m.unet, True, True)


def test_quantized_layer_is_refused_by_name():
    m = models.tiny_sd1()
    name, layer = next((n, mod) for n, mod in m.unet.named_modules() if isinstance(mod, torch.nn.Linear))
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SaraSelectionError, match=rf"{name}: its weight is stored as torch.int8"):
        network = sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, density="0.05")
        network.apply_to(m.text_encoders[0], m.unet, True, True)


def _trained_file(tmp_path, kind="sd1"):
    m = KINDS[kind]()
    network = make_network(m, ARGS)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.normal_(0, 1e-3)
    path = tmp_path / f"{kind}.safetensors"
    network.save_weights(str(path), torch.float16, {})
    return path


def test_bad_files_are_refused_and_nothing_is_applied(tmp_path):
    good = _trained_file(tmp_path)
    m = models.tiny_sd1()
    network = make_network(m, ARGS)
    before = delta_snapshot(network)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(SaraFileError, match="corrupted or truncated"):
        network.load_weights(str(truncated))

    from safetensors.torch import save_file
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1), "lora_unet_conv_in.alpha": torch.tensor(4.0)},
              str(lora))
    with pytest.raises(SaraFileError, match="LoRA"):
        network.load_weights(str(lora))

    wrong_base = _trained_file(tmp_path, "sdxl")
    with pytest.raises(SaraFileError, match="another base model"):
        network.load_weights(str(wrong_base))

    tensors, metadata = read_tensors(str(good))
    name = next(k for k in tensors if k.endswith(".sara_values"))
    broken = dict(tensors)
    broken[name] = broken[name].clone()
    broken[name][0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    save_file(broken, str(nan_path), metadata)
    with pytest.raises(SaraFileError, match="NaN or Inf"):
        network.load_weights(str(nan_path))

    unsorted = dict(tensors)
    index_key = next(k for k in tensors if k.endswith(".sara_indices") and tensors[k].numel() > 1)
    unsorted[index_key] = tensors[index_key].flip(0).contiguous()
    unsorted_path = tmp_path / "unsorted.safetensors"
    save_file(unsorted, str(unsorted_path), metadata)
    with pytest.raises(SaraFileError, match="strictly increasing"):
        network.load_weights(str(unsorted_path))

    extra = dict(tensors)
    extra[name.replace(".sara_values", ".sara_unknown")] = torch.zeros(1)
    extra_path = tmp_path / "extra.safetensors"
    save_file(extra, str(extra_path), metadata)
    with pytest.raises(SaraFileError, match="unknown tensor"):
        network.load_weights(str(extra_path))

    for name, value in delta_snapshot(network).items():
        assert torch.equal(value, before[name])


def test_loading_onto_a_different_base_with_same_shapes_warns(tmp_path, caplog):
    good = _trained_file(tmp_path)
    other = models.tiny_sd1(seed=7)
    network = make_network(other, ARGS)
    with caplog.at_level("WARNING", logger="sara_network"):
        info = network.load_weights(str(good))
    assert "base model differs" in info
    assert any("different base model" in record.message for record in caplog.records)


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_loading_onto_the_same_base_stored_in_fp8_does_not_warn_but_another_base_does(tmp_path, caplog, fp8):
    """--fp8_base with --network_weights: the file was trained on the base in full precision; the
    U-Net now holds the same weights rounded to fp8 (the text encoder stays as it was)."""
    good = _trained_file(tmp_path)
    for model, differs in ((models.tiny_sd1(), False), (models.tiny_sd1(seed=7), True)):
        model.unet.to(getattr(torch, fp8))
        network = make_network(model, ARGS)
        caplog.clear()
        with caplog.at_level("WARNING", logger="sara_network"):
            info = network.load_weights(str(good))
        assert ("base model differs" in info) == differs
        assert any("different base model" in record.message for record in caplog.records) == differs


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    from sara_network.fileformat import atomic_write_bytes

    m = models.tiny_sd1()
    network = make_network(m, ARGS)
    path = tmp_path / "sara.safetensors"
    network.save_weights(str(path), torch.float16, {})
    original = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_bytes(str(path), object())  # the write fails half-way
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["sara.safetensors"]


def test_budget_is_exact_and_include_bias_trains_biases(tmp_path):
    m = models.tiny_sd1()
    network = make_network(m, {"budget": "3k", "include_bias": "true", "progressive_iter": "off"})
    weight_count = sum(mod.indices.numel() for mod in network.children())
    assert weight_count == 3000
    with_bias = [mod for mod in network.children() if mod.bias_delta is not None]
    assert with_bias, "no bias entries were selected"
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 2)
    assert any(mod.bias_delta.abs().sum() > 0 for mod in with_bias)
    path = str(tmp_path / "bias.safetensors")
    network.save_weights(path, torch.float32, {})
    deltas = {d.name: d for d in load_native(path)[0]}
    for mod in with_bias:
        assert torch.equal(deltas[mod.sara_name].bias_values, mod.bias_delta.detach())
    patched = outputs(m)
    fresh = models.tiny_sd1()
    loaded = make_network(fresh, ARGS)
    loaded.load_weights(path)
    torch.testing.assert_close(outputs(fresh), patched)


def test_network_weights_skips_the_selection_and_trains_from_the_file(tmp_path):
    """With --network_weights kohya calls load_weights right after apply_to: nothing is selected
    before the file is read, and the result equals loading the file over a full selection."""
    m = models.tiny_sd1()
    network = make_network(m, ARGS)
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    train_steps(m, network, optimizer, 2)
    path = str(tmp_path / "start.safetensors")
    network.save_weights(path, torch.float32, {})

    reference = models.tiny_sd1()
    selected_first = make_network(reference, {**ARGS, "density": "0.2"})
    selected_first.load_weights(path)

    fresh = models.tiny_sd1()
    deferred = make_network(fresh, {**ARGS, "density": "0.2"}, network_weights=path)
    assert not deferred.sara_modules(), "apply_to selected entries that the file replaces"
    deferred.load_weights(path)
    assert {n: mod.indices for n, mod in deferred.named_children()}.keys() == \
        {n: mod.indices for n, mod in selected_first.named_children()}.keys()
    for (_, a), (_, b) in zip(deferred.named_children(), selected_first.named_children()):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.delta, b.delta)
    torch.testing.assert_close(outputs(fresh), outputs(reference))
    before = delta_snapshot(deferred)
    optimizer = make_optimizer(deferred)
    freeze_and_cast(fresh, deferred)
    train_steps(fresh, deferred, optimizer, 2)
    assert any(not torch.equal(before[n], d) for n, d in delta_snapshot(deferred).items())


# --- FLUX.1 / SD3 trainers (flux_train_network.py, sd3_train_network.py) ------------------------------
DIT_KINDS = {"flux": kohya_driver.tiny_flux, "sd3": kohya_driver.tiny_sd3}
DIT_TRAINED = {"flux": ["lora_te1", "unet"], "sd3": ["lora_te1", "lora_te2", "unet"]}


def bits(tensor):
    return tensor.detach().contiguous().view(torch.uint8).clone()


def dit_network(m, args, **flags):
    """kohya's FLUX/SD3 order up to apply_to: create_network, prepare_network, then
    post_process_network reads network.train_t5xxl (unguarded) before apply_to."""
    network = sara_network.create_network(1.0, None, 1.0, None, m.text_encoders, m.unet, neuron_dropout=None,
                                           dropout=None, **args)
    network.prepare_network(types.SimpleNamespace(max_train_steps=8, network_weights=flags.get("network_weights")))
    train_t5xxl = network.train_t5xxl
    network.apply_to(m.text_encoders, m.unet, flags.get("train_text_encoder", True), True)
    return network, train_t5xxl


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_flux_and_sd3_trainer_call_order_leaves_t5_alone(tmp_path, kind):
    """The trainers' sequence with the default train_t5xxl=false: CLIP encoders and the DiT get
    deltas under kohya's names, T5-XXL none; T5 stays bit-identical through training; the file
    reloads through create_network_from_weights onto fresh models with the same outputs."""
    m = DIT_KINDS[kind]()
    t5_before = {n: bits(p) for n, p in m.text_encoders[-1].named_parameters()}
    network, train_t5xxl = dit_network(m, ARGS)
    assert train_t5xxl is False
    names = [name for name, _ in network.named_children()]
    assert sorted({component_of(name) for name in names}) == DIT_TRAINED[kind]
    expected = {"flux": ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_mlp_2",
                         "lora_unet_single_blocks_0_linear1", "lora_unet_final_layer_adaLN_modulation_1"],
                "sd3": ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
                        "lora_unet_joint_blocks_1_context_block_mlp_fc2", "lora_unet_x_embedder_proj"]}[kind]
    assert set(expected) <= set(names)
    assert not any(name.startswith("lora_te3") for name in names)
    network.enable_gradient_checkpointing()  # --gradient_checkpointing
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-3, 2e-3], 2e-3, 1e-3)
    assert descriptions == ["unet", "textencoder 1"] + (["textencoder 2"] if kind == "sd3" else [])
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    freeze_and_cast(m, network)
    before = delta_snapshot(network)
    train_steps(m, network, optimizer, 3)
    after = delta_snapshot(network)
    for component in DIT_TRAINED[kind]:
        prefix = "lora_unet_" if component == "unet" else component + "_"
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix)), component
    assert all(torch.equal(bits(p), t5_before[n]) for n, p in m.text_encoders[-1].named_parameters())
    path = str(tmp_path / f"{kind}.safetensors")
    network.save_weights(path, None, {"ss_base_model_version": "flux1" if kind == "flux" else "sd3"})
    deltas, _ = load_native(path)
    assert {d.name for d in deltas} == set(names)

    fresh = DIT_KINDS[kind]()
    loaded, _ = sara_network.create_network_from_weights(1.0, path, None, fresh.text_encoders, fresh.unet)
    assert loaded.train_t5xxl is False
    loaded.apply_to(fresh.text_encoders, fresh.unet, True, True)
    with torch.no_grad():
        batch = models.batch(kind, 5)[:3]
        torch.testing.assert_close(kohya_driver.predict(fresh, *batch), kohya_driver.predict(m, *batch))


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_train_t5xxl_selects_in_t5_and_files_carry_it(tmp_path, kind, caplog):
    """train_t5xxl=true (kohya's network arg) selects and trains T5-XXL as lora_te3; a file with
    lora_te3 modules sets train_t5xxl for create_network_from_weights (as kohya's LoRA does), and
    --network_weights into a run without it leaves those modules out, saying so."""
    m = DIT_KINDS[kind]()
    network, train_t5xxl = dit_network(m, {**ARGS, "train_t5xxl": "True"})
    assert train_t5xxl is True
    t5_names = [name for name, _ in network.named_children() if name.startswith("lora_te3_")]
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5_names
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    before = delta_snapshot(network)
    train_steps(m, network, optimizer, 2)
    after = delta_snapshot(network)
    assert any(not torch.equal(before[n], after[n]) for n in t5_names)
    path = str(tmp_path / "with_t5.safetensors")
    network.save_weights(path, None, {})

    fresh = DIT_KINDS[kind]()
    from_file, _ = sara_network.create_network_from_weights(1.0, path, None, fresh.text_encoders, fresh.unet)
    assert from_file.train_t5xxl is True
    without, _ = dit_network(DIT_KINDS[kind](), ARGS, network_weights=path)
    with caplog.at_level("INFO", logger="sara_network"):
        without.load_weights(path)
    assert not any(name.startswith("lora_te3_") for name, _ in without.named_children())
    assert len(without.sara_modules()) == len(network.sara_modules()) - len(t5_names)
    assert any("(lora_te3) are not loaded: not trained in this run" in r.getMessage() for r in caplog.records)
    with pytest.raises(SaraOptionError, match="train_t5xxl='maybe'"):
        sara_network.create_network(1.0, None, 1.0, None, m.text_encoders, m.unet, train_t5xxl="maybe")


@pytest.mark.parametrize("cast", ["before_apply_to", "after_apply_to"])
def test_fp8_base_stays_bit_exact_and_deltas_are_saved_unrounded(tmp_path, cast):
    """--fp8_base. FLUX/SD3 load the DiT in fp8 before apply_to (selection from the fp8 values);
    train_network.py casts after apply_to (selection from the weights as loaded). Either way the
    fp8 weights are never written (the patched weight is a bf16 copy), each patched layer computes
    with fp32(w + delta) rounded once to bf16, and the file holds the fp32 deltas, also those
    smaller than fp8 can represent at their entry."""
    m = kohya_driver.tiny_flux()
    threshold = 0.02
    original = {name: module.weight.detach().clone() for name, module in m.unet.named_modules()
                if isinstance(module, torch.nn.Linear)}
    if cast == "before_apply_to":
        m.unet.to(torch.float8_e4m3fn)
    network, _ = dit_network(m, {"threshold": str(threshold), "progressive_iter": "off"}, train_text_encoder=False)
    for module in network.sara_modules():
        source = module.base.weight if cast == "before_apply_to" else original[module.path]
        assert torch.equal(module.indices.long(), (source.float().abs() < threshold).reshape(-1).nonzero().reshape(-1))
    optimizer = make_optimizer(network)
    freeze_and_cast(m, network)
    if cast == "after_apply_to":
        m.unet.to(torch.float8_e4m3fn)  # train_network.py: unet.to(fp8) after apply_to
    fp8_bits = {name: bits(p) for name, p in m.unet.named_parameters()}
    train_steps(m, network, optimizer, 2, autocast_dtype=torch.bfloat16)
    assert all(torch.equal(bits(p), fp8_bits[name]) for name, p in m.unet.named_parameters())

    module = network.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
    x = torch.randn(2, 5, kohya_driver.HIDDEN)
    weight = module.base.weight.float().reshape(-1).clone()
    weight[module.indices.long()] += module.delta.detach()
    reference = torch.nn.functional.linear(x.bfloat16(), weight.view(module.weight_shape).bfloat16(),
                                           module.base.bias.bfloat16())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(module.base(x), reference)
    network.unpatch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.functional.linear(x.bfloat16(), module.base.weight.bfloat16(), module.base.bias.bfloat16())
        assert torch.equal(module.base(x), plain)
    assert all(torch.equal(bits(p), fp8_bits[name]) for name, p in m.unet.named_parameters())

    path = str(tmp_path / "fp8.safetensors")
    network.save_weights(path, None, {})
    saved = {d.name: d for d in load_native(path)[0]}
    lost_in_fp8 = 0
    for mod in network.sara_modules():
        assert saved[mod.sara_name].values.dtype == torch.float32
        assert torch.equal(saved[mod.sara_name].values, mod.delta.detach())
        base = mod.base.weight.reshape(-1)[mod.indices.long()].float()
        rounded = (base + mod.delta.detach()).to(torch.float8_e4m3fn).float() - base
        lost_in_fp8 += int(((rounded != mod.delta.detach()) & (mod.delta.detach() != 0)).sum())
    assert lost_in_fp8 > 0  # deltas an fp8 write-back would have changed are kept exactly
