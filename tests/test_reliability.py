"""Damaged and hostile files: one minimal file per failure class of issue 12, built here, through
the loaders; NaN / Inf never produced from finite input; atomic outputs (mode, temp names, stale
temps, SIGKILL during a write); nothing half-applied to a live model or a merge destination."""
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import time
import types

import pytest
import torch

import models
import sara_network
from sara_network import analysis, cli, fileformat, hf, host_patch, ldm_names
from sara_network.fileformat import ModuleDelta, SaraFileError
from test_convert import ldm_checkpoint

NAME = "lora_unet_x"


def tiny_parts(**changes):
    """One valid module: a 4x4 weight, entries 0 and 5."""
    parts = {"sara_values": torch.tensor([0.5, -0.25]), "sara_indices": torch.tensor([0, 5], dtype=torch.int32),
             "sara_shape": torch.tensor([4, 4])}
    parts.update(changes)
    return {k: v for k, v in parts.items() if v is not None}


def tiny_metadata(**changes):
    metadata = {"sara_format": "sara-network/native", "sara_format_version": "1",
                "sara_counts": json.dumps({NAME: 2}), "sara_total_selected": "2", "ss_base_model_version": "sd_v1"}
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def write_file(path, parts=None, metadata=None) -> str:
    tensors = {f"{NAME}.{k}": v for k, v in (parts if parts is not None else tiny_parts()).items()}
    fileformat.write_safetensors(str(path), tensors, metadata if metadata is not None else tiny_metadata(),
                                 with_hash=False)
    return str(path)


def raw_file(path, header, body=b"") -> str:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(blob)) + blob + body)
    return str(path)


def refused(path, *words, **kwargs):
    """load_native raises a SaraFileError naming the file and the given words."""
    with pytest.raises(SaraFileError) as caught:
        fileformat.load_native(path, **kwargs)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, (word, message)
    return message


def test_the_minimal_file_is_valid(tmp_path):
    deltas, _ = fileformat.load_native(write_file(tmp_path / "ok.safetensors"))
    assert deltas[0].name == NAME and deltas[0].indices.tolist() == [0, 5]


# --- wrong JSON types in metadata and header -------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("sara_counts", json.dumps([1, 2]), ["sara_counts", "JSON object"]),
    ("sara_counts", json.dumps({NAME: 2.0}), ["sara_counts", NAME, "positive integer"]),  # 13.0 style
    ("sara_counts", json.dumps({NAME: "2"}), ["sara_counts", NAME]),
    ("sara_counts", "{not json", ["sara_counts", "not valid JSON"]),
    ("sara_counts", json.dumps({NAME: 2, "lora_unet_y": 1}), ["lists 2 modules", "lora_unet_y"]),
    ("sara_total_selected", "2.0", ["sara_total_selected", "digits"]),
    ("sara_total_selected", "3", ["sara_total_selected", "add up to 2"]),
    ("sara_total_selected", None, ["sara_total_selected"]),
    ("sara_format_version", "1.0", ["version '1.0'"]),
    ("sara_format_version", "2", ["version '2'", "upgrade"]),
    ("sara_thresholds", json.dumps([0.1]), ["sara_thresholds", "JSON object"]),
    ("sara_thresholds", json.dumps({"unet": "abc"}), ["sara_thresholds", "unet", "finite number"]),
    ("sara_thresholds", '{"unet": NaN}', ["sara_thresholds", "unet"]),
    ("sara_config", json.dumps([1]), ["sara_config", "JSON object"]),
    ("sara_optimizer_steps", "-1", ["sara_optimizer_steps"]),
])
def test_metadata_fields_are_typed_and_ranged(tmp_path, key, value, words):
    path = write_file(tmp_path / "bad.safetensors", metadata=tiny_metadata(**{key: value}))
    refused(path, *words)
    with pytest.raises(SaraFileError):  # the kohya and inspect paths read through the same checks
        sara_network.create_network_from_weights(1.0, path, None, None, None)
    with pytest.raises(SaraFileError):
        analysis.inspect_file(path)


@pytest.mark.parametrize("header, words", [
    (b"\xff\xfe{}", ["not UTF-8"]),
    (b'{"a": ', ["not valid JSON"]),
    (b"[" * 100000 + b"]" * 100000, ["not valid JSON"]),  # nesting deeper than the parser's recursion
    (b'{"__metadata__": {"sara_format": 1}}', ["metadata must map strings to strings"]),
    (b'{"__metadata__": ["x"]}', ["metadata must map strings to strings"]),
    (b'{"x": [1, 2]}', ["'x'", "exactly dtype, shape and data_offsets"]),
    (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": '
     b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', ["duplicate key 'x'"]),
    (b'{"x": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', ["shape must be a list of non-negative"]),
    (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', ["data_offsets"]),
    (b'{"x": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}', ["dtype 7 is not supported"]),
    (b'{"x": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 4]}}', ["does not match its 4 bytes"]),
    (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', ["data at byte 4, expected 0"]),
])
def test_safetensors_header_is_checked_before_any_allocation(tmp_path, header, words):
    refused(raw_file(tmp_path / "bad.safetensors", header, b"\0" * 8), *words)


def test_header_length_and_size_come_from_the_file(tmp_path):
    good = open(write_file(tmp_path / "ok.safetensors"), "rb").read()
    for length in (2 ** 63, len(good), 100_000_001):
        path = tmp_path / "long.safetensors"
        path.write_bytes(struct.pack("<Q", length) + good[8:])
        refused(str(path), "corrupted or truncated", f"claims {length} bytes")
    (tmp_path / "short.safetensors").write_bytes(good[:5])
    refused(str(tmp_path / "short.safetensors"), "too short")
    (tmp_path / "extra.safetensors").write_bytes(good + b"\0")
    refused(str(tmp_path / "extra.safetensors"), "corrupted or truncated")


# --- module tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("changes, words", [
    ({"sara_indices": torch.tensor([5, 0], dtype=torch.int32)}, ["sara_indices not strictly increasing"]),
    ({"sara_indices": torch.tensor([5, 5], dtype=torch.int32)}, ["sara_indices not strictly increasing"]),
    ({"sara_indices": torch.tensor([0, 16], dtype=torch.int32)}, ["sara_indices out of range for 16"]),
    ({"sara_indices": torch.tensor([-1, 5], dtype=torch.int32)}, ["out of range"]),
    ({"sara_indices": torch.tensor([0, 5], dtype=torch.int64)}, ["int32"]),
    ({"sara_indices": None, "sara_mask": torch.tensor([0b100001, 0x80], dtype=torch.uint8),  # popcount 3
      "sara_values": torch.tensor([0.5, -0.25, 1.0])}, ["sara_counts says 2 entries, the file has 3"]),
    ({"sara_indices": None, "sara_mask": torch.tensor([1, 0, 0], dtype=torch.uint8)}, ["sara_mask", "2 bytes"]),
    ({"sara_mask": torch.tensor([1, 0], dtype=torch.uint8)}, ["exactly one of"]),
    ({"sara_shape": torch.tensor([4, 4], dtype=torch.int32)}, ["sara_shape", "int64"]),
    ({"sara_shape": torch.tensor([16])}, ["sara_shape", "2 or 4 sizes"]),
    ({"sara_shape": torch.tensor([0, 4])}, ["sara_shape", "positive"]),
    ({"sara_shape": torch.tensor([2 ** 40, 2 ** 40])}, ["sara_shape", "at most"]),
    ({"sara_values": torch.tensor([1, 2], dtype=torch.int32)}, ["sara_values", "fp32/fp16/bf16"]),
    ({"sara_values": torch.tensor([0.5])}, ["sara_values has 1 entries"]),
    ({"sara_values": torch.tensor([0.5, float("nan")])}, ["holds NaN or Inf", "allow_non_finite"]),
    ({"sara_frozen": torch.tensor([0x04], dtype=torch.uint8)}, ["sara_frozen", "bits set past"]),
    ({"sara_bias_values": torch.tensor([0.1])}, ["both sara_bias_values and sara_bias_indices"]),
    ({"sara_bias_values": torch.tensor([0.1]), "sara_bias_indices": torch.tensor([4], dtype=torch.int32)},
     ["sara_bias_indices out of range for 4"]),
    ({"sara_odd": torch.zeros(1)}, ["unknown tensor"]),
])
def test_module_tensors_are_checked(tmp_path, changes, words):
    refused(write_file(tmp_path / "bad.safetensors", tiny_parts(**changes)), NAME, *words)


def test_an_empty_module_is_refused_not_a_key_error(tmp_path):
    parts = tiny_parts(sara_indices=torch.zeros(0, dtype=torch.int32), sara_values=torch.zeros(0))
    refused(write_file(tmp_path / "bad.safetensors", parts, tiny_metadata(sara_counts=json.dumps({NAME: 0}),
                                                                          sara_total_selected="0")), "positive")
    m = models.tiny_sd1()
    network = sara_network.network.SaraNetwork()
    targets = sara_network.network.all_targets(m.unet, [], [])
    name = targets[0].name
    shape = tuple(targets[0].module.weight.shape)
    with pytest.raises(SaraFileError, match="no entries"):
        network.adopt_deltas(targets, [ModuleDelta(name, shape, torch.zeros(0, dtype=torch.int32), torch.zeros(0))])
    one = ModuleDelta(name, shape, torch.tensor([1], dtype=torch.int32), torch.ones(1))
    with pytest.raises(SaraFileError, match="given twice"):
        network.adopt_deltas(targets, [one, one])


def test_non_finite_values_are_refused_unless_allowed(tmp_path, capsys):
    path = write_file(tmp_path / "nan.safetensors", tiny_parts(sara_values=torch.tensor([float("inf"), 1.0])))
    refused(path, "module lora_unet_x", "NaN or Inf")
    deltas, _ = fileformat.load_native(path, allow_non_finite=True)
    assert torch.isinf(deltas[0].values[0])
    assert cli.main(["inspect", path]) == 1
    assert "NaN or Inf" in capsys.readouterr().err
    assert cli.main(["inspect", path, "--allow-non-finite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["values"]["nonfinite"] == 1
    out = tmp_path / "lora.safetensors"
    assert cli.main(["to-lora", path, str(out), "--rank", "1"]) == 1  # not a linalg.svd error
    error = capsys.readouterr().err
    assert "the file holds NaN or Inf" in error and "svd" not in error and not out.exists()


# --- wrong kinds and pickles ------------------------------------------------------------------
def test_torch_files_with_pickles_sparse_or_odd_metadata(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2), "y": types.SimpleNamespace(a=1)}, evil)
    refused(str(evil), "pickled objects", "never unpickles")
    assert cli.main(["inspect", str(evil)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sara inspect: error: {evil}: "), lines
    assert cli.main(["inspect", str(evil), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err

    tensors = {f"{NAME}.{k}": v for k, v in tiny_parts().items()}
    sparse = dict(tensors, **{f"{NAME}.sara_values": tensors[f"{NAME}.sara_values"].to_sparse()})
    sparse["__sara_metadata__"] = torch.frombuffer(bytearray(json.dumps(tiny_metadata()).encode()), dtype=torch.uint8)
    torch.save(sparse, tmp_path / "sparse.pt")
    refused(str(tmp_path / "sparse.pt"), "sparse")
    with pytest.raises(SaraFileError, match="dense tensor"):  # a host hands the sparse tensor over directly
        fileformat.parse_module(NAME, {k.split(".", 1)[1]: v for k, v in sparse.items() if k.startswith(NAME)})
    odd = dict(tensors, __sara_metadata__=torch.tensor([300, 1], dtype=torch.int32))
    torch.save(odd, tmp_path / "odd.pt")
    refused(str(tmp_path / "odd.pt"), "__sara_metadata__", "uint8")
    bad_text = dict(tensors, __sara_metadata__=torch.tensor([0xff, 0xfe], dtype=torch.uint8))
    torch.save(bad_text, tmp_path / "text.pt")
    refused(str(tmp_path / "text.pt"), "not UTF-8")


@pytest.mark.parametrize("change, words", [
    ({"alpha": torch.zeros(3)}, ["alpha one floating number"]),
    ({"lora_up.weight": torch.zeros(5)}, ["2-D or 4-D"]),
    ({"lora_down.weight": torch.zeros(0, 4)}, ["2-D or 4-D"]),
    ({"lora_up.weight": torch.zeros(4, 2, dtype=torch.int32)}, ["floating"]),
])
def test_damaged_lora_files_are_named_not_raw_errors(tmp_path, change, words):
    parts = {"lora_up.weight": torch.ones(4, 2), "lora_down.weight": torch.ones(2, 4), "alpha": torch.tensor(2.0)}
    parts.update(change)
    path = str(tmp_path / "lora.safetensors")
    fileformat.write_safetensors(path, {f"{NAME}.{k}": v for k, v in parts.items()}, {})
    with pytest.raises(SaraFileError, match=" / ".join(words)) as caught:
        analysis.inspect_file(path)
    assert str(caught.value).startswith(path) and NAME in str(caught.value)


def test_cli_errors_are_one_line_naming_command_and_file(tmp_path, capsys):
    path = raw_file(tmp_path / "bad.safetensors", b"\xff")
    for argv in (["inspect", path], ["to-diff", path, str(tmp_path / "o")], ["to-lora", path, str(tmp_path / "o"),
                 "--rank", "1"], ["merge", path, "-o", str(tmp_path / "o")]):
        assert cli.main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sara {argv[0]}: error: {path}: "), lines
    assert not os.path.exists(tmp_path / "o")


# --- conversions never produce NaN / Inf from finite input ------------------------------------
def test_to_diff_refuses_values_beyond_fp16_instead_of_writing_inf(tmp_path, capsys):
    path = write_file(tmp_path / "big.safetensors", tiny_parts(sara_values=torch.tensor([1e5, -0.5])))
    out = tmp_path / "diff.safetensors"
    assert cli.main(["to-diff", path, str(out)]) == 1
    assert "does not fit torch.float16" in capsys.readouterr().err and not out.exists()
    assert cli.main(["to-diff", path, str(out), "--dtype", "fp32"]) == 0
    diff = fileformat.read_tensors(str(out))[0][f"{NAME}.diff"]
    assert diff.reshape(-1)[0] == 1e5 and bool(torch.isfinite(diff).all())


def test_to_lora_and_merge_refuse_overflow(tmp_path, capsys):
    huge = write_file(tmp_path / "huge.safetensors", tiny_parts(sara_values=torch.tensor([3e38, 3e38])))
    assert cli.main(["merge", huge, huge, "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "overflows float32" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()
    big = write_file(tmp_path / "big.safetensors", tiny_parts(sara_values=torch.tensor([1e12, 1e12])))
    assert cli.main(["to-lora", big, str(tmp_path / "l.safetensors"), "--rank", "1"]) == 1
    assert "overflow fp16" in capsys.readouterr().err and not (tmp_path / "l.safetensors").exists()


# --- nothing half-applied ---------------------------------------------------------------------
def weights_hash(*modules) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    m = models.tiny_sd1()
    net = models.random_sara_file(m, str(folder / "good.safetensors"), 0, {})
    tensors, metadata = fileformat.read_tensors(str(folder / "good.safetensors"))
    last = sorted({k.split(".", 1)[0] for k in tensors})[-1]
    shape_key = f"{last}.sara_shape"
    wrong = dict(tensors, **{shape_key: tensors[shape_key].flip(0).contiguous()})  # valid file, wrong fit
    fileformat.write_safetensors(str(folder / "misfit.safetensors"), wrong, metadata)
    net.unpatch()
    net.detach_optimizer_hooks()
    return folder, m


def test_kohya_load_failures_leave_every_weight_identical(trained, tmp_path):
    folder, _ = trained
    m = models.tiny_sd1()
    network = sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, density="0.02")
    network.apply_to(m.text_encoders[0], m.unet, True, True)
    before = weights_hash(m.unet, m.text_encoders[0], network)
    bad = raw_file(tmp_path / "bad.safetensors", b"{")
    for path in (str(folder / "misfit.safetensors"), bad):
        with pytest.raises(SaraFileError):
            network.load_weights(path)
        assert weights_hash(m.unet, m.text_encoders[0], network) == before
    # a file naming a module this model lacks is an error, not silently dropped
    deltas, metadata = fileformat.load_native(str(folder / "good.safetensors"))
    renamed = [ModuleDelta("lora_unet_not_here", d.shape, d.indices, d.values) if i == 0 else d
               for i, d in enumerate(deltas)]
    fileformat.save_native(str(tmp_path / "renamed.safetensors"), renamed, None, fileformat.format_metadata(renamed))
    fresh = models.tiny_sd1()
    created, _ = sara_network.create_network_from_weights(1.0, str(tmp_path / "renamed.safetensors"), None,
                                                          fresh.text_encoders[0], fresh.unet)
    before = weights_hash(fresh.unet, fresh.text_encoders[0])
    with pytest.raises(SaraFileError, match="lora_unet_not_here: no such module"):
        created.apply_to(fresh.text_encoders[0], fresh.unet, True, True)
    assert weights_hash(fresh.unet, fresh.text_encoders[0]) == before and not created.sara_modules()


def test_hf_load_sara_with_a_bad_second_file_loads_nothing(trained):
    folder, _ = trained
    m = models.tiny_sd1()
    pipe = types.SimpleNamespace(unet=m.unet, text_encoder=m.text_encoders[0])
    hf.load_sara(pipe, str(folder / "good.safetensors"))
    hf.fuse_sara(pipe)
    fused = weights_hash(m.unet, m.text_encoders[0])
    with pytest.raises(SaraFileError, match="does not fit"):
        hf.load_sara(pipe, [str(folder / "good.safetensors"), str(folder / "misfit.safetensors")])
    assert weights_hash(m.unet, m.text_encoders[0]) == fused and len(hf.get_sara_networks(pipe)) == 1


def test_checkpoint_patch_is_all_or_nothing(trained):
    folder, m = trained
    state = ldm_checkpoint(m, "sd_v1")
    deltas, _ = fileformat.load_native(str(folder / "good.safetensors"))
    arch = ldm_names.get_arch("sd1")
    biased = [d for d in deltas if d.bias_indices is not None][-1]
    del state[ldm_names.checkpoint_key(biased.name, arch).bias_key]
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(SaraFileError, match="trains a bias"):
        host_patch.patch_checkpoint_(state, deltas, arch)
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_failed_merge_leaves_the_destination_as_it_was(trained, tmp_path):
    folder, m = trained
    base = tmp_path / "base.safetensors"
    fileformat.save_tensors(str(base), ldm_checkpoint(m, "sd_v1"), {}, with_hash=False)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    argv = ["merge", str(folder / "misfit.safetensors"), "--base", str(base), "-o", str(out), "--overwrite"]
    assert cli.main(argv) == 1
    assert out.read_bytes() == b"old"
    assert not [n for n in os.listdir(tmp_path) if "sara-tmp" in n]


# --- atomic outputs ---------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_outputs_get_the_mode_a_plain_write_gives(trained, tmp_path, umask_022):
    folder, _ = trained
    m = models.tiny_sd1()
    network = sara_network.create_network(1.0, None, None, None, m.text_encoders[0], m.unet, density="0.02")
    network.apply_to(m.text_encoders[0], m.unet, True, True)
    saved = tmp_path / "kohya.safetensors"
    network.save_weights(str(saved), torch.float16, {})
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644
    os.chmod(saved, 0o640)
    network.save_weights(str(saved), torch.float16, {})  # replacing keeps the file's own mode
    assert stat.S_IMODE(saved.stat().st_mode) == 0o640
    base_folder = tmp_path / "base"
    m.unet.save_pretrained(base_folder / "unet")
    m.text_encoders[0].save_pretrained(base_folder / "text_encoder")
    out = tmp_path / "merged"
    assert cli.main(["merge", str(folder / "good.safetensors"), "--base", str(base_folder), "-o", str(out),
                     "--base-model", "sd_v1"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode) == 0o644


def test_stale_temps_of_dead_runs_are_reclaimed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path = tmp_path / "out.safetensors"
    stale_file = tmp_path / f".out.safetensors.sara-tmp-{dead}-0000"
    stale_folder = tmp_path / f".out.safetensors.sara-tmp-{dead}-0001"
    live = tmp_path / f".out.safetensors.sara-tmp-{os.getppid()}-0002"  # a run still going: kept
    stale_file.write_bytes(b"half")
    stale_folder.mkdir()
    (stale_folder / "x").write_bytes(b"half")
    live.write_bytes(b"busy")
    fileformat.atomic_write_bytes(str(path), b"new")
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "out.safetensors"])
    # a folder moved aside by a replace that was killed comes back when the output is missing
    aside = tmp_path / f".dest.sara-old-{dead}-0003"
    aside.mkdir()
    (aside / "kept").write_bytes(b"old")
    fileformat.reclaim_stale_temps(str(tmp_path / "dest"))
    assert (tmp_path / "dest" / "kept").read_bytes() == b"old"


def test_a_failed_folder_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with fileformat.atomic_folder(str(tmp_path / "dest")) as staging:
            open(os.path.join(staging, "a"), "wb").close()
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


KILLS = int(os.environ.get("SARA_KILLS", "0"))  # the long mode (docs/reliability.md) sets 50


def record_kills(what, survived, during_write):
    """Append to SARA_KILL_REPORT (long mode): kills survived, and how many hit a write in progress."""
    if os.environ.get("SARA_KILL_REPORT"):
        with open(os.environ["SARA_KILL_REPORT"], "a") as stream:
            stream.write(json.dumps({"what": what, "kills": survived, "during_write": during_write}) + "\n")


WRITER = """
import sys
from sara_network import fileformat
path, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
n = 0
while True:
    n += 1
    fileformat.atomic_write_bytes(path, bytes([n % 2]) * size)
"""


def kill_during_writes(path, size, kills, rng):
    """SIGKILL a process rewriting `path` (payload all 0 or all 1 bytes) at random moments; after
    each kill the file is one of the two complete payloads."""
    survived = during_write = 0
    for _ in range(kills):
        process = subprocess.Popen([sys.executable, "-c", WRITER, path, str(size)], stdout=subprocess.PIPE,
                                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        data = open(path, "rb").read()
        assert len(data) == size and data in (b"\0" * size, b"\1" * size)
        survived += 1
        during_write += any(".sara-tmp-" in name for name in os.listdir(os.path.dirname(path)))
    record_kills("atomic file write", survived, during_write)
    return survived


def test_sigkill_during_writes_leaves_the_old_or_the_new_file(tmp_path):
    path = str(tmp_path / "out.safetensors")
    fileformat.atomic_write_bytes(path, b"\0" * 4_000_000)
    kills = KILLS or 3
    assert kill_during_writes(path, 4_000_000, kills, random.Random(0)) == kills
    fileformat.atomic_write_bytes(path, b"done")  # the next write reclaims the killed runs' temps
    assert os.listdir(tmp_path) == ["out.safetensors"]


MERGER = """
import sys
from sara_network import cli
print("ready", flush=True)
cli.main(sys.argv[1:])
"""


def folder_digest(folder) -> dict:
    return {os.path.relpath(os.path.join(root, name), folder):
            hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(folder) for name in names}


def kill_during_folder_merges(source, base_folder, out, kills, rng):
    """SIGKILL `sara merge --base <folder>` over an older merge (scale 0.5), every other time at a
    random moment and otherwise just after its temporary folder appears (so some kills land in the
    write); after each kill, and the reclaim the next run does first, `out` is the old or the new merge."""
    argv = ["merge", f"{source}:0.5", "--base", str(base_folder), "-o", str(out), "--base-model", "sd_v1",
            "--overwrite"]
    assert cli.main(argv) == 0
    old = folder_digest(out)
    assert cli.main([a.replace(":0.5", ":1") for a in argv]) == 0
    new = folder_digest(out)
    assert cli.main(argv) == 0
    survived = during_write = 0
    for number in range(kills):
        process = subprocess.Popen([sys.executable, "-c", MERGER, *[a.replace(":0.5", ":1") for a in argv]],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert process.stdout.readline().strip() == b"ready"
        if number % 2:
            deadline = time.time() + 120
            while process.poll() is None and time.time() < deadline and \
                    not any(".sara-tmp-" in name for name in os.listdir(os.path.dirname(out))):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.03))
        else:
            time.sleep(rng.uniform(0.0, 2.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        during_write += any(".sara-" in name for name in os.listdir(os.path.dirname(out)))
        fileformat.reclaim_stale_temps(str(out))
        assert folder_digest(out) in (old, new)
        survived += 1
        if folder_digest(out) == new:
            assert cli.main(argv) == 0  # back to the old one for the next kill
    record_kills("sara merge --base <diffusers folder>", survived, during_write)
    return survived


def test_sigkill_during_a_folder_merge_leaves_the_old_or_the_new_folder(trained, tmp_path):
    folder, m = trained
    base_folder = tmp_path / "base"
    m.unet.save_pretrained(base_folder / "unet")
    m.text_encoders[0].save_pretrained(base_folder / "text_encoder")
    out = tmp_path / "merged"
    kills = KILLS or 2
    assert kill_during_folder_merges(str(folder / "good.safetensors"), base_folder, out, kills, random.Random(1)) == kills
    assert cli.main(["merge", str(folder / "good.safetensors"), "--base", str(base_folder), "-o", str(out),
                     "--base-model", "sd_v1", "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["base", "merged"]
