#!/usr/bin/env bash
# End-to-end check of `--network_module sara_network` inside a real kohya-ss/sd-scripts checkout.
#
#   bash tools/kohya_e2e.sh SD_SCRIPTS_DIR VENV_DIR [WORK_DIR]
#
# SD_SCRIPTS_DIR  a checkout of kohya-ss/sd-scripts (tested at 48d368fa); nothing of it is copied here.
# VENV_DIR        the sd-scripts virtualenv; created and filled (torch, sd-scripts' requirements.txt,
#                 this repository with `pip install -e`) when it has no python yet.
# WORK_DIR        models, dataset and outputs (default /tmp/sara-kohya-e2e).
#
# Runs on the CPU (accelerate --cpu) with a random-init model built locally: no hub access.
# Stages (env STAGES, default "install assets sd1 resume variants te_only typo"; add "sdxl"):
#   install   venv + packages          assets  tokenizers, random SD1.x (and SDXL) folders, dataset
#   sd1       train_network.py, fp32, AdamW8bit, grad accumulation + checkpointing, step saves + states
#   resume    --resume from the step-3 state, one more step (--skip_until_initial_step, and accumulation 1:
#             kohya 48d368fa multiplies the skipped steps by the accumulation but divides by optimizer
#             steps per epoch, so with accumulation 2 it skips every epoch and trains nothing)
#   variants  --network_weights + --dim_from_weights + --base_weights, bf16, --save_precision fp16,
#             --save_model_as ckpt, --scale_weight_norms, --network_train_unet_only
#   te_only   --network_train_text_encoder_only with --network_weights, --save_precision bf16
#   typo      a misspelt --network_args key must fail with SaRA's list of valid keys
#   sdxl      sdxl_train_network.py on a full-size random SDXL (kohya hard-codes the 2.57B architecture).
#             NOT run yet (time box, CPU): the U-Net config was checked against kohya's
#             SdxlUNet2DConditionModel on the meta device (same keys and shapes); needs ~20 GB RAM.
# Every trained file is checked: native format, ss_* metadata, sshs_model_hash of the data section.
set -euo pipefail
SD=$(cd "${1:?usage: kohya_e2e.sh SD_SCRIPTS_DIR VENV_DIR [WORK_DIR]}" && pwd)
VENV=${2:?usage: kohya_e2e.sh SD_SCRIPTS_DIR VENV_DIR [WORK_DIR]}
WORK=${3:-/tmp/sara-kohya-e2e}
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAGES=${STAGES:-install assets sd1 resume variants te_only typo}
PY="$VENV/bin/python"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COLUMNS=200 PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "=== $(date +%H:%M:%S) $*"; }

if has install && [ ! -x "$PY" ]; then
  log "install into $VENV"
  python3 -m venv "$VENV"
  # torchvision (imported by sd-scripts) must match torch: install the pair first.
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  (cd "$SD" && "$VENV/bin/pip" install -q -r requirements.txt)   # its `-e .` installs `library`
  "$VENV/bin/pip" install -q -e "$REPO"
fi
"$PY" -c "import torch, diffusers, transformers, accelerate, bitsandbytes, sara_network; print('versions: torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', bitsandbytes.__version__, 'sara_network', sara_network.__version__)"
echo "sd-scripts commit: $(git -C "$SD" rev-parse --short HEAD 2>/dev/null || echo unknown)"

cat > "$WORK/build_assets.py" <<'PYEOF'
"""Build random-init SD1.x / SDXL diffusers folders, CLIP tokenizers and a tiny dataset (no downloads)."""
import argparse
import gzip
import json
import os
import zipfile

import torch


def bytes_to_unicode():
    """GPT-2/CLIP byte <-> unicode table (public algorithm)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer_files(wheel: str, out: str) -> None:
    """vocab.json + merges.txt for CLIPTokenizer from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        lines = gzip.decompress(archive.read(name)).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: index for index, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer(files: str, pad: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(os.path.join(files, "vocab.json"), os.path.join(files, "merges.txt"),
                         pad_token=pad, model_max_length=77)


def clip_config(hidden, layers, heads, projection=None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4 if hidden < 1024 else 1024,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act="quick_gelu" if projection is None else "gelu",
                          projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64)


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_sd1(out: str, tokenizer_files: str) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    # kohya's SD1 U-Net (library/original_unet.py) hard-codes block_out_channels (320, 640, 1280, 1280),
    # so the U-Net is full size (860M); cross_attention_dim / head dim come from the config.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    text_encoder = CLIPTextModel(clip_config(768, 2, 12))  # 2 layers: kohya reads the last hidden state
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder,
                                   tokenizer=clip_tokenizer(tokenizer_files, "<|endoftext|>"), unet=unet,
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def build_sdxl(out: str, tokenizer_files: str) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # kohya's SdxlUNet2DConditionModel hard-codes the SDXL architecture (2.57B): full size, saved fp16.
    with torch.device("cpu"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    unet = unet.to(torch.float16)
    # kohya takes hidden_states[11] of encoder 1 (needs >= 11 layers) and [-2] of encoder 2.
    te1 = CLIPTextModel(clip_config(768, 11, 12))
    te2 = CLIPTextModelWithProjection(clip_config(1280, 2, 20, projection=1280))
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=clip_tokenizer(tokenizer_files, "<|endoftext|>"),
                                     tokenizer_2=clip_tokenizer(tokenizer_files, "!"), unet=unet,
                                     scheduler=scheduler())
    pipe.save_pretrained(out, safe_serialization=True)


def build_dataset(out: str, count: int = 4) -> None:
    from PIL import Image

    folder = os.path.join(out, "1_sks")
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.png"))
        with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
            f.write(f"a photo of sks thing, number {i}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--open_clip_wheel", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sdxl", action="store_true")
    args = parser.parse_args()
    files = os.path.join(args.out, "bpe")
    build_tokenizer_files(args.open_clip_wheel, files)
    cache = os.path.join(args.out, "tokenizers")  # kohya --tokenizer_cache_dir layout: model id with '/' -> '_'
    clip_tokenizer(files, "<|endoftext|>").save_pretrained(os.path.join(cache, "openai_clip-vit-large-patch14"))
    clip_tokenizer(files, "!").save_pretrained(os.path.join(cache, "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    build_dataset(os.path.join(args.out, "data"))
    if not os.path.exists(os.path.join(args.out, "sd1", "model_index.json")):
        build_sd1(os.path.join(args.out, "sd1"), files)
    if args.sdxl and not os.path.exists(os.path.join(args.out, "sdxl", "model_index.json")):
        build_sdxl(os.path.join(args.out, "sdxl"), files)


if __name__ == "__main__":
    main()
PYEOF
cat > "$WORK/check_file.py" <<'PYEOF'
"""Check a SaRA file written by kohya: native format, ss_* metadata, sshs_model_hash."""
import hashlib
import json
import struct
import sys

from sara_network.fileformat import load_native

path = sys.argv[1]
expect = dict(arg.split("=", 1) for arg in sys.argv[2:])  # e.g. dtype=torch.float16 trained=unet
deltas, metadata = load_native(path)
total = sum(d.indices.numel() for d in deltas)
frozen = sum(int(d.frozen.sum()) for d in deltas if d.frozen is not None)
nonzero = sum(int((d.values != 0).sum()) for d in deltas)
components = sorted({"unet" if d.name.startswith("lora_unet_") else d.name.split("_text_model_")[0] for d in deltas})
dtypes = sorted({str(d.values.dtype) for d in deltas})
print(f"{path}: {len(deltas)} modules, {total:,d} deltas ({nonzero:,d} non-zero, {frozen:,d} frozen), "
      f"components {components}, dtypes {dtypes}, steps {metadata.get('sara_optimizer_steps')}")
problems = []
# kohya writes ss_network_args only when --network_args is given (network_args=absent says it was not)
for key in ("ss_network_module", "ss_steps", "ss_base_model_version", "ss_sd_scripts_commit_hash", "ss_network_args",
            "modelspec.architecture", "sara_format", "sara_base_hash"):
    if key not in metadata and not (key == "ss_network_args" and expect.get("network_args") == "absent"):
        problems.append(f"missing metadata {key}")
if metadata.get("ss_network_module") != "sara_network":
    problems.append(f"ss_network_module={metadata.get('ss_network_module')!r}")
if path.endswith(".safetensors"):
    blob = open(path, "rb").read()
    header = struct.unpack("<Q", blob[:8])[0]
    if metadata.get("sshs_model_hash") != hashlib.sha256(blob[8 + header:]).hexdigest():  # hex, no 0x (kohya's)
        problems.append("sshs_model_hash does not match the data section")
if "dtype" in expect and dtypes != [expect["dtype"]]:
    problems.append(f"dtypes {dtypes}, expected {expect['dtype']}")
if "components" in expect and components != sorted(expect["components"].split(",")):
    problems.append(f"components {components}, expected {expect['components']}")
if "steps" in expect and metadata.get("sara_optimizer_steps") != expect["steps"]:
    problems.append(f"sara_optimizer_steps {metadata.get('sara_optimizer_steps')}, expected {expect['steps']}")
if nonzero == 0:
    problems.append("every delta is zero: nothing was trained")
print("metadata:", {k: metadata[k] for k in ("ss_steps", "ss_network_args", "ss_base_model_version",
                                           "modelspec.architecture", "sshs_model_hash") if k in metadata})
if problems:
    print("CHECK FAILED: " + "; ".join(problems))
    sys.exit(1)
print("CHECK OK")
PYEOF

if has assets; then
  log "assets"
  mkdir -p "$WORK/dl"
  ls "$WORK"/dl/open_clip_torch-*.whl >/dev/null 2>&1 || "$VENV/bin/pip" download -q open-clip-torch --no-deps -d "$WORK/dl"
  "$PY" "$WORK/build_assets.py" --open_clip_wheel "$(ls "$WORK"/dl/open_clip_torch-*.whl | head -1)" --out "$WORK" \
    $(has sdxl && echo --sdxl)
fi

COMMON=(--tokenizer_cache_dir "$WORK/tokenizers" --train_data_dir "$WORK/data" --caption_extension .txt
        --resolution 64 --train_batch_size 1 --seed 42 --network_module sara_network
        --learning_rate 1e-4 --optimizer_type AdamW8bit --max_data_loader_n_workers 0)
SARA_ARGS=(--network_args "density=0.05" "lambda_rank=5e-3" "progressive_iter=0.5")
train() {  # train SCRIPT LOGNAME MIXED_PRECISION ARGS...
  local script=$1 name=$2 mp=$3; shift 3
  log "$script $name (mixed_precision=$mp) -> $WORK/logs/$name.log"
  mkdir -p "$WORK/logs"
  (cd "$SD" && "$VENV/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --num_cpu_threads_per_process "$(nproc)" \
      --mixed_precision "$mp" --dynamo_backend no "$script" --mixed_precision "$mp" "${COMMON[@]}" "$@") \
      > "$WORK/logs/$name.log" 2>&1 || { [ -n "${EXPECT_FAILURE:-}" ] && return 1
                                          echo "FAILED: $name (tail of $WORK/logs/$name.log)"; tail -40 "$WORK/logs/$name.log"; return 1; }
}
check() { "$PY" "$WORK/check_file.py" "$@"; }
SD1=(--pretrained_model_name_or_path "$WORK/sd1")
FAILED=""

if has sd1; then (
  # (set -e does not act inside a `( ... ) || ...` list: each step exits by itself)
  rm -rf "$WORK/out_sd1" || exit 1
  train train_network.py sd1 no "${SD1[@]}" --output_dir "$WORK/out_sd1" --output_name sara1 "${SARA_ARGS[@]}" \
    --max_train_steps 6 --gradient_accumulation_steps 2 --gradient_checkpointing --save_every_n_steps 3 --save_state \
    --save_model_as safetensors || exit 1
  check "$WORK/out_sd1/sara1-step00000003.safetensors" steps=3 components=lora_te,unet dtype=torch.float32 || exit 1
  check "$WORK/out_sd1/sara1.safetensors" steps=6 components=lora_te,unet dtype=torch.float32 || exit 1
  grep -q "SaRA progressive step at optimizer step 3" "$WORK/logs/sd1.log" && echo "progressive step ran at step 3" || exit 1
  ls "$WORK/out_sd1/sara1-step00000003-state" "$WORK/out_sd1/sara1-state" >/dev/null || exit 1
) || FAILED="$FAILED sd1"; fi

if has resume; then (
  # (set -e does not act inside a `( ... ) || ...` list: each step exits by itself)
  rm -rf "$WORK/out_resume" || exit 1
  train train_network.py resume no "${SD1[@]}" --output_dir "$WORK/out_resume" --output_name resumed "${SARA_ARGS[@]}" \
    --resume "$WORK/out_sd1/sara1-step00000003-state" --skip_until_initial_step --max_train_steps 4 \
    --gradient_accumulation_steps 1 \
    --gradient_checkpointing --save_model_as safetensors || exit 1
  grep -q "load train state from" "$WORK/logs/resume.log" || exit 1
  check "$WORK/out_resume/resumed.safetensors" steps=4 components=lora_te,unet || exit 1
) || FAILED="$FAILED resume"; fi

if has variants; then (
  # (set -e does not act inside a `( ... ) || ...` list: each step exits by itself)
  rm -rf "$WORK/out_variants/fromweights.ckpt" || exit 1
  train train_network.py variants bf16 "${SD1[@]}" --output_dir "$WORK/out_variants" --output_name fromweights \
    --network_weights "$WORK/out_sd1/sara1.safetensors" --dim_from_weights \
    --base_weights "$WORK/out_sd1/sara1-step00000003.safetensors" --base_weights_multiplier 0.5 \
    --network_train_unet_only --scale_weight_norms 1.0 --save_precision fp16 --save_model_as ckpt --max_train_steps 1 || exit 1
  check "$WORK/out_variants/fromweights.ckpt" steps=1 components=unet dtype=torch.float16 network_args=absent || exit 1
) || FAILED="$FAILED variants"; fi

if has te_only; then (
  train train_network.py te_only no "${SD1[@]}" --output_dir "$WORK/out_variants" --output_name teonly "${SARA_ARGS[@]}" \
    --network_weights "$WORK/out_sd1/sara1.safetensors" --network_train_text_encoder_only --save_precision bf16 \
    --max_train_steps 1 || exit 1
  check "$WORK/out_variants/teonly.safetensors" components=lora_te dtype=torch.bfloat16 || exit 1
) || FAILED="$FAILED te_only"; fi

if has typo; then (
  # (set -e does not act inside a `( ... ) || ...` list: each step exits by itself)
  if EXPECT_FAILURE=1 train train_network.py typo no "${SD1[@]}" --output_dir "$WORK/out_typo" --network_args "densty=0.05" --max_train_steps 1; then
    echo "FAILED: a misspelt network arg was accepted"; exit 1
  fi
  grep -q "unknown SaRA network arg 'densty'; valid keys are" "$WORK/logs/typo.log" && echo "typo rejected with the valid keys" || exit 1
) || FAILED="$FAILED typo"; fi

if has sdxl; then (
  # (set -e does not act inside a `( ... ) || ...` list: each step exits by itself)
  rm -rf "$WORK/out_sdxl" || exit 1
  train sdxl_train_network.py sdxl bf16 --pretrained_model_name_or_path "$WORK/sdxl" --output_dir "$WORK/out_sdxl" \
    --output_name saraxl --network_args "density=0.01" "progressive_iter=1" --network_train_unet_only \
    --cache_text_encoder_outputs --max_train_steps 1 --gradient_checkpointing --save_model_as safetensors || exit 1
  check "$WORK/out_sdxl/saraxl.safetensors" components=unet || exit 1
) || FAILED="$FAILED sdxl"; fi
if [ -n "$FAILED" ]; then log "FAILED stages:$FAILED"; exit 1; fi
log "all stages passed: $STAGES"
