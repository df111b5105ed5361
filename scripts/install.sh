#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install gd-train into it.
#   - a machine whose python3 already has torch (e.g. a CUDA image): the venv sees it
#     (--system-site-packages) and that torch is kept, pinned, never replaced;
#   - otherwise torch==2.13.0 is installed: the CPU wheel on this project's CPU machines (a plain
#     `torch` would pull GBs of CUDA packages); GD_TORCH_SPEC picks another build.
# Idempotent: does nothing when pyproject.toml and the constraints have not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GD_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.gd-train-installed"
want=$(cat pyproject.toml requirements/constraints.txt scripts/install.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import gd_train, torch" 2>/dev/null; then
  exit 0
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "install: Python >= 3.11 is required ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "install: creating $VENV on top of $PY's own torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "install: creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # torch==2.13.0 resolves to the CPU wheel on this project's CPU machines; on a GPU machine PyPI's
  # default (CUDA) build of the same version. GD_TORCH_SPEC picks another build.
  spec=${GD_TORCH_SPEC:-torch==2.13.0}
  echo "install: $spec"
  "${pip[@]}" install "$spec"
fi
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
{ cat requirements/constraints.txt; echo "torch==$torch_version"; } > "$constraints"
echo "install: gd-train and its stack (torch $torch_version kept)"
"${pip[@]}" install -c "$constraints" -e ".[test]"
echo "$want" > "$stamp"
echo "install: done ($VENV)"
