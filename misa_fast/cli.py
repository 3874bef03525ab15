"""The ``misa-fast`` command line. Each subcommand lives with the code it drives; this file only
maps names to ``module:configure`` / ``module:run`` pairs, imported lazily so ``misa-fast --help``
stays fast and a missing optional dependency only affects its own subcommand.

A mistake in what the user gave (an option, a file, the data, the run directory, a full disk)
ends the command with one line naming it and exit status 2; an interrupt with one line and
128 + the signal (130 for Ctrl-C, 143 for SIGTERM). ``--debug`` or ``MISA_FAST_DEBUG=1`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). The module defines configure_parser(parser) and run(args) -> int.
SUBCOMMANDS = {
    "train": ("misa_fast.training.loop", "train an agent on a D4RL-format dataset"),
    "finetune": ("misa_fast.training.finetune", "fine-tune an offline checkpoint online in its gymnasium environment"),
    "eval": ("misa_fast.training.evaluation", "evaluate a checkpoint in its gymnasium environment"),
    "make-dataset": ("misa_fast.envs.make_dataset", "write a D4RL-format dataset from a gymnasium env"),
    "sweep": ("misa_fast.sweep.grid",
              "a grid of train runs (datasets x algorithms x seeds x config values) on Ray Tune"),
    "report": ("misa_fast.sweep.report",
               "results table (mean ± std over seeds) and learning curves of run directories"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="misa-fast", description="misa-fast: MISA and the offline-RL baselines of its paper, fast: train on "
        "D4RL-format or Minari datasets, evaluate, fine-tune online, sweep on Ray Tune and report. "
        "`misa-fast COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Parsers are configured only for the command being run (see main).
    return parser


def user_errors() -> tuple:
    """The exceptions that report a mistake in what the user gave rather than a fault of the
    program: the project's refusals (ValueError and its UserError), the operating system's
    answers (a missing or unwritable file, a full disk), a missing optional package, and a run
    that does not fit in memory."""
    errors = [ValueError, OSError, ImportError]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass finds the command; the second parses its own options.
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help / error for unknown commands
        return 2
    command = argv[0]
    sub = argparse.ArgumentParser(prog=f"misa-fast {command}", description=SUBCOMMANDS[command][1])
    sub.add_argument("--debug", action="store_true", help="show the traceback of an error (also MISA_FAST_DEBUG=1)")
    debug = "--debug" in argv[1:] or os.environ.get("MISA_FAST_DEBUG", "") not in ("", "0")
    try:
        from misa_fast.training.runtime import prefer_passive_waiting, tune_host_allocator

        prefer_passive_waiting()  # before the subcommand's module imports torch (see misa_fast.training.runtime)
        tune_host_allocator()
        module = importlib.import_module(SUBCOMMANDS[command][0])
        module.configure_parser(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through misa_fast.training.interrupts
        if debug:
            raise
        message = str(err) or "interrupted; nothing was saved since the last checkpoint"
        print(f"misa-fast {command}: {' '.join(message.split())}", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    except user_errors() as err:
        if debug:
            raise
        print(f"misa-fast {command}: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
