"""`sara`: convert, merge, inspect and analyse SaRA files (docs/cli.md).

Each subcommand reads its inputs, calls one library function of convert.py / analysis.py, and
writes its output atomically. Outputs never replace an existing file unless --overwrite is given;
bad input is reported on stderr with exit status 1 and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Iterable, Optional, Sequence

import torch

from . import analysis, convert, fileformat
from .fileformat import SaraFileError
from .options import parse_count

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def progress(items: Iterable, **kwargs) -> Iterable:
    """tqdm when installed (the `tools` extra), silent otherwise; off when stderr is not a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, disable=None, **kwargs)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")


def _title(output: str) -> str:
    return os.path.splitext(os.path.basename(output.rstrip("/")))[0]


def _version(deltas_or_names, metadata, given: Optional[str]) -> str:
    names = [getattr(d, "name", d) for d in deltas_or_names]
    return convert.base_model_version(names, metadata, given)


# ---------------------------------------------------------------------------------------------
def cmd_to_lora(args) -> None:
    _check_output(args.output, args.overwrite)
    deltas, metadata = fileformat.load_native(args.input)
    version = _version(deltas, metadata, args.base_model)
    rule = convert.RankRule(args.rank, args.energy, args.max_rel_error, args.max_rank)
    result = convert.to_lora(deltas, rule, version, args.svd, DTYPES[args.dtype], progress, args.uniform_rank)
    _refuse_non_finite(result.tensors, args.input, f"the LoRA factors overflow {args.dtype}; use --dtype fp32")
    shapes = {d.name: d.shape for d in deltas}
    conv_ranks = [m.rank for m in result.modules if len(shapes[m.name]) == 4]
    extra = {"sara_lora_conversion": json.dumps({"source": os.path.basename(args.input), "svd": args.svd,
                                                 **result.report()}, separators=(",", ":"))}
    if conv_ranks:
        extra["ss_network_args"] = json.dumps({"conv_dim": str(max(conv_ranks)), "conv_alpha": str(max(conv_ranks))})
    out_metadata = convert.adapter_metadata(metadata, version, _title(args.output), "networks.lora",
                                            result.max_rank, extra)
    fileformat.save_tensors(args.output, result.tensors, out_metadata)
    for module in sorted(result.modules, key=lambda m: -m.rel_error)[: args.show]:
        print(f"  {module.name:<80} rank {module.rank:>4}  rel. error {module.rel_error:.4%}")
    print(f"wrote {args.output}: {len(result.modules)} LoRA modules, ranks {min(m.rank for m in result.modules)}"
          f"..{result.max_rank}, overall relative Frobenius error {result.rel_error:.4%}")
    if result.bias_modules:
        _say(f"warning: {len(result.bias_modules)} modules have bias deltas, which a LoRA cannot carry; they are "
             f"dropped (use to-diff to keep them): {', '.join(result.bias_modules[:5])}"
             + (" ..." if len(result.bias_modules) > 5 else ""))
    if result.fillers:
        print(f"  added {len(result.fillers)} zero rank-1 modules so A1111 patches partly covered OpenCLIP attention")


def cmd_to_diff(args) -> None:
    _check_output(args.output, args.overwrite)
    deltas, metadata = fileformat.load_native(args.input, args.allow_non_finite)
    version = _version(deltas, metadata, args.base_model)
    dtype = DTYPES[args.dtype]
    tensors = convert.to_diff(deltas, dtype)
    fillers = convert.open_clip_fillers({d.name: d.shape for d in deltas}, version)
    tensors.update({f"{name}.diff": torch.zeros(shape, dtype=dtype) for name, shape in fillers.items()})
    out_metadata = convert.adapter_metadata(metadata, version, _title(args.output), "lycoris.kohya", None,
                                            {"ss_network_args": json.dumps({"algo": "full"})})
    fileformat.save_tensors(args.output, tensors, out_metadata)
    print(f"wrote {args.output}: {len(deltas)} diff modules ({args.dtype})"
          + (f", {len(fillers)} zero OpenCLIP attention fillers" if fillers else ""))


def _refuse_non_finite(tensors, source: str, problem: str) -> None:
    """A conversion of finite input never writes NaN / Inf: it stops and says why instead."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SaraFileError(f"{source}: {name}: {problem}")


def _native_metadata(source: dict, version: str, output: str, extra: dict) -> dict:
    return convert.adapter_metadata(source, version, _title(output), "sara_network", None, extra)


def cmd_from_diff(args) -> None:
    _check_output(args.output, args.overwrite)
    tensors, metadata = fileformat.read_tensors(args.input)
    deltas, empty = convert.from_diff(tensors, args.input)
    version = _version(deltas, metadata, args.base_model)
    fileformat.save_native(args.output, deltas, DTYPES[args.dtype] if args.dtype else None,
                           _native_metadata(metadata, version, args.output,
                                            {"sara_converted_from": os.path.basename(args.input)}))
    print(f"wrote {args.output}: {len(deltas)} modules, {sum(d.indices.numel() for d in deltas):,d} nonzero deltas"
          + (f"; left out {len(empty)} all-zero modules" if empty else ""))


def _selection_args(args) -> dict:
    return {k: v for k, v in (("threshold", args.threshold), ("budget", args.budget), ("density", args.density),
                              ("preset", args.preset)) if v is not None}


def cmd_from_lora(args) -> None:
    from .options import parse_network_args

    _check_output(args.output, args.overwrite)
    tensors, metadata = fileformat.read_tensors(args.input)
    if analysis.file_kind(tensors, metadata) == "native":
        raise SaraFileError(f"{args.input} is already a native SaRA file")
    dense = convert.lora_deltas(tensors, args.input)
    base = convert.load_base(args.base, args.base_model) if args.base else None
    extra = {"sara_converted_from": os.path.basename(args.input)}
    if args.topk_budget is not None:
        if _selection_args(args):
            raise ValueError("--topk-budget keeps the LoRA's largest entries; it takes no --threshold/--budget/"
                             "--density/--preset")
        if base is not None:  # check the fit and take the base's shapes (a 2-D LoRA on a 1x1 conv)
            weights = base.weights()
            convert.project_onto(dense, {n: (tuple(w.shape), torch.zeros(0, dtype=torch.int32))
                                         for n, w in weights.items()}, args.input)
            dense = {n: d.reshape(weights[n].shape) for n, d in dense.items()}
        projection = convert.topk_deltas(dense, args.topk_budget)
    elif base is not None:
        config = parse_network_args(_selection_args(args))
        support, network_metadata = convert.preset_support(base, config)
        projection = convert.project_onto(dense, support, args.input)
        extra.update(network_metadata)
    else:
        raise ValueError("give --base (project onto the SaRA selection of that base model) or --topk-budget N")
    version = _version(dense, metadata, args.base_model or (base.version if base else None))
    extra["sara_projection"] = json.dumps({"rel_error": projection.rel_error, "modules": projection.errors},
                                          separators=(",", ":"))
    fileformat.save_native(args.output, projection.deltas, DTYPES[args.dtype],
                           _native_metadata(metadata, version, args.output, extra))
    worst = sorted(projection.errors.items(), key=lambda item: -item[1])[: args.show]
    for name, error in worst:
        print(f"  {name:<80} rel. error {error:.4%}")
    print(f"wrote {args.output}: {len(projection.deltas)} modules, "
          f"{sum(d.indices.numel() for d in projection.deltas):,d} entries; projection relative Frobenius error "
          f"{projection.rel_error:.4%}")


def _scaled_inputs(specs: Sequence[str]) -> list[tuple[str, float]]:
    """'file.safetensors:0.6' -> (file, 0.6); a missing scale is 1 (a ':' inside a path is kept)."""
    parsed = []
    for spec in specs:
        path, _, scale = spec.rpartition(":")
        try:
            parsed.append((path, float(scale)) if path and not os.path.exists(spec) else (spec, 1.0))
        except ValueError:
            parsed.append((spec, 1.0))
    return parsed


def cmd_merge(args) -> None:
    _check_output(args.output, args.overwrite)
    inputs = _scaled_inputs(args.inputs)
    loaded = [(fileformat.load_native(path, args.allow_non_finite), scale) for path, scale in inputs]
    deltas = convert.merge_natives([(d, scale) for (d, _), scale in loaded])
    if not args.allow_non_finite:
        dtype = DTYPES[args.dtype] if args.base is None and args.dtype else torch.float32
        _refuse_non_finite({d.name: d.values.to(dtype) for d in deltas}, " + ".join(p for p, _ in inputs),
                           "the scaled sum overflows " + str(dtype).replace("torch.", ""))
    if args.base is None:
        first = loaded[0][0][1]
        hashes = {m.get("sara_base_hash") for (_, m), _ in loaded}
        metadata = convert.carried_metadata(first)
        if len(hashes) != 1:
            metadata.pop("sara_base_hash", None)
        metadata["sara_merged_from"] = json.dumps([[os.path.basename(p), s] for p, s in inputs])
        fileformat.save_native(args.output, deltas, DTYPES[args.dtype] if args.dtype else None, metadata)
        print(f"wrote {args.output}: {len(deltas)} modules, {sum(d.indices.numel() for d in deltas):,d} deltas "
              f"merged from {len(inputs)} files")
        return
    base = convert.load_base(args.base, args.base_model)
    for (file_deltas, metadata), _ in loaded:
        declared = metadata.get("ss_base_model_version")
        if declared and convert.ARCH_OF_BASE_MODEL.get(declared) != convert.ARCH_OF_BASE_MODEL[base.version]:
            raise SaraFileError(f"a merged file is for {declared} but {args.base} is {base.version}")
    convert.bake(base, deltas, " + ".join(p for p, _ in inputs))
    convert.write_merged(base, args.output)
    print(f"wrote {args.output}: {args.base} with {len(deltas)} modules of "
          + ", ".join(f"{os.path.basename(p)} x{s:g}" for p, s in inputs) + " merged in")


def _print_report(report: dict, indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict) and value:
            print(f"{indent}{key}:")
            _print_report(value, indent + "  ")
        else:
            text = f"{value:.6g}" if isinstance(value, float) else str(value)
            print(f"{indent}{key}: {text[:300]}")


def cmd_inspect(args) -> None:
    base = convert.load_base(args.base, args.base_model) if args.base else None
    report = analysis.inspect_file(args.input, base, args.allow_non_finite)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)
    if base is not None and not report["base"]["fits"]:
        raise SaraFileError(f"{args.input} does not fit {args.base}: {len(report['base']['missing'])} modules missing,"
                            f" {len(report['base']['shape_mismatches'])} shape mismatches")


def cmd_analyze(args) -> None:
    if args.plot:
        _check_output(args.plot, args.overwrite)
    base = convert.load_base(args.base, args.base_model)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    result = analysis.analyze(base, thresholds, args.budget, progress)
    report = result.to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{result.total:,d} Linear/Conv2d weights in {len(result.blocks)} blocks; {result.zeros:,d} are zero")
        print("fraction with |w| < threshold:")
        header = "".join(f"{t:>11.3g}" for t in result.thresholds)
        print(f"  {'block':<36}{header}{'selected':>11}")
        for name, block in result.blocks.items():
            row = "".join(f"{c / block['weights']:>11.3%}" for c in block["below"])
            print(f"  {name:<36}{row}{block['selected'] / block['weights']:>11.3%}")
        row = "".join(f"{c / result.total:>11.3%}" for c in result.below)
        print(f"  {'overall':<36}{row}{result.selected / result.total:>11.3%}")
        if args.budget:
            print(f"--budget {args.budget:,d}: threshold={result.selected_threshold:.6g} "
                  f"(selects {result.selected:,d})")
    if args.plot:
        analysis.plot_analysis(result, args.plot, f"{os.path.basename(args.base.rstrip('/'))}: |w| distribution")
        print(f"wrote {args.plot}")


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sara", description="Convert, merge, inspect and analyse SaRA files.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, function, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(function=function)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
        return sub

    def allow_non_finite(sub):
        sub.add_argument("--allow-non-finite", action="store_true",
                         help="read a native file holding NaN / Inf deltas instead of refusing it")

    def base_model(sub):
        sub.add_argument("--base-model", choices=list(convert.BASE_MODELS),
                         help="ss_base_model_version to use when the file does not say")

    def output(sub):
        sub.add_argument("output")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output")

    sub = command("to-lora", cmd_to_lora, "native SaRA file -> kohya LoRA (A1111, Forge, ComfyUI, diffusers)")
    sub.add_argument("input")
    output(sub)
    rank = sub.add_mutually_exclusive_group(required=True)
    rank.add_argument("--rank", type=int, help="the same rank for every module")
    rank.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction of "
                                                   "the squared singular values (e.g. 0.99)")
    rank.add_argument("--max-rel-error", type=float, help="per module, the smallest rank whose relative "
                                                          "Frobenius error is at most this (e.g. 0.05)")
    sub.add_argument("--max-rank", type=int, help="upper bound on any module's rank")
    sub.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                     help="auto: randomized when the rank bound is small against the matrix, else exact")
    sub.add_argument("--uniform-rank", action="store_true",
                     help="pad every module with zeros to the largest rank (exact); needed by diffusers' "
                          "load_lora_weights when ranks differ (--energy / --max-rel-error)")
    sub.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    sub.add_argument("--show", type=int, default=10, help="print the N modules with the largest error")
    base_model(sub)

    sub = command("to-diff", cmd_to_diff, "native SaRA file -> LyCORIS full (diff) file, exact")
    sub.add_argument("input")
    output(sub)
    sub.add_argument("--dtype", choices=list(DTYPES), default="fp16",
                     help="fp16 (default) or fp32; bf16 rounds the patched base weights in A1111")
    allow_non_finite(sub)
    base_model(sub)

    sub = command("from-diff", cmd_from_diff, "LyCORIS diff file -> native SaRA file (its exact nonzero support)")
    sub.add_argument("input")
    output(sub)
    sub.add_argument("--dtype", choices=list(DTYPES), help="value dtype (default: the diff's)")
    base_model(sub)

    sub = command("from-lora", cmd_from_lora, "LoRA / LoCon -> native SaRA file, projected onto a SaRA selection "
                                              "of a base model or onto its top-k entries")
    sub.add_argument("input")
    output(sub)
    sub.add_argument("--base", help="diffusers model folder or single-file checkpoint")
    sub.add_argument("--threshold", help="SaRA selection |w| < threshold (default 2e-3)")
    sub.add_argument("--budget", help="SaRA selection of exactly this many entries (e.g. 50M)")
    sub.add_argument("--density", help="SaRA selection of this fraction of the targeted weights")
    sub.add_argument("--preset", help="target preset (default full)")
    sub.add_argument("--topk-budget", type=parse_count, help="instead: keep the N largest-magnitude entries")
    sub.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    sub.add_argument("--show", type=int, default=10, help="print the N modules with the largest error")
    base_model(sub)

    sub = command("merge", cmd_merge, "merge native files (file:scale ...) into one native file, or bake them "
                                      "into a base checkpoint / diffusers folder (--base)")
    sub.add_argument("inputs", nargs="+", metavar="file[:scale]")
    sub.add_argument("-o", "--output", required=True)
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sub.add_argument("--base", help="diffusers folder or single-file .safetensors checkpoint to bake into")
    sub.add_argument("--dtype", choices=list(DTYPES), help="value dtype of a merged native file (default fp32)")
    allow_non_finite(sub)
    base_model(sub)

    sub = command("inspect", cmd_inspect, "show a native / LoRA / diff file: metadata, sizes, densities, values")
    sub.add_argument("input")
    sub.add_argument("--base", help="check that this base model fits the file (modules, shapes, base hash)")
    sub.add_argument("--json", action="store_true")
    allow_non_finite(sub)
    base_model(sub)

    sub = command("analyze", cmd_analyze, "|w| distribution of a base model, thresholds per block, budget")
    sub.add_argument("base", help="diffusers model folder or single-file checkpoint")
    sub.add_argument("--thresholds", default="1e-4,5e-4,1e-3,2e-3,5e-3,1e-2")
    sub.add_argument("--budget", type=parse_count, help="also find the threshold selecting this many (e.g. 50M)")
    sub.add_argument("--plot", help="write a PNG: histogram of log10|w| and the selected fraction per block")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing plot")
    base_model(sub)
    return parser


def error_line(error: BaseException) -> str:
    """One line for any failure: the message (which names the file) of the errors bad input
    raises, the type too for anything else (a bug: --debug shows where)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    elif not isinstance(error, (SaraFileError, ValueError, OSError)):
        text = f"internal error ({type(error).__name__}: {text}); run with --debug and report it"
    return text[:2000]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.function(args)
    except Exception as error:  # every failure is one line on stderr and exit status 1
        if getattr(args, "debug", False):
            traceback.print_exc()
        _say(f"sara {args.command}: error: {error_line(error)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
