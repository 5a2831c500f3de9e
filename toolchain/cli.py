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

from toolchain.recipe import TASK_CHOICES  # --task takes the recipe's ``task`` values
#: an unexpected error's message is cut to this many characters on its one line
MAX_MESSAGE_CHARS = 300
#: our own errors list every problem at once; only a pathological value makes them longer
MAX_ERROR_CHARS = 4000

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = (
    "toolchain.commands.relevance",
    "toolchain.commands.train",
    "toolchain.commands.listing",
    "toolchain.commands.compress",
    "toolchain.commands.recipe",
    "toolchain.tune.command",
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


def bounded_int(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi] (the recipe's bounds, e.g. ``MAX_RUNS``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} must be an integer in [{lo}, {hi}]")
        return value
    return parse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def finite_seconds(text: str) -> float:
    """A timeout: a finite number of seconds > 0 (``nan``, ``inf`` and negatives are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} must be a finite number of seconds > 0, e.g. 120")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def add_model_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Keras model: .keras, .h5 or a SavedModel directory")
    p.add_argument("--data", required=True,
                   help="dataset spec: digits, kws01[:PATH], mnist, fashion_mnist, cifar10, images:DIR[?scale=1|255|-1&train_per_class=N&eval_per_class=N], npz:PATH")
    p.add_argument("--data-dir", help="where cached Keras datasets live (default: the Keras cache)")
    p.add_argument("--trust-model", action="store_true",
                   help="allow Lambda layers and custom objects (loading them can execute code)")
    p.add_argument("--task", choices=TASK_CHOICES, default=None,
                   help="what the model does (default: the recipe's task, else auto: inferred from "
                        "the model and data)")


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


#: what ``toolchain --help`` says it is, for the people who use it
DESCRIPTION = ("Compress a trained Keras model for a Raspberry Pi-class board or a microcontroller, guided by "
               "explainability (LRP relevance): prune, quantize with mixed precision, export to TFLite, ONNX and "
               "TFLite Micro, verify every artifact against your original model, and measure what you gain "
               "(size, speed) and lose (accuracy or your task's metric). Start with `toolchain compress`.")


def build_parser() -> argparse.ArgumentParser:
    from toolchain import __version__

    parser = _Parser(prog="toolchain", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for mod in _modules():
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # TensorFlow's C++ logging prints "Unable to register cuDNN factory" errors on CPU-only machines;
    # our own errors are Python exceptions, printed as one line below
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not sys.stderr.isatty():
        # progress bars are for terminals: in a log file, one plain progress line a minute per bar
        # instead of every update (tqdm reads TQDM_* defaults from the environment)
        os.environ.setdefault("TQDM_MININTERVAL", "60")
        os.environ.setdefault("TQDM_NCOLS", "100")
    parser = build_parser()
    unknown = _unknown_flag(parser, sys.argv[1:] if argv is None else list(argv))
    if unknown:
        print(unknown, file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    from toolchain.errors import ToolchainError

    if getattr(args, "debug", False):
        os.environ["TOOLCHAIN_DEBUG"] = "1"  # native library output (the TFLite converter's) stays visible
    try:
        _check_paths(args)
        return args._run(args)
    except ToolchainError as e:
        if args.debug:
            raise
        print(f"error: {_one_line(e, MAX_ERROR_CHARS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the output directory was left as it was", file=sys.stderr)
        return 130
    except RecursionError:
        if args.debug:
            raise
        given = [str(getattr(args, a)) for a in ("model", "artifact", "recipe", "bitplan", "thresholds", "check")
                 if isinstance(getattr(args, a, None), str)]
        print(f"error: an input ({', '.join(given) or 'a config file'}) is nested too deeply to read: a "
              "hostile or corrupt JSON/YAML config; pass a file the toolchain or Keras wrote", file=sys.stderr)
        return 2
    except OSError as e:  # ENOSPC, EACCES, EBUSY, ENOENT on the user's paths
        if args.debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or _one_line(e)}{where}; free space or fix the permissions of the "
              "paths given, then rerun", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is our bug; say so in one line
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__} ({_one_line(e)}): this is a bug in the toolchain; "
              "re-run with --debug for details and report it", file=sys.stderr)
        return 1


def _unknown_flag(parser: argparse.ArgumentParser, argv: List[str]) -> Optional[str]:
    """One line naming the first flag the chosen command does not take, with the closest one it
    does: argparse would first complain that a required flag is missing (``--modle`` for
    ``--model``)."""
    import difflib

    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    name = next((a for a in argv if not a.startswith("-")), None)
    if commands is None or name not in commands.choices:
        return None
    sub = commands.choices[name]
    known = [o for a in sub._actions for o in a.option_strings]
    for token in argv[argv.index(name) + 1:]:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            return f"error: {sub.prog}: unknown option {flag}{hint} (see `{sub.prog} --help`)"
    return None


def _one_line(e: BaseException, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_paths(args) -> None:
    """Before any work: input paths must be files or directories (a FIFO would hang the loader),
    and ``--out`` must not replace an input, ``/``, the working directory or a system directory."""
    from toolchain.outdir import check_artifact_name, check_output_dir, check_output_file
    from toolchain.paths import check_command_inputs

    inputs = check_command_inputs(args)
    check_artifact_name(getattr(args, "name", None))
    out = getattr(args, "out", None)
    if isinstance(out, str) and args.command == "train":  # train's --out is a model file
        check_output_file(out)
    elif isinstance(out, str):
        check_output_dir(out, inputs=inputs)


if __name__ == "__main__":
    sys.exit(main())
