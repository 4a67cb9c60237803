"""Test configuration: Triton kernels run through the interpreter on CPU, natively on CUDA.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, at
collection start. With a GPU the kernels run on it and tests marked ``cuda`` run too;
``pytest -m cuda`` runs only those.
"""

import os
import sys

if "triton" in sys.modules:  # pragma: no cover - a plugin imported triton before us
    raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET")

import torch  # noqa: E402  (torch does not import triton at import time)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: their matmuls are tiny, and OpenMP threads only
    contend on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_defaults():
    """Settings a test module's ``train_config`` starts from, beyond the common ones; a module
    overrides this fixture to set its own."""
    return {}


@pytest.fixture
def train_config(tmp_path, train_defaults):
    """A factory of ``TrainConfig``s for the training tests: the tiny model of
    ``fastmim.testing.TINY_TRAIN_MODEL`` writing to ``tmp_path / "run"``, no DataLoader workers,
    no progress bar, then the module's ``train_defaults``; keywords override them all."""
    from fastmim.testing import TINY_TRAIN_MODEL
    from fastmim.train.config import TrainConfig

    def make(**kw):
        base = {"output": str(tmp_path / "run"), "num_workers": 0, "progress": False,
                "model_overrides": dict(TINY_TRAIN_MODEL), **train_defaults}
        return TrainConfig(**{**base, **kw})

    return make


@pytest.fixture
def cli_error(capsys):
    """Runs ``fastmim`` with ``argv`` and returns its error line, checking that the command failed
    the way every bad input must: exit code 2, exactly one ``fastmim: error:`` line, no traceback."""
    from fastmim.cli import main

    def run(argv) -> str:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("fastmim: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return run
