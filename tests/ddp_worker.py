"""One rank of the multi-process test: kohya's DDP path (accelerate prepare + manual grad all-reduce).

Run by tests/test_ddp.py through `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU), or
directly as a single process with the whole global batch as the reference.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402
from kohya_driver import delta_snapshot, freeze_and_cast, make_network, make_optimizer  # noqa: E402

GLOBAL_BATCH = 4
ARGS = {"density": "0.05", "progressive_iter": "2", "lambda_rank": "5e-2", "rank_min_dim": "16", "rank_layers": "3"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--network_arg", action="append", default=[], help="key=value over ARGS")
    parser.add_argument("--save_indices", action="store_true")
    options = parser.parse_args()
    args = dict(ARGS, **dict(item.split("=", 1) for item in options.network_arg))

    from accelerate import Accelerator
    from safetensors.torch import save_file

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    m = models.tiny_sd1()
    network = make_network(m, args, max_train_steps=options.steps)
    optimizer = make_optimizer(network, options.optimizer)
    freeze_and_cast(m, network)
    network, optimizer = accelerator.prepare(network, optimizer)
    unwrapped = accelerator.unwrap_model(network)

    share = GLOBAL_BATCH // world
    for step in range(options.steps):
        unwrapped.on_step_start(m.text_encoders[0], m.unet)
        latents, timesteps, ids, target = models.batch("sd1", 100 + step, GLOBAL_BATCH)
        part = slice(rank * share, (rank + 1) * share)
        prediction = models.predict(m, latents[part], timesteps[part], ids[part])
        loss = torch.nn.functional.mse_loss(prediction.float(), target[part])
        accelerator.backward(loss)
        if world > 1:  # kohya's all_reduce_network: forward never goes through DDP
            for param in network.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
                    param.grad /= world
        accelerator.clip_grad_norm_(unwrapped.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    assert int(unwrapped.optimizer_steps) == options.steps
    frozen = sum(module.frozen_positions.numel() for module in unwrapped.children())
    tensors = {f"{name}": value.contiguous() for name, value in delta_snapshot(unwrapped).items()}
    tensors["frozen_count"] = torch.tensor([frozen])
    if options.save_indices:
        tensors.update({f"{name}.indices": module.indices.contiguous() for name, module in unwrapped.named_children()})
    save_file(tensors, f"{options.out}.rank{rank}.safetensors")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
