"""Two processes on gloo (real accelerate launch, CPU) with kohya's manual gradient all-reduce."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(__file__)


def run(out, optimizer, processes, extra=()):
    # the checkout under test first, not whichever sara_network is installed
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    if processes == 1:
        command = [sys.executable, os.path.join(HERE, "ddp_worker.py")]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29533", os.path.join(HERE, "ddp_worker.py")]
    result = subprocess.run(command + ["--out", out, "--optimizer", optimizer, *extra], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw8bit"])
def test_two_ranks_agree_and_match_one_process(tmp_path, optimizer):
    run(str(tmp_path / "ddp"), optimizer, 2)
    rank0 = load_file(str(tmp_path / "ddp.rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "ddp.rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    assert int(rank0["frozen_count"]) > 0  # the progressive step ran on both ranks alike
    if optimizer == "sgd":  # linear in the gradient: one process with the global batch is the reference
        run(str(tmp_path / "single"), optimizer, 1)
        single = load_file(str(tmp_path / "single.rank0.safetensors"))
        for name in rank0:
            if name != "frozen_count":
                torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-6)
