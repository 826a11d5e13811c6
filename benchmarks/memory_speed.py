"""Training memory and step time on the SD1.5 U-Net architecture: SaRA vs LoRA, LyCORIS, SHiRA, full FT.

Every configuration runs in its own fresh Python process (this script with --worker), so the peak
resident set size (VmHWM, reset after the model is built) belongs to that configuration alone.
Configurations are interleaved across repeats so slow drift of a shared machine hits all methods.

    python benchmarks/memory_speed.py                      # the priority plan (see --plan)
    python benchmarks/memory_speed.py --plan wide          # adds LyCORIS, SHiRA, torch AdamW, batch 2/4
    python benchmarks/memory_speed.py --smoke --out /tmp/x # tiny model, seconds

Results are merged into <out>/memory_speed.json (one record per process run) and the tables in
<out>/memory_speed.md and the plot memory_speed.png are rebuilt from all records.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SD15 = dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8)
TINY = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
SDXL = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
ARCHS = {"sd15": SD15, "sdxl": SDXL, "tiny": TINY}
TITLES = {"sd15": "SD1.5 U-Net architecture", "sdxl": "SDXL U-Net architecture", "tiny": "smoke"}
BUDGETS = {"sd15": (5_000_000, 20_000_000), "sdxl": (5_000_000, 20_000_000), "tiny": (5_000,)}
RESULT_TAG = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------
# worker: one configuration in this process
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def build_unet(arch: str, device: str = "cpu"):
    """The architecture with a fast random init (meta build, then normal(0, 1/sqrt(fan_in)))."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[arch])
    unet = unet.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return unet


def _target_names(unet) -> tuple[list[str], list[str]]:
    from sara_network.network import collect_targets
    import torch

    targets = collect_targets(unet, [], [], "full")
    all_names = [t.path for t in targets]
    linear = [t.path for t in targets if isinstance(t.module, torch.nn.Linear)]
    return all_names, linear


def setup_method(unet, cfg: dict) -> tuple[list, dict]:
    """Make `unet` trainable the way `cfg['method']` does; return (trainable params, info)."""
    method, budget = cfg["method"], cfg.get("budget")
    info: dict = {}
    unet.requires_grad_(False)
    if method in ("frozen",):
        return [], info
    if method == "full":
        unet.requires_grad_(True)
        return [p for p in unet.parameters()], info
    if method in ("sara", "sara_x", "sara_norank"):
        from sara_network.network import SaraNetwork, collect_targets
        from sara_network.options import SaraConfig

        started = time.perf_counter()
        # The paper's nuclear-norm term (one SVD of one random eligible 2-D layer per step); sara_norank: off.
        lambda_rank = 0.0 if method == "sara_norank" else 5e-3
        network = SaraNetwork(SaraConfig(budget=budget, lambda_rank=lambda_rank, progressive_iter=None))
        network.select(collect_targets(unet, [], [], "full"))
        network.patch()
        network.attach_optimizer_hooks()
        info["select_s"] = time.perf_counter() - started
        info["network"] = network  # kept alive by the caller
        params = network.trainable_parameters()
        if method == "sara_x":
            for p in params:
                p.requires_grad_(False)
            return [], info
        return params, info
    names, linear = _target_names(unet)
    if method in ("lora", "shira"):
        from peft import LoraConfig, ShiraConfig, inject_adapter_in_model

        if method == "lora":
            rank = max(1, round(budget / common.per_rank_count(unet, names)))
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), unet)
        else:
            rank = max(1, round(budget / common.per_rank_count(unet, linear)))
            inject_adapter_in_model(ShiraConfig(r=rank, target_modules=linear, random_seed=0), unet)
        info["rank"] = rank
        marker = "lora_" if method == "lora" else "shira_"
        return [p for n, p in unet.named_parameters() if marker in n and p.requires_grad], info
    if method in ("locon", "lokr", "lyco_full"):
        net, lyco_info = common.lycoris_adapter(unet, method, budget, names)
        info.update(lyco_info, network=net)
        return [p for p in net.parameters() if p.requires_grad], info
    raise ValueError(f"unknown method {method}")


def make_optimizer(params, name: str):
    import torch

    if not params or name == "none":
        return None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=0.01, is_paged=False)
    raise ValueError(name)


class CudaMeter:
    """Peak from torch.cuda.max_memory_allocated (reset after setup), step times from CUDA events."""

    def __init__(self):
        import torch

        self.torch = torch
        self.model_bytes = torch.cuda.memory_allocated()

    def reset(self):
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()

    def step_timer(self):
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return stop

    def peak_gib(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**30


def _cpu_step_timer():
    started = time.perf_counter()
    return lambda: time.perf_counter() - started


def configure_sampled_grad(setting: str) -> None:
    """--sampled_grad: 'auto' keeps sara_network's measured rule; 'on' allows the SDDMM for every
    dtype on every device (up to the density limit); 'off' always takes the dense GEMM."""
    import torch
    from sara_network import ops

    if setting == "on":
        for device in ("cpu", "cuda"):
            ops.SAMPLED_GRAD_DTYPES[device] = (torch.float32, torch.float16, torch.bfloat16)
    elif setting == "off":
        ops.SAMPLED_GRAD_DTYPES.clear()


def cast_weights_to_fp8(unet) -> None:
    """kohya --fp8_base as far as the CPU allows: every Linear / Conv2d weight (99.9% of the U-Net's
    parameters) stored in float8_e4m3fn, computed in bf16 by autocast. kohya casts the whole U-Net;
    on the CPU torch's group_norm refuses fp8 parameters ("mixed dtype (CPU): expect parameter to
    have scalar type of Float"), so norms and biases stay bf16 here."""
    import torch

    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)


def run_worker(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = cfg.get("device", "cpu")
    configure_sampled_grad(cfg.get("sampled_grad", "auto"))
    rss_start = _status_kib("VmRSS")
    started = time.perf_counter()
    unet = build_unet(cfg["arch"], device)
    # the compute (autocast) dtype; fp8 stores the base in float8_e4m3fn and computes in bf16
    weight_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                    "fp8": torch.bfloat16}[cfg.get("dtype", "fp32")]
    if weight_dtype != torch.float32:  # kohya / diffusers mixed precision: frozen base in half, autocast
        unet.to(weight_dtype)
    if cfg.get("dtype") == "fp8":
        cast_weights_to_fp8(unet)
    meter = CudaMeter() if device == "cuda" else None
    rss_model = _status_kib("VmRSS")
    params, info = setup_method(unet, cfg)
    for param in params:  # trainable parameters in fp32, as the hosts' mixed-precision scripts keep them
        param.data = param.data.float()
    network = info.pop("network", None)  # noqa: F841 - keeps hooks/patches alive
    optimizer = make_optimizer(params, cfg["optim"])
    if cfg["ckpt"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    setup_s = time.perf_counter() - started
    batch = cfg["batch"]
    generator = torch.Generator().manual_seed(1)
    channels, size = unet.config.in_channels, cfg["latent"]
    latents = torch.randn(batch, channels, size, size, generator=generator).to(device)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + size/crop ids
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=generator).to(device),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device)}
    inputs_need_grad = not params
    # Give freed heap back to the OS (selection / adapter construction leave freed-but-mapped pages,
    # which would otherwise count in the training peak of some methods and not others).
    trimmed = _malloc_trim()
    rss_setup = _status_kib("VmRSS")
    peak_reset = _reset_peak()
    if meter is not None:
        meter.reset()
    times = []
    for _ in range(cfg["warmup"] + cfg["steps"]):
        stop = meter.step_timer() if meter is not None else _cpu_step_timer()
        x = latents.clone().to(weight_dtype).requires_grad_(inputs_need_grad)
        with torch.autocast(device, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            pred = unet(x, timesteps, encoder_hidden_states=context.to(weight_dtype), **extra).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(stop())
    import resource

    timed = times[cfg["warmup"]:]
    peak_gib, model_gib = _status_kib("VmHWM") / 2**20, rss_model / 2**20
    if meter is not None:  # on a GPU the accelerator's memory is what counts; host RSS kept in info
        info.update(host_peak_rss_gib=peak_gib, cuda_device=torch.cuda.get_device_name())
        peak_gib, model_gib = meter.peak_gib(), meter.model_bytes / 2**30
    return dict(cfg, trainable=sum(p.numel() for p in params), rss_start_gib=rss_start / 2**20,
                rss_model_gib=model_gib, rss_setup_gib=rss_setup / 2**20,
                peak_train_gib=peak_gib, peak_reset=peak_reset, trimmed=trimmed,
                ru_maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                step_times=timed, median_step_s=statistics.median(timed), warmup_s=times[:cfg["warmup"]],
                setup_s=setup_s, info={k: v for k, v in info.items() if isinstance(v, (int, float, str))},
                loadavg=os.getloadavg())


def run_export_worker(cfg: dict) -> dict:
    """Time `sara to-lora` on a native file of a full SD1.5 SaRA network (random non-zero deltas)."""
    import tempfile

    import torch
    from sara_network.cli import main as sara_cli
    from sara_network.network import SaraNetwork, collect_targets
    from sara_network.options import SaraConfig

    torch.set_num_threads(cfg["threads"])
    unet = build_unet(cfg["arch"])
    network = SaraNetwork(SaraConfig(budget=cfg["budget"], progressive_iter=None))
    network.select(collect_targets(unet, [], [], "full"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        native, lora = os.path.join(tmp, "sara.safetensors"), os.path.join(tmp, "lora.safetensors")
        network.save(native, torch.float16)
        del unet, network
        size_native = os.path.getsize(native)
        t0 = time.perf_counter()
        status = sara_cli(["to-lora", native, lora, "--rank", str(cfg["rank"]), "--base-model", "sd_v1",
                           "--overwrite", "--show", "0"])
        elapsed = time.perf_counter() - t0
        size_lora = os.path.getsize(lora) if os.path.exists(lora) else 0
    return dict(cfg, status=status, export_s=elapsed, native_mib=size_native / 2**20, lora_mib=size_lora / 2**20,
                loadavg=os.getloadavg())


# ---------------------------------------------------------------------------------------------
# driver
def config(method, budget, optim, ckpt, batch, **extra) -> dict:
    return dict(kind="train", method=method, budget=budget, optim=optim, ckpt=ckpt, batch=batch, **extra)


def plan_configs(plan: str, arch: str, batches: list[int]) -> list[dict]:
    low, high = BUDGETS[arch][0], BUDGETS[arch][-1]
    budgets = sorted(set(BUDGETS[arch]))
    configs = []
    if plan in ("priority", "smoke"):
        ckpts = (False, True) if plan == "priority" else (False,)
        for ckpt in ckpts:
            for budget in budgets:
                configs += [config("sara", budget, "adamw8bit", ckpt, 1), config("lora", budget, "adamw8bit", ckpt, 1)]
            configs.append(config("full", None, "adamw8bit", ckpt, 1))
        configs += [config("frozen", None, "none", False, 1), config("sara_x", low, "none", False, 1),
                    config("sara", low, "none", False, 1), config("lora", low, "none", False, 1)]
        if plan == "smoke":
            configs += [config("locon", low, "adamw", False, 1), config("shira", low, "adamw", False, 1)]
    elif plan == "wide":
        for budget in budgets:
            configs += [config(m, budget, "adamw8bit", False, 1) for m in ("locon", "lokr", "shira")]
        configs.append(config("lyco_full", None, "adamw8bit", False, 1))
        for budget in budgets:
            configs += [config(m, budget, "adamw", False, 1) for m in ("sara_norank", "lora")]
        for batch in batches:
            if batch == 1:
                continue
            for ckpt in (False, True):
                configs += [config("sara_norank", low, "adamw8bit", ckpt, batch),
                            config("lora", low, "adamw8bit", ckpt, batch), config("full", None, "adamw8bit", ckpt, batch)]
    elif plan == "batch":
        for batch in batches:
            for ckpt in (False, True):
                configs += [config("sara", low, "adamw8bit", ckpt, batch), config("lora", low, "adamw8bit", ckpt, batch),
                            config("full", None, "adamw8bit", ckpt, batch)]
    elif plan == "core":  # the priority plan, ordered so the most important rows come first
        configs += [config("sara", low, "adamw8bit", False, 1), config("lora", low, "adamw8bit", False, 1),
                    config("sara_norank", low, "adamw8bit", False, 1), config("full", None, "adamw8bit", False, 1),
                    config("sara", low, "adamw8bit", True, 1), config("lora", low, "adamw8bit", True, 1),
                    config("sara_norank", low, "adamw8bit", True, 1), config("full", None, "adamw8bit", True, 1),
                    config("frozen", None, "none", False, 1), config("sara_x", low, "none", False, 1),
                    config("sara", low, "none", False, 1), config("lora", low, "none", False, 1)]
        for budget in budgets[1:]:
            for ckpt in (False, True):
                configs += [config("sara", budget, "adamw8bit", ckpt, 1), config("lora", budget, "adamw8bit", ckpt, 1),
                            config("sara_norank", budget, "adamw8bit", ckpt, 1)]
    elif plan == "norank":
        for ckpt in (False, True):
            for budget in budgets:
                configs += [config("sara_norank", budget, "adamw8bit", ckpt, 1), config("lora", budget, "adamw8bit", ckpt, 1)]
    elif plan == "norank_batch":  # SaRA without the rank term against LoRA at each budget and batch
        for batch in batches:
            for budget in budgets:
                configs += [config(m, budget, "adamw8bit", False, batch) for m in ("sara_norank", "lora")]
    elif plan == "sdxl":  # full FT does not fit (2.57B fp32 weights + grads + states > 23.5 GiB)
        for budget in budgets:
            configs += [config("sara", budget, "adamw8bit", False, 1), config("lora", budget, "adamw8bit", False, 1),
                        config("sara_norank", budget, "adamw8bit", False, 1)]
        configs += [config("frozen", None, "none", False, 1), config("sara", low, "none", False, 1),
                    config("lora", low, "none", False, 1)]
    elif plan == "gpu":  # benchmarks/gpu_plan.sh: every budget at batch 1 and 4, the peers beside
        for batch in batches:
            for budget in budgets:
                configs += [config(m, budget, "adamw8bit", False, batch) for m in ("sara", "sara_norank", "lora")]
            configs.append(config("full", None, "adamw8bit", False, batch))
        configs += [config("frozen", None, "none", False, 1), config("sara_norank", low, "none", False, 1),
                    config("lora", low, "none", False, 1)]
    elif plan == "fullfp32":
        configs += [config("full", None, "adamw", False, 1)]
    elif plan != "export":
        raise SystemExit(f"unknown plan {plan}")
    del high
    return configs


def key_of(r: dict) -> tuple:
    return (r["method"], r.get("budget"), r["optim"], bool(r["ckpt"]), r["batch"])


def same_setup(r: dict, device: str, dtype: str, sampled_grad: str) -> bool:
    """Records of one device / weight dtype / SDDMM setting (older records: CPU, fp32, auto)."""
    return (r.get("device", "cpu"), r.get("dtype", "fp32"), r.get("sampled_grad", "auto")) == (device, dtype, sampled_grad)


def run_subprocess(cfgs: list[dict], timeout: float) -> list[dict]:
    """Run `cfgs` in one fresh worker process (one config per process except in smoke mode)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfgs[0]["threads"]), PYTHONWARNINGS="ignore")
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfgs)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=str(common.REPO))
    except subprocess.TimeoutExpired:
        return [dict(cfg, error=f"timed out after {timeout:.0f} s") for cfg in cfgs]
    results = [json.loads(line[len(RESULT_TAG):]) for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    for result in results:
        result["wall_s"] = time.time() - started
    tail = (proc.stderr or proc.stdout)[-1500:]
    return results + [dict(cfg, error=f"exit {proc.returncode}: {tail}") for cfg in cfgs[len(results):]]


def _fmt_count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,d}"


def _label(r: dict) -> str:
    method = r["method"]
    extra = r.get("info", {})
    if "rank" in extra:
        method += f" r={extra['rank']}"
    if "lokr_factor" in extra:
        method += f" f={extra['lokr_factor']}"
    return method


def aggregate(records: list[dict]) -> dict:
    groups: dict = {}
    for r in records:
        if r.get("kind") != "train" or "error" in r or not r.get("trimmed"):
            continue  # records from before malloc_trim was added are not comparable
        groups.setdefault(key_of(r), []).append(r)
    out = {}
    for key, rs in groups.items():
        medians = [r["median_step_s"] for r in rs]
        out[key] = dict(rs[0], runs=len(rs), step_s=statistics.median(medians), step_min=min(medians),
                        step_max=max(medians), peak_gib=statistics.median(r["peak_train_gib"] for r in rs),
                        over_gib=statistics.median(r["peak_train_gib"] - r["rss_model_gib"] for r in rs),
                        timed_steps=sum(len(r["step_times"]) for r in rs))
    return out


def build_markdown(records: list[dict], title_cmd: str, smoke: bool, notes: list[str]) -> tuple[str, dict]:
    agg = aggregate(records)
    arch = next((r["arch"] for r in records if "arch" in r), "sd15")
    lines = [common.header(f"Training memory and step time ({TITLES[arch]})", title_cmd, smoke)]
    lines += notes
    rows = []
    order = {"sara": 0, "sara_norank": 0.5, "lora": 1, "locon": 2, "lokr": 3, "shira": 4, "lyco_full": 5, "full": 6}
    train_keys = sorted((k for k in agg if k[2] != "none"),
                        key=lambda k: (k[4], k[2], k[3], k[1] or 0, order.get(k[0], 9)))
    for key in train_keys:
        a = agg[key]
        ref_key = ("lora", key[1] if key[1] else min((b for (m, b, o, c, bt) in agg if m == "lora" and b), default=None),
                   key[2], key[3], key[4])
        ref = agg.get(ref_key)
        if ref is None:  # e.g. torch AdamW rows: compare with LoRA at the same budget, any optimizer match first
            ref = None
        rows.append([_label(a), _fmt_count(a.get("budget")), _fmt_count(a["trainable"]), a["optim"],
                     "on" if a["ckpt"] else "off", a["batch"], round(a["peak_gib"], 3), round(a["over_gib"], 3),
                     round(a["step_s"], 3), f"{a['step_min']:.3g}–{a['step_max']:.3g}", f"{a['runs']}×{len(a['step_times'])}",
                     None if ref is None else round(a["peak_gib"] / ref["peak_gib"], 3),
                     None if ref is None else round(a["over_gib"] / ref["over_gib"], 3),
                     None if ref is None else round(a["step_s"] / ref["step_s"], 3)])
    columns = ["method", "budget", "trainable", "optimizer", "grad ckpt", "batch", "peak RSS GiB",
               "peak above weights GiB", "median step s", "run medians", "processes×timed steps",
               "peak / LoRA", "above-weights / LoRA", "step time / LoRA"]
    lines += ["## Training step (forward + backward + optimizer step)", "",
              common.markdown_table(columns, rows), ""]
    lines += ["`peak RSS`: VmHWM of the worker process, reset after the model was built (so it covers adapter setup, "
              "optimizer state and the warmup and timed steps). `peak above weights`: that peak minus the RSS right "
              "after the fp32 model was built. Ratios are against PEFT LoRA with the same budget (full FT / LyCORIS "
              "full: against the smallest-budget LoRA), optimizer, checkpointing and batch.", ""]
    # overhead table
    over_rows = []
    frozen = next((a for k, a in agg.items() if k[0] == "frozen"), None)
    for key in sorted((k for k in agg if k[2] == "none"), key=lambda k: order.get(k[0], -1)):
        a = agg[key]
        desc = {"frozen": "frozen model, grad w.r.t. latents only",
                "sara_x": "SaRA layers patched, deltas frozen, grad w.r.t. latents only",
                "sara": "SaRA layers patched, grad w.r.t. deltas (no optimizer step)",
                "lora": "PEFT LoRA, grad w.r.t. LoRA factors (no optimizer step)"}.get(a["method"], a["method"])
        over_rows.append([_label(a), desc, _fmt_count(a.get("budget")), round(a["step_s"], 3),
                          f"{a['step_min']:.3g}–{a['step_max']:.3g}", round(a["over_gib"], 3),
                          None if frozen is None else round(a["step_s"] / frozen["step_s"], 3)])
    if over_rows:
        lines += ["## Per-step overhead of the sparse layers (forward + backward, batch 1, no checkpointing)", "",
                  common.markdown_table(["method", "what", "budget", "median fwd+bwd s", "run medians",
                                         "peak above weights GiB", "time / frozen"], over_rows), ""]
    exports = [r for r in records if r.get("kind") == "export" and "error" not in r]
    if exports:
        ex_rows = [[_fmt_count(r["budget"]), r["rank"], r["status"], round(r["export_s"], 1),
                    round(r["native_mib"], 1), round(r["lora_mib"], 1)] for r in exports]
        lines += ["## LoRA export of a full SD1.5 SaRA file (`sara to-lora --rank R --base-model sd_v1`)", "",
                  common.markdown_table(["budget", "rank", "exit status", "seconds", "native file MiB",
                                         "LoRA file MiB"], ex_rows), ""]
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["## Configurations that failed", ""]
        lines += [f"- {r.get('method', r.get('kind'))} budget={r.get('budget')} optim={r.get('optim')} "
                  f"ckpt={r.get('ckpt')} batch={r.get('batch')}: `{r['error'][-300:].strip()}`" for r in errors]
        lines.append("")
    return "\n".join(lines), {str(k): v for k, v in agg.items()}


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [a for a in agg.values() if a["optim"] != "none" and a["batch"] == 1 and a["optim"] == "adamw8bit"]
    if not rows:
        return
    rows.sort(key=lambda a: (a["ckpt"], a.get("budget") or 0, a["method"]))
    labels = [f"{_label(a)}\n{_fmt_count(a.get('budget'))}{' ckpt' if a['ckpt'] else ''}" for a in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(rows)), 4.5))
    colors = ["tab:red" if a["method"].startswith("sara") else "tab:blue" if a["method"] == "lora" else "tab:gray"
              for a in rows]
    axes[0].bar(range(len(rows)), [a["over_gib"] for a in rows], color=colors)
    axes[0].set_ylabel("peak RSS above the fp32 weights (GiB)")
    axes[1].bar(range(len(rows)), [a["step_s"] for a in rows], color=colors)
    axes[1].errorbar(range(len(rows)), [a["step_s"] for a in rows],
                     yerr=[[a["step_s"] - a["step_min"] for a in rows], [a["step_max"] - a["step_s"] for a in rows]],
                     fmt="none", ecolor="black")
    axes[1].set_ylabel("median step time (s)")
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.suptitle("SD1.5 U-Net, 8x8 latents, batch 1, AdamW8bit (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny U-Net, one process per config, seconds")
    parser.add_argument("--plan", default="priority", help="priority | core | wide | batch | norank | norank_batch | fullfp32 | export | sdxl | gpu")
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15",
                        help="U-Net architecture (results go to memory_speed.* or memory_speed_sdxl.*)")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT))
    parser.add_argument("--repeats", type=int, default=1, help="processes per configuration (interleaved)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full_steps", type=int, default=1,
                        help="timed steps for full FT / LyCORIS full (bnb AdamW8bit on CPU: ~0.15 s per 1M params)")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads spin and run far slower)")
    parser.add_argument("--latent", type=int, default=8, help="latent size (8 = 64x64 pixels)")
    parser.add_argument("--methods", default="", help="comma list: only these methods")
    parser.add_argument("--only_budget", type=float, default=None, help="keep only configs with this budget")
    parser.add_argument("--only_ckpt", choices=("on", "off"), default=None)
    parser.add_argument("--only_optim", default=None, help="keep only configs with this optimizer")
    parser.add_argument("--export", action="store_true", help="also time the LoRA export")
    parser.add_argument("--export_rank", type=int, default=16)
    parser.add_argument("--fresh", action="store_true", help="drop earlier records in the results file")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: peak from torch.cuda.max_memory_allocated, step time from CUDA events")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16", "fp8"), default="fp32",
                        help="frozen base weights in this dtype under autocast (trainable parameters stay fp32); "
                             "fp8: Linear/Conv2d weights in float8_e4m3fn, computed in bf16 (kohya --fp8_base)")
    parser.add_argument("--sampled_grad", choices=("auto", "on", "off"), default="auto",
                        help="SDDMM delta gradient: sara_network's rule, allowed everywhere, or never")
    parser.add_argument("--optim", default=None, help="replace AdamW8bit by this optimizer (adamw where bitsandbytes is missing)")
    parser.add_argument("--budgets", default=None, help="comma list overriding the arch's budgets, e.g. 5M,20M,50M")
    args = parser.parse_args(argv)
    if args.smoke:
        args.threads = 1
    if args.worker:
        cfgs = json.loads(args.worker)
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            result = run_export_worker(cfg) if cfg.get("kind") == "export" else run_worker(cfg)
            print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    arch = "tiny" if args.smoke else args.arch
    plan = "smoke" if args.smoke else args.plan
    if args.budgets:
        from sara_network.options import parse_count

        BUDGETS[arch] = tuple(parse_count(b) for b in args.budgets.split(","))
    if args.smoke:
        args.steps, args.warmup, args.repeats, args.export = 1, 1, 1, True
    batches = [int(b) for b in args.batches.split(",")]
    configs = plan_configs(plan, arch, batches)
    if args.methods:
        wanted = set(args.methods.split(","))
        configs = [c for c in configs if c["method"] in wanted]
    if args.only_budget is not None:
        configs = [c for c in configs if c["budget"] == int(args.only_budget)]
    if args.only_ckpt is not None:
        configs = [c for c in configs if c["ckpt"] == (args.only_ckpt == "on")]
    if args.only_optim is not None:
        configs = [c for c in configs if c["optim"] == args.only_optim]
    for c in configs:
        if args.optim and c["optim"] != "none":
            c["optim"] = args.optim
        c.update(arch=arch, steps=args.steps, warmup=args.warmup, threads=args.threads, latent=args.latent,
                 device=args.device, dtype=args.dtype, sampled_grad=args.sampled_grad)
        if c["method"] in ("full", "lyco_full") and not args.smoke:
            c["steps"] = args.full_steps
    if (args.export or plan == "export") and arch == "sdxl":
        raise SystemExit("--export times the LoRA export of an SD1.5 file; run it with --arch sd15")
    if args.export or plan == "export":
        for budget in BUDGETS[arch]:
            configs.append(dict(kind="export", arch=arch, budget=budget, rank=args.export_rank if not args.smoke else 2,
                                threads=args.threads))
    out = Path(args.out)
    stem = "memory_speed" if arch in ("sd15", "tiny") else f"memory_speed_{arch}"
    if args.device != "cpu" or args.dtype != "fp32" or args.sampled_grad != "auto":
        stem += f"_{args.device}_{args.dtype}" + ("" if args.sampled_grad == "auto" else f"_sddmm-{args.sampled_grad}")
    json_path = out / f"{stem}.json"
    records = []
    if json_path.exists() and not args.fresh and not args.smoke:
        records = [r for r in json.loads(json_path.read_text()).get("records", [])
                   if same_setup(r, args.device, args.dtype, args.sampled_grad)]
    notes = [] if args.smoke else [
        "Machine: 2 CPU cores shared with other developers' jobs (see `loadavg` per record in the JSON); "
        "absolute times are inflated and noisy, ratios between interleaved runs are more trustworthy.", ""]
    if args.smoke:  # one worker process for everything: the plumbing is tested, not the numbers
        records += run_subprocess(configs, args.timeout)
        configs = []
    for repeat in range(args.repeats):
        order = configs if repeat % 2 == 0 else list(reversed(configs))
        for cfg in order:
            t0 = time.time()
            result = run_subprocess([cfg], args.timeout)[0]
            result["repeat"] = repeat
            records.append(result)
            status = result.get("error", "")[:200] or (
                f"step {result.get('median_step_s', 0):.3f}s peak {result.get('peak_train_gib', 0):.2f}GiB"
                if cfg["kind"] == "train" else f"export {result.get('export_s', 0):.1f}s")
            print(f"[{time.strftime('%H:%M:%S')}] {cfg.get('method', 'export')} budget={cfg.get('budget')} "
                  f"{cfg.get('optim', '')} ckpt={cfg.get('ckpt')} b={cfg.get('batch')} -> {status} "
                  f"({time.time() - t0:.0f}s, load {os.getloadavg()[0]:.1f})", flush=True)
            markdown, agg = build_markdown(records, common.command_line(), args.smoke, notes)
            common.write_results(out, stem, markdown, {"records": records})
    markdown, agg = build_markdown(records, common.command_line(), args.smoke, notes)
    common.write_results(out, stem, markdown, {"records": records})
    plot(aggregate(records), out / f"{stem}.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
