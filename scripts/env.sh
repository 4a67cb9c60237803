#!/usr/bin/env bash
# Sets up the Python environment fastmim runs in, then runs the given command inside it.
#
#   scripts/env.sh COMMAND [ARGS...]
#
# - An active virtual environment ($VIRTUAL_ENV) is used as it is.
# - Otherwise ./.venv is created; when the system Python already imports torch (as on a GPU
#   machine with no internet) it is created with --system-site-packages so that torch, triton
#   and the CUDA libraries are reused rather than downloaded.
# - fastmim is installed editable with its [dev] extras; a stamp skips the install while
#   setup.py is unchanged. Where no package index can be reached but the system has torch,
#   triton and timm, fastmim alone is installed over them (no build isolation, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ -n "${VIRTUAL_ENV:-}" ]; then
    VENV=$VIRTUAL_ENV
else
    VENV=.venv
    if [ ! -x "$VENV/bin/python" ]; then
        if "$PYTHON" -c "import torch" 2>/dev/null; then
            echo "env: creating $VENV (reusing the system's torch through --system-site-packages)"
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            echo "env: creating $VENV"
            "$PYTHON" -m venv "$VENV"
        fi
    fi
fi

STAMP="$VENV/.fastmim-installed"
WANT=$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "env: installing fastmim and its dependencies into $VENV (the first time downloads torch: several minutes)"
    if "$VENV/bin/python" -m pip install --quiet --upgrade pip && "$VENV/bin/python" -m pip install --quiet -e ".[dev]"; then
        :
    elif "$VENV/bin/python" -c "import torch, triton, timm, setuptools" 2>/dev/null; then
        # No package index (a GPU machine without internet): install fastmim alone over the
        # packages the system already has, building with the system's setuptools.
        echo "env: the package index cannot be reached; installing fastmim over the system's packages"
        "$VENV/bin/python" -m pip install --quiet --no-index --no-build-isolation --no-deps -e .
    else
        echo "env: installing the dependencies failed (see above)" >&2
        exit 1
    fi
    echo "$WANT" > "$STAMP"
fi

export PATH="$VENV/bin:$PATH"
exec "$@"
