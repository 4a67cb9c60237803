"""The ``fastmim`` command (also ``python -m fastmim``).

Subcommands register themselves in ``SUBCOMMANDS``: each is a ``(help, add_arguments, run)``
triple; ``run(args)`` returns the exit code. Expected failures (bad data, bad arguments found
late) raise :class:`CLIError`, printed as one line with exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Callable, Sequence


class CLIError(Exception):
    """A user-facing error: printed as ``fastmim: error: <message>`` with exit code 2."""


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # report any import failure, e.g. a broken optional package
        return f"not available ({type(exc).__name__})"


def run_info(args: argparse.Namespace) -> int:
    """Print versions, the GPU (if any) and which op backends can run here, with reasons."""
    del args
    import torch

    import fastmim
    from fastmim.ops import backend_status

    print(f"fastmim {fastmim.__version__}")
    print(f"python  {platform.python_version()}")
    for module in ("torch", "triton", "timm", "xformers"):
        print(f"{module:7} {_version(module)}")
    if torch.cuda.is_available():
        print(f"gpu     {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("gpu     none")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends on {device}:")
        for backend, reason in backend_status(device).items():
            print(f"  {backend:9} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("versions, GPU and which op backends can run here", _add_info_arguments, run_info),
}


def _register_optional_subcommands() -> None:
    """Subcommands living in their own modules add themselves to ``SUBCOMMANDS`` on import."""
    for module in ("fastmim.train.cli",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only the subcommand module (or its package) being absent is expected.
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise


def build_parser() -> argparse.ArgumentParser:
    _register_optional_subcommands()
    parser = argparse.ArgumentParser(prog="fastmim", description="Fast masked image modeling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub_parser)
        sub_parser.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except CLIError as exc:
        print(f"fastmim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastmim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
