"""The ``fastmim`` command (also ``python -m fastmim``).

``SUBCOMMANDS`` lists every subcommand: its help and the module holding its
``add_arguments(parser)`` and ``run(args)`` functions, imported only when the command line is
parsed; ``run(args)`` returns the exit code. Expected failures (bad data, bad arguments found
late) raise :class:`CLIError`, printed as one line with exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence

from fastmim.errors import CLIError


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


# name -> (help, module, add_arguments function, run function)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "info": ("versions, GPU and which op backends can run here", "fastmim.cli", "_add_info_arguments", "run_info"),
    "train": ("train a model (MAE, supervised+MIM, CMAE, LUT) with progress, checkpoints and plots",
              "fastmim.train.cli", "add_train_arguments", "run_train"),
    "eval": ("k-NN / linear-probe / classifier / fine-tune accuracy of a checkpoint on the held-out split",
             "fastmim.train.cli", "add_eval_arguments", "run_eval"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmim", description="Fast masked image modeling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, module_name, add_arguments, run) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, add_arguments)(sub_parser)
        sub_parser.set_defaults(_run=getattr(module, run))
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
