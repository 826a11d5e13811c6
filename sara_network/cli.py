"""`sara`: convert, merge, inspect and analyse SaRA files (docs/cli.md).

Each subcommand reads its inputs, calls one library function of convert.py / analysis.py, and
writes its output atomically. Outputs never replace an existing file unless --overwrite is given,
never replace an input, and go into a missing folder only with --make-dirs; bad input is reported
on stderr with exit status 1 and nothing is written. Long loops show a progress bar on a terminal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Optional, Sequence

import torch

from . import analysis, convert, fileformat
from .fileformat import SaraFileError
from .options import SaraConfig, parse_count
from .progress import progress_bars

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _same_path(first: str, second: str) -> bool:
    """The same file or folder, through links and relative paths (real paths, then inodes)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    return os.path.exists(first) and os.path.exists(second) and os.path.samefile(first, second)


def _check_output(output: str, args, inputs: Sequence[str]) -> None:
    """Refuse an output that is one of the inputs (even with --overwrite: the export would replace
    its own source) or that exists (unless --overwrite); a missing folder is created only on
    --make-dirs."""
    for source in inputs:
        if source and _same_path(output, source):
            raise ValueError(f"the output {output} is the input {source}; write to another path")
    if os.path.exists(output) and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        if not args.make_dirs:
            raise ValueError(f"the folder {os.path.dirname(output)} of {output} does not exist; create it or "
                             "pass --make-dirs")
        os.makedirs(folder)


def _title(output: str) -> str:
    return os.path.splitext(os.path.basename(output.rstrip("/")))[0]


def _version(deltas_or_names, metadata, given: Optional[str]) -> str:
    names = [getattr(d, "name", d) for d in deltas_or_names]
    return convert.base_model_version(names, metadata, given)


# ---------------------------------------------------------------------------------------------
def cmd_to_lora(args) -> None:
    _check_output(args.output, args, [args.input])
    deltas, metadata = fileformat.load_native(args.input, progress=progress_bars(args.quiet))
    version = _version(deltas, metadata, args.base_model)
    rule = convert.RankRule(args.rank, args.energy, args.max_error, args.max_rank)
    result = convert.to_lora(deltas, rule, version, args.svd, DTYPES[args.dtype], progress_bars(args.quiet),
                             args.uniform_rank)
    _refuse_non_finite(result.tensors, args.input, f"the LoRA factors overflow {args.dtype}; use --dtype fp32")
    shapes = {d.name: d.shape for d in deltas}
    conv_ranks = [m.rank for m in result.modules if len(shapes[m.name]) == 4]
    extra = {"sara_lora_conversion": json.dumps({"source": os.path.basename(args.input), "svd": args.svd,
                                                 **result.report()}, separators=(",", ":"))}
    if conv_ranks:
        extra["ss_network_args"] = json.dumps({"conv_dim": str(max(conv_ranks)), "conv_alpha": str(max(conv_ranks))})
    out_metadata = convert.adapter_metadata(metadata, version, _title(args.output), "networks.lora",
                                            result.max_rank, extra)
    tensors, left_out = result.tensors, []
    if args.format == "diffusers":
        tensors, left_out = convert.diffusers_lora(result.tensors, version)
    fileformat.save_tensors(args.output, tensors, out_metadata)
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
    if left_out:
        _say(f"warning: {len(left_out)} T5 modules are left out: diffusers' pipeline loads no LoRA into T5 "
             f"({', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''})")
    if result.unreached:
        cap = min(r for r in (rule.rank, rule.max_rank) if r is not None)  # full rank always reaches it
        _say(f"warning: {len(result.unreached)} modules stay above --max-error {args.max_error:g} at the rank cap "
             f"{cap}: {', '.join(result.unreached[:5])}"
             + (" ..." if len(result.unreached) > 5 else ""))


def cmd_to_diff(args) -> None:
    _check_output(args.output, args, [args.input])
    deltas, metadata = fileformat.load_native(args.input, args.allow_non_finite, progress_bars(args.quiet))
    version = _version(deltas, metadata, args.base_model)
    dtype = DTYPES[args.dtype]
    tensors = convert.to_diff(deltas, dtype, progress_bars(args.quiet))
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
    _check_output(args.output, args, [args.input])
    tensors, metadata = fileformat.read_tensors(args.input)
    deltas, empty = convert.from_diff(tensors, args.input, progress_bars(args.quiet))
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

    _check_output(args.output, args, [args.input, args.base])
    tensors, metadata = fileformat.read_tensors(args.input)
    if analysis.file_kind(tensors, metadata) == "native":
        raise SaraFileError(f"{args.input} is already a native SaRA file")
    dense = convert.lora_deltas(tensors, args.input, progress_bars(args.quiet))
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
        support, network_metadata = convert.preset_support(base, config, progress_bars(args.quiet))
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
    inputs = _scaled_inputs(args.inputs)
    _check_output(args.output, args, [path for path, _ in inputs] + [args.base])
    progress = progress_bars(args.quiet)
    loaded = [(fileformat.load_native(path, args.allow_non_finite), scale)
              for path, scale in progress(inputs, desc="read", unit="file")]
    deltas = convert.merge_natives([(d, scale) for (d, _), scale in loaded], progress)
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
        if (declared and convert.CUSTOM_BASE not in (declared, base.version)
                and convert.ARCH_OF_BASE_MODEL.get(declared) != convert.ARCH_OF_BASE_MODEL.get(base.version)):
            raise SaraFileError(f"a merged file is for {declared} but {args.base} is {base.version}")
    convert.bake(base, deltas, " + ".join(p for p, _ in inputs), progress)
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
    report = analysis.inspect_file(args.input, base, progress_bars(args.quiet), args.allow_non_finite)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)
    if base is not None and not report["base"]["fits"]:
        raise SaraFileError(f"{args.input} does not fit {args.base}: {len(report['base']['missing'])} modules missing,"
                            f" {len(report['base']['shape_mismatches'])} shape mismatches")


def cmd_analyze(args) -> None:
    if args.plot:
        _check_output(args.plot, args, [args.base])
    base = convert.load_base(args.base, args.base_model)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    result = analysis.analyze(base, thresholds, args.budget, progress_bars(args.quiet), args.threshold)
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
        how = f"--budget {args.budget:,d}" if args.budget else "--threshold, default: the training default"
        print(f"selected: |w| < {result.selected_threshold:.6g} ({how}): selects {result.selected:,d}")
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
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
        return sub

    def allow_non_finite(sub):
        sub.add_argument("--allow-non-finite", action="store_true",
                         help="read a native file holding NaN / Inf deltas instead of refusing it")

    def base_model(sub):
        sub.add_argument("--base-model", choices=list(convert.BASE_MODELS),
                         help="ss_base_model_version to use when the file does not say (custom: a model the UIs "
                              "do not know, such as the demo's; no Stable Diffusion metadata is stamped)")

    def overwrite(sub, what: str = "output"):
        sub.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (never an input)")
        sub.add_argument("--make-dirs", action="store_true", help=f"create the {what}'s missing folders")

    def output(sub):
        sub.add_argument("output")
        overwrite(sub)

    sub = command("to-lora", cmd_to_lora, "native SaRA file -> kohya LoRA (A1111, Forge, ComfyUI, diffusers)")
    sub.add_argument("input")
    output(sub)
    sub.add_argument("--rank", type=int, help="the rank of every module; with --energy / --max-error, the "
                                              "largest rank a module may get")
    adaptive = sub.add_mutually_exclusive_group()
    adaptive.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction of "
                                                       "the squared singular values (e.g. 0.99)")
    adaptive.add_argument("--max-error", "--max-rel-error", dest="max_error", type=float,
                          help="per module, the smallest rank whose relative Frobenius error is at most this "
                               "(e.g. 0.05); modules that cannot reach it within the rank cap are listed")
    sub.add_argument("--max-rank", type=int, help="upper bound on any module's rank")
    sub.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                     help="auto: randomized (on the sparse delta) when the rank bound is small against the "
                          "matrix, else exact")
    sub.add_argument("--uniform-rank", action="store_true",
                     help="pad every module with zeros to the largest rank (exact); needed by diffusers' "
                          "load_lora_weights when ranks differ (--energy / --max-error)")
    sub.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    sub.add_argument("--format", choices=("kohya", "diffusers"), default="kohya",
                     help="kohya: kohya's module names, read by every UI and by diffusers for SD1/SDXL/FLUX.1; "
                          "diffusers: diffusers' own layer names (FLUX.1 / SD3 only), which "
                          "StableDiffusion3Pipeline needs and FluxPipeline reads at any model width")
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
    sub.add_argument("--base", help=f"the base model to project onto: {convert.BASE_KINDS}")
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
    overwrite(sub)
    sub.add_argument("--base", help=f"the base model to bake into: {convert.BASE_KINDS}")
    sub.add_argument("--dtype", choices=list(DTYPES), help="value dtype of a merged native file (default fp32)")
    allow_non_finite(sub)
    base_model(sub)

    sub = command("inspect", cmd_inspect, "show a native / LoRA / diff file: metadata, sizes, densities, values")
    sub.add_argument("input")
    sub.add_argument("--base", help="check that this base model fits the file (modules, shapes, base hash): "
                                    + convert.BASE_KINDS)
    sub.add_argument("--json", action="store_true")
    allow_non_finite(sub)
    base_model(sub)

    sub = command("analyze", cmd_analyze, "|w| distribution of a base model, thresholds per block, budget")
    sub.add_argument("base", help=convert.BASE_KINDS)
    sub.add_argument("--thresholds", default="1e-4,5e-4,1e-3,2e-3,5e-3,1e-2", help="columns of the table")
    sub.add_argument("--threshold", type=float, default=SaraConfig().threshold,
                     help="the selection shown as 'selected' (default: the training default, %(default)g)")
    sub.add_argument("--budget", type=parse_count, help="instead: the threshold selecting this many (e.g. 50M)")
    sub.add_argument("--plot", help="write a PNG: histogram of log10|w| and the selected fraction per block")
    sub.add_argument("--json", action="store_true")
    overwrite(sub, "plot")
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
