"""Cost of the nuclear-norm term with rank_layers=all on the SD1.5 U-Net (one torch thread).

Selects `--budget` entries of a random-init SD1.5 U-Net, then times the term's subgradient
(`regularizers.rank_penalty_grad`, the work the optimizer pre-hook does per layer) once for each
distinct eligible layer shape and each `rank_method`; the per-step cost of rank_layers=all is the
sum over the eligible layers (the cost depends on the shape, not on the selected count). With
`rank_refresh=N` each layer is recomputed once every N steps (spread by `regularizers.refresh_slots`):
the mean cost per step is the sum / N, and the dearest step is the largest slot of that assignment.
In the same process it times a SaRA training step without the term (SD1.5 U-Net, the same budget,
batch 1, 64 px, AdamW8bit; as `memory_speed.py`) to give each cost as a share of a step.

    python benchmarks/rank_term_cost.py [--budget 5M] [--methods svd,newton_schulz] [--refresh 1,50,300]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory_speed import build_unet, config, run_worker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5M")
    parser.add_argument("--methods", default="svd,newton_schulz")
    parser.add_argument("--refresh", default="1,50,300", help="rank_refresh periods to report")
    args = parser.parse_args()
    import torch

    from sara_network.network import SaraNetwork, collect_targets
    from sara_network.options import SaraConfig, parse_count
    from sara_network.regularizers import polar_cost, rank_penalty_grad, refresh_slots

    torch.set_num_threads(1)
    step = run_worker(dict(config("sara_norank", parse_count(args.budget), "adamw8bit", False, 1), arch="sd15",
                           latent=8, threads=1, warmup=1, steps=3))["median_step_s"]
    print(f"SaRA step without the term: {step:.2f} s (median of 3); load {os.getloadavg()}")
    network = SaraNetwork(SaraConfig(budget=parse_count(args.budget), lambda_rank=5e-3, rank_layers="all"))
    network.select(collect_targets(build_unet("sd15"), [], [], "full"))
    for module in network.sara_modules():
        module.delta.grad = torch.zeros_like(module.delta)  # eligible once trained
    by_shape = collections.OrderedDict()
    for module, shape in network.rank_eligible():
        by_shape.setdefault(shape, []).append(module)
    print(f"{len(network.rank_eligible())} eligible layers, {len(by_shape)} shapes; load {os.getloadavg()}")
    layers = [shape for shape, modules in by_shape.items() for _ in modules]
    for method in args.methods.split(","):
        seconds_by_shape = {}
        for shape, modules in by_shape.items():
            module = modules[0]
            entries = module.pinned_delta().detach() + module.base_values.float()
            start = time.perf_counter()
            rank_penalty_grad(shape, module.indices, entries, 5e-3, method)
            seconds_by_shape[shape] = time.perf_counter() - start
            print(f"  {method:<14} {str(shape):<14} x{len(modules):<3} {seconds_by_shape[shape]:8.3f} s each",
                  flush=True)
        total = sum(seconds_by_shape[shape] for shape in layers)
        print(f"{method}: {total:.1f} s per optimizer step for all eligible layers; load {os.getloadavg()}")
        for period in (int(p) for p in args.refresh.split(",")):
            slots = refresh_slots([polar_cost(shape) for shape in layers], period)
            loads = [0.0] * period
            for shape, slot in zip(layers, slots):
                loads[slot] += seconds_by_shape[shape]
            print(f"  rank_refresh={period:<4} mean {total / period:7.3f} s per step ({total / period / step:.0%} of a "
                  f"step), dearest step {max(loads):7.3f} s")


if __name__ == "__main__":
    main()
