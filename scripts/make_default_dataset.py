"""Regenerate the dataset that ships inside the package (misa_fast/assets/pendulum-default.hdf5)
with misa-fast's own make-dataset code, and measure the Pendulum reference returns that
misa_fast/data/registry.py records (Pendulum has no D4RL reference).

    python scripts/make_default_dataset.py          # a few CPU minutes (SB3 SAC, 10k steps)

The data: "full-replay", every transition of a 10k-step SB3 SAC run (50 episodes of 200 steps,
from random swinging to a stable swing-up): a mix of poor and good episodes. Why not
"medium-replay": SAC solves Pendulum within ~3.5k steps, so the replay up to the medium checkpoint
is only ~2k near-random transitions, from which an offline learner barely beats a random policy
in a few CPU minutes (measured: -1104 after 3k MISA steps, random -1212); on the full replay it
reached -423 after 2k steps (dataset mean -498).

The SAC run that produces the data also gives the reference policy: ref_max is its best
checkpoint's mean return (deterministic actions), ref_min a uniform random policy's, both over
the same 100 seeded episodes (seeds 0..99) of misa_fast.envs.rollout.evaluate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from misa_fast.data import registry  # noqa: E402
from misa_fast.data.hdf5 import write_hdf5  # noqa: E402
from misa_fast.envs.make_dataset import build_dataset, describe  # noqa: E402
from misa_fast.envs.rollout import evaluate  # noqa: E402

ENV_ID = "Pendulum-v1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "misa_fast" / "assets" / registry.DEFAULT_DATASET_FILE))
    parser.add_argument("--kind", default="full-replay")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=10_000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--medium-fraction", type=float, default=1 / 3)
    parser.add_argument("--reference-episodes", type=int, default=100)
    args = parser.parse_args()

    data, meta, behaviour = build_dataset(ENV_ID, args.kind, args.size, seed=args.seed,
                                          train_steps=args.train_steps, eval_every=args.eval_every,
                                          medium_fraction=args.medium_fraction)
    print("checkpoint  mean return  normalized")
    for c in behaviour.checkpoints:
        mark = " <- medium" if c is behaviour.medium else " <- expert" if c is behaviour.expert else ""
        print(f"{c.step:10d}  {c.mean_return:11.1f}  {c.score:10.1f}{mark}")

    rng = np.random.default_rng(args.seed)
    uniform = lambda obs: rng.uniform(-1.0, 1.0, size=(len(obs), 1)).astype(np.float32)  # noqa: E731
    ref_min = evaluate(uniform, ENV_ID, episodes=args.reference_episodes, seed=0)["mean_return"]
    ref_max = evaluate(behaviour.policy(behaviour.expert), ENV_ID, episodes=args.reference_episodes,
                       seed=0)["mean_return"]
    print(f"measured references over {args.reference_episodes} episodes: random {ref_min:.1f}, "
          f"SAC step {behaviour.expert.step} {ref_max:.1f}")
    if abs(ref_min - registry.PENDULUM_REF_MIN) > 0.01 or abs(ref_max - registry.PENDULUM_REF_MAX) > 0.01:
        print(f"NOTE: registry.py has PENDULUM_REF_MIN = {registry.PENDULUM_REF_MIN}, "
              f"PENDULUM_REF_MAX = {registry.PENDULUM_REF_MAX}; update them to the measured values")

    command = "python scripts/make_default_dataset.py " + " ".join(sys.argv[1:])
    meta = describe(meta, registry.DEFAULT_DATASET, command.strip())
    meta.update({"reference_min_measured": ref_min, "reference_max_measured": ref_max,
                 "reference_episodes": args.reference_episodes})
    out = write_hdf5(args.out, data, metadata=meta)
    print(f"wrote {out}: {meta['size']} transitions, {meta['episodes']} episodes, "
          f"mean episode return {meta['mean_episode_return']:.1f} "
          f"(normalized {meta.get('mean_episode_normalized_score', float('nan')):.1f}), "
          f"{out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
