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
