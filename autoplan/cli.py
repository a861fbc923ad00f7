"""The ``autoplan`` command line: a table of commands, each in its own module under
``autoplan/commands/`` with ``register(subparsers)`` and ``run(args)``. ``plan`` is the
default command, so ``autoplan --gpus 64 --target-seqlen 256k`` plans.

Planning never imports torch: ``run``, ``check`` and ``validate`` import the runtime
inside ``run(args)`` only. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from cost_models.specs import SpecError

from .errors import UsageError
from .plan import PlanError

# name -> (module under autoplan.commands, one-line summary); the order is the help's.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("plan", "choose a plan (default command)"),
    "emit": ("emit", "write launch scripts for a plan"),
    "probe": ("probe", "show the detected hardware"),
    "run": ("run", "train a plan on this node (wraps torchrun)"),
    "cost": ("cost", "price one configuration: memory, time, FLOPs, collectives"),
    "check": ("check", "trace a plan's memory on CPU (fake tensors) vs the prediction"),
    "validate": ("validate", "memory model vs traced memory over a grid (needs torch)"),
    "calibrate": ("calibrate", "fit GPU efficiencies and memory terms to measured run records"),
    "capacity": ("capacity", "fewest GPUs for a target sequence length, and neighbouring cluster sizes"),
    "sweep": ("sweep", "vary one knob (cp, gpus, seqlen, gpu) or draw the seq_len vs tokens/s frontier"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (``UsageError``), not usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or with ``only`` just that command's options (the others
    are listed but their modules not imported: planning starts that much sooner)."""
    parser = OneLineParser(
        prog="autoplan",
        description="Plan long-context LLM training: dp/cp/tp degrees, seq_len, batch and activation "
                    "checkpointing that fit in GPU memory and run fast. `plan` is the default command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, summary) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary)
        if only is None or name == only:
            module = importlib.import_module(f"autoplan.commands.{module_name}")
            module.register(command)
            command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["plan"] + argv
    try:
        args = build_parser(argv[0] if argv[0] in COMMANDS else None).parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # `autoplan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a command cut off this way
    except (SpecError, PlanError, UsageError) as error:
        print(f"autoplan: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # validation errors from pydantic / specs deep in the stack
        print(f"autoplan: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"autoplan: error: {error.filename}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
