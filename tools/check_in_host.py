"""Run our UI extension inside a host's own loader code, on tiny random models (CPU): SD1 and SDXL
everywhere, FLUX.1 and SD3 where the host has them (ComfyUI, Forge).

    python tools/check_in_host.py --host a1111   --path ~/stable-diffusion-webui
    python tools/check_in_host.py --host forge   --path ~/stable-diffusion-webui-forge
    python tools/check_in_host.py --host comfyui --path ~/ComfyUI

It trains nothing: a SaRA network gets random deltas and is saved as a native file; its own
merge_into_base gives the expected weights. Then the host's code loads the file with our extension
registered and patches the host's copy of the weights (see tools/host_checks/<host>.py for which
host functions run). Exit status 0 when every patched weight equals base + multiplier * delta.
The host's code is imported from --path; none of it is in this repository.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.host_checks.common import Report, make_case  # noqa: E402

HOSTS = ("a1111", "forge", "comfyui")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", choices=HOSTS, required=True)
    parser.add_argument("--path", required=True, help="the host's checkout (its root folder)")
    parser.add_argument("--kinds", help="comma-separated models to check (default: every one the host has, "
                                        "sd1,sdxl[,flux,sd3])")
    args = parser.parse_args(argv)
    host = importlib.import_module(f"tools.host_checks.{args.host}")
    kinds = args.kinds.split(",") if args.kinds else list(host.KINDS)
    unknown = sorted(set(kinds) - set(host.KINDS))
    if unknown:
        parser.error(f"{args.host} has no {', '.join(unknown)} models here (it has {', '.join(host.KINDS)})")
    report = Report()
    with tempfile.TemporaryDirectory() as folder:
        cases = [make_case(kind, folder) for kind in kinds]
        host.check(os.path.abspath(args.path), cases, report)
    print(f"{args.host}: {report.checked} weights checked, {report.failed} failures")
    return 1 if report.failed or not report.checked else 0


if __name__ == "__main__":
    sys.exit(main())
