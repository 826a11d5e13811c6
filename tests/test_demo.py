"""The README quick start: the main job in its short mode, then the README's CLI lines on its outputs
(read from README.md, so the README and this test cannot drift apart)."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sara_network import cli
from sara_network.demo.model import BASE_PATH, load_base
from sara_network.fileformat import load_native, read_tensors

REPO = Path(__file__).resolve().parent.parent
CLI_BLOCK = re.compile(r"<!-- cli-on-demo-outputs -->\n(.*?)<!-- /cli-on-demo-outputs -->", re.S)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python -m sara_network.demo --quick` run in a fresh folder, as from a clone's root: it writes to
    the default outputs/demo/, and the package's base is where the README's lines expect it."""
    root = tmp_path_factory.mktemp("clone")
    (root / "sara_network" / "demo").mkdir(parents=True)
    os.symlink(BASE_PATH, root / "sara_network" / "demo" / BASE_PATH.name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "sara_network.demo", "--quick"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root, result.stdout


def readme_cli_lines() -> list[list[str]]:
    """The argv of each `bash tools/run.sh sara ...` line of the README's block on the demo's outputs."""
    block = CLI_BLOCK.search((REPO / "README.md").read_text())
    assert block, "README.md lost its <!-- cli-on-demo-outputs --> block"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert all(line[:3] == ["bash", "tools/run.sh", "sara"] for line in lines), lines
    return [line[3:] for line in lines]


def test_demo_quick_mode_writes_its_files(demo_run):
    root, stdout = demo_run
    out = root / "outputs" / "demo"
    assert "torch threads: 1 (change with --threads N)" in stdout and "wall time:" in stdout
    assert "trainable parameters:" in stdout and "before" in stdout
    assert re.search(r"applied instead of the native file: bold-digit loss \d\.\d{4}, -?\d+% of the native", stdout)
    deltas, metadata = load_native(str(out / "digits_bold_sara.safetensors"))
    assert deltas and metadata["sara_format_version"] == "1"
    assert metadata["ss_base_model_version"] == "custom" and metadata["ss_sd_model_name"] == BASE_PATH.name
    assert not [key for key in metadata if key.startswith("modelspec.")]
    lora, lora_metadata = read_tensors(str(out / "digits_bold_lora.safetensors"))
    assert any(key.endswith(".lora_down.weight") for key in lora)
    assert lora_metadata["ss_base_model_version"] == "custom" and "modelspec.resolution" not in lora_metadata
    with open(out / "before_after.png", "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"


def test_readme_cli_lines_run_on_the_demo_outputs(demo_run, monkeypatch, capsys):
    root, _ = demo_run
    monkeypatch.chdir(root)
    lines = readme_cli_lines()
    assert {argv[0] for argv in lines} == {"to-lora", "to-diff", "from-diff", "inspect", "analyze", "merge",
                                           "from-lora"}
    for argv in lines:
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    printed = capsys.readouterr().out
    assert "fits: True" in printed and "hash_matches: True" in printed  # inspect --base: the demo base fits
    assert "selects 100,000" in printed  # analyze --budget 100k is exact

    out = root / "outputs" / "demo"
    deltas, _ = load_native(str(out / "digits_bold_sara.safetensors"))
    diff, diff_metadata = read_tensors(str(out / "digits_bold_diff.safetensors"))
    for delta in deltas:  # the diff is the dense delta (fp16)
        assert torch.equal(diff[f"{delta.name}.diff"], delta.dense().half())
    assert diff_metadata["ss_base_model_version"] == "custom"
    back = {d.name: d for d in load_native(str(out / "from_diff.safetensors"))[0]}
    for delta in deltas:  # the diff's nonzero support: the native entries that stay nonzero in fp16
        kept = delta.values.half() != 0
        assert torch.equal(back[delta.name].indices, delta.indices[kept])
        assert torch.equal(back[delta.name].values.half(), delta.values.half()[kept])
    assert not [key for key in diff_metadata if key.startswith("modelspec.") and key != "modelspec.title"]

    # merge --base: the demo base with 0.8 x the deltas baked in, still a demo base file
    base, merged = load_base(), load_base(out / "digits_base_bold.safetensors")
    base_modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in base.named_modules()}
    merged_modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in merged.named_modules()}
    for delta in deltas:
        weight = base_modules[delta.name].weight.detach()
        expected = weight + 0.8 * delta.dense().reshape(weight.shape)
        torch.testing.assert_close(merged_modules[delta.name].weight.detach(), expected, rtol=0, atol=1e-7)

    # from-lora --base --density 0.05: the demo base's 5% selection, the same support as the demo trained
    projected, projected_metadata = load_native(str(out / "from_lora.safetensors"))
    assert {d.name: d.indices.tolist() for d in projected} == {d.name: d.indices.tolist() for d in deltas}
    assert projected_metadata["ss_base_model_version"] == "custom"

    blend, _ = load_native(str(out / "blend.safetensors"))
    assert {d.name for d in blend} == {d.name for d in deltas}
    assert (out / "weights.png").stat().st_size > 0
    lora, _ = read_tensors(str(out / "digits_bold_lora_r4.safetensors"))
    assert max(t.shape[0] for k, t in lora.items() if k.endswith("lora_down.weight")) == 4


def test_lora_applied_adds_the_kohya_delta_and_restores_the_weights():
    from sara_network.demo.finetune import lora_applied

    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3)
    originals = [linear.weight.detach().clone(), conv.weight.detach().clone()]
    tensors = {"lora_unet_a.lora_up.weight": torch.randn(5, 2), "lora_unet_a.lora_down.weight": torch.randn(2, 6),
               "lora_unet_a.alpha": torch.tensor(1.0),  # scale alpha / rank = 0.5
               "lora_unet_b.lora_up.weight": torch.randn(4, 3, 1, 1),
               "lora_unet_b.lora_down.weight": torch.randn(3, 3, 3, 3)}  # no alpha: scale 1
    with lora_applied({"lora_unet_a": linear, "lora_unet_b": conv}, tensors):
        expected_linear = originals[0] + 0.5 * tensors["lora_unet_a.lora_up.weight"] @ tensors["lora_unet_a.lora_down.weight"]
        expected_conv = originals[1] + torch.einsum("or,rihw->oihw", tensors["lora_unet_b.lora_up.weight"][:, :, 0, 0],
                                                    tensors["lora_unet_b.lora_down.weight"])
        torch.testing.assert_close(linear.weight.detach(), expected_linear)
        torch.testing.assert_close(conv.weight.detach(), expected_conv)
    assert torch.equal(linear.weight, originals[0]) and torch.equal(conv.weight, originals[1])


def test_demo_gradient_selection_calibrates_and_records_the_mode(tmp_path, capsys):
    from sara_network.demo.finetune import main

    main(["--quick", "--steps", "2", "--selection", "gradient", "--lr", "auto", "--batch", "16", "--out", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert re.search(r"^lr 0\.000\d+ \(the paper's rule for this threshold\)$", stdout, re.M)
    _, metadata = read_tensors(str(tmp_path / "digits_bold_sara.safetensors"))
    assert '"selection": "gradient"' in metadata["sara_config"]
    assert json.loads(metadata["sara_calibration"])["steps"] == 10  # the demo's calibration batches
