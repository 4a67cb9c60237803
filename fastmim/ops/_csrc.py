"""Loader of the compiled extension (CPU C++ and CUDA ops from ``csrc/``).

Loading it registers the ``torch.ops.fastmim.csrc_*`` ops. In order:

1. ``FASTMIM_NO_EXT=1`` skips the extension entirely;
2. the prebuilt module ``fastmim._C`` (built by ``setup.py``) if it imports;
3. in a source tree (``csrc/`` next to the package, e.g. an editable install), a just-in-time
   build with ``torch.utils.cpp_extension.load`` into a cache folder
   (``$FASTMIM_EXT_DIR``, default ``~/.cache/fastmim/torch_extensions/<python>-<torch>-<cpu|cuda>-<hash>``,
   the hash over the sources, headers and flags: checkouts with the same sources share one
   build, checkouts with other sources never rebuild into the same folder nor wait on each
   other's build lock). The first build takes a minute or two (a message says so); later
   processes reuse it, and a failed build is remembered so it is not retried on every import.

The CPU code comes in two builds: the default one (x86-64 baseline: ATen's ``at::vec`` falls back
to its generic, SSE2-level code) and, on x86-64, an AVX2 one (``-mavx2 -mfma -mf16c`` with ATen's
``CPU_CAPABILITY_AVX2``, as ATen builds its own AVX2 kernels): ``fastmim._C`` and
``fastmim._C_avx2``. :func:`cpu_variant` chooses at run time, from the CPU capability torch detects
(``torch.backends.cpu.get_cpu_capability()``: AVX2 or AVX512 load the AVX2 build), and only the
chosen build is loaded (both register the same ops); a just-in-time build compiles only that one.

The package works without the extension: the dispatcher falls back to the other backends and
:func:`load_error` says why (``fastmim info`` prints it). ``setup.py`` builds the same sources
with the same flags through :func:`extension_kwargs` (both CPU builds on x86-64).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]
_CSRC = _REPO_ROOT / "csrc"
_JIT_NAME = "fastmim_C"

_CPU_SOURCES = ("csrc/registration.cpp", "csrc/cpu/token_ops.cpp", "csrc/cpu/loss.cpp",
                "csrc/cpu/resized_crop.cpp")
_CUDA_SOURCES = ("csrc/cuda/token_ops.cu", "csrc/cuda/loss.cu")
_CUDA_ARCHS = ("80", "90")


def cuda_arch_flags() -> list[str]:
    """``-gencode`` flags for sm_80 and sm_90 (plus PTX for newer GPUs).

    Empty when ``TORCH_CUDA_ARCH_LIST`` is set: torch's build then derives the flags from it.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    flags = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in _CUDA_ARCHS]
    flags.append(f"-gencode=arch=compute_{_CUDA_ARCHS[-1]},code=compute_{_CUDA_ARCHS[-1]}")
    return flags


# ATen's own flags for its AVX2 kernels (cmake/Codegen.cmake): the vector code of at::vec, and every
# loop the compiler vectorises, use 256-bit AVX2 with fused multiply-adds.
_AVX2_CXX = ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2")
CPU_VARIANTS = ("default", "avx2")


def cpu_variant() -> str:
    """The CPU build to load here: ``"avx2"`` on an x86-64 CPU torch runs at AVX2 or AVX512, else
    ``"default"``."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "default"
    return "avx2" if capability in ("AVX2", "AVX512") else "default"


def module_name(variant: str = "default") -> str:
    """The prebuilt module of a CPU build: ``fastmim._C`` or ``fastmim._C_avx2``."""
    return "fastmim._C" if variant == "default" else f"fastmim._C_{variant}"


def extension_kwargs(with_cuda: bool, variant: str = "default") -> dict:
    """Sources (relative to the repository root) and compiler flags of the extension's ``variant``
    (:data:`CPU_VARIANTS`).

    ``setup.py`` passes them to ``CppExtension``/``CUDAExtension(module_name(variant), **kwargs)``;
    the just-in-time build uses the same ones.
    """
    if variant not in CPU_VARIANTS:
        raise ValueError(f"variant must be one of {CPU_VARIANTS}, got {variant!r}")
    cxx = ["-O3", *(_AVX2_CXX if variant == "avx2" else ())]
    sources = list(_CPU_SOURCES)
    extra: dict[str, list[str]] = {"cxx": cxx}
    if with_cuda:
        sources += _CUDA_SOURCES
        cxx.append("-DFASTMIM_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DFASTMIM_WITH_CUDA", "--expt-relaxed-constexpr", *cuda_arch_flags()]
    return {"sources": sources, "extra_compile_args": extra}


def cuda_buildable() -> bool:
    """True when the CUDA sources can be compiled here: a CUDA build of torch and ``nvcc``."""
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cache_dir(with_cuda: bool, digest: str) -> Path:
    from fastmim import environment  # here, not at the top: setup.py loads this file on its own

    base = environment.extension_dir()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"{python}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest}"
    return base / tag.replace("+", "_")


def _sources_digest(kwargs: dict) -> str:
    digest = hashlib.sha256(repr(kwargs["extra_compile_args"]).encode())
    headers = {str(p.relative_to(_REPO_ROOT)) for p in (*_CSRC.rglob("*.h"), *_CSRC.rglob("*.cuh"))}
    for path in sorted(set(kwargs["sources"]) | headers):
        digest.update(path.encode())
        digest.update((_REPO_ROOT / path).read_bytes())
    return digest.hexdigest()[:16]


def _jit_build(variant: str = "default") -> None:
    """Compile ``csrc/`` (the CPU build ``variant``) with ``torch.utils.cpp_extension.load`` (cached) and load it."""
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ImportError("no C++ compiler found (set CXX or install g++/clang++)")
    with_cuda = cuda_buildable() and torch.cuda.is_available()
    kwargs = extension_kwargs(with_cuda, variant)
    build_dir = _cache_dir(with_cuda, _sources_digest(kwargs))
    build_dir.mkdir(parents=True, exist_ok=True)
    failed_marker = build_dir / "failed.txt"
    if failed_marker.exists():
        raise ImportError(f"an earlier build of these sources failed (log: {failed_marker}; delete it to retry)")
    name = _JIT_NAME if variant == "default" else f"{_JIT_NAME}_{variant}"
    if not (build_dir / f"{name}.so").exists():
        print(f"fastmim: compiling the C++ extension once into {build_dir} (a minute or two)...", file=sys.stderr)
    flags = kwargs["extra_compile_args"]
    try:
        cpp_extension.load(
            name=name,
            sources=[str(_REPO_ROOT / s) for s in kwargs["sources"]],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags.get("nvcc"),
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, subprocess.CalledProcessError) as exc:  # the compiler's verdict on these sources
        failed_marker.write_text(f"{type(exc).__name__}: {exc}\n")
        raise ImportError(f"building the C++ extension failed: {exc}") from exc
    except OSError as exc:
        # Loading the library failed (e.g. another process was still writing it): not a verdict
        # on the sources, so nothing is remembered and the next process tries again.
        raise ImportError(f"loading the C++ extension failed: {exc}") from exc


def _register_fakes() -> None:
    """Fake (shape-only) kernels of the random ops, which write to a ``device`` argument."""

    @torch.library.register_fake("fastmim::csrc_random_permutation")
    def _(seed, batch, num_patches, device, offset=None):
        return (torch.empty(batch, num_patches, dtype=torch.int64, device=device),
                torch.empty(batch, num_patches, dtype=torch.int64, device=device))

    @torch.library.register_fake("fastmim::csrc_random_masking")
    def _(seed, batch, num_patches, num_keep, device, offset=None):
        return (torch.empty(batch, num_keep, dtype=torch.int64, device=device),
                torch.empty(batch, num_patches, dtype=torch.int64, device=device),
                torch.empty(batch, num_patches, dtype=torch.float32, device=device))

    @torch.library.register_fake("fastmim::csrc_random_masking_varlen")
    def _(seed, cu_seqlens, batch, num_patches, total, device, offset=None):
        return (torch.empty(total, dtype=torch.int64, device=device),
                torch.empty(batch, num_patches, dtype=torch.int64, device=device),
                torch.empty(batch, num_patches, dtype=torch.float32, device=device))


@functools.cache
def load_error() -> str | None:
    """``None`` once the extension is loaded (prebuilt or just-in-time), else why it could not be."""
    from fastmim import environment

    if environment.extension_disabled():
        return "disabled by FASTMIM_NO_EXT=1"
    variant = cpu_variant()
    errors = []
    # The CPU's build first; a prebuilt default build still runs on any x86-64 CPU.
    for name in dict.fromkeys((module_name(variant), module_name("default"))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name} is not built ({exc})")
            continue
        _LOADED["variant"] = variant if name == module_name(variant) else "default"
        _register_fakes()
        return None
    prebuilt_error = "; ".join(errors)
    if not (_CSRC / "registration.cpp").exists():
        return prebuilt_error
    try:
        _jit_build(variant)
    except ImportError as jit_exc:
        return f"{prebuilt_error}; just-in-time build: {jit_exc}"
    _LOADED["variant"] = variant
    _register_fakes()
    return None


_LOADED: dict[str, str] = {}


def loaded_variant() -> str | None:
    """The CPU build that was loaded (``"default"`` or ``"avx2"``), ``None`` when none is."""
    return _LOADED.get("variant") if load_error() is None else None


def has_cuda() -> bool:
    """True when the loaded extension holds CUDA kernels."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastmim::csrc_gather_visible", "CUDA")
