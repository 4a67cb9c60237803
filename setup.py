"""Build script of fastmim.

The C++/CUDA extension ``fastmim._C`` (sources in ``csrc/``; on x86-64 also ``fastmim._C_avx2``,
the same sources with AVX2 and FMA, which the loader picks on CPUs that run them) is optional: it is built with
ninja through ``torch.utils.cpp_extension`` when torch is importable in the build
environment (``pip install --no-build-isolation .``) and a C++ compiler is present; its CUDA
sources only when ``nvcc`` and a CUDA build of torch are there. ``FASTMIM_NO_EXT=1`` skips
it. Without it the package works: editable installs build it on first use through
``fastmim.ops._csrc`` (cached), and the dispatcher falls back to Triton or the references.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _log(message: str) -> None:
    print(f"fastmim setup: {message}", file=sys.stderr)


def _extension_build():
    """``(ext_modules, cmdclass)`` for fastmim._C, or empty ones with the reason logged."""
    if os.environ.get("FASTMIM_NO_EXT", "0") == "1":
        _log("FASTMIM_NO_EXT=1: skipping the C++/CUDA extension")
        return [], {}
    if not (ROOT / "csrc").is_dir():
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable in the build environment: skipping the extension "
             "(it is built on first use instead; `pip install --no-build-isolation .` builds it now)")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _log("no C++ compiler found: skipping the extension")
        return [], {}
    # The sources and flags are those of the just-in-time build, kept in one place.
    spec = importlib.util.spec_from_file_location("fastmim_csrc_build", ROOT / "fastmim" / "ops" / "_csrc.py")
    csrc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(csrc)
    with_cuda = csrc.cuda_buildable()
    # Both CPU builds on x86-64 (the loader picks the AVX2 one where the CPU runs it), the default elsewhere.
    variants = ["default"] + (["avx2"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    extensions = []
    for variant in variants:
        kwargs = csrc.extension_kwargs(with_cuda, variant)
        name = csrc.module_name(variant)
        if with_cuda:
            extensions.append(cpp_extension.CUDAExtension(name, **kwargs))
        else:
            extensions.append(cpp_extension.CppExtension(name, **kwargs))
        _log(f"building {name} ({'CPU + CUDA' if with_cuda else 'CPU only'}, torch {torch.__version__})")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return extensions, {"build_ext": build_ext}


ext_modules, cmdclass = _extension_build()

setup(
    name="fastmim",
    version="0.1.0",
    description="Fast masked image modeling: fused Triton and CUDA kernels for MAE-style training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmim", "fastmim.*"]),
    package_data={"fastmim": ["data/*.npz", "data/LICENSE*", "data/*.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "timm>=1.0",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "ruff", "ninja", "transformers>=5"],
        "hf": ["transformers>=5"],  # fastmim.patch of transformers' ViTMAE / ViT models
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["fastmim = fastmim.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
