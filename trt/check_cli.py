"""check-trt-mllm: check a bundle's ONNX graphs against one TensorRT version's ONNX parser, statically.

Exit 0 when no problem is found, 1 when there are findings (or on a user error). Needs neither
TensorRT nor a GPU: the operator tables come from onnx-tensorrt's operators.md (trt/support/).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from mllm_deploy.core import cli

PROG = "check-trt-mllm"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("bundle", help="bundle directory written by export-mllm")
    # No argparse choices: an unknown version is a user error with the known list on one line.
    p.add_argument("--trt", required=True, metavar="VERSION",
                   help="TensorRT version to check against (tables in trt/support: e.g. 10.3, 10.16, 11.4)")
    cli.add_json_argument(p, "the report (findings, plugins, shape inputs)")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.trt.check import inspect_bundle, load_support

    support = load_support(args.trt)
    report = inspect_bundle(args.bundle, args.trt)
    by_graph, plugins = report.findings, report.plugins
    findings = [f for graph in by_graph.values() for f in graph]
    shape_inputs = {graph: names for graph, names in report.shape_inputs.items() if names}
    cli.emit_json(args, {"tensorrt": args.trt, "ok": not findings, "findings": [asdict(f) for f in findings],
                         "plugins": plugins, "shape_inputs": shape_inputs, "caveat": support.get("caveat")}, indent=1)
    if cli.json_to_stdout(args):
        return 1 if findings else 0
    if support.get("caveat"):
        # The table for this version is reconstructed from the nearest one found; say so once.
        print(f"{PROG}: note: the TensorRT {args.trt} operator table is approximate "
              "(see trt/support/README.md)", file=sys.stderr)
    for graph, names in shape_inputs.items():
        print(f"{PROG}: note: {graph} input{'s' if len(names) > 1 else ''} {', '.join(names)}: TensorRT shape tensor "
              "(build-mllm gives it profile values; bound in host memory)", file=sys.stderr)
    for finding in findings:
        print(finding.line())
    graphs = ", ".join(by_graph)
    if not findings:
        extra = f"; plugins: {', '.join(plugins)}" if plugins else ""
        print(f"{PROG}: no problems for TensorRT {args.trt} ({graphs}{extra})")
        return 0
    print(f"{PROG}: {len(findings)} problem{'s' if len(findings) != 1 else ''} for TensorRT {args.trt}")
    return 1


def main(argv=None) -> int:
    return cli.main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
