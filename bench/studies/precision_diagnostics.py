"""Does ``--matmul-precision medium`` change what the HMC chains and the SNIS weights see?

On trained checkpoints (a run directory each), the same batches and the same random numbers are
put through one update's losses at ``highest`` and at ``medium``; the HMC diagnostics (acceptance,
effective samples) and the SNIS ones (the Kish ESS of the weights: its mean and 5th percentile over
states) are compared, with the losses themselves:

    OMP_NUM_THREADS=1 python bench/studies/precision_diagnostics.py runs/seed0 runs/seed1 \\
        --batches 20 --out bench/results/precision-diagnostics-<date>.json

The checkpoint's own configuration runs the HMC term; SNIS runs on the same agent with
``unbiased_estimator=snis`` (no retraining: both estimators read the same critic and policy).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from misa_fast.agents import algorithms as algos
from misa_fast.data import prepare
from misa_fast.replay.sources import make_source
from misa_fast.training import checkpoint as ckpt
from misa_fast.training.runtime import matmul_precision

DIAGNOSTICS = ("hmc_accept_rate", "hmc_ess", "snis_ess", "snis_ess_p05", "critic_loss", "actor_loss")


def diagnostics(agent, batches, generator_seed: int, precision: str) -> dict:
    """Mean of every diagnostic over the batches, each batch with noise drawn from a fixed seed."""
    values: dict = {}
    with matmul_precision(precision):
        for i, batch in enumerate(batches):
            agent.generator.manual_seed(generator_seed + i)
            out = agent.compute_losses(batch)
            merged = {**{k: v for k, v in out.metrics.items()}, **out.losses}
            for name in DIAGNOSTICS:
                if name in merged:
                    values.setdefault(name, []).append(float(merged[name].detach()))
    return {k: float(np.mean(v)) for k, v in values.items()}


def study(run_dir: Path, num_batches: int) -> dict:
    state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME)
    run = state["run"]
    data, _ = prepare(run["dataset"] or "pendulum-default", obs_norm=run["obs_norm"])
    source = make_source("prefetch", data, state["agent_config"]["batch_size"], seed=123, device="cpu")
    batches = [next(source) for _ in range(num_batches)]
    source.close()
    result = {"run": str(run_dir), "step": state["step"]}
    for estimator in ("hmc", "snis"):
        agent = algos.agent_from_checkpoint(state)
        if estimator == "snis":
            snis_cfg = agent.config.replace(unbiased_estimator="snis")
            agent = algos.make_agent(snis_cfg)
            algos.load_agent_state(agent, {**state["agent"], "config": snis_cfg.to_dict()}, str(run_dir))
        result[estimator] = {p: diagnostics(agent, batches, 7, p) for p in ("highest", "medium")}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of misa-fast train (MISA)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", default=None, help="a JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [study(Path(r), args.batches) for r in args.runs]
    for r in results:
        for estimator in ("hmc", "snis"):
            hi, med = r[estimator]["highest"], r[estimator]["medium"]
            cells = ", ".join(f"{k} {hi[k]:.4g} / {med[k]:.4g}" for k in hi)
            print(f"{r['run']} step {r['step']} {estimator} (highest / medium): {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
