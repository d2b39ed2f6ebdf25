"""report-mllm: a readable report (report.md, a self-contained report.html and PNG figures) from
bench-mllm and eval-mllm results, with roofline estimates for Jetson and datacenter GPUs."""

from __future__ import annotations

import argparse
import sys

from mllm_deploy.core import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="report-mllm", description=__doc__)
    p.add_argument("results", nargs="+",
                   help="JSON files from bench-mllm --json (mllm-deploy/bench@1) or eval-mllm --json (mllm-deploy/eval@1)")
    p.add_argument("-o", "--output", required=True, help="directory for report.md, report.html and the PNGs")
    p.add_argument("--device-dtype-bytes", type=int, default=2,
                   help="bytes per weight and KV element in the device estimates (default 2: FP16/BF16)")
    return p


def run(args: argparse.Namespace) -> int:
    from mllm_deploy.core.errors import DependencyError
    from mllm_deploy.tools.report import write_report

    try:
        import matplotlib  # noqa: F401 - only to give a clear message before any work
    except ImportError:
        raise DependencyError("report-mllm draws its figures with matplotlib: pip install 'mllm-deploy[report]'") from None
    written = write_report(args.results, args.output, args.device_dtype_bytes)
    print(f"report-mllm: wrote {len(written)} files to {args.output} ({written[0].name}, {written[1].name},"
          f" {len(written) - 2} figures)")
    return 0


def main(argv=None) -> int:
    return cli.main("report-mllm", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
