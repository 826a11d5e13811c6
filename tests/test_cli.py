"""The `sara` command line end to end on real files: each subcommand, and bad inputs that must fail
with a clear message, a non-zero exit status and nothing written."""
import hashlib
import json
import os
import struct

import pytest
import torch

from sara_network import cli, convert, fileformat
from test_convert import ldm_checkpoint, trained_native


def data_section_sha256(serialized: bytes) -> str:
    """The addnet / sshs_model_hash of a safetensors file: sha256 of everything after the header."""
    header_length = struct.unpack("<Q", serialized[:8])[0]
    return hashlib.sha256(serialized[8 + header_length:]).hexdigest()


def test_streaming_writer_round_trips_every_dtype_and_hashes_the_data(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=generator), "b.f16": torch.randn(7, generator=generator).half(),
        "c.bf16": torch.randn(2, 3, generator=generator).bfloat16(), "d.i32": torch.arange(5, dtype=torch.int32),
        "e.i64": torch.tensor([2, 3]), "f.u8": torch.tensor([1, 255], dtype=torch.uint8),
        "g.bool": torch.tensor([True, False, True]), "h.scalar": torch.tensor(1.5),
        "i.empty": torch.zeros(0, 4), "j.f8": torch.randn(3, generator=generator).to(torch.float8_e4m3fn),
        "k.strided": torch.randn(4, 6, generator=generator).t(),
    }
    path = tmp_path / "mixed.safetensors"
    fileformat.save_tensors(str(path), tensors, {"note": "kept", "sshs_model_hash": "stale", "sshs_legacy_hash": "x"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    raw = path.read_bytes()
    assert metadata == {"note": "kept", "sshs_model_hash": data_section_sha256(raw)}
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0
    fileformat.save_tensors(str(path), tensors, {"note": "kept"}, with_hash=False)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"note": "kept"}


def test_streaming_writer_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.safetensors"
    fileformat.save_tensors(str(path), {"x": torch.ones(3)}, {})
    before = path.read_bytes()
    with pytest.raises(fileformat.SaraFileError, match="complex64"):
        fileformat.save_tensors(str(path), {"x": torch.ones(3), "y": torch.ones(2, dtype=torch.complex64)}, {})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained SD1 native file, its LDM checkpoint, a diffusers folder, and an SDXL native file."""
    folder = tmp_path_factory.mktemp("cli")
    m, _ = trained_native("sd1", folder / "sara.safetensors")
    fileformat.save_tensors(str(folder / "base.safetensors"), ldm_checkpoint(m, "sd_v1"), {}, with_hash=False)
    m.unet.save_pretrained(folder / "base_folder" / "unet")
    m.text_encoders[0].save_pretrained(folder / "base_folder" / "text_encoder")
    xl, _ = trained_native("sdxl", folder / "xl.safetensors")
    fileformat.save_tensors(str(folder / "xl_base.safetensors"), ldm_checkpoint(xl, "sdxl_base_v1-0"), {},
                            with_hash=False)
    return folder


def run(*argv):
    return cli.main([str(a) for a in argv])


def test_to_lora_and_back(files, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    assert run("to-lora", files / "sara.safetensors", lora, "--rank", 4) == 0
    out = capsys.readouterr().out
    assert "overall relative Frobenius error" in out
    tensors, metadata = fileformat.read_tensors(str(lora))
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "4"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert "sara_format" not in metadata
    report = json.loads(metadata["sara_lora_conversion"])
    assert f"{report['rel_error']:.4%}" in out
    assert metadata["sshs_model_hash"] == data_section_sha256(lora.read_bytes())

    native = tmp_path / "start.safetensors"
    assert run("from-lora", lora, native, "--base", files / "base.safetensors", "--density", "0.05") == 0
    deltas, meta = fileformat.load_native(str(native))
    assert json.loads(meta["sara_projection"])["rel_error"] > 0 and meta["sara_base_hash"]
    from_folder = tmp_path / "start_folder.safetensors"  # the same base as a diffusers folder
    assert run("from-lora", lora, from_folder, "--base", files / "base_folder", "--density", "0.05") == 0
    folder_deltas = {d.name: d for d in fileformat.load_native(str(from_folder))[0]}
    assert sorted(folder_deltas) == sorted(d.name for d in deltas)
    for d in deltas:
        assert torch.equal(d.dense(), folder_deltas[d.name].dense()), d.name
    assert run("from-lora", lora, tmp_path / "top.safetensors", "--topk-budget", "2k") == 0
    assert sum(d.indices.numel() for d in fileformat.load_native(str(tmp_path / "top.safetensors"))[0]) == 2000


def test_to_diff_from_diff_exact(files, tmp_path):
    diff = tmp_path / "d.safetensors"
    assert run("to-diff", files / "sara.safetensors", diff) == 0
    tensors, metadata = fileformat.read_tensors(str(diff))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert run("from-diff", diff, tmp_path / "n.safetensors") == 0
    original = {d.name: d.dense() for d in fileformat.load_native(str(files / "sara.safetensors"))[0]}
    back = fileformat.load_native(str(tmp_path / "n.safetensors"))[0]
    assert {d.name for d in back} == set(original)
    assert all(torch.equal(d.dense(), original[d.name]) for d in back)


def test_sdxl_open_clip_fillers(files, tmp_path):
    deltas, _ = fileformat.load_native(str(files / "xl.safetensors"))
    # drop the k_proj of one OpenCLIP attention layer: A1111 needs q, k, v and out together
    dropped = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    partial = [d for d in deltas if d.name != dropped]
    fileformat.save_native(str(tmp_path / "partial.safetensors"), partial, None,
                           {"ss_base_model_version": "sdxl_base_v1-0"})
    assert run("to-diff", tmp_path / "partial.safetensors", tmp_path / "d.safetensors") == 0
    tensors, metadata = fileformat.read_tensors(str(tmp_path / "d.safetensors"))
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert not tensors[f"{dropped}.diff"].any()
    assert run("to-lora", tmp_path / "partial.safetensors", tmp_path / "l.safetensors", "--rank", "2") == 0
    assert f"{dropped}.lora_up.weight" in fileformat.read_tensors(str(tmp_path / "l.safetensors"))[0]


@pytest.mark.parametrize("base", ["base.safetensors", "base_folder"])
def test_merge_into_base(files, tmp_path, base):
    output = tmp_path / ("merged.safetensors" if base.endswith(".safetensors") else "merged")
    assert run("merge", f"{files / 'sara.safetensors'}:0.6", f"{files / 'sara.safetensors'}:0.4",
               "--base", files / base, "-o", output) == 0
    merged = convert.load_base(str(output))
    original = convert.load_base(str(files / base)).weights()
    for delta in fileformat.load_native(str(files / "sara.safetensors"))[0]:
        torch.testing.assert_close(merged.weights()[delta.name].float(),
                                   original[delta.name].float() + delta.dense(), atol=1e-6, rtol=1e-5)


def test_merge_natives_and_sdxl_checkpoint(files, tmp_path):
    assert run("merge", f"{files / 'xl.safetensors'}:0.5", f"{files / 'xl.safetensors'}:-0.5",
               "-o", tmp_path / "zero.safetensors") == 0
    assert all(not d.values.any() for d in fileformat.load_native(str(tmp_path / "zero.safetensors"))[0])
    assert run("merge", f"{files / 'xl.safetensors'}:2", "--base", files / "xl_base.safetensors",
               "-o", tmp_path / "xl.safetensors") == 0
    merged = convert.load_checkpoint(str(tmp_path / "xl.safetensors")).weights()
    original = convert.load_checkpoint(str(files / "xl_base.safetensors")).weights()
    for delta in fileformat.load_native(str(files / "xl.safetensors"))[0]:
        torch.testing.assert_close(merged[delta.name], original[delta.name] + 2 * delta.dense())


def test_inspect_and_analyze(files, tmp_path, capsys):
    assert run("inspect", files / "sara.safetensors", "--base", files / "base_folder", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "native" and report["modules"] > 50
    assert report["base"]["fits"] and report["base"]["hash_matches"] is True
    assert 0.04 < report["density"] < 0.06
    plot = tmp_path / "w.png"
    assert run("analyze", files / "base.safetensors", "--budget", "10k", "--plot", plot) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "selects 10,000" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bad_cases(files, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((files / "sara.safetensors").read_bytes()[:-100])
    lora = tmp_path / "lora.safetensors"
    assert run("to-lora", files / "sara.safetensors", lora, "--rank", 2) == 0
    odd = tmp_path / "odd.safetensors"
    fileformat.save_tensors(str(odd), {"lora_unet_x.weird": torch.zeros(2)}, {})
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    out = tmp_path / "out.safetensors"
    return [
        (["to-lora", truncated, out, "--rank", 2], "truncated"),
        (["to-lora", lora, out, "--rank", 2], "LoRA"),
        (["to-diff", lora, out], "LoRA"),
        (["from-diff", lora, out], "from-lora"),
        (["from-lora", files / "sara.safetensors", out, "--topk-budget", 10], "native"),
        (["from-lora", odd, out, "--topk-budget", 10], "suffixes"),
        (["from-diff", odd, out], "suffixes"),
        (["from-lora", lora, out, "--base", files / "xl_base.safetensors"], "another base"),
        (["from-lora", lora, out], "--base"),
        (["merge", files / "sara.safetensors", "--base", files / "xl_base.safetensors", "-o", out], "sd_v1"),
        (["merge", files / "xl.safetensors", "--base", files / "base.safetensors", "-o", out], "sdxl"),
        (["merge", files / "sara.safetensors", "--base", lora, "-o", out], "checkpoint"),
        (["inspect", files / "sara.safetensors", "--base", files / "xl_base.safetensors"], "does not fit"),
        (["to-diff", files / "sara.safetensors", existing], "--overwrite"),
    ], out, existing


def test_bad_inputs_fail_cleanly(files, tmp_path, capsys):
    cases, out, existing = bad_cases(files, tmp_path)
    capsys.readouterr()
    for argv, message in cases:
        assert run(*argv) == 1, argv
        error = capsys.readouterr().err
        assert "error:" in error and message in error, (argv, error)
        assert not out.exists(), argv
    assert existing.read_bytes() == b"keep"
    assert not [name for name in os.listdir(tmp_path) if ".sara-tmp-" in name]


def test_tools_script_runs(files, tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "tools", "sara_cli.py")
    result = subprocess.run([sys.executable, script, "inspect", str(files / "sara.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "kind: native" in result.stdout
    bad = subprocess.run([sys.executable, script, "to-diff", str(tmp_path / "missing.safetensors"),
                          str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no such file" in bad.stderr
