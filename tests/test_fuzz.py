"""A mutation fuzzer over every entry point that reads a native SaRA file.

Valid native files of a tiny SD1 model (mask and index forms, fp16 / bf16 / fp32 values, frozen
flags, bias deltas, a tensor-only .pt) are damaged in seeded random ways: byte flips, truncation,
appended bytes, safetensors header edits, metadata edits with wrong JSON types, tensor edits
(out-of-range / unsorted / duplicate indices, mask padding, popcount, NaN, shapes), and files of the
wrong kind. Each case goes through `fileformat.load_native` and one more entry point in turn (kohya
`create_network_from_weights` + `apply_to` and `load_weights`, `hf.load_sara`, `sara inspect / to-lora /
to-diff / merge`, merges into a checkpoint and a diffusers folder, the UI helpers of host_patch).

Every case must end in either
- a valid load whose data equal an independent numpy reading of the file's bytes, and outputs that
  are complete and finite, or
- a SaraFileError, with every model weight bit-identical and no output or temp file left,
within CASE_SECONDS. Quick mode (CI): SARA_FUZZ_CASES (default 300) cases; the long mode in
docs/reliability.md runs SARA_FUZZ_CASES=5000 and writes a summary to SARA_FUZZ_REPORT.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import signal
import struct
import time
import types

import numpy as np
import pytest
import torch

import models
import sara_network
from sara_network import cli, fileformat, hf, host_patch, ldm_names
from sara_network.fileformat import ModuleDelta, SaraFileError
from sara_network.naming import component_of
from test_convert import ldm_checkpoint

CASES = int(os.environ.get("SARA_FUZZ_CASES", "300"))
SEED = int(os.environ.get("SARA_FUZZ_SEED", "12"))
CASE_SECONDS = 10
MAX_RSS_BYTES = 6 * 2 ** 30


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise CaseTimeout(f"more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# an independent reading of a safetensors native file: numpy over the raw bytes
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def numpy_tensors(data: bytes) -> tuple[dict[str, tuple[str, np.ndarray]], dict]:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = data[8 + length + begin: 8 + length + end]
        if entry["dtype"] == "BF16":
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, _NUMPY[entry["dtype"]])
        arrays[name] = (entry["dtype"], array.reshape(entry["shape"]))
    return arrays, metadata


def expected_modules(arrays) -> dict[str, dict]:
    grouped = collections.defaultdict(dict)
    for key, (_, array) in arrays.items():
        name, suffix = key.split(".", 1)
        grouped[name][suffix] = array
    expected = {}
    for name, parts in grouped.items():
        shape = tuple(int(s) for s in parts["sara_shape"])
        if "sara_mask" in parts:
            indices = np.unpackbits(parts["sara_mask"], bitorder="little")[: int(np.prod(shape))].nonzero()[0]
        else:
            indices = parts["sara_indices"].astype(np.int64)
        values = parts["sara_values"].astype(np.float32)
        frozen = None
        if "sara_frozen" in parts:
            frozen = np.unpackbits(parts["sara_frozen"], bitorder="little")[: len(indices)].astype(bool)
        expected[name] = {"shape": shape, "indices": indices, "values": values, "frozen": frozen,
                          "bias_indices": parts.get("sara_bias_indices"), "bias_values": parts.get("sara_bias_values")}
    return expected


def same_array(tensor, array) -> bool:
    if tensor is None or array is None:
        return tensor is None and array is None
    ours = tensor.detach().cpu().to(torch.float64 if tensor.is_floating_point() else torch.int64).numpy()
    theirs = np.asarray(array, dtype=ours.dtype)
    return ours.shape == theirs.shape and np.array_equal(ours, theirs, equal_nan=ours.dtype.kind == "f")


def check_against_bytes(deltas: list[ModuleDelta], data: bytes) -> None:
    arrays, _ = numpy_tensors(data)
    expected = expected_modules(arrays)
    assert sorted(d.name for d in deltas) == sorted(expected), "module set differs from the file's"
    for delta in deltas:
        want = expected[delta.name]
        assert tuple(delta.shape) == want["shape"], delta.name
        assert same_array(delta.indices, want["indices"]), delta.name
        assert same_array(delta.values, want["values"]), delta.name
        assert same_array(delta.frozen, want["frozen"]), delta.name
        assert same_array(delta.bias_indices, want["bias_indices"]), delta.name
        assert same_array(delta.bias_values, want["bias_values"]), delta.name


# ---------------------------------------------------------------------------------------------
# seed files
def split_file(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_file(header, body: bytes, text: str | None = None) -> bytes:
    blob = (text if text is not None else json.dumps(header, separators=(",", ":"))).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + body


def write_native(deltas, metadata, dtype=None) -> bytes:
    import tempfile

    tensors = fileformat.to_tensors(deltas, dtype)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "f.safetensors")
        fileformat.write_safetensors(path, tensors, fileformat.format_metadata(list(deltas), metadata))
        with open(path, "rb") as stream:
            return stream.read()


def seed_files(network, rng: random.Random) -> dict[str, bytes]:
    """Valid native files of the tiny model in each form the format allows."""
    deltas = network.deltas()
    metadata = {**network.file_metadata(), "ss_base_model_version": "sd_v1"}
    sparse = [ModuleDelta(d.name, d.shape, d.indices[::8].contiguous(), d.values[::8].contiguous())
              for d in deltas]  # index form (density below 1/32)
    frozen = []
    for d in deltas[:6]:
        flags = torch.tensor([rng.random() < 0.3 for _ in range(d.indices.numel())])
        frozen.append(ModuleDelta(d.name, d.shape, d.indices, d.values, flags, d.bias_indices, d.bias_values))
    seeds = {"mask_fp16": write_native(deltas, metadata, torch.float16),
             "index_fp32": write_native(sparse, metadata, torch.float32),
             "frozen_bf16": write_native(frozen, metadata, torch.bfloat16)}
    return seeds


# ---------------------------------------------------------------------------------------------
# mutations: each takes (bytes, rng) and returns (bytes, description)
def flip_bytes(data, rng):
    data = bytearray(data)
    length = int.from_bytes(data[:8], "little")
    spots = []
    for _ in range(rng.randint(1, 4)):
        in_header = rng.random() < 0.3 or length + 8 >= len(data)
        spot = rng.randrange(0, min(len(data), 8 + length)) if in_header else rng.randrange(8 + length, len(data))
        data[spot] ^= rng.randint(1, 255)
        spots.append(spot)
    return bytes(data), f"flip bytes {spots}"


def truncate(data, rng):
    cut = rng.choice([0, 4, 8, 9, rng.randrange(len(data)), len(data) - rng.randint(1, 64)])
    return data[:max(cut, 0)], f"truncate to {cut}"


def append(data, rng):
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))), "append bytes"


def set_length(data, rng):
    length = int.from_bytes(data[:8], "little")
    value = rng.choice([0, 1, length - 1, length + 1, len(data), 2 ** 63, 2 ** 64 - 1, 100_000_001])
    return struct.pack("<Q", value) + data[8:], f"header length {value}"


WEIRD = [None, True, 13.0, -1, 2 ** 70, "x", "13", [], {}, [1, 2], {"a": 1}, 1e400, float("nan")]


def edit_header(data, rng):
    header, body = split_file(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(12)
    if choice == 0:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I32", "I64", "U8", "F64", "C64", "F4", "Q4", 7, None])
    elif choice == 1:
        entry["shape"] = rng.choice([[2 ** 40], [2 ** 31, 2 ** 31], [-1], [1.0], ["3"], 3, [0], [],
                                     [len(body)], entry["shape"] + [1], [2 ** 62, 0]])
    elif choice == 2:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, end + 1], [begin - 1, end], [0, end - begin],
                                            [begin, end, 0], [float(begin), end], "0", [begin, 2 ** 64]])
    elif choice == 3:
        del header[name]
    elif choice == 4:
        header[name + "_copy"] = dict(entry)
    elif choice == 5:
        header[name] = rng.choice(WEIRD)
    elif choice == 6:
        entry[rng.choice(["dtype", "shape", "data_offsets", "extra"])] = rng.choice(WEIRD)
    elif choice == 7:
        header["__metadata__"] = rng.choice(WEIRD + [{"sara_format": 1}, ["a"]])
    elif choice == 8:  # not UTF-8, or not JSON
        text = json.dumps(header)
        spot = rng.randrange(len(text))
        raw = text.encode()
        raw = raw[:spot] + rng.choice([b"\xff", b"\xc3", b"\x00", b"{", b"]"]) + raw[spot + 1:]
        return struct.pack("<Q", len(raw)) + raw + body, f"header byte {spot}"
    elif choice == 9:
        return join_file(None, body, rng.choice(["[]", "null", "1", '"x"', "[" * 100000 + "]" * 100000])), \
            "header not an object"
    elif choice == 10:  # duplicate key in the JSON text
        text = json.dumps(header)
        first = json.dumps({name: entry})[1:-1]
        return join_file(None, body, "{" + first + "," + text[1:]), f"duplicate key {name}"
    else:  # swap two tensors' offsets
        other = rng.choice(names)
        if other in header and isinstance(header[other], dict):
            entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    return join_file(header, body), f"header edit {choice} on {name}"


def edit_metadata(data, rng):
    header, body = split_file(data)
    metadata = header.setdefault("__metadata__", {})
    counts = json.loads(metadata["sara_counts"])
    name = rng.choice(sorted(counts))
    choice = rng.randrange(14)
    if choice == 0:
        metadata["sara_counts"] = rng.choice(["[1, 2]", "13", "not json", '"x"', "{", "null", "{\"a\": 1}",
                                              "{" * 5000 + "}" * 5000])
    elif choice == 1:
        counts[name] = rng.choice([float(counts[name]), str(counts[name]), -1, 0, None, [1], counts[name] + 1,
                                   True, 2 ** 70])
        metadata["sara_counts"] = json.dumps(counts)
    elif choice == 2:
        metadata["sara_total_selected"] = rng.choice([metadata["sara_total_selected"] + ".0", "-1", " 1", "1e3",
                                                      str(int(metadata["sara_total_selected"]) + 1), "", "x"])
    elif choice == 3:
        metadata["sara_format_version"] = rng.choice(["2", "1.0", " 1", "", "0"])
    elif choice == 4:
        metadata["sara_format"] = rng.choice(["sara-network/native2", "", "lora"])
    elif choice == 5:
        metadata["sara_thresholds"] = rng.choice(['{"unet": "abc"}', "[1]", '{"unet": NaN}', '{"unet": -1}',
                                                  '{"unet": Infinity}', "x", '{"unet": true}', '{"unet": [1]}'])
    elif choice == 6:
        metadata["sara_config"] = rng.choice(["[]", "x", "1", '{"threshold": "x"}', "null"])
    elif choice == 7:
        metadata["sara_optimizer_steps"] = rng.choice(["-1", "1.5", "x", "", "1e3"])
    elif choice == 8:
        del metadata[rng.choice(["sara_counts", "sara_total_selected", "sara_format_version", "sara_format"])]
    elif choice == 9:
        metadata[rng.choice(sorted(metadata))] = rng.choice(WEIRD)
    elif choice == 10:
        metadata["sara_base_hash"] = rng.choice(["", "x", "sha256:00:!!", "sha256:ab:AAAA", ":" * 10])
    elif choice == 11:
        metadata["ss_base_model_version"] = rng.choice(["sdxl_base_v1-0", "sd_v9", ""])
    elif choice == 12:
        del counts[name]
        counts[name + "x"] = 1
        metadata["sara_counts"] = json.dumps(counts)
    else:
        header["__metadata__"] = {k: v for k, v in metadata.items() if rng.random() < 0.7}
    return join_file(header, body), f"metadata edit {choice}"


def edit_tensors(data, rng):
    """A well-formed safetensors file whose native content is wrong (our writer, edited tensors)."""
    arrays, metadata = numpy_tensors(data)
    tensors = {k: torch.from_numpy(a.copy()) if dtype != "BF16" else torch.from_numpy(a.copy()).to(torch.bfloat16)
               for k, (dtype, a) in arrays.items()}
    names = sorted({k.split(".", 1)[0] for k in tensors})
    name = rng.choice(names)
    parts = {k.split(".", 1)[1]: k for k in tensors if k.split(".", 1)[0] == name}
    choice = rng.randrange(18)
    index_key = parts.get("sara_indices")
    values_key = parts["sara_values"]
    if choice == 0 and index_key and tensors[index_key].numel() > 1:
        tensors[index_key] = tensors[index_key].flip(0).contiguous()
    elif choice == 1 and index_key and tensors[index_key].numel() > 1:
        tensors[index_key][1] = tensors[index_key][0]
    elif choice == 2 and index_key:
        numel = int(torch.prod(tensors[parts["sara_shape"]]))
        tensors[index_key][-1] = rng.choice([numel, numel + 5, -1, 2 ** 31 - 1])
    elif choice == 3 and "sara_mask" in parts:
        mask = tensors[parts["sara_mask"]]
        mask[-1] = mask[-1] | 0x80 if rng.random() < 0.5 else mask[-1] ^ 1
    elif choice == 4:
        tensors[values_key][rng.randrange(tensors[values_key].numel())] = rng.choice([float("nan"), float("inf")])
    elif choice == 5:
        tensors[values_key] = tensors[values_key].to(rng.choice([torch.int32, torch.float64, torch.uint8]))
    elif choice == 6:
        shape = tensors[parts["sara_shape"]]
        tensors[parts["sara_shape"]] = rng.choice([shape.flip(0), shape * 2, torch.tensor([0, 4]), -shape,
                                                   torch.tensor([2 ** 40, 2 ** 40]), shape[:1], shape.to(torch.int32),
                                                   torch.cat([shape, torch.ones(1, dtype=torch.int64)]),
                                                   torch.tensor([2 ** 20, 2 ** 12])]).contiguous()
    elif choice == 7:
        del tensors[parts[rng.choice(sorted(parts))]]
    elif choice == 8 and "sara_mask" in parts:
        numel = int(torch.prod(tensors[parts["sara_shape"]]))
        tensors[f"{name}.sara_indices"] = torch.arange(0, numel, 64, dtype=torch.int32)
    elif choice == 9 and "sara_frozen" in parts:
        frozen = tensors[parts["sara_frozen"]]
        tensors[parts["sara_frozen"]] = rng.choice([torch.cat([frozen, frozen[:1]]), frozen[:-1],
                                                    frozen | 0xFF]).contiguous()
    elif choice == 10 and "sara_bias_indices" in parts:
        bias = tensors[parts["sara_bias_indices"]]
        bias[-1] = int(tensors[parts["sara_shape"]][0]) + rng.randint(0, 3)
    elif choice == 11 and "sara_bias_values" in parts:
        del tensors[parts["sara_bias_values"]]
    elif choice == 12:  # a module the model does not have, counts kept consistent
        for suffix, key in parts.items():
            tensors[f"lora_unet_not_in_the_model.{suffix}"] = tensors.pop(key)
        counts = json.loads(metadata["sara_counts"])
        counts["lora_unet_not_in_the_model"] = counts.pop(name)
        metadata["sara_counts"] = json.dumps(counts)
    elif choice == 13:
        tensors[values_key] = tensors[values_key] * rng.choice([1e30, 7e4, 3e38, -1e5])
    elif choice == 14 and index_key:
        tensors[index_key] = tensors[index_key][:0].contiguous()
        tensors[values_key] = tensors[values_key][:0].contiguous()
        counts = json.loads(metadata["sara_counts"])
        counts[name] = 0
        metadata["sara_counts"] = json.dumps(counts)
    elif choice == 16:  # still valid: other finite values
        values = tensors[values_key]
        tensors[values_key] = (values.float() * rng.uniform(-3, 3)).to(values.dtype)
    elif choice == 15:  # still valid: one module fewer, counts and total updated
        for key in parts.values():
            del tensors[key]
        counts = json.loads(metadata["sara_counts"])
        del counts[name]
        metadata["sara_counts"] = json.dumps(counts)
        metadata["sara_total_selected"] = str(sum(counts.values()))
    else:
        tensors[f"{name}.sara_{rng.choice(['weird', 'values2'])}"] = torch.zeros(1)
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata), f"tensor edit {choice} on {name}"


def replace_any_tensor(data, rng):
    """Any kind of file: one tensor replaced by one of another shape or dtype, or by NaN."""
    arrays, metadata = numpy_tensors(data)
    tensors = {k: torch.from_numpy(a.copy()) if dtype != "BF16" else torch.from_numpy(a.copy()).to(torch.bfloat16)
               for k, (dtype, a) in arrays.items()}
    key = rng.choice(sorted(tensors))
    old = tensors[key]
    tensors[key] = rng.choice([torch.zeros(5), torch.tensor(1.0), torch.zeros(3, dtype=torch.int32),
                               old.float().reshape(-1).contiguous(), torch.full_like(old.float(), float("nan")),
                               torch.zeros(0), torch.ones(*old.shape[:1], 3), old.to(torch.int64)])
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata), f"replace {key}"


MUTATIONS = [flip_bytes, flip_bytes, truncate, append, set_length, edit_header, edit_header, edit_metadata,
             edit_metadata, edit_tensors, edit_tensors, edit_tensors]


# ---------------------------------------------------------------------------------------------
# the world the entry points act on
def weights_hash(*modules) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def patched_layers(*modules) -> list[str]:
    return [name for module in modules for name, m in module.named_modules()
            if isinstance(getattr(m.forward, "__self__", None), sara_network.network.SaraModule)]


class World:
    def __init__(self, folder):
        self.folder = folder
        self.kohya = models.tiny_sd1(0)  # create_network_from_weights: a fresh network each case
        self.resumed = models.tiny_sd1(0)  # load_weights into an applied network
        self.diffusers = models.tiny_sd1(0)  # hf.load_sara
        self.network = sara_network.create_network(1.0, None, None, None, self.resumed.text_encoders[0],
                                                   self.resumed.unet, density="0.05", include_bias="true")
        self.network.apply_to(self.resumed.text_encoders[0], self.resumed.unet, True, True)
        rng = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for parameter in self.network.trainable_parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=rng) * 0.01)
        self.seeds = seed_files(self.network, random.Random(SEED))
        self.other = os.path.join(folder, "other.safetensors")
        with open(self.other, "wb") as stream:
            stream.write(self.seeds["index_fp32"])
        self.checkpoint_state = ldm_checkpoint(self.kohya, "sd_v1")
        self.checkpoint = os.path.join(folder, "base.safetensors")
        fileformat.save_tensors(self.checkpoint, self.checkpoint_state, {}, with_hash=False)
        self.base_folder = os.path.join(folder, "base_folder")
        self.kohya.unet.save_pretrained(os.path.join(self.base_folder, "unet"))
        self.kohya.text_encoders[0].save_pretrained(os.path.join(self.base_folder, "text_encoder"))
        self.wrong_kind = self._wrong_kind_files()

    def _wrong_kind_files(self) -> dict[str, bytes]:
        files = {}
        source = os.path.join(self.folder, "seed.safetensors")
        with open(source, "wb") as stream:
            stream.write(self.seeds["mask_fp16"])
        for kind, argv in (("lora", ["to-lora", source, "{out}", "--rank", "2"]), ("diff", ["to-diff", source, "{out}"])):
            out = os.path.join(self.folder, f"{kind}.safetensors")
            assert cli.main([a.replace("{out}", out) for a in argv]) == 0
            with open(out, "rb") as stream:
                files[kind] = stream.read()
        with open(self.checkpoint, "rb") as stream:
            files["checkpoint"] = stream.read()
        files["empty"] = b""
        files["random"] = bytes(random.Random(1).randrange(256) for _ in range(4000))
        buffer = io.BytesIO()
        torch.save({"x": torch.zeros(3), "object": collections.OrderedDict(a=types.SimpleNamespace)}, buffer)
        files["pickle.pt"] = buffer.getvalue()
        deltas, metadata = fileformat.load_native(source)
        buffer = io.BytesIO()
        blob = fileformat.to_tensors(deltas, None)
        blob["__sara_metadata__"] = torch.frombuffer(bytearray(json.dumps(metadata).encode()), dtype=torch.uint8)
        torch.save(blob, buffer)
        files["native.pt"] = buffer.getvalue()
        files["sparse.pt"] = self._sparse_pt(deltas, metadata)
        return files

    @staticmethod
    def _sparse_pt(deltas, metadata) -> bytes:
        blob = fileformat.to_tensors(deltas, None)
        key = next(k for k in blob if k.endswith(".sara_values"))
        blob[key] = blob[key].to_sparse()
        blob["__sara_metadata__"] = torch.frombuffer(bytearray(json.dumps(metadata).encode()), dtype=torch.uint8)
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# entry points: each raises SaraFileError for a bad file, or checks what a good one produced
def run_cli(*argv):
    args = cli.build_parser().parse_args([str(a) for a in argv])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        args.function(args)


def output_check(world, out, succeeded: bool, check=None):
    leftovers = [n for n in os.listdir(world.folder) if fileformat.TEMP_MARK in n or fileformat.OLD_MARK in n]
    assert not leftovers, f"temporary outputs left: {leftovers}"
    if not succeeded:
        assert not os.path.exists(out), "a failed command wrote its output"
        return
    if check is not None:
        check(out)


def finite_file(path):
    tensors, _ = fileformat.read_tensors(path)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert not bad, f"output holds NaN/Inf in {bad[:3]}"


def cli_entry(argv_of, check=None):
    def entry(world, path, deltas):
        out = os.path.join(world.folder, "out")
        ok = False
        try:
            run_cli(*argv_of(world, path, out))
            ok = True
        finally:
            output_check(world, out, ok, check)
            fileformat._remove(out)
    return entry


def check_diff(deltas):
    def check(out):
        tensors, _ = fileformat.read_tensors(out)
        for delta in deltas:
            expected = delta.dense(torch.float32).to(torch.float16)
            assert torch.equal(tensors[f"{delta.name}.diff"], expected), delta.name
            assert bool(torch.isfinite(tensors[f"{delta.name}.diff"]).all())
    return check


def entry_kohya_from_weights(world, path, deltas):
    models_ = world.kohya
    before = weights_hash(models_.unet, models_.text_encoders[0])
    network = None
    try:
        network, _ = sara_network.create_network_from_weights(1.0, path, None, models_.text_encoders[0], models_.unet)
        network.apply_to(models_.text_encoders[0], models_.unet, True, True)
        got = {d.name: d for d in network.deltas()}
        assert sorted(got) == sorted(d.name for d in deltas), "the network's modules differ from the file's"
        for delta in deltas:
            assert torch.equal(got[delta.name].indices, delta.indices.to(torch.int32))
            assert torch.equal(got[delta.name].values, delta.values.to(torch.float32))
    finally:
        if network is not None:
            network.unpatch()
            network.detach_optimizer_hooks()
        assert not patched_layers(models_.unet, models_.text_encoders[0]), "layers left patched"
        assert weights_hash(models_.unet, models_.text_encoders[0]) == before, "model weights changed"


def entry_kohya_load_weights(world, path, deltas):
    models_ = world.resumed
    before = weights_hash(models_.unet, models_.text_encoders[0], world.network)
    try:
        world.network.load_weights(path)
    except SaraFileError:
        assert weights_hash(models_.unet, models_.text_encoders[0], world.network) == before, "half-applied"
        raise
    got = {d.name: d for d in world.network.deltas()}
    assert sorted(got) == sorted(d.name for d in deltas)
    for delta in deltas:
        assert torch.equal(got[delta.name].values, delta.values.to(torch.float32))


def entry_hf_load_sara(world, path, deltas):
    models_ = world.diffusers
    pipe = types.SimpleNamespace(unet=models_.unet, text_encoder=models_.text_encoders[0])
    before = weights_hash(models_.unet, models_.text_encoders[0])
    try:
        networks = hf.load_sara(pipe, path, 0.5)
        present = networks[0].host_components()
        assert sorted(m.sara_name for m in networks[0].sara_modules()) == \
            sorted(d.name for d in deltas if component_of(d.name) in present)
        hf.fuse_sara(pipe)
        hf.unload_sara(pipe)
    finally:
        left = hf.get_sara_networks(pipe)
        hf.unload_sara(pipe)
        assert not left, "networks left on the model"
        assert not patched_layers(models_.unet, models_.text_encoders[0]), "layers left patched"
        assert weights_hash(models_.unet, models_.text_encoders[0]) == before, "model weights changed"


def entry_host_patch(world, path, deltas):
    """The UI path: a bare state dict parsed module by module, then patched into a checkpoint."""
    tensors, _ = fileformat.read_tensors(path)
    state = {k: v.clone() for k, v in world.checkpoint_state.items()}
    before = {k: v.clone() for k, v in state.items()}
    try:
        found = host_patch.deltas_for(tensors, host_patch.module_names(tensors))
        host_patch.patch_checkpoint_(state, found.values(), ldm_names.get_arch("sd1"), 0.7)
    except SaraFileError:
        assert all(torch.equal(state[k], before[k]) for k in state), "checkpoint half-patched"
        raise


ENTRY_POINTS = {
    "kohya create_network_from_weights": entry_kohya_from_weights,
    "kohya load_weights": entry_kohya_load_weights,
    "hf.load_sara": entry_hf_load_sara,
    "host_patch": entry_host_patch,
    "sara inspect": cli_entry(lambda w, p, o: ["inspect", p]),
    "sara to-lora": cli_entry(lambda w, p, o: ["to-lora", p, o, "--rank", "2", "--base-model", "sd_v1"], finite_file),
    "sara to-diff": None,  # needs the deltas: see run_case
    "sara merge": cli_entry(lambda w, p, o: ["merge", p, f"{w.other}:0.5", "-o", o], finite_file),
    "sara merge --base checkpoint": cli_entry(lambda w, p, o: ["merge", p, "--base", w.checkpoint, "-o", o,
                                                               "--base-model", "sd_v1"], finite_file),
    "sara merge --base folder": cli_entry(lambda w, p, o: ["merge", p, "--base", w.base_folder, "-o", o,
                                                           "--base-model", "sd_v1"]),
}


# inspect also reads LoRA / diff files; a UI parses a bare state dict module by module, without metadata
OTHER_KINDS_ACCEPTED = ("sara inspect", "host_patch")


def run_case(world, data: bytes, suffix: str, entry_name: str) -> tuple[str, str]:
    """(outcome, detail): 'valid' / 'SaraFileError' / a failure class."""
    path = os.path.join(world.folder, "case" + suffix)
    with open(path, "wb") as stream:
        stream.write(data)
    deltas = None
    try:
        with time_limit(CASE_SECONDS):
            try:
                deltas, _ = fileformat.load_native(path)
                if suffix == ".safetensors":
                    check_against_bytes(deltas, data)
            except SaraFileError:
                pass
            entry = ENTRY_POINTS[entry_name] or cli_entry(
                lambda w, p, o: ["to-diff", p, o, "--base-model", "sd_v1"], check_diff(deltas or []))
            try:
                entry(world, path, deltas or [])
            except SaraFileError as error:
                return "SaraFileError", str(error)
            if deltas is None and entry_name not in OTHER_KINDS_ACCEPTED:
                return "accepted a file load_native refuses", ""
            return "valid", ""
    except CaseTimeout as error:
        return "timeout", str(error)
    except AssertionError as error:
        return "wrong result", str(error)[:300]
    except Exception as error:
        return f"raw {type(error).__name__}", " ".join(str(error).split())[:300]


def generate(world, rng: random.Random, number: int) -> tuple[bytes, str, str, str]:
    """(file bytes, suffix, description, mutation class) of case `number`."""
    if number % 11 == 10:
        kind = rng.choice(sorted(world.wrong_kind))
        data = world.wrong_kind[kind]
        suffix = ".pt" if kind.endswith(".pt") else ".safetensors"
        if kind == "native.pt" and rng.random() < 0.6:
            data, what = flip_bytes(data, rng)
            return data, suffix, f"wrong kind {kind}, {what}", f"damaged {kind}"
        if kind in ("lora", "diff") and rng.random() < 0.7:
            data, what = rng.choice([replace_any_tensor, replace_any_tensor, flip_bytes])(data, rng)
            return data, suffix, f"wrong kind {kind}, {what}", f"damaged {kind}"
        return data, suffix, f"wrong kind {kind}", f"wrong kind ({kind})"
    seed_name = rng.choice(sorted(world.seeds))
    data = world.seeds[seed_name]
    descriptions, applied = [], []
    for _ in range(1 if rng.random() < 0.8 else 2):
        mutation = rng.choice(MUTATIONS)
        applied.append(mutation.__name__)
        try:
            data, what = mutation(data, rng)
        except Exception:
            what = f"{mutation.__name__} not applicable"  # a second mutation on an already broken file
        descriptions.append(what)
    return data, ".safetensors", f"{seed_name}: " + "; ".join(descriptions), " + ".join(applied)


def fuzz(world, cases: int, seed: int) -> dict:
    import logging

    logging.getLogger("sara_network").setLevel(logging.ERROR)  # base-hash warnings of edited files
    rng = random.Random(seed)
    names = list(ENTRY_POINTS)
    outcomes = collections.Counter()
    per_entry = collections.defaultdict(collections.Counter)
    per_class = collections.defaultdict(collections.Counter)
    failures = []
    started = time.time()
    for number in range(cases):
        data, suffix, description, mutation_class = generate(world, rng, number)
        entry_name = names[number % len(names)]
        outcome, detail = run_case(world, data, suffix, entry_name)
        outcomes[outcome] += 1
        per_entry[entry_name][outcome] += 1
        per_class[mutation_class][outcome] += 1
        if outcome not in ("valid", "SaraFileError"):
            failures.append({"case": number, "input": description, "entry": entry_name, "outcome": outcome,
                             "detail": detail})
    return {"cases": cases, "seed": seed, "seconds": round(time.time() - started, 1),
            "outcomes": dict(outcomes), "per_entry_point": {k: dict(v) for k, v in per_entry.items()},
            "per_mutation": {k: dict(v) for k, v in sorted(per_class.items())},
            "failures": failures,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("fuzz")))


def test_seed_files_are_valid_and_read_identically(world):
    for name, data in world.seeds.items():
        path = os.path.join(world.folder, f"{name}.safetensors")
        with open(path, "wb") as stream:
            stream.write(data)
        deltas, _ = fileformat.load_native(path)
        check_against_bytes(deltas, data)
        for entry_name, entry in ENTRY_POINTS.items():
            assert run_case(world, data, ".safetensors", entry_name)[0] == "valid", (name, entry_name)


def test_fuzz(world):
    report = fuzz(world, CASES, SEED)
    if os.environ.get("SARA_FUZZ_REPORT"):
        with open(os.environ["SARA_FUZZ_REPORT"], "w") as stream:
            json.dump(report, stream, indent=1)
    assert report["outcomes"].get("valid", 0) > 0 and report["outcomes"].get("SaraFileError", 0) > 0
    assert not report["failures"], json.dumps(report["failures"][:10], indent=1)
    assert report["max_rss_mib"] * 2 ** 20 < MAX_RSS_BYTES
