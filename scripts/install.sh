#!/usr/bin/env bash
# Set up .venv with mllm-deploy and its export/dev extras. Idempotent.
#
# torch is installed first and on purpose: a bare `torch` requirement resolves to the
# registry's CUDA build (several GB) even on a machine without a GPU. Without a GPU we ask
# for the CPU build (TORCH_SPEC, default torch==2.13.0, which this project's build machines
# keep as a local CPU wheel; set TORCH_INDEX_URL to a CPU wheel index elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# pip's output condensed: the packages it collects on one line as they come, then how many it installed, and
# its errors and warnings as they are (this project's build machines list extra package folders that may be
# absent: pip's notes on those are dropped)
condensed() {
  "$@" 2>&1 | awk '
    /is ignored: it is neither a file nor a directory/ {next}
    /^Collecting / {printf " %s", $2; fflush(); next}
    /^Successfully installed/ {printf "\n  installed %d packages\n", NF - 2; fflush(); next}
    /^(ERROR|WARNING|error)/ {print; fflush()}
    END {print ""}'
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "install: PyTorch (a few minutes the first time) ..."
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    condensed "${PIP[@]}" install "${TORCH_SPEC:-torch}"
  else
    condensed "${PIP[@]}" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
# ONNX Runtime: onnxruntime-gpu where a GPU is (its CUDA provider), onnxruntime otherwise; never both (one module)
ORT_EXTRA=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ORT_EXTRA=gpu; fi
echo "install: mllm-deploy with [export,dev,${ORT_EXTRA}] ..."
condensed "${PIP[@]}" install -e ".[export,dev,${ORT_EXTRA}]"
echo "install: done (.venv)"
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__ else 1)"
