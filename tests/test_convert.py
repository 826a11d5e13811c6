"""sara_network.convert / analysis on tiny SD1 (diffusers) and SDXL (LDM) models: round trips,
low-rank export, diffusers loading, LyCORIS key names, projections and merges."""
import json
import math

import pytest
import torch

import models
import sara_network
from sara_network import analysis, convert, fileformat, ldm_names
from sara_network.compat import release
from sara_network.fileformat import ModuleDelta, SaraFileError
from sara_network.naming import text_encoder_prefixes
from sara_network.network import all_targets

KINDS = {"sd1": models.tiny_sd1, "sdxl": models.tiny_sdxl}
VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def trained_native(kind, path, seed=0, density="0.05", **args):
    """A native file as training writes it: SaRA selection on the tiny model, random deltas."""
    m = KINDS[kind]()
    te = m.text_encoders if len(m.text_encoders) > 1 else m.text_encoders[0]
    network = sara_network.create_network(1.0, None, None, None, te, m.unet, density=density, **args)
    network.apply_to(te, m.unet, True, True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    network.save(str(path), torch.float16, {"ss_base_model_version": VERSION[kind]})
    return m, network


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def native(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "sara.safetensors"
    trained_native(request.param, path)
    deltas, metadata = fileformat.load_native(str(path))
    return request.param, deltas, metadata


def dense_of(deltas):
    return {d.name: d.dense() for d in deltas}


def test_diff_round_trip_is_exact(native):
    kind, deltas, _ = native
    tensors = convert.to_diff(deltas, torch.float16)
    assert set(tensors) == {f"{d.name}.diff" for d in deltas}
    assert all(tensors[f"{d.name}.diff"].shape == d.shape for d in deltas)
    back, empty = convert.from_diff(tensors)
    assert not empty
    for before, after in zip(deltas, back):
        assert before.name == after.name and before.shape == after.shape
        assert torch.equal(before.dense(), after.dense())


def test_diff_keeps_bias_deltas(tmp_path):
    trained_native("sd1", tmp_path / "b.safetensors", include_bias="true", threshold="0.05")
    deltas, _ = fileformat.load_native(str(tmp_path / "b.safetensors"))
    with_bias = [d for d in deltas if d.bias_indices is not None]
    assert with_bias
    tensors = convert.to_diff(deltas, torch.float32)
    back = {d.name: d for d in convert.from_diff(tensors)[0]}
    for delta in with_bias:
        assert tensors[f"{delta.name}.diff_b"].shape == (delta.shape[0],)
        assert torch.equal(back[delta.name].bias_values, delta.bias_values.float())
    lora = convert.to_lora(deltas, convert.RankRule(rank=2), "sd_v1")
    assert sorted(lora.bias_modules) == sorted(d.name for d in with_bias)


def test_full_rank_lora_is_exact(native):
    kind, deltas, _ = native
    result = convert.to_lora(deltas, convert.RankRule(energy=1.0), VERSION[kind], dtype=torch.float32)
    assert result.rel_error < 1e-5
    dense = convert.lora_deltas(result.tensors)
    for delta in deltas:
        assert dense[delta.name].shape == delta.shape
        torch.testing.assert_close(dense[delta.name], delta.dense(), atol=1e-8, rtol=1e-4)
    for key, tensor in result.tensors.items():
        if key.endswith(".alpha"):
            assert tensor.dim() == 0
            assert float(tensor) == result.tensors[key.replace(".alpha", ".lora_down.weight")].shape[0]


def test_low_rank_reported_error_equals_recomputed(native):
    kind, deltas, _ = native
    result = convert.to_lora(deltas, convert.RankRule(rank=3), VERSION[kind], dtype=torch.float16)
    dense = convert.lora_deltas(result.tensors)
    err_sq = norm_sq = 0.0
    by_name = {m.name: m for m in result.modules}
    for delta in deltas:
        target = delta.dense().double()
        residual = (target - dense[delta.name].double()).square().sum().item()
        module_norm = target.square().sum().item()
        assert by_name[delta.name].rel_error == pytest.approx(math.sqrt(residual / module_norm), rel=1e-4)
        err_sq, norm_sq = err_sq + residual, norm_sq + module_norm
    assert result.rel_error == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-4)
    assert 0.1 < result.rel_error < 1.0
    conv = next(d for d in deltas if len(d.shape) == 4 and d.shape[-1] == 3)
    assert result.tensors[f"{conv.name}.lora_down.weight"].shape == (3, conv.shape[1], 3, 3)
    assert result.tensors[f"{conv.name}.lora_up.weight"].shape == (conv.shape[0], 3, 1, 1)


@pytest.mark.parametrize("shape", [(48, 40), (24, 16, 3, 3), (32, 16, 1, 1)])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_exactly_rank_r_delta_converts_at_rank_r(shape, method):
    generator = torch.Generator().manual_seed(1)
    r = 3
    matrix = torch.randn(shape[0], r, generator=generator) @ torch.randn(r, math.prod(shape[1:]), generator=generator)
    delta = ModuleDelta("lora_unet_x", shape, torch.arange(math.prod(shape), dtype=torch.int32), matrix.reshape(-1))
    rule = convert.RankRule(max_rel_error=1e-3, max_rank=8)
    result = convert.to_lora([delta], rule, "sd_v1", method, torch.float32)
    assert result.modules[0].rank == r
    assert result.rel_error < 1e-5


def test_rank_rules():
    spectrum = torch.tensor([4.0, 2.0, 1.0, 0.5])
    total = float((spectrum ** 2).sum())  # 21.25
    assert convert.RankRule(rank=2).choose(spectrum, total, 4) == 2
    assert convert.RankRule(rank=9, max_rank=3).choose(spectrum, total, 4) == 3
    assert convert.RankRule(energy=0.95).choose(spectrum, total, 4) == 3  # rank 2 keeps 20/21.25 = 0.941
    assert convert.RankRule(energy=0.94).choose(spectrum, total, 4) == 2
    assert convert.RankRule(max_rel_error=0.2).choose(spectrum, total, 4) == 3  # sqrt(1.25/21.25)=0.24
    assert convert.RankRule(rank=2, max_rel_error=0.2).choose(spectrum, total, 4) == 2  # --rank caps it
    assert convert.RankRule(rank=2, energy=0.9).cap(4) == 2
    for bad in [dict(), dict(energy=0.9, max_rel_error=0.1), dict(rank=0), dict(rank=2, max_rel_error=1.5)]:
        with pytest.raises(ValueError):
            convert.RankRule(**bad)


def sparse_delta(name, shape, density, seed, decaying=False):
    """A module delta on a random `density` support: random values, or a masked sum of rank-1 terms
    with geometric scales (a decaying spectrum) plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    cols = numel // shape[0]
    indices = torch.randperm(numel, generator=generator)[: int(density * numel)].sort().values
    values = torch.randn(indices.numel(), generator=generator) * 1e-3
    if decaying:
        left = torch.randn(shape[0], 32, generator=generator) * 0.7 ** torch.arange(32)
        right = torch.randn(32, cols, generator=generator)
        values = (left[indices // cols] * right[:, indices % cols].T).sum(1) * 1e-3 + values * 1e-2
    return ModuleDelta(name, shape, indices.to(torch.int32), values)


# SD1.5 shapes: attention 320x320, feed-forward out 1280x5120, a 3x3 conv 320x320x3x3. Measured at
# OVERSAMPLE 10 / POWER_ITERATIONS 2: the randomized error was 0.2-1.0% above the exact one.
@pytest.mark.parametrize("shape,density,decaying", [((320, 320), 0.06, False), ((320, 320), 0.006, True),
                                                    ((1280, 5120), 0.006, True), ((320, 320, 3, 3), 0.006, False)])
def test_randomized_export_error_is_close_to_the_exact_truncated_svd(shape, density, decaying):
    delta = sparse_delta("lora_unet_x", shape, density, seed=3, decaying=decaying)
    matrix = delta.dense().reshape(shape[0], -1).double()
    singular = torch.linalg.svdvals(matrix)
    best = float(singular[16:].square().sum().sqrt() / singular.square().sum().sqrt())  # Eckart-Young
    result = convert.to_lora([delta], convert.RankRule(rank=16), "sd_v1", "randomized", torch.float32)
    assert best <= result.rel_error <= 1.015 * best
    again = convert.to_lora([delta], convert.RankRule(rank=16), "sd_v1", "randomized", torch.float32)
    for key, tensor in result.tensors.items():  # a fixed seed: the same file gives the same LoRA
        assert torch.equal(again.tensors[key], tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse_randomized_export_reports_the_error_of_what_it_stores(dtype):
    """The sparse path computes ||D - up@down|| without a dense D (the dense path directly, in fp32):
    check both against the fp64 residual of the written factors, per module and overall, for Linear
    and 3x3 / 1x1 conv shapes."""
    deltas = [sparse_delta("lora_unet_a", (256, 512), 0.01, 1), sparse_delta("lora_unet_b", (128, 64, 3, 3), 0.02, 2),
              sparse_delta("lora_unet_c", (192, 256, 1, 1), 0.03, 3, decaying=True),
              sparse_delta("lora_unet_d", (160, 320), 2 * convert.SPARSE_BELOW_DENSITY, 4)]  # the dense path
    result = convert.to_lora(deltas, convert.RankRule(rank=8), "sd_v1", "auto", dtype)
    dense = convert.lora_deltas(result.tensors)
    err_sq = norm_sq = 0.0
    for delta, module in zip(deltas, result.modules):
        assert module.name == delta.name and module.rank == 8
        residual = float((delta.dense().double() - dense[delta.name].double()).square().sum())
        own = float(delta.dense().double().square().sum())
        assert module.rel_error == pytest.approx(math.sqrt(residual / own), rel=1e-6)
        err_sq, norm_sq = err_sq + residual, norm_sq + own
    assert result.rel_error == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-6)
    assert result.tensors["lora_unet_b.lora_down.weight"].shape == (8, 64, 3, 3)
    assert result.tensors["lora_unet_b.lora_up.weight"].shape == (128, 8, 1, 1)
    assert result.tensors["lora_unet_c.lora_down.weight"].shape == (8, 256, 1, 1)


def test_max_error_picks_per_module_ranks_and_lists_the_unreachable(tmp_path, capsys):
    from sara_network.cli import main

    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(96, 3, generator=generator) @ torch.randn(3, 160, generator=generator)
    exact3 = ModuleDelta("lora_unet_low", (96, 160), torch.arange(96 * 160, dtype=torch.int32), low_rank.reshape(-1))
    noise = sparse_delta("lora_unet_noise", (96, 160), 0.3, 4)
    fileformat.save_native(str(tmp_path / "in.safetensors"), [exact3, noise], torch.float32,
                           {"ss_base_model_version": "sd_v1"})
    for flag in ("--max-error", "--max-rel-error"):
        out = tmp_path / f"out{flag}.safetensors"
        assert main(["to-lora", str(tmp_path / "in.safetensors"), str(out), "--rank", "8", flag, "0.05",
                     "--dtype", "fp32"]) == 0
        tensors, metadata = fileformat.read_tensors(str(out))
        assert tensors["lora_unet_low.lora_down.weight"].shape[0] == 3
        assert tensors["lora_unet_noise.lora_down.weight"].shape[0] == 8  # the cap: noise needs far more
        report = json.loads(metadata["sara_lora_conversion"])
        assert report["modules"]["lora_unet_low"]["rel_error"] <= 0.05
        assert report["above_max_error"] == ["lora_unet_noise"]
        assert "1 modules stay above --max-error 0.05 at the rank cap 8: lora_unet_noise" in capsys.readouterr().err
    result = convert.to_lora([noise], convert.RankRule(rank=80, max_rel_error=0.5), "sd_v1", "auto", torch.float32)
    assert result.modules[0].rel_error <= 0.5 and not result.unreached
    smaller = convert.to_lora([noise], convert.RankRule(rank=result.modules[0].rank - 1), "sd_v1", "exact", torch.float32)
    assert smaller.modules[0].rel_error > 0.5  # the smallest rank that reaches it
    assert main(["to-lora", str(tmp_path / "in.safetensors"), str(tmp_path / "x.safetensors")]) == 1
    assert "give --rank, --energy or --max-error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
def tiny_tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_pipeline(tmp_path, m):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=vae, text_encoder=m.text_encoders[0], tokenizer=tiny_tokenizer(tmp_path),
                                   unet=m.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sara_outputs(models_, path):
    network, _ = sara_network.create_network_from_weights(1.0, str(path), None, models_.text_encoders[0], models_.unet)
    network.apply_to(models_.text_encoders[0], models_.unet, True, True)
    return diffusers_outputs(models_)


def diffusers_outputs(m):
    latents, timesteps, ids, _ = models.batch("sd1", 5)
    with torch.no_grad():
        return models.predict(m, latents, timesteps, ids)


# diffusers before 0.39 (kohya's pin is 0.32.1) has no mapping for the kohya names of the U-Net's
# top-level layers and drops their LoRA entries as unexpected keys (fixed by huggingface/diffusers#14006).
TOP_LEVEL_UNET = ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_")


@pytest.mark.parametrize("rank", [None, 4])
def test_lora_loads_in_diffusers_and_matches_sara(tmp_path, rank):
    native_path = tmp_path / "sara.safetensors"
    trained_native("sd1", native_path, density="0.2")
    deltas, metadata = fileformat.load_native(str(native_path))
    rule = convert.RankRule(energy=1.0) if rank is None else convert.RankRule(rank=rank)
    result = convert.to_lora(deltas, rule, "sd_v1", dtype=torch.float32, uniform=True)
    lora_path = tmp_path / "lora.safetensors"
    fileformat.save_tensors(str(lora_path), result.tensors,
                            convert.adapter_metadata(metadata, "sd_v1", "t", "networks.lora", result.max_rank))
    if release("diffusers") < (0, 39):  # the reference is SaRA without the layers old diffusers drops
        assert sum(d.name.startswith(TOP_LEVEL_UNET) for d in deltas) == 4
        deltas = [d for d in deltas if not d.name.startswith(TOP_LEVEL_UNET)]
        native_path = tmp_path / "sara_without_top_level.safetensors"
        fileformat.save_native(str(native_path), deltas, torch.float16, metadata)

    base = diffusers_outputs(models.tiny_sd1())
    reference = sara_outputs(models.tiny_sd1(), native_path)
    m = models.tiny_sd1()
    pipe = tiny_pipeline(tmp_path, m)
    pipe.load_lora_weights(str(lora_path), adapter_name="sara")
    loaded = diffusers_outputs(m)
    effect = (reference - base).norm()
    assert effect > 1e-4
    gap = (loaded - reference).norm() / effect
    if rank is None:
        assert gap < 1e-3
    else:  # the output error follows the weight error: a rough, generous bound
        assert 0 < gap < 2 * result.rel_error + 0.05
    peft_layers = [n for n, _ in m.unet.named_modules() if n.endswith("lora_A.sara")]
    assert len(peft_layers) == sum(1 for d in deltas if d.name.startswith("lora_unet_"))


# ---------------------------------------------------------------------------------------------
LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D",
                      "SpatialTransformer", "ResBlock", "Downsample", "Upsample"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", ["full", "locon"])
def test_key_names_match_lycoris(tmp_path, kind, algo):
    from lycoris.kohya import create_network as lycoris_network

    preset = tmp_path / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    m = KINDS[kind]()
    te = m.text_encoders if kind == "sdxl" else m.text_encoders[0]
    # ours first: LyCORIS `full` deletes the weights of the layers it wraps
    prefixes = text_encoder_prefixes(m.text_encoders)
    targets = all_targets(m.unet, m.text_encoders, prefixes)
    deltas = [ModuleDelta(t.name, tuple(t.module.weight.shape), torch.tensor([0], dtype=torch.int32),
                          torch.tensor([1.0])) for t in targets]
    lyco = lycoris_network(1.0, 4, 4, None, te, m.unet, algo=algo, conv_dim=4, conv_alpha=4, preset=str(preset))
    lyco.apply_to(te, m.unet, True, True)  # LyCORIS registers its modules here
    lyco_state = lyco.state_dict()
    # LyCORIS names the flattened transformers-5 CLIPTextModel without `text_model_`; kohya, UIs and we keep it
    lyco_state = {key.replace("_encoder_layers_", "_text_model_encoder_layers_")
                  if "_text_model_" not in key else key: t for key, t in lyco_state.items()}
    if algo == "full":
        ours = convert.to_diff(deltas, torch.float32)
    else:
        ours = convert.to_lora(deltas, convert.RankRule(rank=4), VERSION[kind], dtype=torch.float32).tensors
    lyco_modules = {key.split(".")[0] for key in lyco_state}
    assert len(lyco_modules) > 20 and any(n.startswith("lora_unet_") for n in lyco_modules)
    assert lyco_modules <= {d.name for d in deltas}
    for key, tensor in lyco_state.items():
        if key.endswith((".diff", ".lora_down.weight", ".lora_up.weight")):
            assert key in ours, key
            if algo == "full":
                assert ours[key].shape == tensor.shape, key
            else:  # ranks differ (a rank-1 delta); the layout (2-D / 4-D, kernel) must not
                assert ours[key].shape[1:] == tensor.shape[1:] if key.endswith("down.weight") \
                    else ours[key].shape[0] == tensor.shape[0] and ours[key].dim() == tensor.dim(), key


# ---------------------------------------------------------------------------------------------
def test_merge_natives_is_union_and_scaled_sum(native):
    kind, deltas, _ = native
    other = [ModuleDelta(d.name, d.shape, torch.arange(0, d.numel, 7, dtype=torch.int32),
                         torch.full((len(range(0, d.numel, 7)),), 0.25)) for d in deltas[::2]]
    merged = convert.merge_natives([(deltas, 0.6), (other, -2.0)])
    expected = {d.name: 0.6 * d.dense() for d in deltas}
    for d in other:
        expected[d.name] = expected[d.name] - 2.0 * d.dense()
    assert [d.name for d in merged] == sorted(expected)
    for delta in merged:
        torch.testing.assert_close(delta.dense(), expected[delta.name])
        assert bool((delta.indices[1:] > delta.indices[:-1]).all())


def ldm_checkpoint(m, version):
    """A single-file LDM state dict of a tiny model's targets (OpenCLIP q/k/v fused), plus a few
    non-target tensors, as a real checkpoint holds them."""
    arch = convert.ARCH_OF_BASE_MODEL[version]
    state = {"model.diffusion_model.out.0.weight": torch.ones(8),
             ldm_names.get_arch(arch).text_encoders[text_encoder_prefixes(m.text_encoders)[-1]].checkpoint_prefix
             + "token_embedding.weight": torch.randn(99, 32)}
    for target in all_targets(m.unet, m.text_encoders, text_encoder_prefixes(m.text_encoders)):
        key = ldm_names.checkpoint_key(target.name, arch)
        pairs = [(key.key, target.module.weight.detach())]
        if target.module.bias is not None:
            pairs.append((key.bias_key, target.module.bias.detach()))
        for name, tensor in pairs:
            if key.chunk is not None:
                fused = state.setdefault(name, torch.zeros(3 * tensor.shape[0], *tensor.shape[1:]))
                key.view(fused).copy_(tensor)
            else:
                state[name] = tensor.t().contiguous() if key.transposed else tensor.clone()
    return state


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_bake_into_ldm_checkpoint(tmp_path, kind):
    m = KINDS[kind]()
    state = ldm_checkpoint(m, VERSION[kind])
    fileformat.save_tensors(str(tmp_path / "base.safetensors"), state, {}, with_hash=False)
    base = convert.load_checkpoint(str(tmp_path / "base.safetensors"))
    assert base.version == VERSION[kind]
    expected_names = {t.name for t in all_targets(m.unet, m.text_encoders, text_encoder_prefixes(m.text_encoders))}
    assert {t.name for t in base.targets} == expected_names
    trained_native(kind, tmp_path / "a.safetensors", seed=1)
    trained_native(kind, tmp_path / "b.safetensors", seed=2, density="0.1")
    files = [(fileformat.load_native(str(tmp_path / n))[0], s) for n, s in (("a.safetensors", 0.6), ("b.safetensors", 0.3))]
    originals = {t.name: t.module.weight.detach().clone() for t in base.targets}
    convert.bake(base, convert.merge_natives(files))
    for target in base.targets:
        expected = originals[target.name] + sum(s * {d.name: d for d in deltas}[target.name].dense()
                                                if target.name in {d.name for d in deltas} else 0
                                                for deltas, s in files)
        torch.testing.assert_close(target.module.weight, expected)
    # the targets are views: the state dict itself holds the merged weights
    probe = next(t for t in base.targets if "q_proj" in t.name and t.name.startswith(("lora_te2", "lora_te_")))
    key = ldm_names.checkpoint_key(probe.name, convert.ARCH_OF_BASE_MODEL[VERSION[kind]])
    torch.testing.assert_close(key.view(base.state_dict[key.key]), probe.module.weight)


def test_bake_into_diffusers_folder_reloads(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    m = models.tiny_sd1()
    m.unet.to(torch.float16).save_pretrained(tmp_path / "base" / "unet")
    m.text_encoders[0].save_pretrained(tmp_path / "base" / "text_encoder")
    (tmp_path / "base" / "model_index.json").write_text("{}")
    trained_native("sd1", tmp_path / "a.safetensors")
    deltas, _ = fileformat.load_native(str(tmp_path / "a.safetensors"))
    base = convert.load_base(str(tmp_path / "base"))
    assert base.version == "sd_v1"
    before = {t.name: t.module.weight.detach().float().clone() for t in base.targets}
    convert.bake(base, convert.merge_natives([(deltas, 0.5)]))
    convert.write_merged(base, str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "model_index.json").exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert stored.get_tensor("conv_in.weight").dtype == torch.float16  # the base dtype is kept
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "merged", subfolder="unet")
    te = CLIPTextModel.from_pretrained(tmp_path / "merged" / "text_encoder")
    reloaded = {t.name: t.module.weight for t in all_targets(unet, [te], ["lora_te"])}
    for delta in deltas:
        expected = before[delta.name] + 0.5 * delta.dense()
        tolerance = 1e-3 if delta.name.startswith("lora_unet") else 1e-6  # fp16 U-Net
        torch.testing.assert_close(reloaded[delta.name].float(), expected, atol=tolerance, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
def test_lora_projected_onto_sara_selection_starts_training(tmp_path):
    native_path = tmp_path / "sara.safetensors"
    trained_native("sd1", native_path, density="0.3")
    deltas, _ = fileformat.load_native(str(native_path))
    lora = convert.to_lora(deltas, convert.RankRule(rank=4), "sd_v1", dtype=torch.float32)
    dense = convert.lora_deltas(lora.tensors)
    m = models.tiny_sd1()
    base = convert.BaseModel("<tiny>", "sd_v1", all_targets(m.unet, m.text_encoders, ["lora_te"]))
    support, metadata = convert.preset_support(base, sara_network.SaraConfig(density=0.05))
    projection = convert.project_onto(dense, support)
    kept_sq = total_sq = 0.0
    for delta in projection.deltas:
        assert torch.equal(delta.indices, support[delta.name][1])
        if delta.name in dense:
            kept_sq += delta.values.double().square().sum().item()
    total_sq = sum(d.double().square().sum().item() for d in dense.values())
    assert projection.rel_error == pytest.approx(math.sqrt(1 - kept_sq / total_sq), rel=1e-6)
    fileformat.save_native(str(tmp_path / "start.safetensors"), projection.deltas, None, metadata)
    network = sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet)
    network.apply_to(m.text_encoders[0], m.unet, True, True)
    network.load_weights(str(tmp_path / "start.safetensors"))
    assert network.selected_count() == sum(d.indices.numel() for d in projection.deltas)

    top = convert.topk_deltas(dense, 500)
    assert sum(d.indices.numel() for d in top.deltas) == 500
    smallest_kept = min(float(d.values.abs().min()) for d in top.deltas)
    largest_dropped = max(float(dense[n].reshape(-1).abs().index_fill(0, {d.name: d for d in top.deltas}[n]
                                                                        .indices.long(), 0).max())
                          if n in {d.name for d in top.deltas} else float(dense[n].abs().max()) for n in dense)
    assert smallest_kept >= largest_dropped


def test_lora_module_forms():
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
    parts = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}
    torch.testing.assert_close(convert.lora_module_delta("lora_unet_a", parts), 0.5 * up @ down)
    mid = torch.randn(2, 2, 3, 3, generator=generator)
    tucker = {"lora_up.weight": up[:, :, None, None], "lora_down.weight": down[:, :, None, None],
              "lora_mid.weight": mid}
    conv = torch.nn.Sequential(torch.nn.Conv2d(5, 2, 1, bias=False), torch.nn.Conv2d(2, 2, 3, padding=1, bias=False),
                               torch.nn.Conv2d(2, 6, 1, bias=False))
    for layer, weight in zip(conv, (tucker["lora_down.weight"], mid, tucker["lora_up.weight"])):
        layer.weight.data.copy_(weight)
    x = torch.randn(1, 5, 7, 7, generator=generator)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, convert.lora_module_delta("lora_unet_c", tucker), padding=1),
                               conv(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(SaraFileError, match="LoHa"):
        convert.lora_module_delta("lora_unet_h", {"hada_w1_a": up, "hada_w1_b": down, "alpha": torch.tensor(1.0)})
    with pytest.raises(SaraFileError, match="not kohya-style"):
        convert.lora_deltas({"unet.down_blocks.0.attn.lora_A.weight": down, "unet.down_blocks.0.attn.lora_B.weight": up})


def test_analysis_counts_match_selection():
    m = models.tiny_sd1()
    base = convert.BaseModel("<tiny>", "sd_v1", all_targets(m.unet, m.text_encoders, ["lora_te"]))
    result = analysis.analyze(base, [1e-3, 5e-3], budget=5000)
    weights = list(base.weights().values())
    from sara_network import selection

    assert result.total == sum(w.numel() for w in weights)
    assert result.below == [selection.count_below(weights, t) for t in (1e-3, 5e-3)]
    assert result.selected == 5000
    assert result.selected_threshold == selection.threshold_for_count(weights, 5000)
    assert int(result.histogram.sum()) + result.zeros == result.total
    assert "unet:down_blocks.0" in result.blocks and "lora_te:text_model.encoder.layers.0" in result.blocks
    assert analysis.analyze(m.unet, [1e-3]).total == sum(w.numel() for n, w in base.weights().items()
                                                         if n.startswith("lora_unet"))
