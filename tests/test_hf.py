"""sara_network.hf: apply/save/load for diffusers models, accelerate checkpoints, argparse flags, and
the inference API (load, scale, fuse, stack), on a tiny Stable Diffusion pipeline built locally.

`tiny_pipeline()` / `save_tiny_pipeline()` are also used by test_diffusers_scripts.py.
"""
import argparse
import copy
import json
import os

import pytest
import torch

import models
import sara_network
from sara_network import hf
from sara_network.fileformat import SaraFileError, load_native, read_tensors
from sara_network.options import OPTIONS, SaraConfig, SaraOptionError, auto_lr

TOKENS = 16  # the tiny text encoder's max_position_embeddings


# ---------------------------------------------------------------------------------------------
# a tiny SD pipeline, no downloads
def tiny_tokenizer(folder):
    """A byte-less CLIP BPE tokenizer over single letters (ids < the tiny encoder's vocab of 99)."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for piece in list(letters) + [letter + "</w>" for letter in letters] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[piece] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as stream:
        json.dump(vocab, stream)
    with open(os.path.join(folder, "merges.txt"), "w") as stream:
        stream.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=TOKENS, pad_token="<|endoftext|>")


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


def tiny_pipeline(work_folder, seed=0):
    """StableDiffusionPipeline: tiny UNet2DConditionModel (latents 8x8 -> 16 px), AutoencoderKL,
    CLIPTextModel, a local CLIPTokenizer and DDPMScheduler."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=models.tiny_text_encoder(seed + 1),
        tokenizer=tiny_tokenizer(os.path.join(work_folder, "tokenizer-source")), unet=models.tiny_unet(seed),
        scheduler=DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def save_tiny_pipeline(folder, seed=0):
    pipe = tiny_pipeline(str(folder) + "-work", seed)
    pipe.save_pretrained(str(folder))
    return str(folder)


def latents(pipe, prompt="a red cat", seed=0):
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                    output_type="latent", guidance_scale=2.0).images


# ---------------------------------------------------------------------------------------------
def fill_deltas(network, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def unet_out(unet, text_encoder, seed=3):
    with torch.no_grad():
        lat, timesteps, ids, _ = models.batch("sd1", seed)
        return unet(lat, timesteps, text_encoder(ids).last_hidden_state).sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, above all on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = tiny_pipeline(str(tmp_path_factory.mktemp("pipe")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
def test_param_groups_log_auto_lr_and_warn_when_tiny(pipe, caplog):
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    network = hf.apply_sara(unet, [te], threshold=0.04, te_threshold=1e-3, lr="auto", progressive_iter="off")
    with caplog.at_level("INFO", logger="sara_network"):
        groups = network.param_groups(1e-4)
    tiny, sane = auto_lr(0.04), auto_lr(1e-3)
    assert [(g["component"], g["lr"]) for g in groups] == [("unet", pytest.approx(tiny)), ("lora_te", pytest.approx(sane))]
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if "lr=auto" in r.getMessage()]
    assert ("INFO", f"SaRA lr=auto for lora_te: {sane:.3g} (threshold 0.001)") in messages
    assert ("INFO", f"SaRA lr=auto for unet: {tiny:.3g} (threshold 0.04)") in messages
    warnings = [m for level, m in messages if level == "WARNING"]
    assert len(warnings) == 1 and "for unet: threshold 0.04 gives lr 8.32e-10" in warnings[0]


def test_apply_sara_config_forms_groups_and_training(pipe):
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    from_kwargs = hf.apply_sara(copy.deepcopy(unet), [te], density=0.05, progressive_iter="off", lr="auto")
    from_dict = hf.apply_sara(copy.deepcopy(unet), [te], {"density": "0.05", "progressive_iter": None, "lr": "auto"})
    from_config = hf.apply_sara(copy.deepcopy(unet), [te], SaraConfig(density=0.05, progressive_iter=None, lr="auto"))
    for network in (from_dict, from_config):
        assert network.config == from_kwargs.config
        assert [n for n, _ in network.named_children()] == [n for n, _ in from_kwargs.named_children()]
    assert from_kwargs.components() == ["unet", "lora_te"]
    names = [n for n, _ in from_kwargs.named_children()]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    groups = from_kwargs.param_groups(1e-4)
    assert [g["component"] for g in groups] == ["unet", "lora_te"]
    threshold = from_kwargs.thresholds["unet"]
    assert groups[0]["lr"] == pytest.approx(1e-3 * torch.exp(torch.tensor(-350 * threshold)).item())

    # the U-Net alone, text encoder untouched; real training moves the loss
    unet_only = hf.apply_sara(unet, [te], threshold=2e-2, train_text_encoder=False, progressive_iter=3,
                              lambda_rank=1e-3, rank_min_dim=8)
    assert unet_only.components() == ["unet"]
    unet.requires_grad_(False)
    te.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet_only.param_groups(1e-3), weight_decay=0.0)

    def loss():
        lat, timesteps, ids, target = models.batch("sd1", 0)
        return torch.nn.functional.mse_loss(unet(lat, timesteps, te(ids).last_hidden_state).sample, target)

    with torch.no_grad():
        before = float(loss())
    for _ in range(6):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(loss()) < before
    assert int(unet_only.optimizer_steps) == 6
    assert sum(int(m.frozen_positions.numel()) for m in unet_only.sara_modules()) > 0  # progressive step ran
    unet_only.unpatch()
    unet_only.detach_optimizer_hooks()


def test_apply_sara_on_unet2dmodel_and_errors():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(16, 32), norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    network = hf.apply_sara(model, density=0.1, progressive_iter="off")
    assert network.components() == ["unet"]
    x = torch.randn(2, 1, 8, 8)
    fill_deltas(network, 0)
    patched = model(x, torch.tensor([1, 500])).sample
    patched.square().mean().backward()
    assert all(p.grad is not None for p in network.trainable_parameters())
    with pytest.raises(SaraOptionError, match="tresh"):
        hf.apply_sara(model, tresh=1e-3)
    with pytest.raises(SaraOptionError, match="threshold"):
        hf.apply_sara(model, threshold="-1")
    with pytest.raises(SaraOptionError, match="either budget"):
        hf.apply_sara(model, budget="1k", density=0.1)
    network.unpatch()


def test_argparse_flags_come_from_the_option_table():
    parser = hf.add_sara_args(argparse.ArgumentParser())
    flags = {action.dest for action in parser._actions}
    assert {f"sara_{option.name}" for option in OPTIONS} <= flags and "sara" in flags
    args = parser.parse_args(["--sara", "--sara_budget", "2k", "--sara_progressive_iter", "off",
                              "--sara_include_bias", "yes", "--sara_lambda_rank", "5e-3"])
    config = hf.sara_config_from_args(args)
    assert config == SaraConfig(budget=2000, progressive_iter=None, include_bias=True, lambda_rank=5e-3)
    assert hf.sara_config_from_args(parser.parse_args([])) == SaraConfig()
    with pytest.raises(SaraOptionError, match="--sara_density"):
        hf.sara_config_from_args(parser.parse_args(["--sara_density", "2"]))
    without_switch = hf.add_sara_args(argparse.ArgumentParser(), switch=False)
    assert "sara" not in {action.dest for action in without_switch._actions}


def test_files_interchange_with_the_kohya_path(pipe, tmp_path):
    base_unet, base_te = pipe.unet, pipe.text_encoder

    # diffusers side -> kohya loader
    unet, te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    ours = hf.apply_sara(unet, [te], density=0.05, include_bias=True, progressive_iter="off")
    fill_deltas(ours, 1)
    ours.run_progressive_reselection()  # some frozen entries travel too
    expected = unet_out(unet, te)
    ours.save(str(tmp_path / "hf.safetensors"))
    ours.unpatch()
    unet_k, te_k = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    kohya = sara_network.create_network(1.0, None, None, None, te_k, unet_k, density="0.2")
    kohya.apply_to(te_k, unet_k)
    kohya.load_weights(str(tmp_path / "hf.safetensors"))
    torch.testing.assert_close(unet_out(unet_k, te_k), expected, rtol=0, atol=0)
    assert kohya.thresholds == ours.thresholds
    kohya.unpatch()
    unet_k, te_k = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    kohya_again, _ = sara_network.create_network_from_weights(1.0, str(tmp_path / "hf.safetensors"), None, te_k, unet_k)
    kohya_again.apply_to(te_k, unet_k)
    assert sorted(n for n, _ in kohya_again.named_children()) == sorted(n for n, _ in ours.named_children())
    torch.testing.assert_close(unet_out(unet_k, te_k), expected, rtol=0, atol=0)
    kohya_again.unpatch()

    # kohya side -> our loaders (training-time and inference)
    unet_k2, te_k2 = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    kohya2 = sara_network.create_network(1.0, None, None, None, te_k2, unet_k2, threshold="3e-2",
                                         progressive_iter="off")
    kohya2.apply_to(te_k2, unet_k2)
    fill_deltas(kohya2, 2)
    expected2 = unet_out(unet_k2, te_k2)
    kohya2.save_weights(str(tmp_path / "kohya.safetensors"), torch.float32, {"ss_output_name": "x"})
    kohya2.unpatch()
    tensors_kohya, _ = read_tensors(str(tmp_path / "kohya.safetensors"))
    unet_h, te_h = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    loaded = hf.apply_sara(unet_h, [te_h], weights=str(tmp_path / "kohya.safetensors"), progressive_iter="off")
    torch.testing.assert_close(unet_out(unet_h, te_h), expected2, rtol=0, atol=0)
    loaded.save(str(tmp_path / "roundtrip.safetensors"))
    tensors_ours, _ = read_tensors(str(tmp_path / "roundtrip.safetensors"))
    assert tensors_ours.keys() == tensors_kohya.keys()
    assert all(torch.equal(tensors_ours[k], tensors_kohya[k]) for k in tensors_kohya)
    loaded.unpatch()
    unet_i = copy.deepcopy(base_unet)
    hf.load_sara(unet_i, str(tmp_path / "kohya.safetensors"))  # a bare unet: text-encoder modules skipped
    assert [m.component for m in hf.get_sara_networks(unet_i)[0].sara_modules()] == \
        [m.component for m in kohya2.sara_modules() if m.component == "unet"]


def save_random_network(pipe, path, seed, **options):
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    network = hf.apply_sara(unet, [te], progressive_iter="off", **options)
    fill_deltas(network, seed)
    network.save(str(path))
    network.unpatch()


def test_inference_scale_fuse_and_stacking(pipe, tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_random_network(pipe, first, 10, density=0.05, include_bias=True)
    save_random_network(pipe, second, 11, threshold=2e-2)  # overlaps the first on many layers
    pipe = copy.deepcopy(pipe)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = latents(pipe)

    # scale, fuse / unfuse
    hf.load_sara(pipe, str(first), scale=0.7)
    patched = latents(pipe)
    assert not torch.allclose(patched, base)
    hf.fuse_sara(pipe)
    assert not any(m._original_forward for m in hf.get_sara_networks(pipe)[0].sara_modules())
    torch.testing.assert_close(latents(pipe), patched, rtol=0, atol=1e-6)
    hf.set_sara_scale(pipe, 0.7)  # re-fuses at the scale
    torch.testing.assert_close(latents(pipe), patched, rtol=0, atol=1e-6)
    hf.unfuse_sara(pipe)
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())
    torch.testing.assert_close(latents(pipe), patched, rtol=0, atol=0)
    hf.set_sara_scale(pipe.unet, 0.0)  # the pipeline and its unet share the state
    torch.testing.assert_close(latents(pipe), base, rtol=0, atol=0)

    # two stacked files == one model with both deltas merged (summed)
    hf.set_sara_scale(pipe, 1.0)
    hf.load_sara(pipe, str(second))
    stacked = latents(pipe)
    merged_pipe = copy.deepcopy(pipe)
    hf.unload_sara(merged_pipe)
    for path in (first, second):
        network = hf.load_sara(merged_pipe, str(path))[0]
        network.merge_into_base()
        hf.unload_sara(merged_pipe)
    merged = latents(merged_pipe)
    torch.testing.assert_close(stacked, merged, rtol=0, atol=1e-4)
    hf.fuse_sara(pipe)
    torch.testing.assert_close(latents(pipe), merged, rtol=0, atol=1e-4)
    hf.unfuse_sara(pipe)
    # unloading the bottom network of the stack splices it out; the top one keeps working
    bottom, top = hf.get_sara_networks(pipe)
    bottom.unpatch()
    only_second = latents(pipe)
    single = copy.deepcopy(merged_pipe)
    single.unet.load_state_dict(original)
    single.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
    hf.load_sara(single, str(second))
    torch.testing.assert_close(only_second, latents(single), rtol=0, atol=1e-6)
    top.unpatch()
    hf.get_sara_networks(pipe)  # still listed; unload clears
    hf.unload_sara(pipe)
    assert hf.get_sara_networks(pipe) == []
    torch.testing.assert_close(latents(pipe), base, rtol=0, atol=0)
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())


def test_load_errors(pipe, tmp_path):
    with pytest.raises(SaraFileError, match="no such file"):
        hf.load_sara(copy.deepcopy(pipe.unet), str(tmp_path / "missing.safetensors"))
    other = models.tiny_unet(0)
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    different = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                     block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                     attention_head_dim=8, norm_num_groups=8)
    save_random_network(pipe, tmp_path / "a.safetensors", 0, density=0.05)
    with pytest.raises(SaraFileError, match="does not fit this model"):
        hf.load_sara(different, str(tmp_path / "a.safetensors"))
    assert hf.get_sara_networks(different) == []
    with pytest.raises(ValueError, match="load_sara first"):
        hf.fuse_sara(other)


def test_accelerate_checkpoint_hooks(pipe, tmp_path):
    from accelerate import Accelerator

    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    network = hf.apply_sara(unet, [te], density=0.05, progressive_iter=2)
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare(torch.optim.AdamW(network.param_groups(1e-3)))
    hf.register_accelerate_hooks(accelerator, network)

    def step(seed):
        lat, timesteps, ids, target = models.batch("sd1", seed)
        loss = torch.nn.functional.mse_loss(unet(lat, timesteps, te(ids).last_hidden_state).sample, target)
        accelerator.backward(loss)
        hf.all_reduce_gradients(accelerator, network)
        optimizer.step()
        optimizer.zero_grad()

    for seed in range(3):
        step(seed)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    assert {hf.CHECKPOINT_STATE_NAME, hf.CHECKPOINT_WEIGHTS_NAME} <= set(os.listdir(tmp_path / "checkpoint"))
    deltas, metadata = load_native(str(tmp_path / "checkpoint" / hf.CHECKPOINT_WEIGHTS_NAME))
    assert metadata["sara_optimizer_steps"] == "3"
    saved = copy.deepcopy(network.checkpoint_state())
    step(3)
    resumed_after = copy.deepcopy(network.checkpoint_state())
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert all(torch.equal(v, saved[k]) for k, v in network.checkpoint_state().items())
    assert int(network.optimizer_steps) == 3 and any(m.frozen_positions.numel() for m in network.sara_modules())
    step(3)
    assert all(torch.equal(v, resumed_after[k]) for k, v in network.checkpoint_state().items())

    other = hf.apply_sara(copy.deepcopy(pipe.unet), [copy.deepcopy(pipe.text_encoder)], density=0.02)
    from safetensors.torch import load_file

    with pytest.raises(SaraFileError, match="selection differs"):
        other.load_checkpoint_state(load_file(str(tmp_path / "checkpoint" / hf.CHECKPOINT_STATE_NAME)))
    other.unpatch()
    network.unpatch()
    network.detach_optimizer_hooks()
