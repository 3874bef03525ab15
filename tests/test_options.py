"""Command-line options come from the dataclass fields that hold them: one definition per option."""
import argparse
import dataclasses
from typing import Optional

import pytest

from misa_fast.options import add_options, from_args, option


@dataclasses.dataclass
class Example:
    name: str = option(required=True, help="a name")
    count: int = option(3, help="how many")
    rate: Optional[float] = option(None, help="a rate")
    mode: str = option("a", choices=("a", "b"), help="a choice")
    tags: tuple = option((), flag="--tag", repeatable=True, help="repeatable")
    verbose: bool = option(False, help="more output")
    color: bool = option(True, help="no colors")
    steps: int = option(1000, cli_default=None, help="computed when not given")
    internal: int = 7  # not an option


def parse(argv):
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    return parser.parse_args(argv)


def test_fields_become_options_and_come_back():
    args = parse(["--name", "x", "--count", "5", "--rate", "0.5", "--mode", "b", "--tag", "p", "--tag", "q",
                  "--verbose", "--no-color"])
    cfg = from_args(Example, args, steps=args.steps or 42)
    assert cfg == Example(name="x", count=5, rate=0.5, mode="b", tags=("p", "q"), verbose=True, color=False,
                          steps=42, internal=7)
    defaults = from_args(Example, parse(["--name", "y"]), steps=1000)
    assert defaults == Example(name="y")
    assert not hasattr(parse(["--name", "y"]), "internal")


@pytest.mark.parametrize("argv", [["--count", "1"], ["--name", "x", "--mode", "c"], ["--name", "x", "--count", "z"]])
def test_bad_options_are_argparse_errors(argv):
    with pytest.raises(SystemExit):
        parse(argv)


def test_train_and_sweep_share_the_trial_options():
    from misa_fast.sweep.grid import TRIAL_OPTIONS
    from misa_fast.sweep.grid import configure_parser as sweep_parser
    from misa_fast.training.loop import RunConfig
    from misa_fast.training.loop import configure_parser as train_parser

    parsers = {}
    for name, configure in (("train", train_parser), ("sweep", sweep_parser)):
        parsers[name] = argparse.ArgumentParser()
        configure(parsers[name])
    actions = {name: {a.dest: a for a in p._actions} for name, p in parsers.items()}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert fields <= set(actions["train"])  # every run setting is an option of train
    for dest in TRIAL_OPTIONS:
        assert actions["sweep"][dest].help == actions["train"][dest].help
        assert actions["sweep"][dest].default == actions["train"][dest].default
