"""Launches per training step for each backend, counted with torch.profiler.

    python -m bench.launch_counts --device cpu            # eager and compiled
    python -m bench.launch_counts --device cuda --json bench/results/launches-<gpu>-<date>.json

On CUDA it counts device kernels (and CUDA-graph launches) per step; on CPU, where nothing is
launched, it counts top-level ATen operator dispatches per step (each a Python -> C++ round trip,
the CPU analogue of a launch) plus compiled-region calls. B=256, K=50, 2x256, hopper shapes.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.autograd import DeviceType

from misa_fast.agents import MISA
from misa_fast.backends import make_step
from misa_fast.config import preset
from misa_fast.samplers import DeviceSource


def hopper_like_data(n=10_000, obs_dim=11, act_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-0.99, 0.99, size=(n, act_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "terminals": (rng.random(n) < 0.01).astype(np.float32)}


def count(backend: str, device: str, steps: int = 3, **overrides) -> dict:
    cfg = preset("locomotion").replace(obs_dim=11, act_dim=3, device=device, **overrides)
    agent = MISA(cfg)
    step = make_step(agent, DeviceSource(hopper_like_data(), cfg.batch_size, 0, device), backend)
    for _ in range(2):  # compile / capture / allocator warm-up
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    top_level_aten = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    graph_launches = sum(1 for e in events if e.name == "cudaGraphLaunch")
    compiled = sum(1 for e in events if "Compiled" in e.name and e.cpu_parent is None)
    return {"backend": backend, "device": device, "hmc_mode": cfg.hmc_mode, "num_samples": cfg.num_samples,
            "aten_ops_per_step": top_level_aten / steps, "kernels_per_step": kernels / steps,
            "graph_launches_per_step": graph_launches / steps, "compiled_regions_per_step": compiled / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--hmc-mode", default="faithful", choices=["faithful", "adaptive", "parallel"])
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    backends = args.backends or (["eager", "compiled", "graph"] if args.device == "cuda" else ["eager", "compiled"])
    rows = [count(b, args.device, hmc_mode=args.hmc_mode, num_samples=args.num_samples) for b in backends]
    what = "kernels" if args.device == "cuda" else "top-level ATen ops"
    print(f"| backend | {what} / step | graph launches / step | compiled regions / step |")
    print("|---|---:|---:|---:|")
    for r in rows:
        n = r["kernels_per_step"] if args.device == "cuda" else r["aten_ops_per_step"]
        print(f"| {r['backend']} | {n:.0f} | {r['graph_launches_per_step']:.0f} | {r['compiled_regions_per_step']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
