"""The paper's premise on the digits base: do the smallest-|w| weights matter less than random ones?

One global threshold (sara_network.selection.threshold_for_count, exact, no torch.quantile) zeroes
the given fraction of smallest-|w| entries over all Linear/Conv2d weights; the control zeroes the
same number of entries chosen at random (the same exact-count selection over uniform scores).
The metric is the paired-noise denoising MSE on 480 images of the old classes 0-7.

    python benchmarks/premise.py
    python benchmarks/premise.py --smoke --out /tmp/x
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.40)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="random-init model, 32 images, 1 draw")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT))
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--random_seeds", type=int, default=2, help="random masks averaged per fraction")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads spin and run far slower)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.threads = 1

    import torch
    from sara_network import selection
    from sara_network.demo import data, model
    from sara_network.network import collect_targets

    torch.set_num_threads(args.threads)
    started = time.time()
    splits = data.splits()
    if args.smoke:
        torch.manual_seed(0)
        unet = model.build_unet().eval()
        images, labels = splits.old_eval.images[:32], splits.old_eval.labels[:32]
        args.draws, args.random_seeds = 1, 1
        fractions = (0.01, 0.05)
        base_note = "random-init demo U-Net (smoke)"
    else:
        unet = model.load_base()
        images = torch.cat([splits.old_eval.images, splits.pretrain.images[:400]])
        labels = torch.cat([splits.old_eval.labels, splits.pretrain.labels[:400]])
        fractions = FRACTIONS
        base_note = f"pretrained digits base `{model.BASE_PATH.name}`"
    targets = collect_targets(unet, [], [], "full")
    weights = [t.module.weight for t in targets]
    total = sum(w.numel() for w in weights)
    originals = [w.detach().clone() for w in weights]

    def loss() -> float:
        return model.denoising_loss(unet, images, labels, seed=0, draws=args.draws)

    def restore() -> None:
        with torch.no_grad():
            for w, o in zip(weights, originals):
                w.copy_(o)

    base = loss()
    rows, records = [], []
    median_abs = float(torch.cat([selection.canonical_abs(w) for w in weights]).median())
    for fraction in fractions:
        count = max(1, round(fraction * total))
        threshold = selection.threshold_for_count(weights, count)
        with torch.no_grad():
            zeroed = 0
            for w in weights:
                mask = selection.canonical_abs(w).view(w.shape) < selection.fp32(threshold)
                zeroed += int(mask.sum())
                w.masked_fill_(mask, 0.0)
        magnitude = loss()
        restore()
        randoms = []
        for rseed in range(args.random_seeds):
            generator = torch.Generator().manual_seed(1000 + rseed)
            scores = [torch.rand(w.shape, generator=generator) for w in weights]
            cut = selection.threshold_for_count(scores, count)
            with torch.no_grad():
                for w, s in zip(weights, scores):
                    w.masked_fill_(s < selection.fp32(cut), 0.0)
            randoms.append(loss())
            restore()
        random_mean = sum(randoms) / len(randoms)
        records.append(dict(fraction=fraction, count=count, zeroed=zeroed, threshold=threshold, magnitude=magnitude,
                            random=randoms))
        rows.append([f"{fraction:.0%}", f"{zeroed:,d}", f"{threshold:.3g}", f"{magnitude:.5f}",
                     f"{100 * (magnitude / base - 1):+.2f}%", f"{random_mean:.4f}",
                     f"{100 * (random_mean / base - 1):+.0f}%",
                     ", ".join(f"{r:.4f}" for r in randoms)])
        print(rows[-1], flush=True)

    lines = [common.header("Premise: zeroing the smallest weights vs random weights", common.command_line(),
                           args.smoke),
             f"Model: {base_note}; {len(weights)} Linear/Conv2d weights, {total:,d} entries, median |w| "
             f"{median_abs:.4g}. Loss: paired-noise denoising MSE on {len(labels)} images of classes 0-7 "
             f"({args.draws} draws, seed 0). Base loss **{base:.5f}**. Random rows: mean over "
             f"{args.random_seeds} random masks (each listed).", "",
             common.markdown_table(["fraction zeroed", "entries zeroed", "threshold", "magnitude: loss",
                                    "magnitude: Δ", "random: loss", "random: Δ", "random masks"], rows), "",
             f"Run time {time.time() - started:.0f} s.", ""]
    out = Path(args.out)
    common.write_results(out, "premise", "\n".join(lines), {"base_loss": base, "records": records,
                                                           "images": len(labels), "draws": args.draws})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.6))
        xs = [100 * r["fraction"] for r in records]
        ax.plot(xs, [r["magnitude"] for r in records], "o-", color="tab:red", label="smallest |w| zeroed")
        ax.plot(xs, [sum(r["random"]) / len(r["random"]) for r in records], "s--", color="tab:gray",
                label="random entries zeroed")
        ax.axhline(base, color="black", lw=0.8, label="base")
        ax.set_yscale("log")
        ax.set_xlabel("% of Linear/Conv2d weights zeroed")
        ax.set_ylabel("denoising MSE (classes 0-7)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "premise.png", dpi=110)
        plt.close(fig)
    except Exception as error:  # noqa: BLE001 - the plot is optional
        print(f"plot skipped: {error}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
