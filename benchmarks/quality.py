"""Quality on a real small task: teach the pretrained digits base the held-out classes 8 and 9.

Protocol (the tiny-diffusion probe of sara_network/demo/, shortened where said; benchmarks/README.md): start from
the pretrained base, train on the 200 images of 8/9 at batch 64 with AdamW (weight decay 0, 20
warmup steps then cosine), grad-clip 1.0. In every method the class-embedding rows 8 and 9 are
trainable through a row-mask gradient hook (own param group, lr 2e-3 for every method), rows 0-7
stay frozen, so forgetting comes from the weights. Metrics, with fixed paired noise and timesteps:
held-out new-class loss (154 images of 8/9, 4 draws: learning), old-class loss on the 80 held-out
0-7 images before/after (8 draws: forgetting), and SVC accuracy of 20 samples of 8/9.

    python benchmarks/quality.py                            # all methods, seeds 0 1, default lrs
    python benchmarks/quality.py --sweep --seeds 0          # 3 lrs per method, one seed
    python benchmarks/quality.py --smoke --out /tmp/x       # random-init model, a few steps
    python benchmarks/quality.py --task style --methods sara,sara_grad,lora --steps 1000 --seeds 0,1,2 --sweep

`--task style` is the second task kind: the demo's bold style over digits 0-7, learning measured on
held-out bold digits, forgetting on the same digits in the original style. SaRA sweeps include the
paper's lr rule (`auto`); `sara_grad`, `sara_gsmall`, `sara_random` are the selection modes.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

# SaRA variants: the network args each one runs with (5% density everywhere; the selection modes
# differ only in which entries of each layer are trained, see docs/kohya.md "Selection modes").
SARA_VARIANTS = {
    "sara": dict(lambda_rank=5e-3, rank_min_dim=32, progressive_iter=0.5),
    "sara_plain": dict(lambda_rank=0.0, progressive_iter=None),
    "sara_grad": dict(selection="gradient", lambda_rank=0.0, progressive_iter=None),
    "sara_gsmall": dict(selection="gradient_small", lambda_rank=0.0, progressive_iter=None),
    "sara_random": dict(selection="random", lambda_rank=0.0, progressive_iter=None),
    # the paper's Table 3 ablation: each of its two parts alone
    "sara_noprog": dict(lambda_rank=5e-3, rank_min_dim=32, progressive_iter=None),
    "sara_norank": dict(lambda_rank=0.0, progressive_iter=0.5),
    # the rank term on the update of every Linear and Conv2d (the matrices a LoRA export factorises)
    **{f"sara_lowrank_{weight}": dict(lambda_rank=float(weight), rank_target="update", rank_layers="all",
                                      rank_convs=True, rank_min_dim=16, progressive_iter=0.5)
       for weight in ("5e-3", "5e-4")},
    # the same, each layer's term recomputed once every 50 steps and reused between (rank_refresh)
    "sara_lowrank_5e-4_refresh50": dict(lambda_rank=5e-4, rank_target="update", rank_layers="all", rank_refresh=50,
                                        rank_convs=True, rank_min_dim=16, progressive_iter=0.5),
}
CALIBRATION_BATCHES = 10  # gradient modes: training batches scored before training (own noise draws)
SARA_LRS = (1e-3, 2e-3, 4e-3)
DEFAULT_LR = {**{name: 2e-3 for name in SARA_VARIANTS}, "lora": 2e-3, "locon": 2e-3, "lokr": 2e-3, "full": 3e-4,
              "emb": 2e-3}
# Every SaRA sweep includes the paper's rule lr = 1e-3 * exp(-350 * threshold) ("auto").
SWEEP = {**{name: ("auto",) + SARA_LRS for name in SARA_VARIANTS}, "lora": SARA_LRS,
         "locon": SARA_LRS, "lokr": SARA_LRS, "full": (1e-4, 3e-4, 1e-3), "emb": (2e-3,)}
DESCRIPTION = {
    "sara": "SaRA, 5% density (|w| < global threshold), lambda_rank 5e-3 (rank_min_dim 32), progressive step at 50%",
    "sara_plain": "SaRA, 5% density, no rank term, no progressive step",
    "sara_grad": "SaRA selection=gradient (per-layer counts of the 5% magnitude rule, entries by accumulated |grad| "
                 f"over {CALIBRATION_BATCHES} training batches), no rank term, no progressive step",
    "sara_gsmall": "SaRA selection=gradient_small (largest |grad| among the 4x-budget smallest |w| of each layer), "
                   "no rank term, no progressive step",
    "sara_random": "SaRA selection=random (same per-layer counts, uniform positions; control)",
    "sara_noprog": "SaRA as `sara` without the progressive step (rank term only)",
    "sara_norank": "SaRA as `sara` without the rank term (progressive step only)",
    **{f"sara_lowrank_{weight}": f"SaRA as `sara` with the rank term on the update of every Linear and Conv2d with "
                                 f"min dim > 16 (rank_target=update, rank_layers=all, rank_convs=true), lambda_rank {weight}"
       for weight in ("5e-3", "5e-4")},
    "sara_lowrank_5e-4_refresh50": "SaRA as `sara_lowrank_5e-4`, each layer's term recomputed once every 50 steps "
                                   "(spread by cost) and its last value applied at every step (rank_refresh=50)",
    "lora": "PEFT LoRA (inject_adapter_in_model) on all 65 Linear/Conv2d, rank matched, alpha = rank",
    "locon": "LyCORIS LoCon on all Linear/Conv2d, same rank as LoRA, alpha = rank",
    "lokr": "LyCORIS LoKr (full-matrix, factor with the count nearest the budget) on all Linear/Conv2d",
    "full": "full fine-tuning of every parameter",
    "emb": "class-embedding rows 8/9 only (floor)",
}
TASKS = {"new_classes": "Quality: fine-tuning the digits base on new classes 8/9",
         "style": "Quality: fine-tuning the digits base to a new style (bold digits 0-7)"}
EMB_LR = 2e-3
NOISE_NEW, NOISE_OLD = 0.0005, 0.002  # the probe's seed noise on the new- / old-class loss
METHODS = ("sara", "sara_plain", "lora", "locon", "full")


def setup(unet, method: str, steps: int) -> tuple[list, dict, object]:
    """Make the method's parameters trainable; returns (params, info, keep-alive object)."""
    from sara_network.network import SaraNetwork, collect_targets
    from sara_network.options import SaraConfig

    unet.requires_grad_(False)
    targets = collect_targets(unet, [], [], "full")
    total = sum(t.module.weight.numel() for t in targets)
    budget = round(0.05 * total)
    names = [t.path for t in targets]
    rank = max(1, round(budget / common.per_rank_count(unet, names)))
    info = {"budget": budget}
    if method in SARA_VARIANTS:
        network = SaraNetwork(SaraConfig(density=0.05, **SARA_VARIANTS[method]))
        network.select(targets)
        network.total_steps = steps
        network.patch()
        network.attach_optimizer_hooks()
        info["threshold"] = network.thresholds.get("unet")
        return network.trainable_parameters(), info, network
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), unet)
        info["rank"] = rank
        return [p for n, p in unet.named_parameters() if "lora_" in n], info, None
    if method in ("locon", "lokr"):
        net, lyco_info = common.lycoris_adapter(unet, method, budget, names)
        info.update(lyco_info)
        return [p for p in net.parameters() if p.requires_grad], info, net
    if method == "full":
        params = [p for n, p in unet.named_parameters() if n != "class_embedding.weight"]
        for p in params:
            p.requires_grad_(True)
        return params, info, None
    if method == "emb":
        return [], info, None
    raise ValueError(method)


def run_one(method: str, lr: float, seed: int, args, splits, base_state, base_metrics: dict) -> dict:
    import torch

    from sara_network.demo import classifier, finetune, model

    torch.manual_seed(seed)  # adapter init (LoRA/LoCon down matrices)
    unet = model.build_unet()
    unet.load_state_dict(base_state)
    unet.eval()
    params, info, keep = setup(unet, method, args.steps)
    scheduler = model.build_scheduler()
    images, labels = args.train_images, args.train_labels

    def batch_loss(generator):
        return finetune.batch_loss(unet, scheduler, images, labels, args.batch, generator)

    if keep is not None and getattr(keep, "calibration_pending", lambda: False)():
        calibration_generator = torch.Generator().manual_seed(10_000 + seed)  # not the training draws
        unet.train()
        keep.calibrate(lambda step: batch_loss(calibration_generator), CALIBRATION_BATCHES)
    if lr == "auto":
        from sara_network.options import auto_lr

        info["lr_value"] = auto_lr(info["threshold"])
    lr_value = info.get("lr_value", lr)
    embedding = unet.class_embedding.weight
    groups = []
    if args.train_rows:  # new classes: their class-embedding rows train too, the others stay frozen
        embedding.requires_grad_(True)
        row_mask = torch.zeros(embedding.shape[0], 1)
        row_mask[list(args.train_rows)] = 1.0
        embedding.register_hook(lambda grad: grad * row_mask)
        groups.append({"params": [embedding], "lr": EMB_LR})
    if params:
        groups.append({"params": params, "lr": lr_value})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = min(20, max(1, args.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(seed)
    trainable = sum(p.numel() for p in params) + len(args.train_rows) * embedding.shape[1]
    clip_params = [p for group in groups for p in group["params"]]
    started = time.time()
    unet.train()
    losses = []
    for _ in range(args.steps):
        loss = batch_loss(generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.time() - started
    unet.eval()
    new_loss = model.denoising_loss(unet, args.new_eval_images, args.new_eval_labels, seed=0, draws=args.new_draws)
    old_loss = model.denoising_loss(unet, args.old_eval_images, args.old_eval_labels, seed=0, draws=args.old_draws)
    sample_labels = [c for c in args.sample_classes for _ in range(args.samples)]
    samples = model.sample(unet, sample_labels, seed=123, steps=args.sample_steps)
    accuracy = float((classifier.classify(samples) == torch.tensor(sample_labels).numpy()).mean())
    untouched = [row for row in range(embedding.shape[0]) if row not in args.train_rows]
    with torch.no_grad():
        old_rows_unchanged = bool(torch.equal(embedding[untouched].detach(), base_state["class_embedding.weight"][untouched]))
    exports = {}
    if hasattr(keep, "sara_modules"):  # the share of the selected entries frozen by the progressive step
        frozen = sum(m.frozen_positions.numel() for m in keep.sara_modules())
        info["frozen_share"] = frozen / max(1, keep.selected_count())
        exports = exported_metrics(keep, unet, args, base_metrics)
    del keep
    return dict(method=method, lr=lr, seed=seed, steps=args.steps, batch=args.batch, trainable=trainable, task=args.task,
                info={k: v for k, v in info.items() if v is not None}, new_loss=new_loss, old_loss=old_loss,
                old_before=base_metrics["old"], new_before=base_metrics["new"], forgetting=old_loss - base_metrics["old"],
                sample_acc=accuracy, train_s=train_s, final_train_loss=statistics.mean(losses[-20:]),
                old_rows_unchanged=old_rows_unchanged, exports=exports, samples=[[round(v, 4) for v in img.flatten().tolist()]
                                                                for img in samples])


def exported_metrics(network, unet, args, base_metrics: dict) -> dict:
    """What a LoRA user gets: the losses with every SaRA delta replaced by its `sara to-lora` export
    at each rank of --export_ranks (kohya tensors, fp16 as the command writes them, applied as
    up @ down * alpha / rank; LoRA files carry no bias, so trained bias entries are dropped; the
    class-embedding rows stay as trained). Leaves the model unpatched."""
    from sara_network import convert
    from sara_network.demo import model
    from sara_network.demo.finetune import lora_applied

    deltas = network.deltas()
    modules = {m.sara_name: m.base for m in network.sara_modules()}
    network.unpatch()
    results = {}
    for rank in args.export_ranks:
        lora = convert.to_lora(deltas, convert.RankRule(rank=rank), "sd1")
        with lora_applied(modules, lora.tensors):
            new_loss = model.denoising_loss(unet, args.new_eval_images, args.new_eval_labels, seed=0, draws=args.new_draws)
            old_loss = model.denoising_loss(unet, args.old_eval_images, args.old_eval_labels, seed=0, draws=args.old_draws)
        norm_sq = sum(m.norm_sq for m in lora.modules)
        results[str(rank)] = dict(new_loss=new_loss, old_loss=old_loss, forgetting=old_loss - base_metrics["old"],
                                  rel_error=math.sqrt(sum(m.error_sq for m in lora.modules) / max(norm_sq, 1e-30)))
    return results


def lr_text(lr) -> str:
    return lr if isinstance(lr, str) else f"{lr:g}"


def lr_order(lr) -> float:
    return -1.0 if isinstance(lr, str) else lr


def summarise(records: list[dict]) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault((r["method"], r["lr"], r["steps"]), []).append(r)  # records of one task only
    out = {}
    for key, rs in groups.items():
        def stats(field):
            values = [r[field] for r in rs]
            return statistics.mean(values), (max(values) - min(values))
        out[key] = dict(method=key[0], lr=key[1], steps=key[2], seeds=sorted(r["seed"] for r in rs),
                        trainable=rs[0]["trainable"], info=rs[0]["info"], new=stats("new_loss"),
                        old=stats("old_loss"), forgetting=stats("forgetting"), acc=stats("sample_acc"),
                        train_s=statistics.mean(r["train_s"] for r in rs), old_before=rs[0]["old_before"],
                        new_before=rs[0]["new_before"], exports=_export_stats(rs))
    return out


def _export_stats(records: list[dict]) -> dict:
    """Per export rank: the mean export losses and how much of the native file's learning gain and
    forgetting the export keeps (1.0 = the same as the native file), over the seeds that have it."""
    out = {}
    for rank in sorted({k for r in records for k in r.get("exports", {})}, key=int):
        rs = [r for r in records if rank in r.get("exports", {})]
        mean = lambda f: statistics.mean(f(r) for r in rs)  # noqa: E731
        out[rank] = dict(seeds=len(rs), native_new=mean(lambda r: r["new_loss"]),
                         native_forgetting=mean(lambda r: r["forgetting"]),
                         new=mean(lambda r: r["exports"][rank]["new_loss"]),
                         forgetting=mean(lambda r: r["exports"][rank]["forgetting"]),
                         rel_error=mean(lambda r: r["exports"][rank]["rel_error"]),
                         learning_kept=mean(lambda r: (r["new_before"] - r["exports"][rank]["new_loss"])
                                            / (r["new_before"] - r["new_loss"])),
                         forgetting_ratio=mean(lambda r: r["exports"][rank]["forgetting"] / r["forgetting"]))
    return out


def _label(s: dict) -> str:
    extra = s["info"]
    return s["method"] + (f" r={extra['rank']}" if "rank" in extra else "") + (
        f" f={extra['lokr_factor']}" if "lokr_factor" in extra else "")


def build_markdown(records: list[dict], args, smoke: bool) -> tuple[str, dict]:
    summary = summarise(records)
    lines = [common.header(TASKS[args.task], common.command_line(), smoke)]
    any_s = next(iter(summary.values()))
    task_note = ("Every method also trains class-embedding rows 8/9 (256 params, "
                 f"lr {EMB_LR})." if args.task == "new_classes" else
                 "Learning: the loss on held-out digits 0-7 in the bold style; forgetting: the loss on the same "
                 "digits in the original thin style. No class-embedding row is trained.")
    lines += [f"Base model: {args.base_note}. Before fine-tuning: learning-set loss {any_s['new_before']:.4f}, "
              f"forgetting-set loss {any_s['old_before']:.4f}. Batch {args.batch}; steps as listed. {task_note} "
              f"Sample accuracy: SVC on {len(args.sample_classes) * args.samples} DDIM-{args.sample_steps} samples "
              f"(seed 123), a sanity check only (too few samples to rank methods). 'frozen at the end': the share "
              "of the selected entries the progressive step froze (the paper reports 80-85%).", "",
              "Methods:", ""]
    lines += [f"- **{m}**: {DESCRIPTION[m]}" for m in dict.fromkeys(s["method"] for s in summary.values())]
    lines.append("")
    columns = ["method", "lr", "frozen at the end", "trainable", "steps", "seeds", "learning-set loss ↓ (mean)", "new spread",
               "forgetting-set loss after", "forgetting Δold ↓ (mean)", "forgetting spread", "sample acc",
               "train s/run"]
    rows = []
    order = {m: i for i, m in enumerate((*SARA_VARIANTS, "lora", "locon", "lokr", "full", "emb"))}
    for key in sorted(summary, key=lambda k: (order.get(k[0], 9), lr_order(k[1]))):
        s = summary[key]
        lr_shown = lr_text(s["lr"]) + (f" = {s['info']['lr_value']:.3g}" if "lr_value" in s["info"] else "")
        frozen = s["info"].get("frozen_share")
        rows.append([_label(s), lr_shown, "—" if frozen is None else f"{frozen:.0%}", f"{s['trainable']:,d}",
                     s["steps"], ",".join(map(str, s["seeds"])),
                     f"{s['new'][0]:.5f}", f"{s['new'][1]:.5f}", f"{s['old'][0]:.5f}", f"{s['forgetting'][0]:+.5f}",
                     f"{s['forgetting'][1]:.5f}", f"{s['acc'][0]:.2f}", f"{s['train_s']:.0f}"])
    lines += ["## Results", "", common.markdown_table(columns, rows), "",
              "Spread = max − min over the seeds (half of it is the ± around the mean). The probe measured a seed "
              "noise of about 0.0005 on the new-class loss and 0.002 on the old-class loss.", ""]
    export_rows = [[_label(summary[key]), lr_text(summary[key]["lr"]), rank, e["seeds"], f"{e['native_new']:.5f}",
                    f"{e['new']:.5f}", f"{e['learning_kept']:.0%}", f"{e['native_forgetting']:+.5f}",
                    f"{e['forgetting']:+.5f}", f"{e['forgetting_ratio']:.0%}", f"{e['rel_error']:.0%}"]
                   for key in sorted(summary, key=lambda k: (order.get(k[0], 9), lr_order(k[1])))
                   for rank, e in summary[key]["exports"].items()]
    if export_rows:
        lines += ["## The LoRA export applied instead of the native file", "",
                  common.markdown_table(["method", "lr", "rank", "seeds", "native learning-set loss", "export learning-set loss",
                                         "learning kept", "native forgetting", "export forgetting", "forgetting kept",
                                         "Frobenius rel. error"], export_rows), "",
                  "Each SaRA run's deltas exported as `sara to-lora --rank r` does (fp16 kohya tensors, no biases) and "
                  "applied to the base as up @ down * alpha / rank. 'learning kept': the export's drop of the "
                  "learning-set loss below the base model's, as a share of the native file's drop; 'forgetting kept': "
                  "the export's forgetting as a share of the native file's (100% = the same as the native file; "
                  "the goal is within 10% on both). Native columns: the same seeds' native files. Frobenius error: "
                  "||D - up·down||/||D|| over all modules.", ""]
    matched = matched_learning_rows(summary, order)
    if matched:
        lines += ["## Forgetting at equal learning", "",
                  common.markdown_table(["point", "learning-set loss", "forgetting", "peer", "peer forgetting at this learning",
                                         "difference"], matched), "",
                  "The peer's forgetting at the same learning-set loss, linearly interpolated between the two of its lr "
                  "points (means over their seeds) whose learning-set losses bracket this point's; a point outside "
                  "every bracket of a peer is left out. A negative difference: this point forgets less than the peer "
                  "would at the same learning.", ""]
    # Learning and forgetting trade off through the lr, so no single lr per method is "its best":
    # a point is beaten only by a point that is lower on both (by more than the noise).
    points = [summary[key] for key in sorted(summary, key=lambda k: (order.get(k[0], 9), lr_order(k[1])))]
    front = []
    for s in points:
        winners = [f"{_label(o)} lr {lr_text(o['lr'])}" for o in points if o["method"] != s["method"] and
                   s["new"][0] - o["new"][0] > max(s["new"][1], o["new"][1], NOISE_NEW) and
                   s["forgetting"][0] - o["forgetting"][0] > max(s["forgetting"][1], o["forgetting"][1], NOISE_OLD)]
        front.append([f"{_label(s)} lr {lr_text(s['lr'])}", f"{s['new'][0]:.5f}", f"{s['forgetting'][0]:+.5f}",
                      "; ".join(winners) or "not beaten"])
    lines += ["## Learning vs forgetting: which points are beaten on both", "",
              common.markdown_table(["point", "learning-set loss", "forgetting", "beaten on both by"], front), "",
              f"A point is beaten by another method's point that has both a lower new-class loss and a lower "
              f"forgetting, each by more than the larger seed spread of the two and at least the probe's noise "
              f"floor ({NOISE_NEW} new / {NOISE_OLD} old). 'not beaten': no other method is lower on both.", ""]
    return "\n".join(lines), summary


def matched_learning_rows(summary: dict, order: dict) -> list[list]:
    """Per SaRA point and peer method (LoRA, LoCon, ...), the peer's forgetting interpolated at the
    point's learning-set loss between the peer's bracketing lr points."""
    rows = []
    peers = {}
    for s in summary.values():
        if s["method"] not in SARA_VARIANTS:
            peers.setdefault(s["method"], []).append((s["new"][0], s["forgetting"][0]))
    for key in sorted(summary, key=lambda k: (order.get(k[0], 9), lr_order(k[1]))):
        s = summary[key]
        if s["method"] not in SARA_VARIANTS:
            continue
        learning, forgetting = s["new"][0], s["forgetting"][0]
        for peer, points in peers.items():
            points = sorted(points)
            for (l0, f0), (l1, f1) in zip(points, points[1:]):
                if l0 <= learning <= l1 and l1 > l0:
                    at = f0 + (f1 - f0) * (learning - l0) / (l1 - l0)
                    rows.append([f"{_label(s)} lr {lr_text(s['lr'])}", f"{learning:.5f}", f"{forgetting:+.5f}", peer,
                                 f"{at:+.5f}", f"{forgetting - at:+.5f}"])
                    break
    return rows


def record_key(record: dict) -> tuple:
    """What makes a run: a later run with the same key replaces the earlier one."""
    return record["method"], record["lr"], record["seed"], record["steps"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--task", choices=tuple(TASKS), default="new_classes")
    parser.add_argument("--out", default=str(common.DEFAULT_OUT))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", default="", help="method=lr,... overrides the default lrs")
    parser.add_argument("--sweep", action="store_true", help="3 lrs per method")
    parser.add_argument("--samples", type=int, default=10, help="samples per new class")
    parser.add_argument("--sample_steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads spin and run far slower)")
    parser.add_argument("--stem", default="", help="results file name (default quality / quality_sweep)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier records in the results file")
    parser.add_argument("--merge", default="",
                        help="comma list of result stems (runs done in parallel) whose records join --stem's")
    parser.add_argument("--export_ranks", default="16",
                        help="SaRA runs: also measure their rank-r LoRA exports (comma list; '' for none)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.threads = 1

    import torch

    from sara_network.demo import data, model

    torch.set_num_threads(args.threads)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.export_ranks = [int(r) for r in args.export_ranks.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]  # --methods "": rebuild tables, plot, grid from the JSON
    lrs = dict(DEFAULT_LR)
    for item in filter(None, args.lr.split(",")):
        name, value = item.split("=")
        lrs[name] = value if value == "auto" else float(value)
    splits = data.splits()
    args.new_draws, args.old_draws = 4, 8
    if args.task == "new_classes":
        args.train_images, args.train_labels = splits.new_train.images, splits.new_train.labels
        args.train_rows = args.sample_classes = data.NEW_CLASSES
        args.new_eval_images, args.new_eval_labels = splits.new_eval.images, splits.new_eval.labels
    else:  # the demo's bold style over the whole distribution
        from sara_network.demo.finetune import embolden

        args.train_images, args.train_labels = embolden(splits.pretrain.images), splits.pretrain.labels
        args.train_rows, args.sample_classes = (), data.OLD_CLASSES
        args.new_eval_images, args.new_eval_labels = embolden(splits.old_eval.images), splits.old_eval.labels
    args.old_eval_images, args.old_eval_labels = splits.old_eval.images, splits.old_eval.labels
    if args.smoke:
        torch.manual_seed(0)
        base = model.build_unet()
        args.steps, args.batch, args.samples, args.sample_steps = 2, 8, 1, 2
        args.seeds = args.seeds[:1]
        args.new_draws, args.old_draws = 1, 1
        args.new_eval_images, args.new_eval_labels = args.new_eval_images[:16], args.new_eval_labels[:16]
        args.old_eval_images, args.old_eval_labels = args.old_eval_images[:16], args.old_eval_labels[:16]
        args.base_note = "random-init demo U-Net (smoke)"
    else:
        base = model.load_base()
        args.base_note = f"pretrained digits base `{model.BASE_PATH.name}`"
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_metrics = {"new": model.denoising_loss(base, args.new_eval_images, args.new_eval_labels, seed=0,
                                                draws=args.new_draws),
                    "old": model.denoising_loss(base, args.old_eval_images, args.old_eval_labels, seed=0,
                                                draws=args.old_draws)}
    base_samples = model.sample(base, [c for c in args.sample_classes for _ in range(args.samples)], seed=123,
                                steps=args.sample_steps)
    out = Path(args.out)
    stem = args.stem or ("quality_sweep" if args.sweep else "quality") + ("" if args.task == "new_classes" else "_style")
    json_path = out / f"{stem}.json"
    records = []
    if json_path.exists() and not args.fresh and not args.smoke:
        records = json.loads(json_path.read_text()).get("records", [])
    for other in filter(None, args.merge.split(",")):
        merged = json.loads((out / f"{other}.json").read_text())["records"]
        keys = {record_key(r) for r in merged}
        records = [r for r in records if record_key(r) not in keys] + merged
    runs = [(m, lr, seed) for seed in args.seeds for m in methods
            for lr in (SWEEP[m] if args.sweep else (lrs[m],))]
    for method, lr, seed in runs:
        t0 = time.time()
        record = run_one(method, lr, seed, args, splits, base_state, base_metrics)
        records = [r for r in records if record_key(r) != record_key(record)]
        records.append(record)
        print(f"[{time.strftime('%H:%M:%S')}] {method} lr={lr_text(lr)} seed={seed}: new {record['new_loss']:.5f} "
              f"old {record['old_loss']:.5f} (Δ{record['forgetting']:+.5f}) acc {record['sample_acc']:.2f} "
              f"trainable {record['trainable']:,d} ({time.time() - t0:.0f}s)", flush=True)
        markdown, _ = build_markdown(records, args, args.smoke)
        common.write_results(out, stem, markdown, {"records": records})
    markdown, summary = build_markdown(records, args, args.smoke)
    # sample grid: per (method, lr) the run of the lowest seed that kept its samples
    chosen = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r.get("samples") is not None and r["steps"] == args.steps:
            chosen.setdefault((r["method"], r["lr"]), r)
    side = base_samples.shape[-1]
    rows = [base_samples] + [torch.tensor(r["samples"]).view(-1, 1, side, side) for r in chosen.values()]
    labels = ["base"] + [f"{r['method']} lr {lr_text(r['lr'])} seed {r['seed']}" for r in chosen.values()]
    grid_path = out / f"{stem}_samples.png"
    model.save_grid_png(rows, grid_path, labels=[str(i) for i in range(len(rows))])
    markdown += (f"\nSample grid `{grid_path.name}`: one row per method, {args.samples} samples of each class in "
                 f"{', '.join(map(str, args.sample_classes))}, the same noise (seed 123) in every row; rows: "
                 + ", ".join(f"{i} = {l}" for i, l in enumerate(labels)) + ".\n")
    common.write_results(out, stem, markdown, {"records": records, "base": base_metrics})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.2))
        for s in summary.values():
            ax.errorbar(s["new"][0], s["forgetting"][0], xerr=s["new"][1] / 2, yerr=s["forgetting"][1] / 2, fmt="o",
                        capsize=3, label=f"{_label(s)} lr {lr_text(s['lr'])}")
        ax.set_xlabel("held-out new-class loss (lower = learned more)")
        ax.set_ylabel("forgetting: Δ old-class loss (lower = better)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
    except Exception as error:  # noqa: BLE001
        print(f"plot skipped: {error}")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
