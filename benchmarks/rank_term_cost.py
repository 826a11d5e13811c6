"""Cost of the nuclear-norm term with rank_layers=all on the SD1.5 U-Net (one torch thread).

Selects `--budget` entries of a random-init SD1.5 U-Net, then times the term's subgradient
(`regularizers.rank_penalty_grad`, the work the optimizer pre-hook does per layer) once for each
distinct eligible layer shape and each `rank_method`; the per-step cost of rank_layers=all is the
sum over the eligible layers (the cost depends on the shape, not on the selected count).

    python benchmarks/rank_term_cost.py [--budget 5M]
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

from memory_speed import build_unet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5M")
    args = parser.parse_args()
    import torch

    from sara_network.network import SaraNetwork, collect_targets
    from sara_network.options import SaraConfig, parse_count
    from sara_network.regularizers import RANK_METHODS, rank_penalty_grad

    torch.set_num_threads(1)
    network = SaraNetwork(SaraConfig(budget=parse_count(args.budget), lambda_rank=5e-3, rank_layers="all"))
    network.select(collect_targets(build_unet("sd15"), [], [], "full"))
    for module in network.sara_modules():
        module.delta.grad = torch.zeros_like(module.delta)  # eligible once trained
    by_shape = collections.OrderedDict()
    for module, shape in network.rank_eligible():
        by_shape.setdefault(shape, []).append(module)
    print(f"{len(network.rank_eligible())} eligible layers, {len(by_shape)} shapes; load {os.getloadavg()}")
    totals = {}
    for method in RANK_METHODS:
        total = 0.0
        for shape, modules in by_shape.items():
            module = modules[0]
            entries = module.pinned_delta().detach() + module.base_values.float()
            start = time.perf_counter()
            rank_penalty_grad(shape, module.indices, entries, 5e-3, method)
            seconds = time.perf_counter() - start
            total += seconds * len(modules)
            print(f"  {method:<14} {str(shape):<14} x{len(modules):<3} {seconds:8.3f} s each", flush=True)
        totals[method] = total
        print(f"{method}: {total:.1f} s per optimizer step for all eligible layers; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
