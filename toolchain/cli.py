"""``toolchain``: the command line. It parses arguments and calls the stages' pipeline functions.

Each subcommand lives in a module with ``add_parser(subparsers)`` and ``run(args) -> int``
(listed in ``COMMANDS``), so stages own their arguments. A ``ToolchainError`` prints as one line
``error: ...`` with exit code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = (
    "toolchain.commands.relevance",
    "toolchain.commands.train",
    "toolchain.commands.listing",
    "toolchain.commands.compress",
    "toolchain.commands.recipe",
)
#: stage subcommands added as the stages land; a missing module is simply not offered
OPTIONAL_COMMANDS = (
    "toolchain.prune.command",
    "toolchain.quantize.command",
    "toolchain.export.command",
    "deploy.command",
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def add_model_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Keras model: .keras, .h5 or a SavedModel directory")
    p.add_argument("--data", required=True,
                   help="dataset spec: digits, kws01[:PATH], mnist, fashion_mnist, cifar10, npz:PATH")
    p.add_argument("--data-dir", help="where cached Keras datasets live (default: the Keras cache)")
    p.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers and custom objects (loading them can execute code)")


def _modules():
    mods = [importlib.import_module(m) for m in COMMANDS]
    for name in OPTIONAL_COMMANDS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
    return mods


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too: ``error: toolchain prune: argument --sparsity: ...``."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toolchain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in _modules():
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # TensorFlow's C++ logging prints "Unable to register cuDNN factory" errors on CPU-only machines;
    # our own errors are Python exceptions, printed as one line below
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    from toolchain.errors import ToolchainError

    try:
        return args._run(args)
    except ToolchainError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the output directory was left as it was", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
