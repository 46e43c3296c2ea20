#!/usr/bin/env bash
# Build, on a machine with network access, the wheelhouse an OFFLINE GPU node needs to install regbench (issue 16).
#
#   benchmarks/build_wheelhouse.sh [DIR]        # default DIR: ./wheelhouse
#
# The node is assumed to have a Python 3.12 (manylinux x86_64) with torch, torchvision, timm, numpy, scipy, pandas,
# scikit-learn, scikit-image, statsmodels, seaborn, matplotlib, tqdm, filelock, pytest and hypothesis. DIR gets
# regbench's own wheel plus what is missing there: optuna and its SQL stack (SQLAlchemy, alembic, Mako, ...), mnist1d,
# mlxtend, submitit and their small dependencies; never torch or the packages above, and not MLflow (a run without
# it warns once and goes on; its store keeps every run for a later `regbench sync-mlflow`). On the node:
#
#   python3 -m venv --system-site-packages ENV && ENV/bin/pip install --no-index --find-links DIR --no-deps regbench \
#     && ENV/bin/pip install --no-index --find-links DIR -r DIR/requirements.txt
#
# (benchmarks/gpu_check.sh --wheelhouse DIR does exactly that). Stops with one line, exit 2, if DIR grows past 40 MB.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${1:-wheelhouse}"
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"  # the node's Python (3.12); another only to try the script elsewhere
ABI="cp${PY_VERSION/./}"
LIMIT_MB=40
# What the node lacks, with the versions regbench's pyproject asks for. Transitive dependencies are listed too:
# `pip download --platform` cannot resolve against the node's preinstalled packages, so it runs with --no-deps.
NEEDED=(
  "optuna>=4.0" "alembic>=1.5" "SQLAlchemy>=2.0" "Mako" "MarkupSafe" "greenlet" "colorlog" "PyYAML"
  "typing_extensions>=4.12" "packaging>=20"
  "mnist1d>=0.0.2" "requests" "urllib3" "idna" "charset_normalizer" "certifi"
  "mlxtend>=0.23,<0.24" "joblib"
  "submitit>=1.5" "cloudpickle>=1.2.1"
)
mkdir -p "$DIR"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "$HERE/.."
"$PYTHON" -m pip download --quiet --no-deps --dest "$DIR" --python-version "$PY_VERSION" --implementation cp --abi "$ABI" \
  --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any "${NEEDED[@]}"
printf '%s\n' "${NEEDED[@]}" > "$DIR/requirements.txt"
size_mb=$(du -sm "$DIR" | cut -f1)
count=$(ls "$DIR"/*.whl | wc -l)
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "build_wheelhouse: $DIR holds $size_mb MB (> $LIMIT_MB MB); remove what the node already has and rebuild" >&2
  exit 2
fi
echo "wheelhouse $DIR: $count wheels, $size_mb MB (limit $LIMIT_MB MB); install line: see the head of this script"
