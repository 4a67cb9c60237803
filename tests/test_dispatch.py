"""Backend selection: defaults per device, forcing, and errors when a forced backend can't run."""

import pytest
import torch

from fastmim.ops import _dispatch
from fastmim.ops._dispatch import backend_status, forced_backend, select_backend, use_backend


def test_reference_is_always_available():
    assert backend_status("cpu")["reference"] is None


def test_cpu_default_is_reference_even_under_the_interpreter():
    assert select_backend("op", torch.device("cpu")) == "reference"


def test_triton_availability_follows_the_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_status("cpu")["triton"] is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in backend_status("cpu")["triton"]


def test_forcing_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("triton"):
        assert select_backend("op", torch.device("cpu")) == "triton"
    assert select_backend("op", torch.device("cpu")) == "reference"


def test_forced_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTMIM_BACKEND", "reference")
    assert forced_backend() == "reference"
    monkeypatch.setenv("FASTMIM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTMIM_BACKEND must be one of"):
        forced_backend()


def test_forcing_an_unavailable_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' was forced but is unavailable"):
        select_backend("my_op", torch.device("cpu"))


def test_forcing_a_backend_the_op_lacks_keeps_its_default(monkeypatch):
    monkeypatch.setattr(_dispatch, "_csrc_import_error", lambda: "not built")
    with use_backend("csrc"):
        assert select_backend("op", torch.device("cpu"), implemented=("reference", "triton")) == "reference"
        with pytest.raises(RuntimeError, match="not built"):
            select_backend("op", torch.device("cpu"), implemented=("reference", "csrc"))


def test_use_backend_rejects_unknown_names_and_restores():
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cudnn"):
            pass
    with use_backend("reference"):
        with use_backend(None):
            assert forced_backend() is None
        assert forced_backend() == "reference"
    assert forced_backend() is None


def test_preference_order_is_followed(monkeypatch):
    monkeypatch.setattr(_dispatch, "_csrc_import_error", lambda: None)
    chosen = select_backend("op", torch.device("cpu"), implemented=("reference", "csrc"), prefer_cpu=("csrc",))
    assert chosen == "csrc"


def test_forcing_the_reference_never_loads_or_builds_the_extension(tmp_path):
    # A fresh process with an empty extension cache: a training-shaped sequence of ops under
    # FASTMIM_BACKEND=reference must not start a build (nor import a prebuilt fastmim._C).
    script = """
import sys, torch
from fastmim.ops import gather_visible, masked_patch_mse, random_masking, unshuffle
ids_keep, ids_restore, mask = random_masking(2, 4, mask_ratio=0.5, seed=0)
x = torch.randn(2, 4, 8, requires_grad=True)
visible = gather_visible(x, ids_keep, torch.randn(4, 8))
full = unshuffle(visible, ids_restore, torch.zeros(8))
imgs = torch.randn(2, 1, 4, 4)
masked_patch_mse(full[..., :4], imgs, mask, patch_size=2).backward()
assert "fastmim._C" not in sys.modules
"""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTMIM_BACKEND="reference", FASTMIM_EXT_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "ext").exists(), "the extension cache was created: a build started"
    assert "compiling the C++ extension" not in proc.stderr


def test_extension_cache_folder_is_keyed_by_the_sources():
    from fastmim.ops import _csrc

    kwargs = _csrc.extension_kwargs(False)
    digest = _csrc._sources_digest(kwargs)
    folder = _csrc._cache_dir(False, digest)
    assert folder.name.endswith(digest)
    changed = dict(kwargs, extra_compile_args={"cxx": ["-O2"]})
    assert _csrc._sources_digest(changed) != digest


def test_the_cpu_build_follows_the_cpu_capability():
    """Two CPU builds of the extension: the default (x86-64 baseline) and AVX2 (ATen's AVX2 flags and
    capability macro), each in its own cache folder; the one loaded is the CPU's."""
    import platform

    from fastmim.ops import _csrc

    default, avx2 = (_csrc.extension_kwargs(False, variant) for variant in ("default", "avx2"))
    assert {"-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"} <= set(avx2["extra_compile_args"]["cxx"])
    assert not any(flag.startswith("-mavx") for flag in default["extra_compile_args"]["cxx"])
    assert default["sources"] == avx2["sources"]
    assert _csrc._sources_digest(default) != _csrc._sources_digest(avx2)
    assert (_csrc.module_name("default"), _csrc.module_name("avx2")) == ("fastmim._C", "fastmim._C_avx2")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = "avx2" if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "default"
    assert _csrc.cpu_variant() == expected
    if _csrc.load_error() is None:  # a prebuilt default build may stand in for a missing AVX2 one
        assert _csrc.loaded_variant() in (expected, "default")
    with pytest.raises(ValueError, match="variant"):
        _csrc.extension_kwargs(False, "sse9")
