"""`sara` outputs and bases beyond Stable Diffusion: an output is never an input, a missing folder is
created only on request, `custom` files carry no SD metadata, and the demo base or a diffusers model
folder is accepted wherever a base model is."""
import json
import os

import pytest
import torch

from sara_network import cli, convert
from sara_network.demo.model import BASE_PATH, load_base
from sara_network.fileformat import load_native, read_tensors
from sara_network.network import SaraNetwork, collect_targets
from sara_network.options import SaraConfig
from sara_network.progress import progress_bars


def run(*argv):
    return cli.main([str(a) for a in argv])


def demo_native(path, metadata):
    """A native file on the demo base: 1% of its weights with random deltas."""
    network = SaraNetwork(SaraConfig(density=0.01))
    network.select(collect_targets(load_base(), [], [], "full"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-2)
    network.save(str(path), torch.float32, metadata)
    return path


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return demo_native(tmp_path_factory.mktemp("paths") / "demo.safetensors", {"ss_base_model_version": "custom"})


def test_output_equal_to_an_input_is_refused_even_with_overwrite(native, tmp_path, capsys, monkeypatch):
    source = tmp_path / "mine.safetensors"
    source.write_bytes(native.read_bytes())
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    os.link(source, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    for output in (source, "mine.safetensors", link, "./sub/../hard.safetensors"):
        os.makedirs(tmp_path / "sub", exist_ok=True)
        assert run("to-diff", source, output, "--overwrite") == 1
        assert "is the input" in capsys.readouterr().err
    assert run("merge", f"{link}:0.5", native, "-o", source, "--overwrite") == 1
    assert run("merge", native, "--base", BASE_PATH, "-o", BASE_PATH, "--overwrite") == 1
    assert run("analyze", BASE_PATH, "--plot", BASE_PATH, "--overwrite") == 1
    assert run("from-lora", source, tmp_path / "x.safetensors", "--base", source, "--overwrite") == 1
    assert source.read_bytes() == native.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.safetensors", "link.safetensors", "mine.safetensors",
                                                          "sub"]


def test_missing_output_folder_is_an_error_unless_make_dirs(native, tmp_path, capsys):
    output = tmp_path / "new" / "deeper" / "diff.safetensors"
    assert run("to-diff", native, output) == 1
    error = capsys.readouterr().err
    assert "does not exist" in error and "--make-dirs" in error
    assert not (tmp_path / "new").exists()
    assert run("to-diff", native, output, "--make-dirs") == 0
    assert read_tensors(str(output))[0]
    assert run("analyze", BASE_PATH, "--plot", tmp_path / "plots" / "w.png") == 1
    assert run("analyze", BASE_PATH, "--plot", tmp_path / "plots" / "w.png", "--make-dirs", "--quiet") == 0


def test_custom_base_kind_stamps_no_stable_diffusion_metadata(tmp_path):
    sd1_native = demo_native(tmp_path / "sd1.safetensors", {"ss_base_model_version": "sd_v1"})
    assert read_tensors(str(sd1_native))[1]["modelspec.resolution"] == "512x512"  # what would be carried over
    bare = demo_native(tmp_path / "bare.safetensors", {})
    assert run("to-lora", bare, tmp_path / "refused.safetensors", "--rank", 2) == 1  # says nothing, needs a kind
    for source, given in ((bare, ["--base-model", "custom"]), (sd1_native, ["--base-model", "custom"])):
        for command, extra in (("to-lora", ["--rank", "2"]), ("to-diff", [])):
            output = tmp_path / f"{source.stem}-{command}.safetensors"
            assert run(command, source, output, *extra, *given) == 0
            metadata = read_tensors(str(output))[1]
            assert metadata["ss_base_model_version"] == "custom" and metadata["ss_v2"] == "False"
            assert [key for key in metadata if key.startswith("modelspec.")] == ["modelspec.title"]
    assert convert.modelspec_metadata("custom") == {}
    assert convert.open_clip_fillers({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8)}, "custom") == {}


def test_demo_base_and_diffusers_model_folder_are_bases(native, tmp_path, capsys):
    folder = tmp_path / "unet_folder"
    load_base().save_pretrained(folder)
    for base in (BASE_PATH, folder):
        assert run("inspect", native, "--base", base) == 0
        out = capsys.readouterr().out
        assert "fits: True" in out and "hash_matches: True" in out
    assert run("merge", f"{native}:0.5", "--base", BASE_PATH, "-o", tmp_path / "merged.safetensors") == 0
    assert run("merge", f"{native}:0.5", "--base", folder, "-o", tmp_path / "merged_folder") == 0
    from diffusers import UNet2DModel

    from_file = load_base(tmp_path / "merged.safetensors").state_dict()
    from_folder = UNet2DModel.from_pretrained(tmp_path / "merged_folder").state_dict()
    base = load_base().state_dict()
    assert sorted(os.listdir(tmp_path / "merged_folder")) == sorted(os.listdir(folder))
    changed = [key for key in base if not torch.equal(base[key], from_file[key])]
    assert len(changed) == len(load_native(str(native))[0])  # one weight per module, nothing else
    for key in base:
        assert torch.equal(from_file[key], from_folder[key]), key


def test_base_errors_say_what_a_base_is(native, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for base in (native, tmp_path / "empty"):
        assert run("analyze", base) == 1
        error = capsys.readouterr().err
        assert "diffusers model folder" in error and "demo base" in error
    assert run("inspect", native, "--base", native) == 1
    assert "native SaRA file, not a base model" in capsys.readouterr().err


def test_analyze_selects_the_default_threshold_without_budget(capsys):
    assert run("analyze", BASE_PATH, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selected_threshold"] == SaraConfig().threshold == 2e-3
    assert report["selected_fraction"] == report["fraction_below"]["0.002"]
    assert run("analyze", BASE_PATH, "--threshold", "1e-3") == 0
    out = capsys.readouterr().out
    assert "selected: |w| < 0.001 (--threshold" in out


def test_progress_bars_are_off_when_quiet_or_not_on_a_terminal():
    items = [1, 2, 3]
    assert progress_bars(quiet=True)(items) is items
    bar = progress_bars()(items, desc="x")  # pytest's stderr is not a terminal
    assert list(bar) == items and getattr(bar, "disable", True)


def test_apply_sara_on_a_non_sd_diffusers_model_records_custom(tmp_path, capsys):
    from sara_network import hf

    network = hf.apply_sara(load_base(), density=0.01, progressive_iter="off")
    network.save(str(tmp_path / "hf.safetensors"))
    network.unpatch()
    assert read_tensors(str(tmp_path / "hf.safetensors"))[1]["ss_base_model_version"] == "custom"
    assert run("to-diff", tmp_path / "hf.safetensors", tmp_path / "diff.safetensors") == 0
    assert run("inspect", tmp_path / "hf.safetensors", "--base", BASE_PATH) == 0
    assert "hash_matches: True" in capsys.readouterr().out


def test_reading_a_native_file_reports_progress_per_module(tmp_path):
    """inspect / to-lora / to-diff read large files through a progress hook: it sees every module."""
    from sara_network import hf
    from sara_network.fileformat import load_native

    network = hf.apply_sara(load_base(), density=0.01, progressive_iter="off")
    path = str(tmp_path / "hf.safetensors")
    network.save(path)
    network.unpatch()
    seen = []

    def recording(items, **kwargs):
        for item in items:
            seen.append((kwargs["desc"], item))
            yield item

    deltas, _ = load_native(path, progress=recording)
    assert [name for _, name in seen] == sorted(d.name for d in deltas) and {d for d, _ in seen} == {"read"}
    assert [d.name for d in deltas] == [d.name for d in load_native(path)[0]]
