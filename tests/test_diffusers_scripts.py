"""The diffusers training scripts end to end, in subprocesses, on a tiny SD pipeline folder and a
few 20x24 PNGs: bf16 autocast + bitsandbytes AdamW8bit (with an exact resume), fp32 + AdamW
(DreamBooth with generated class images), and the files they write loaded by the kohya side.
(fp32 AdamW training through the same API runs in-process in test_hf.py.)"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sara_network
from sara_network import hf
from sara_network.fileformat import load_native, read_tensors
from test_hf import save_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "integrations", "diffusers")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripts")
    model = save_tiny_pipeline(folder / "model")
    data = folder / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as stream:
        for number in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(data / f"{number}.png")
            stream.write(json.dumps({"file_name": f"{number}.png", "text": f"a red cat number {number}"}) + "\n")
    return folder, model, str(data)


def run_script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, os.path.join(SCRIPTS, name), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def text_to_image_args(model, data, output):
    """bf16 autocast, AdamW8bit, text encoder trained, accumulation 2, gradient checkpointing; 5
    optimizer steps of 2 micro-batches over 4 images (2 steps per epoch), a checkpoint at step 3
    (inside the second epoch), the progressive step at 4 and the rank term on every step."""
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output,
            "--resolution", 16, "--random_flip", "--train_batch_size", 1, "--gradient_accumulation_steps", 2,
            "--max_train_steps", 5, "--checkpointing_steps", 3, "--mixed_precision", "bf16", "--use_8bit_adam",
            "--train_text_encoder", "--gradient_checkpointing", "--learning_rate", 1e-3, "--lr_scheduler", "cosine",
            "--seed", 3, "--sara_density", 0.05, "--sara_lambda_rank", 1e-3, "--sara_rank_min_dim", 8,
            "--sara_progressive_iter", 4]


def deltas_of(path):
    deltas, metadata = load_native(path)
    return {d.name: d for d in deltas}, metadata


def test_text_to_image_bf16_8bit_adam_resume_matches_an_uninterrupted_run(workspace):
    folder, model, data = workspace
    full = str(folder / "full")
    run_script("train_text_to_image_sara.py", *text_to_image_args(model, data, full),
               "--validation_prompt", "a cat", "--num_validation_images", 1, "--validation_inference_steps", 2)
    assert sorted(n for n in os.listdir(full) if n.startswith("checkpoint-")) == ["checkpoint-3"]
    assert os.path.isfile(os.path.join(full, "validation", "final-0.png"))
    resumed = str(folder / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    output = run_script("train_text_to_image_sara.py", *text_to_image_args(model, data, resumed),
                        "--resume_from_checkpoint", "latest")
    assert "resuming from" in output.stdout + output.stderr

    expected, expected_meta = deltas_of(os.path.join(full, "sara_weights.safetensors"))
    got, meta = deltas_of(os.path.join(resumed, "sara_weights.safetensors"))
    assert expected.keys() == got.keys()
    for name, delta in expected.items():
        assert torch.equal(delta.values, got[name].values), name
        assert torch.equal(delta.indices, got[name].indices), name
        assert (delta.frozen is None) == (got[name].frozen is None), name
    assert meta["sara_optimizer_steps"] == expected_meta["sara_optimizer_steps"] == "5"
    assert any(d.frozen is not None for d in got.values())  # the progressive step ran (at step 4)
    trained = {name.split("_")[1] for name, d in got.items() if float(d.values.abs().max()) > 0}
    assert trained == {"unet", "te"}

    # the file loads through the kohya side and gives the same model as the diffusers loader
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    def models():
        return (UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))

    unet_k, te_k = models()
    kohya = sara_network.create_network(1.0, None, None, None, te_k, unet_k, density="0.05")
    kohya.apply_to(te_k, unet_k)
    kohya.load_weights(os.path.join(full, "sara_weights.safetensors"))
    unet_h, te_h = models()
    hf.load_sara(unet_h, os.path.join(full, "sara_weights.safetensors"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unet_k(latents, 10, context).sample, unet_h(latents, 10, context).sample,
                                   rtol=0, atol=0)


def test_dreambooth_with_generated_class_images(workspace):
    folder, model, data = workspace
    output, classes = str(folder / "dreambooth"), str(folder / "class-images")
    run_script("train_dreambooth_sara.py", "--pretrained_model_name_or_path", model, "--instance_data_dir", data,
               "--instance_prompt", "a sks cat", "--with_prior_preservation", "--class_data_dir", classes,
               "--class_prompt", "a cat", "--num_class_images", 3, "--class_generation_steps", 2,
               "--sample_batch_size", 2, "--resolution", 16, "--center_crop", "--max_train_steps", 2,
               "--learning_rate", 1e-3, "--seed", 0, "--sara_threshold", 5e-3, "--output_dir", output,
               "--checkpointing_steps", 100, "--export_lora_rank", 2)
    assert sorted(os.listdir(classes)) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    lora, lora_metadata = read_tensors(os.path.join(output, "sara_weights_lora_r2.safetensors"))
    assert lora_metadata["ss_network_module"] == "networks.lora" and lora_metadata["ss_base_model_version"] == "sd_v1"
    downs = [t for k, t in lora.items() if k.endswith(".lora_down.weight")]
    assert downs and all(t.shape[0] <= 2 for t in downs)
    deltas, metadata = deltas_of(os.path.join(output, "sara_weights.safetensors"))
    assert metadata["ss_instance_prompt"] == "a sks cat" and metadata["sara_optimizer_steps"] == "2"
    assert {d.values.dtype for d in deltas.values()} == {torch.float32}
    assert any(float(d.values.abs().max()) > 0 for d in deltas.values())


def test_bad_arguments_are_reported(workspace):
    folder, model, data = workspace
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.join(SCRIPTS, "train_text_to_image_sara.py")
    result = subprocess.run([sys.executable, script, "--pretrained_model_name_or_path", model, "--train_data_dir", data,
                             "--sara_density", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--sara_density" in result.stderr
