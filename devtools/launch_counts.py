"""Launches per training step for each backend (misa_fast.training.backends), counted with torch.profiler.

    python -m devtools.launch_counts --device cpu        # eager and compiled (compiling takes ~30 s)
    python -m devtools.launch_counts --device cuda       # eager, compiled and graph
    python -m devtools.launch_counts --device cpu --hmc-mode parallel --num-samples 5 --backends eager

Prints a markdown table and writes JSON (default ``bench/results/launches-<device>-<date>.json``).
One step = one full update with batch sampling (B=256, 2x256 MLPs, hopper shapes; K and the HMC
mode from the flags), counted over ``--steps`` steps after two warm-up steps.

- CUDA: ``device ops`` are the kernels (and memcpy/memset) the GPU ran; ``host launches`` the
  launch calls the CPU made (cudaLaunchKernel / cuLaunchKernel / cudaGraphLaunch / async memcpy and
  memset): the per-step host cost that a CUDA graph removes.
- CPU: nothing is launched. ``dispatches`` counts the ATen operator calls made from Python, autograd
  and the optimizer (an op's own internal ATen calls not counted) — each one is a trip through the
  dispatcher, the CPU analogue of a launch; ``fused kernels`` counts the C++ kernels inductor
  generated (compiled backend), which run without going through the dispatcher.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType

from misa_fast.agents import MISA
from misa_fast.agents.misa_config import preset
from misa_fast.replay.sources import DeviceSource
from misa_fast.training.backends import make_step

LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
               "cudaMemcpyAsync", "cudaMemsetAsync")


def hopper_like_data(n=100_000, obs_dim=11, act_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-0.99, 0.99, size=(n, act_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "terminals": (rng.random(n) < 0.01).astype(np.float32)}


def count(backend: str, device: str, steps: int = 3, **overrides) -> dict:
    """Profiler counts per step for one backend (dict row)."""
    if backend == "compiled" and device == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name each generated C++ kernel in the profile
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

    def is_dispatch(e):  # an ATen op not called by another ATen op
        return e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))

    row = {
        "backend": backend, "device": device, "hmc_mode": cfg.hmc_mode, "num_samples": cfg.num_samples,
        "burn_in": cfg.hmc_burn_in, "use_hmc": cfg.use_hmc, "steps_profiled": steps,
        "dispatches_per_step": sum(map(is_dispatch, events)) / steps,
        "fused_kernels_per_step": sum(1 for e in events if "cpp_fused" in e.name) / steps,
        "device_ops_per_step": sum(1 for e in events if e.device_type == DeviceType.CUDA) / steps,
        "host_launches_per_step": sum(1 for e in events if e.name in LAUNCH_APIS) / steps,
        "graph_launches_per_step": sum(1 for e in events if e.name == "cudaGraphLaunch") / steps,
    }
    if hasattr(step, "close"):
        step.close()
    return row


def format_table(rows, device: str) -> str:
    if device == "cuda":
        lines = ["| backend | device ops / step | host launches / step | graph launches / step |",
                 "|---|---:|---:|---:|"]
        lines += [f"| {r['backend']} | {r['device_ops_per_step']:.0f} | {r['host_launches_per_step']:.0f} | "
                  f"{r['graph_launches_per_step']:.0f} |" for r in rows]
    else:
        lines = ["| backend | ATen dispatches / step | inductor fused kernels / step |", "|---|---:|---:|"]
        lines += [f"| {r['backend']} | {r['dispatches_per_step']:.0f} | {r['fused_kernels_per_step']:.0f} |"
                  for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=None, choices=["eager", "compiled", "graph"])
    p.add_argument("--hmc-mode", default="faithful", choices=["faithful", "adaptive", "parallel", "off"])
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--burn-in", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", help="output path (default bench/results/launches-<device>-<date>.json)")
    args = p.parse_args(argv)
    backends = args.backends or (["eager", "compiled", "graph"] if args.device == "cuda" else ["eager", "compiled"])
    overrides = dict(num_samples=args.num_samples, hmc_burn_in=args.burn_in)
    overrides.update(use_hmc=False) if args.hmc_mode == "off" else overrides.update(hmc_mode=args.hmc_mode)
    rows = [count(b, args.device, args.steps, **overrides) for b in backends]
    print(format_table(rows, args.device))
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    out = Path(args.json or f"bench/results/launches-{args.device}-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "machine": platform.node(), "torch": torch.__version__,
                               "rows": rows}, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
