"""Wall and CPU time of the `sara` file commands on a full-size SD1.5 native file.

Builds the SD1.5 U-Net and CLIP-L text encoder from their configs with a random init (no download),
selects `--budgets` entries with SaRA's global threshold, fills random deltas (fp16), writes the
native file and an LDM single-file base checkpoint (fp16), then runs, one at a time, each in its own
process: `sara to-lora --rank 16`, `sara to-diff`, `sara merge --base`, `sara inspect`.

    python benchmarks/export_speed.py                       # 5M and 50M, results in benchmarks/results
    python benchmarks/export_speed.py --smoke --out /tmp/x  # tiny model, seconds
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from memory_speed import build_unet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77)
CLIP_TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16)


def build_text_encoder(config: dict):
    """CLIPTextModel with a fast random init (meta build, then normal(0, 1/sqrt(fan_in)))."""
    import math

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.02, generator=generator)
    return model


def build_files(arch: str, budgets: list[int], folder: str) -> tuple[str, dict[int, str]]:
    """(base checkpoint path, {budget: native file path})."""
    import torch

    from sara_network import fileformat, ldm_names
    from sara_network.naming import text_encoder_prefixes
    from sara_network.network import SaraNetwork, all_targets, collect_targets
    from sara_network.options import SaraConfig

    unet = build_unet(arch)
    encoder = build_text_encoder(CLIP_TINY if arch == "tiny" else CLIP_L)
    prefixes = text_encoder_prefixes([encoder])
    base = os.path.join(folder, "base.safetensors")
    state = {}
    for target in all_targets(unet, [encoder], prefixes):  # the LDM checkpoint keys of every target
        key = ldm_names.checkpoint_key(target.name, "sd1")
        weight = target.module.weight.detach()
        state[key.key] = (weight.t() if key.transposed else weight).to(torch.float16).contiguous()
        if target.module.bias is not None:
            state[key.bias_key] = target.module.bias.detach().to(torch.float16)
    fileformat.save_tensors(base, state, {}, with_hash=False)
    del state
    natives = {}
    targets = collect_targets(unet, [encoder], prefixes, "full")
    for budget in budgets:
        network = SaraNetwork(SaraConfig(budget=budget, progressive_iter=None))
        network.select(targets)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in network.trainable_parameters():
                p.copy_((torch.randn(p.shape, generator=generator) * 1e-3).half().float())
        natives[budget] = os.path.join(folder, f"sara_{budget}.safetensors")
        network.save(natives[budget], torch.float16, {"ss_base_model_version": "sd_v1"})
        del network
    return base, natives


def timed(arguments: list[str], folder: str) -> dict:
    """Run `sara <arguments>` in a fresh process; wall and CPU seconds, load average at the start."""
    load = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # more threads spin on a shared machine
    proc = subprocess.run([sys.executable, "-m", "sara_network.cli", *arguments], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("wrote")]
    if summary:
        summary = summary[-1]
    else:
        summary = f"{len(proc.stdout.splitlines())} report lines" if proc.returncode == 0 else proc.stderr[-300:]
    return {"status": proc.returncode, "wall_s": wall, "cpu_s": cpu, "loadavg": load,
            "summary": summary.replace(folder + os.sep, "").replace("\n", " ")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="5M,50M")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny model: checks the script, not the speed")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--keep", help="build and keep the files in this folder (default: a temporary one)")
    args = parser.parse_args()
    from sara_network.options import parse_count

    arch = "tiny" if args.smoke else "sd15"
    budgets = [5000] if args.smoke else [parse_count(b) for b in args.budgets.split(",")]
    records = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or temporary
        os.makedirs(folder, exist_ok=True)
        base, natives = build_files(arch, budgets, folder)
        for budget, native in natives.items():
            out = lambda name: os.path.join(folder, f"{name}_{budget}.safetensors")  # noqa: E731
            commands = {
                f"to-lora --rank {args.rank}": ["to-lora", native, out("lora"), "--rank", str(args.rank), "--show", "0",
                                                    "--overwrite"],
                "to-diff": ["to-diff", native, out("diff"), "--overwrite"],
                "merge --base (LDM checkpoint)": ["merge", native, "-o", out("merged"), "--base", base, "--overwrite"],
                "inspect": ["inspect", native],
            }
            for name, arguments in commands.items():
                record = {"budget": budget, "command": name, "native_mib": os.path.getsize(native) / 2**20,
                          **timed(arguments, folder)}
                records.append(record)
                print(record, flush=True)
    rows = [[f"{r['budget'] / 1e6:g}M", f"sara {r['command']}", r["status"], round(r["wall_s"], 2), round(r["cpu_s"], 2),
             " ".join(f"{x:.2f}" for x in r["loadavg"]), round(r["native_mib"], 1), r["summary"]] for r in records]
    markdown = "\n".join([
        common.header(f"Export speed of the sara commands ({'smoke' if args.smoke else 'SD1.5 U-Net + CLIP-L'})",
                      common.command_line(), args.smoke),
        "Each command runs alone in a fresh process (no `nice`) on a native file of random deltas at the SaRA "
        "selection of a random-init SD1.5 (U-Net + text encoder, preset full). `wall`: elapsed seconds, "
        "including Python start-up and file reading/writing; `cpu`: user + system seconds of the process; "
        "`load`: /proc/loadavg when the command started (2 cores shared with other jobs). Threads: "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", "",
        common.markdown_table(["budget", "command", "exit", "wall s", "cpu s", "load (1/5/15 min)", "native MiB",
                               "output"], rows), ""])
    common.write_results(Path(args.out), "export_speed", markdown, {"records": records, "machine": common.machine()})


if __name__ == "__main__":
    main()
