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
#   setup.py is unchanged.
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
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    echo "$WANT" > "$STAMP"
fi

export PATH="$VENV/bin:$PATH"
exec "$@"
