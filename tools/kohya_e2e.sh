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
# Runs on the CPU (accelerate --cpu) with random-init models built locally: no hub access.
# Stages (env STAGES, default "install assets sd1 resume variants te_only typo"); results and what
# failed and why: docs/kohya-e2e.md.
#   install   venv + packages          assets  tokenizers, random models for the chosen stages, dataset
#   sd1       train_network.py, fp32, AdamW8bit, grad accumulation + checkpointing, step saves + states
#   resume    --resume from the step-3 state, one more step (--skip_until_initial_step, and accumulation 1:
#             kohya 48d368fa multiplies the skipped steps by the accumulation but divides by optimizer
#             steps per epoch, so with accumulation 2 it skips every epoch and trains nothing)
#   variants  --network_weights + --dim_from_weights + --base_weights, bf16, --save_precision fp16,
#             --save_model_as ckpt, --scale_weight_norms, --network_train_unet_only
#   te_only   --network_train_text_encoder_only with --network_weights, --save_precision bf16
#   typo      a misspelt --network_args key must fail with SaRA's list of valid keys
#   sdxl      sdxl_train_network.py on a full-size random SDXL U-Net (kohya hard-codes the 2.57B
#             architecture), --full_bf16 (loads it in bf16: ~8 GB RAM), 2 steps, states
#   sdxl_fp8  --fp8_base with --network_weights     sdxl_resume  --resume from the step-1 state
#   flux      flux_train_network.py on kohya's Flux (dev width, 1 double + 1 single block), full-size
#             CLIP-L and T5-XXL (fp8 file): bf16, 2 steps, states; T5-XXL must get no modules
#   flux_resume, flux_fp8 (--fp8_base_unet + --network_weights), flux_fp8_base (--fp8_base),
#   flux_swap (--blocks_to_swap 1 on a 2 double + 4 single block model), flux_t5 (train_t5xxl=true),
#   flux_fp8_base_cached (--fp8_base, DiT only, on text-encoder outputs cached to disk by a bf16 run)
#   sd3       sd3_train_network.py on kohya's MMDiT (SD3.5-medium layout, depth 2), CLIP-L/G, T5-XXL
#   sd3_resume, sd3_fp8 (--fp8_base_unet + --network_weights), sd3_t5 (train_t5xxl=true)
#   (FLUX --split_mode is deprecated in this sd-scripts: it only sets --blocks_to_swap 18; no stage.)
#   ratio     the README's threshold=2e-3 against kohya's LoRA dim 16 on the sd1 model: per-step time
#   The FLUX/SD3 stages need ~12 GB RAM (T5-XXL in bf16), the SDXL ones ~8 GB; run one at a time.
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
echo "sd-scripts commit: $(git -C "$SD" rev-parse --short HEAD 2>/dev/null || cat "$SD/COMMIT.txt" 2>/dev/null || echo unknown)"

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
    # Built on the meta device and filled in fp16 (normal(0, 1/sqrt(fan_in)) weights, zero biases,
    # unit norms): 5 GB of RAM instead of a 10 GB fp32 model.
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    unet = unet.to_empty(device="cpu").to(torch.float16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
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
    parser.add_argument("--sd1", action="store_true")
    parser.add_argument("--sdxl", action="store_true")
    args = parser.parse_args()
    files = os.path.join(args.out, "bpe")
    build_tokenizer_files(args.open_clip_wheel, files)
    cache = os.path.join(args.out, "tokenizers")  # kohya --tokenizer_cache_dir layout: model id with '/' -> '_'
    clip_tokenizer(files, "<|endoftext|>").save_pretrained(os.path.join(cache, "openai_clip-vit-large-patch14"))
    clip_tokenizer(files, "!").save_pretrained(os.path.join(cache, "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"))
    build_dataset(os.path.join(args.out, "data"))
    if args.sd1 and not os.path.exists(os.path.join(args.out, "sd1", "model_index.json")):
        build_sd1(os.path.join(args.out, "sd1"), files)
    if args.sdxl and not os.path.exists(os.path.join(args.out, "sdxl", "model_index.json")):
        build_sdxl(os.path.join(args.out, "sdxl"), files)


if __name__ == "__main__":
    main()
PYEOF
cat > "$WORK/build_dit_assets.py" <<'PYEOF'
"""Random-init FLUX.1 / SD3.5 checkpoints built from kohya's own model classes, plus a T5 tokenizer.

Every model is built on the meta device by sd-scripts' loaders/classes (so keys and shapes are the
ones its trainers load) and written tensor by tensor, never held in memory as a whole: T5-XXL alone
is 4.76B parameters. kohya hard-codes the widths (FLUX 3072, CLIP-L/G, T5-XXL, the VAEs); only the
depth of the FLUX and SD3 transformers comes from the checkpoint, so those two are made shallow.
"""
import argparse
import json
import math
import os
import sys

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}


def init_value(key, shape, generator):
    """bias -> 0, 1-D weight/scale (norms) -> 1, the rest normal(0, 1/sqrt(fan_in))."""
    if len(shape) <= 1:
        return torch.zeros(shape) if key.endswith("bias") else torch.ones(shape)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def write_random(path, shapes, dtype, seed):
    """A safetensors file of random tensors with `shapes` ({key: shape}), written one tensor at a time."""
    generator = torch.Generator().manual_seed(seed)
    element = torch.tensor([], dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * element
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path + ".part", "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape in shapes.items():
            f.write(init_value(key, shape, generator).to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(path + ".part", path)
    print(f"wrote {path}: {len(shapes)} tensors, {offset / 2**30:.2f} GiB", flush=True)


def shapes_of(module, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def t5_tokenizer(out):
    """A T5TokenizerFast with a small unigram vocabulary (ids < T5-XXL's 32128): captions tokenize offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a photo of sks thing number 0 1 2 3 4 5 6 7 8 9".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    pieces += [(chr(c), -5.0) for c in range(33, 127)] + [("\u2581", -3.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(out)


def build_flux(out, args):
    from dataclasses import replace

    from library import flux_models, flux_utils

    params = replace(flux_models.configs["dev"].params, depth=args.flux_double, depth_single_blocks=args.flux_single)
    with torch.device("meta"):
        flux = flux_models.Flux(params)
        ae = flux_models.AutoEncoder(flux_models.configs["dev"].ae_params)
    write_random(os.path.join(out, "flux.safetensors"), shapes_of(flux), torch.bfloat16, 1)
    write_random(os.path.join(out, "ae.safetensors"), shapes_of(ae), torch.bfloat16, 2)
    clip_l = flux_utils.load_clip_l(None, torch.bfloat16, "cpu", state_dict={})  # meta: kohya's CLIP-L config
    write_random(os.path.join(out, "clip_l.safetensors"), shapes_of(clip_l), torch.bfloat16, 3)


def build_flux_swap(out):
    """kohya's block swap needs >= 2 double and >= 4 single blocks to swap one block."""
    from dataclasses import replace

    from library import flux_models

    params = replace(flux_models.configs["dev"].params, depth=2, depth_single_blocks=4)
    with torch.device("meta"):
        flux = flux_models.Flux(params)
    write_random(os.path.join(out, "flux_swap.safetensors"), shapes_of(flux), torch.bfloat16, 8)


def build_t5(out):
    from library import flux_utils

    t5 = flux_utils.load_t5xxl(None, None, "cpu", state_dict={})  # meta: kohya's T5-XXL config
    write_random(os.path.join(out, "t5xxl_fp8.safetensors"), shapes_of(t5), torch.float8_e4m3fn, 4)


def build_sd3(out, args):
    from library import sd3_models, sd3_utils

    hidden = 64 * args.sd3_depth
    params = sd3_models.SD3Params(patch_size=2, depth=args.sd3_depth, num_patches=32 * 32, pos_embed_max_size=32,
                                  adm_in_channels=2048, qk_norm="rms", x_block_self_attn_layers=[0],
                                  context_embedder_in_features=4096, context_embedder_out_features=hidden,
                                  model_type="5-medium")  # SD3.5-medium layout (MMDiT-X), shallow
    with torch.device("meta"):
        mmdit = sd3_models.create_sd3_mmdit(params)
    vae = sd3_models.SDVAE(torch.float32, "meta")
    shapes = {**shapes_of(mmdit, "model.diffusion_model."), **shapes_of(vae, "first_stage_model.")}
    write_random(os.path.join(out, "sd35.safetensors"), shapes, torch.bfloat16, 5)
    key = "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight"
    clip_g = sd3_utils.load_clip_g(None, torch.bfloat16, "cpu", state_dict={key: torch.zeros(1)})  # meta
    write_random(os.path.join(out, "clip_g.safetensors"), shapes_of(clip_g), torch.bfloat16, 6)
    clip_l_key = "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"
    clip_l = sd3_utils.load_clip_l(None, torch.bfloat16, "cpu", state_dict={clip_l_key: torch.zeros(1)})
    write_random(os.path.join(out, "clip_l_sd3.safetensors"), shapes_of(clip_l), torch.bfloat16, 7)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sd_scripts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="flux,sd3")
    parser.add_argument("--flux_double", type=int, default=1)
    parser.add_argument("--flux_single", type=int, default=1)
    parser.add_argument("--sd3_depth", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, args.sd_scripts)
    out = os.path.join(args.out, "dit")
    os.makedirs(out, exist_ok=True)
    tokenizer_dir = os.path.join(args.out, "tokenizers", "google_t5-v1_1-xxl")
    if not os.path.exists(tokenizer_dir):
        t5_tokenizer(tokenizer_dir)
    models = args.models.split(",")
    if "flux" in models and not os.path.exists(os.path.join(out, "clip_l.safetensors")):
        build_flux(out, args)
    if "flux_swap" in models and not os.path.exists(os.path.join(out, "flux_swap.safetensors")):
        build_flux_swap(out)
    if any(m in models for m in ("flux", "flux_swap", "sd3")) and not os.path.exists(os.path.join(out, "t5xxl_fp8.safetensors")):
        build_t5(out)
    if "sd3" in models and not os.path.exists(os.path.join(out, "clip_l_sd3.safetensors")):
        build_sd3(out, args)


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
from sara_network.naming import component_of

path = sys.argv[1]
expect = dict(arg.split("=", 1) for arg in sys.argv[2:])  # e.g. dtype=torch.float16 components=unet
deltas, metadata = load_native(path)
total = sum(d.indices.numel() for d in deltas)
frozen = sum(int(d.frozen.sum()) for d in deltas if d.frozen is not None)
nonzero = sum(int((d.values != 0).sum()) for d in deltas)
components = sorted({component_of(d.name) for d in deltas})
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
per_component = {}
for d in deltas:
    count = per_component.setdefault(component_of(d.name), [0, 0, 0])
    count[0] += 1
    count[1] += d.indices.numel()
    count[2] += int((d.values != 0).sum())
print("per component (modules, deltas, non-zero):", {k: tuple(v) for k, v in sorted(per_component.items())})
for component in expect.get("trained", "").split(","):  # trained=lora_te3: that component's deltas moved
    if component and per_component.get(component, [0, 0, 0])[2] == 0:
        problems.append(f"no non-zero delta in {component}: it was not trained")
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
  SD1_STAGES=0; for stage in sd1 resume variants te_only typo ratio; do has $stage && SD1_STAGES=1; done
  "$PY" "$WORK/build_assets.py" --open_clip_wheel "$(ls "$WORK"/dl/open_clip_torch-*.whl | head -1)" --out "$WORK" \
    $([ $SD1_STAGES = 1 ] && echo --sd1) $(has sdxl && echo --sdxl)
  DIT_MODELS=""; for stage in $STAGES; do case $stage in flux_swap) DIT_MODELS="$DIT_MODELS,flux,flux_swap";;
    flux*) DIT_MODELS="$DIT_MODELS,flux";; sd3*) DIT_MODELS="$DIT_MODELS,sd3";; esac; done
  if [ -n "$DIT_MODELS" ]; then
    (cd "$SD" && "$PY" "$WORK/build_dit_assets.py" --sd_scripts "$SD" --out "$WORK" --models "${DIT_MODELS#,}") \
      > "$WORK/dit_assets.log" 2>&1 || { echo "FAILED: DiT assets"; tail -20 "$WORK/dit_assets.log"; exit 1; }
    grep "^wrote" "$WORK/dit_assets.log" || true
  fi
fi

COMMON=(--tokenizer_cache_dir "$WORK/tokenizers" --train_data_dir "$WORK/data" --caption_extension .txt
        --resolution 64 --train_batch_size 1 --seed 42 --network_module sara_network
        --learning_rate 1e-4 --optimizer_type AdamW8bit --max_data_loader_n_workers 0)
SARA_ARGS=(--network_args "density=0.05" "lambda_rank=5e-3" "progressive_iter=0.5")
train() {  # train SCRIPT LOGNAME MIXED_PRECISION ARGS...
  local script=$1 name=$2 mp=$3; shift 3
  log "$script $name (mixed_precision=$mp) -> $WORK/logs/$name.log"
  mkdir -p "$WORK/logs"
  (cd "$SD" && "$VENV/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --num_cpu_threads_per_process "${OMP_NUM_THREADS:-$(nproc)}" \
      --mixed_precision "$mp" --dynamo_backend no "$script" --mixed_precision "$mp" "${COMMON[@]}" "$@") \
      > "$WORK/logs/$name.log" 2>&1 || { [ -n "${EXPECT_FAILURE:-}" ] && return 1
                                          echo "FAILED: $name (tail of $WORK/logs/$name.log)"; tail -40 "$WORK/logs/$name.log"; return 1; }
}
check() { "$PY" "$WORK/check_file.py" "$@"; }
has_module() {  # has_module LOG TEXT: the trainer's log shows TEXT
  grep -q "$2" "$1" && echo "log shows: $2" || { echo "FAILED: $1 lacks '$2'"; return 1; }
}
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
  # real-size SDXL U-Net (2.57B). --full_bf16 makes kohya load it in bf16 (5 GB instead of 10 GB fp32
  # plus a conversion copy) and keeps the deltas in bf16 too; text encoders cached, U-Net only
  rm -rf "$WORK/out_sdxl" || exit 1
  train sdxl_train_network.py sdxl bf16 --pretrained_model_name_or_path "$WORK/sdxl" --output_dir "$WORK/out_sdxl" \
    --output_name saraxl --network_args "density=0.01" "progressive_iter=2" --network_train_unet_only \
    --cache_text_encoder_outputs --full_bf16 --max_train_steps 2 --save_every_n_steps 1 --save_state \
    --gradient_checkpointing --save_model_as safetensors || exit 1
  check "$WORK/out_sdxl/saraxl.safetensors" components=unet steps=2 || exit 1
) || FAILED="$FAILED sdxl"; fi
if has sdxl_fp8; then (
  # --fp8_base from the first run's entries (--network_weights); --full_bf16 again for the RAM
  train sdxl_train_network.py sdxl_fp8 bf16 --pretrained_model_name_or_path "$WORK/sdxl" --output_dir "$WORK/out_sdxl" \
    --output_name fp8 --network_weights "$WORK/out_sdxl/saraxl.safetensors" --network_train_unet_only \
    --cache_text_encoder_outputs --full_bf16 --fp8_base --max_train_steps 1 --gradient_checkpointing --save_model_as safetensors || exit 1
  check "$WORK/out_sdxl/fp8.safetensors" components=unet || exit 1
) || FAILED="$FAILED sdxl_fp8"; fi
if has sdxl_resume; then (
  rm -rf "$WORK/out_sdxl_resume" || exit 1
  train sdxl_train_network.py sdxl_resume bf16 --pretrained_model_name_or_path "$WORK/sdxl" \
    --output_dir "$WORK/out_sdxl_resume" --output_name resumed --network_args "density=0.01" "progressive_iter=2" \
    --network_train_unet_only --cache_text_encoder_outputs --full_bf16 --resume "$WORK/out_sdxl/saraxl-step00000001-state" \
    --skip_until_initial_step --max_train_steps 2 --gradient_checkpointing --save_model_as safetensors || exit 1
  has_module "$WORK/logs/sdxl_resume.log" "load train state from" || exit 1
  check "$WORK/out_sdxl_resume/resumed.safetensors" components=unet steps=2 || exit 1
) || FAILED="$FAILED sdxl_resume"; fi
# --- FLUX.1 (flux_train_network.py): kohya's Flux class at the dev width, 1 double + 1 single block ---
DIT="$WORK/dit"
FLUX=(--pretrained_model_name_or_path "$DIT/flux.safetensors" --clip_l "$DIT/clip_l.safetensors"
      --t5xxl "$DIT/t5xxl_fp8.safetensors" --ae "$DIT/ae.safetensors" --t5xxl_max_token_length 16
      --guidance_scale 1.0 --timestep_sampling sigmoid --model_prediction_type raw --save_model_as safetensors)
DIT_ARGS=(--network_args "density=0.02" "lambda_rank=5e-3" "progressive_iter=2")
if has flux; then (
  rm -rf "$WORK/out_flux" || exit 1
  # bf16, CLIP-L trained with the DiT (the trainer's default), T5-XXL not (train_t5xxl defaults to false)
  train flux_train_network.py flux bf16 "${FLUX[@]}" --output_dir "$WORK/out_flux" --output_name saraflux "${DIT_ARGS[@]}" \
    --max_train_steps 2 --save_every_n_steps 1 --save_state --gradient_checkpointing || exit 1
  check "$WORK/out_flux/saraflux-step00000001.safetensors" steps=1 components=lora_te1,unet || exit 1
  check "$WORK/out_flux/saraflux.safetensors" steps=2 components=lora_te1,unet || exit 1
  has_module "$WORK/logs/flux.log" "SaRA progressive step at optimizer step 2" || exit 1
) || FAILED="$FAILED flux"; fi
if has flux_resume; then (
  rm -rf "$WORK/out_flux_resume" || exit 1
  train flux_train_network.py flux_resume bf16 "${FLUX[@]}" --output_dir "$WORK/out_flux_resume" --output_name resumed \
    "${DIT_ARGS[@]}" --resume "$WORK/out_flux/saraflux-step00000001-state" --skip_until_initial_step \
    --max_train_steps 2 --gradient_checkpointing || exit 1
  has_module "$WORK/logs/flux_resume.log" "load train state from" || exit 1
  check "$WORK/out_flux_resume/resumed.safetensors" steps=2 components=lora_te1,unet || exit 1
) || FAILED="$FAILED flux_resume"; fi
if has flux_fp8; then (
  # fp8 DiT (--fp8_base_unet: the text encoders stay bf16) from the previous file's entries
  train flux_train_network.py flux_fp8 bf16 "${FLUX[@]}" --output_dir "$WORK/out_flux" --output_name fp8unet \
    "${DIT_ARGS[@]}" --network_weights "$WORK/out_flux/saraflux.safetensors" --fp8_base_unet \
    --network_train_unet_only --cache_text_encoder_outputs --max_train_steps 1 --gradient_checkpointing || exit 1
  has_module "$WORK/logs/flux_fp8.log" "Loaded fp8 FLUX model\|Cast FLUX model to fp8" || exit 1
  check "$WORK/out_flux/fp8unet.safetensors" components=unet || exit 1
) || FAILED="$FAILED flux_fp8"; fi
if has flux_fp8_base_cached; then (
  # --fp8_base past kohya's CPU failure in T5-XXL's fp8 forward: a bf16 run first caches the text
  # encoders' outputs to disk (in a copy of the dataset), so that the --fp8_base run finds them and
  # never runs the text encoders; DiT only (the cached outputs fix the text side)
  rm -rf "$WORK/data_te_cache" && cp -r "$WORK/data" "$WORK/data_te_cache" || exit 1
  CACHED=(--train_data_dir "$WORK/data_te_cache" --network_train_unet_only --cache_text_encoder_outputs
          --cache_text_encoder_outputs_to_disk)
  train flux_train_network.py flux_te_cache bf16 "${FLUX[@]}" "${CACHED[@]}" --output_dir "$WORK/out_flux" \
    --output_name cachebase "${DIT_ARGS[@]}" --max_train_steps 1 || exit 1
  ls "$WORK"/data_te_cache/*/*.npz >/dev/null || { echo "FAILED: no text-encoder cache was written"; exit 1; }
  train flux_train_network.py flux_fp8_base_cached bf16 "${FLUX[@]}" "${CACHED[@]}" --output_dir "$WORK/out_flux" \
    --output_name fp8base "${DIT_ARGS[@]}" --fp8_base --max_train_steps 1 || exit 1
  check "$WORK/out_flux/fp8base.safetensors" components=unet || exit 1
) || FAILED="$FAILED flux_fp8_base_cached"; fi
if has flux_fp8_base; then (
  # --fp8_base: the DiT and, on kohya's terms, the text encoders in fp8 (T5-XXL file is fp8: loaded as is)
  train flux_train_network.py flux_fp8_base bf16 "${FLUX[@]}" --output_dir "$WORK/out_flux" --output_name fp8base \
    "${DIT_ARGS[@]}" --fp8_base --max_train_steps 1 || exit 1
  check "$WORK/out_flux/fp8base.safetensors" components=lora_te1,unet || exit 1
) || FAILED="$FAILED flux_fp8_base"; fi
if has flux_swap; then (
  # --blocks_to_swap: kohya swaps whole blocks' weights (SaRA's patched layers live inside them); it
  # needs >= 2 double and >= 4 single blocks for one swapped block, so a deeper model is built
  train flux_train_network.py flux_swap bf16 "${FLUX[@]}" --pretrained_model_name_or_path "$DIT/flux_swap.safetensors" \
    --output_dir "$WORK/out_flux" --output_name swap "${DIT_ARGS[@]}" --blocks_to_swap 1 --network_train_unet_only \
    --cache_text_encoder_outputs --max_train_steps 1 || exit 1
  has_module "$WORK/logs/flux_swap.log" "enable block swap: blocks_to_swap=1" || exit 1
  check "$WORK/out_flux/swap.safetensors" components=unet || exit 1
) || FAILED="$FAILED flux_swap"; fi
if has flux_t5; then (
  # train_t5xxl=true: T5-XXL (lora_te3) is selected and trained as well
  train flux_train_network.py flux_t5 bf16 "${FLUX[@]}" --output_dir "$WORK/out_flux" --output_name t5 \
    --network_args "density=0.001" "progressive_iter=off" "train_t5xxl=true" --max_train_steps 1 || exit 1
  check "$WORK/out_flux/t5.safetensors" components=lora_te1,lora_te3,unet trained=lora_te1,lora_te3,unet || exit 1
) || FAILED="$FAILED flux_t5"; fi

# --- SD3.5 (sd3_train_network.py): kohya's MMDiT, SD3.5-medium layout (qk RMSNorm, MMDiT-X), depth 2 ---
SD3=(--pretrained_model_name_or_path "$DIT/sd35.safetensors" --clip_l "$DIT/clip_l_sd3.safetensors"
     --clip_g "$DIT/clip_g.safetensors" --t5xxl "$DIT/t5xxl_fp8.safetensors" --t5xxl_max_token_length 16
     --save_model_as safetensors)
if has sd3; then (
  rm -rf "$WORK/out_sd3" || exit 1
  # CLIP-L and CLIP-G trained with the MMDiT (the trainer's default), T5-XXL not
  train sd3_train_network.py sd3 bf16 "${SD3[@]}" --output_dir "$WORK/out_sd3" --output_name sara3 "${DIT_ARGS[@]}" \
    --max_train_steps 2 --save_every_n_steps 1 --save_state --gradient_checkpointing || exit 1
  check "$WORK/out_sd3/sara3.safetensors" steps=2 components=lora_te1,lora_te2,unet || exit 1
) || FAILED="$FAILED sd3"; fi
if has sd3_resume; then (
  rm -rf "$WORK/out_sd3_resume" || exit 1
  train sd3_train_network.py sd3_resume bf16 "${SD3[@]}" --output_dir "$WORK/out_sd3_resume" --output_name resumed \
    "${DIT_ARGS[@]}" --resume "$WORK/out_sd3/sara3-step00000001-state" --skip_until_initial_step --max_train_steps 2 || exit 1
  has_module "$WORK/logs/sd3_resume.log" "load train state from" || exit 1
  check "$WORK/out_sd3_resume/resumed.safetensors" steps=2 components=lora_te1,lora_te2,unet || exit 1
) || FAILED="$FAILED sd3_resume"; fi
if has sd3_t5; then (
  # train_t5xxl=true for SD3 (kohya's lora_sd3 has the same network arg): T5-XXL trained with CLIP-L/G.
  # The fp8 T5 file holds ~5% exact zeros, which one global magnitude threshold takes first: the 0.1%
  # budget goes to T5 zeros and the random CLIPs' few exact zeros; the 2M-parameter MMDiT has none
  # and gets no module (the sd3 stage trains it), so unet is not required here.
  rm -f "$WORK/out_sd3/t5.safetensors" || exit 1
  train sd3_train_network.py sd3_t5 bf16 "${SD3[@]}" --output_dir "$WORK/out_sd3" --output_name t5 \
    --network_args "density=0.001" "progressive_iter=off" "train_t5xxl=true" --max_train_steps 1 || exit 1
  check "$WORK/out_sd3/t5.safetensors" components=lora_te1,lora_te2,lora_te3 trained=lora_te1,lora_te2,lora_te3 || exit 1
) || FAILED="$FAILED sd3_t5"; fi
if has sd3_fp8; then (
  train sd3_train_network.py sd3_fp8 bf16 "${SD3[@]}" --output_dir "$WORK/out_sd3" --output_name fp8 "${DIT_ARGS[@]}" \
    --network_weights "$WORK/out_sd3/sara3.safetensors" --fp8_base_unet --network_train_unet_only \
    --cache_text_encoder_outputs --max_train_steps 1 --gradient_checkpointing || exit 1
  check "$WORK/out_sd3/fp8.safetensors" components=unet || exit 1
) || FAILED="$FAILED sd3_fp8"; fi
if has ratio; then (
  # The step time a new user meets: the README's threshold=2e-3 against kohya's own LoRA (dim 16), same
  # model, data, optimizer and precision, one after the other; RATIO_STEPS steps each (default 4) at
  # RATIO_RESOLUTION px (default 512, the size SD1.5 is trained at; the overhead is per weight, so a
  # smaller image shows a larger ratio).
  # Per-step wall time from the trainer's progress bar, step 1 to the last (setup and selection excluded).
  rm -rf "$WORK/out_ratio" || exit 1
  RES=${RATIO_RESOLUTION:-512}
  "$PY" - "$WORK/data" "$WORK/data_$RES" "$RES" <<'PYEOF' || exit 1
import os, shutil, sys
from PIL import Image
source, target, size = sys.argv[1], sys.argv[2], int(sys.argv[3])  # the dataset's images scaled to the size
for folder, _, files in os.walk(source):
    out = os.path.join(target, os.path.relpath(folder, source))
    os.makedirs(out, exist_ok=True)
    for name in files:
        if name.endswith(".png"):
            Image.open(os.path.join(folder, name)).convert("RGB").resize((size, size)).save(os.path.join(out, name))
        else:
            shutil.copy(os.path.join(folder, name), out)
PYEOF
  train train_network.py ratio_sara no "${SD1[@]}" --output_dir "$WORK/out_ratio" --output_name sara \
    --network_args "threshold=2e-3" --max_train_steps "${RATIO_STEPS:-4}" --resolution "$RES" \
    --train_data_dir "$WORK/data_$RES" || exit 1
  train train_network.py ratio_lora no "${SD1[@]}" --output_dir "$WORK/out_ratio" --output_name lora \
    --network_module networks.lora --network_dim 16 --network_alpha 16 --max_train_steps "${RATIO_STEPS:-4}" \
    --resolution "$RES" --train_data_dir "$WORK/data_$RES" || exit 1
  "$PY" - "$WORK/logs/ratio_sara.log" "$WORK/logs/ratio_lora.log" <<'PYEOF' || exit 1
import re, sys

def seconds(text):
    parts = [int(p) for p in text.split(":")]
    return sum(value * 60 ** i for i, value in enumerate(reversed(parts)))

def step_seconds(path):
    log = open(path, errors="replace").read()
    points = {}
    for done, elapsed in re.findall(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/\d+ \[([\d:]+)<", log):
        if int(done) >= 1:  # from the end of step 1: loading, selection and the first step's warm-up excluded
            points.setdefault(int(done), seconds(elapsed))
    first, last = min(points, default=0), max(points, default=0)
    if not 1 <= first < last:
        sys.exit(f"{path}: too few steps in the progress bar to time ({sorted(points)})")
    return (points[last] - points[first]) / (last - first), last - first

sara, sara_n = step_seconds(sys.argv[1])
lora, lora_n = step_seconds(sys.argv[2])
selected = re.findall(r"total: ([\d,]+) trainable", open(sys.argv[1], errors="replace").read())
print(f"SaRA threshold=2e-3 ({selected[-1] if selected else '?'} entries): {sara:.1f} s/step over {sara_n} steps; "
      f"LoRA dim 16: {lora:.1f} s/step over {lora_n} steps; SaRA / LoRA = {sara / lora:.2f}x")
PYEOF
) || FAILED="$FAILED ratio"; fi
if [ -n "$FAILED" ]; then log "FAILED stages:$FAILED"; exit 1; fi
log "all stages passed: $STAGES"
