"""The ``misa-fast`` command line. Each subcommand lives with the code it drives; this file only
maps names to ``module:configure`` / ``module:run`` pairs, imported lazily so ``misa-fast --help``
stays fast and a missing optional dependency only affects its own subcommand."""
from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass finds the command; the second parses its own options.
    if argv and argv[0] in SUBCOMMANDS:
        from misa_fast.training.runtime import prefer_passive_waiting, tune_host_allocator

        prefer_passive_waiting()  # before the subcommand's module imports torch (see misa_fast.training.runtime)
        tune_host_allocator()
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"misa-fast {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.configure_parser(sub)
        args = sub.parse_args(argv[1:])
        return int(module.run(args) or 0)
    parser.parse_args(argv)  # prints help / error for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
