"""Where a ``train`` call's settings go: the modules a tiny run visits while it passes them on.

    python -m devtools.run_walk

Traces every call inside ``misa_fast`` that receives the run's settings — the ``RunConfig``, the
``Training`` record of the stages, the dataset's name or the run directory — during a 4-step run on
the embedded dataset. A *stay* is a stretch of consecutive such calls in one module; a *return* a
stay in a module already left; a *climb* a call from a lower layer into a higher one (layers, low
to high: errors/options, data, replay/envs, nets/ops, agents, training, sweep, cli). Prints the
counts, then the stays in order with the functions called in each.
"""
from __future__ import annotations

import sys
import tempfile

LAYERS = {"errors": 0, "options": 0, "data": 1, "replay": 2, "envs": 2, "nets": 3, "ops": 3, "agents": 4,
          "training": 5, "sweep": 6, "cli": 7}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "", LAYERS["training"])


def walk() -> list:
    """[(module, [functions]), ...]: the stays of a tiny run, in order."""
    from misa_fast.data import DEFAULT_DATASET
    from misa_fast.training.loop import RunConfig, Training, train

    out = tempfile.mkdtemp() + "/run"
    run = RunConfig(steps=4, out=out, eval_every=4, eval_episodes=1, log_every=2, progress=False,
                    tensorboard=False, device="cpu",
                    overrides=("policy_hidden=16,16", "critic_hidden=16,16", "num_samples=2", "batch_size=8"))
    names = {out, str(DEFAULT_DATASET)}
    calls = []

    def carries(value) -> bool:
        return isinstance(value, (RunConfig, Training)) or value is run.overrides or (
            isinstance(value, str) and value in names)

    def tracer(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("misa_fast"):
            code = frame.f_code
            arguments = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
            if any(carries(a) for a in arguments):
                calls.append((module, code.co_name, layer(frame.f_back.f_globals.get("__name__", ""))))
        return None

    sys.settrace(tracer)
    try:
        train(run)
    finally:
        sys.settrace(None)
    stays = []
    for module, function, caller_layer in calls:
        if not stays or stays[-1][0] != module:
            stays.append((module, [], caller_layer))
        stays[-1][1].append(function)
    return stays


def main() -> int:
    stays = walk()
    climbs = sum(1 for module, _, caller_layer in stays if layer(module) > caller_layer)
    seen, returns = set(), 0
    for module, _, _ in stays:
        returns += module in seen
        seen.add(module)
    print(f"{len(stays)} stays in {len(seen)} modules, {returns} returns to a module already left, {climbs} climbs")
    for module, functions, _ in stays:
        print(f"  {module}: {', '.join(dict.fromkeys(functions))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
