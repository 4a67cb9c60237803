#!/usr/bin/env bash
# Compiles the CUDA sources of fastmim._C for sm_80 and sm_90 without a GPU (CI runs this), so a
# CUDA compile error fails the build; prints ptxas register / spill figures with -v.
# Usage: csrc/check_cuda_compile.sh [python]   (default: .venv/bin/python, else python3)
# Exits non-zero on a compile error; exits 0 with a note when nvcc or a CUDA torch is absent
# unless FASTMIM_REQUIRE_NVCC=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, nothing to check" >&2
  [[ "${FASTMIM_REQUIRE_NVCC:-0}" == 1 ]] && exit 1 || exit 0
fi
read -r -a INCLUDES <<<"$("$PYTHON" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(f"-I{p}" for p in include_paths()) + f" -I{sysconfig.get_paths()['include']}")
PY
)"
CXX11_ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
CXXSTD="$("$PYTHON" -c 'import torch; v = tuple(int(x) for x in torch.__version__.split(".")[:2]); print("c++20" if v >= (2, 10) else "c++17")')"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  echo "== $src (sm_80, sm_90)"
  if ! "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" -std="$CXXSTD" -O3 -DFASTMIM_WITH_CUDA \
      -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" -DTORCH_EXTENSION_NAME=_C --expt-relaxed-constexpr \
      -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -Xptxas -v -Xcompiler -fPIC "${INCLUDES[@]}" 2>"$OUT/log"; then
    cat "$OUT/log" >&2
    status=1
    continue
  fi
  # ptxas -v: one "Compiling entry function" line then its usage line per kernel and arch.
  grep -E "Compiling entry|registers|spill" "$OUT/log" | sed -E 's/ptxas info *: //' || true
  if grep -qE "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/log"; then
    echo "   note: a kernel spills registers (see above)"
  fi
done
exit $status
