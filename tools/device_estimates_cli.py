"""The LLaVA-1.5-7B weight-scheme table of tools/device_estimates.py on the devices of devices.json, as a command:

    python -m mllm_deploy.tools.device_estimates_cli [--context N]

(a module of its own: tools/report.py uses the estimates, and this command uses the report's device table and
Markdown writer.)
"""

from __future__ import annotations

import sys

from mllm_deploy.tools.device_estimates import CONTEXT_TOKENS, LLAVA7B_NOTE, check_context, llava7b_headers, \
    llava7b_rows


def main(argv=None) -> int:
    import argparse

    from mllm_deploy.core import cli

    def build_parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="python -m mllm_deploy.tools.device_estimates_cli",
                                    description="LLaVA-1.5-7B in FP16, INT8 and INT4 on the devices of devices.json:"
                                                " bandwidth-bound decode tokens/s and memory fit (estimates)")
        p.add_argument("--context", type=int, default=CONTEXT_TOKENS,
                       help=f"tokens in the KV cache for the memory fit and the decode read (default {CONTEXT_TOKENS})")
        return p

    def run(args: argparse.Namespace) -> int:
        from mllm_deploy.tools.report import load_devices, to_markdown

        rows = llava7b_rows(load_devices(), check_context(args.context))
        print(to_markdown([("p", LLAVA7B_NOTE), ("table", llava7b_headers(args.context), rows)]), end="")
        return 0

    return cli.main("device-estimates", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
