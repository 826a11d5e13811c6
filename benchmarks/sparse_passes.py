"""Forward+backward time of the SD1.5 U-Net with SaRA's sparse layers at large budgets, against the
frozen model, for one or more checkouts of sara_network (before/after comparisons of the ops).

Each (code, budget) pair runs in its own process, interleaved over the repeats:

    python benchmarks/sparse_passes.py --budgets 50M,100M --code . --code /path/to/old/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "SPARSE_PASSES "


def worker(code: str, budget: int, arch: str, batch: int, steps: int) -> dict:
    sys.path.insert(0, code)
    import sara_network  # first: memory_speed puts this checkout on sys.path when imported

    sys.path.insert(1, str(HERE))
    import torch
    import memory_speed
    from sara_network.network import SaraNetwork, collect_targets
    from sara_network.options import SaraConfig

    torch.set_num_threads(1)
    unet = memory_speed.build_unet(arch).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)

    def timed(needs_input_grad: bool) -> list[float]:
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            x = latents.clone().requires_grad_(needs_input_grad)
            unet(x, timesteps, encoder_hidden_states=context).sample.square().mean().backward()
            times.append(time.perf_counter() - started)
        return times[1:]

    frozen = timed(True) if budget == 0 else []
    selected = 0
    sara = []
    if budget:
        network = SaraNetwork(SaraConfig(budget=budget, progressive_iter=None))
        network.select(collect_targets(unet, [], [], "full"))
        network.patch()
        selected = network.selected_count()
        sara = timed(False)
    return dict(code=os.path.abspath(code), sara_network=os.path.dirname(sara_network.__file__), budget=budget,
                selected=selected, batch=batch, frozen_s=frozen, sara_s=sara, loadavg=os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", required=True, help="a checkout whose sara_network is timed")
    parser.add_argument("--budgets", default="50M,100M")
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "sparse_passes.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(TAG + json.dumps(worker(*json.loads(args.worker))), flush=True)
        return
    sys.path.insert(0, str(HERE.parent))
    from sara_network.options import parse_count

    budgets = [parse_count(b) for b in args.budgets.split(",")]
    jobs = [(args.code[0], 0)] + [(code, budget) for budget in budgets for code in args.code]
    records = []
    for _ in range(args.repeats):
        for code, budget in jobs:
            payload = json.dumps([code, budget, args.arch, args.batch, args.steps])
            result = subprocess.run([sys.executable, __file__, "--code", code, "--worker", payload],
                                    capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [line for line in result.stdout.splitlines() if line.startswith(TAG)]
            if not lines:
                raise SystemExit(f"worker failed ({code}, {budget}):\n{result.stderr[-3000:]}")
            record = json.loads(lines[0][len(TAG):])
            records.append(record)
            times = record["sara_s"] or record["frozen_s"]
            print(f"{code} budget={budget:,d} selected={record['selected']:,d}: median {statistics.median(times):.2f} s "
                  f"(load {record['loadavg'][0]:.2f})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
