#!/usr/bin/env bash
# One check of regbench's CUDA path on a GPU machine (issue 16): device-switched tests on CUDA, the CLI end to end
# (every method, both composites, --trials, a shift set, --parallel-seeds, SIGINT + resume, a CUDA checkpoint rerun
# on the CPU), the four speed benchmarks, then one summary table and the total wall time.
#
#   benchmarks/gpu_check.sh                         # regbench already installed in this Python
#   benchmarks/gpu_check.sh --wheelhouse DIR        # offline node: install from DIR first (benchmarks/build_wheelhouse.sh)
#   benchmarks/gpu_check.sh --device cpu            # try the script itself on a machine without a GPU
#
# Other options go to benchmarks/gpu_check.py (--parts, --work, --part-timeout). PYTHON picks the interpreter
# (default python3). Exit 0: every part passed; 1: a part failed (see its log); 2: it could not start.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELHOUSE=""
DEVICE="cuda"
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a folder}"; shift 2 ;;
    --device) DEVICE="${2:?--device needs a value}"; PASS+=(--device "$2"); shift 2 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch; run it with the Python that has torch (PYTHON=/path/to/python3)" >&2
  exit 2
fi
if [ "$DEVICE" != "cpu" ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU node, or pass --device cpu to try the script on the CPU" >&2
  exit 2
fi

if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || { echo "gpu_check: wheelhouse $WHEELHOUSE is not a folder; build it with benchmarks/build_wheelhouse.sh on a networked machine" >&2; exit 2; }
  VENV="$(mktemp -d "${TMPDIR:-/tmp}/regbench-gpu-venv-XXXXXX")"
  # --system-site-packages: torch, timm, numpy, … come from the node's Python; only what is missing comes from DIR
  "$PYTHON" -m venv --system-site-packages "$VENV"
  [ -f "$WHEELHOUSE/requirements.txt" ] || { echo "gpu_check: $WHEELHOUSE has no requirements.txt; build it with benchmarks/build_wheelhouse.sh" >&2; exit 2; }
  if ! { "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" --no-deps regbench \
         && "$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" -r "$WHEELHOUSE/requirements.txt"; } \
       >"$VENV/pip.log" 2>&1; then
    missing="$(grep -oE "No matching distribution found for [^ ]+|Could not find a version that satisfies the requirement [^ ]+" "$VENV/pip.log" | head -1 | awk '{print $NF}')"
    echo "gpu_check: the wheelhouse $WHEELHOUSE lacks ${missing:-a package (see $VENV/pip.log)}; rebuild it with benchmarks/build_wheelhouse.sh for this Python ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))" >&2
    exit 2
  fi
  PYTHON="$VENV/bin/python"
  export PATH="$VENV/bin:$PATH"
fi

if ! "$PYTHON" -c "import regbench.cli" 2>/dev/null; then
  echo "gpu_check: regbench is not installed in $PYTHON; pass --wheelhouse DIR (benchmarks/build_wheelhouse.sh) or pip install it" >&2
  exit 2
fi
exec "$PYTHON" "$HERE/gpu_check.py" ${PASS[@]+"${PASS[@]}"}
