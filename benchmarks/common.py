"""Shared helpers of the benchmark scripts: markdown tables, result files, environment notes."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table in `text`: (columns, rows of cell strings). Used by the tests."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table[0], [row for row in table[2:]]


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "diffusers", "transformers", "peft", "lycoris", "bitsandbytes"):
        try:
            from importlib.metadata import version

            out[name] = version({"lycoris": "lycoris-lora"}.get(name, name))
        except Exception as error:  # noqa: BLE001 - only reported
            out[name] = f"unavailable ({type(error).__name__})"
    return out


def machine() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["loadavg_at_start"] = os.getloadavg()
    return info


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def write_results(out_dir: Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(data, indent=1, default=str))
    return md, js


def header(title: str, command: str, smoke: bool) -> str:
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"Commit {git_commit()}; versions {json.dumps(versions())}; machine {json.dumps(machine())}", ""]
    if smoke:
        lines += ["**SMOKE MODE: tiny sizes, the numbers mean nothing.**", ""]
    return "\n".join(lines)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# peers at a matched budget (shared by memory_speed.py and quality.py)
LOKR_FACTORS = (4, 8, 16, 32, 64)


def per_rank_count(unet, names) -> int:
    """LoRA parameters per unit of rank over the named Linear/Conv2d modules (in + out, conv in·k² + out)."""
    import torch

    modules = dict(unet.named_modules())
    total = 0
    for name in names:
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            total += m.in_features + m.out_features
        else:
            total += m.weight[0].numel() + m.out_channels
    return total


def lycoris_adapter(unet, method: str, budget, names) -> tuple[object, dict]:
    """A LyCORIS network on every Linear/Conv2d: LoCon at the rank matching `budget`, full-matrix LoKr
    at the factor whose count is nearest `budget` (factors cannot match it exactly), or `algo=full`."""
    import math

    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": ["Linear", "Conv2d"], "target_name": []})
    info: dict = {}
    if method == "locon":
        rank = max(1, round(budget / per_rank_count(unet, names)))
        net = create_lycoris(unet, 1.0, linear_dim=rank, linear_alpha=rank, conv_dim=rank, conv_alpha=rank,
                             algo="locon")
        info["rank"] = rank
    elif method == "lokr":
        def lokr(factor):
            return create_lycoris(unet, 1.0, linear_dim=100000, linear_alpha=1, conv_dim=100000, conv_alpha=1,
                                  algo="lokr", factor=factor)

        def count(net):
            return sum(p.numel() for lora in net.loras for p in lora.parameters() if p.requires_grad)

        counts = {factor: count(lokr(factor)) for factor in LOKR_FACTORS}
        factor = min((f for f in counts if counts[f]), key=lambda f: abs(math.log(counts[f] / budget)))
        net = lokr(factor)
        info["lokr_factor"] = factor
    elif method == "lyco_full":
        net = create_lycoris(unet, 1.0, algo="full")
    else:
        raise ValueError(f"not a LyCORIS method: {method}")
    net.apply_to()
    return net, info
