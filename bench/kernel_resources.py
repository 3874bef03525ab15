"""Compile the fused-op kernels for Hopper (sm_90) without a GPU and print what ptxas reports:
registers per thread, spill (stack) bytes, shared memory, and whether wgmma was used.

    python bench/kernel_resources.py [--precision tf32|bf16|ieee] [--hidden 256] [--action-dim 6]
    python bench/kernel_resources.py --ops hmc      # the fused HMC chain (kernels/hmc.py)
    python bench/kernel_resources.py --ops all

``--ops`` picks the kernel families (default: sampled_q and log_mean_exp, 9 kernels).

Not a benchmark (not collected by pytest): a static check for register pressure and shared-memory
fit that works on a CPU-only machine; the launch configurations in kernels/ were chosen with it.
Exits 1 if a kernel does not fit in an H100's shared memory (tests/test_ops_sampled_q.py runs it).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernel imports

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from misa_fast.kernels import hmc as hmck  # noqa: E402
from misa_fast.kernels import log_mean_exp as lme  # noqa: E402
from misa_fast.kernels import sampled_q as sq  # noqa: E402

PREC = {"ieee": 0, "tf32": 1, "bf16": 2}
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on H100/H200


def compile_report(kern, const, num_warps, num_stages, label, floats=(), types=None):
    sig = {}
    for n in kern.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif types and n in types:
            sig[n] = types[n]
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
        else:
            sig[n] = "fp32" if n in floats else "i32"
    src = triton.compiler.ASTSource(fn=kern, signature=sig, constexprs=const)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    regs, stack = (m.group(1), m.group(2)) if m else ("?", "?")
    print(f"{label:58s} warps={num_warps} regs={regs:>3s} spill_bytes={stack:>5s} "
          f"smem_KiB={c.metadata.shared / 1024:6.1f} wgmma={'wgmma' in c.asm['ptx']}")
    return c.metadata.shared <= SMEM_LIMIT


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="tf32", choices=list(PREC))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--obs-dim", type=int, default=17)
    ap.add_argument("--action-dim", type=int, default=6)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--ops", default="sampled_q,log_mean_exp",
                    help="comma-separated kernel families: sampled_q, log_mean_exp, hmc, or all")
    a = ap.parse_args(argv)
    H, S, A, K = a.hidden, a.obs_dim, a.action_dim, a.k
    ops = {"sampled_q", "log_mean_exp", "hmc"} if a.ops == "all" else set(a.ops.split(","))
    ok = True
    if "hmc" in ops:
        ok &= hmc_reports(H, A, K, a.precision)
    if "sampled_q" in ops:
        for kind, kern in (("fwd", sq._sq_fwd_kernel), ("trunk", sq._sq_bwd_trunk_kernel),
                           ("head", sq._sq_bwd_head_kernel)):
            blocks, nw, ns = sq.launch_config(kind, K, S, A, H, H)
            const = dict(blocks, HAS_LOGW=False, PREC=PREC[a.precision])
            if kind != "head":
                const["HAS_CHUNK"] = True
            if kind == "trunk":
                const.update(NEED_DOBS=False, NEED_DACT=False, ACCUM_DIN=False)
            ok &= compile_report(kern, const, nw, ns,
                                 f"sampled_q {kind} H={H} S={S} A={A} K={K} {a.precision} {blocks}", floats=("norm",))
    if "log_mean_exp" in ops:
        for M, Kl in ((256, 50), (100_000, 50), (4096, 1024)):
            BM, BK, nw = lme.launch_config(M, Kl)
            ok &= compile_report(lme._lme_fwd_kernel, dict(BLOCK_M=BM, BLOCK_K=BK), nw, 2,
                                 f"log_mean_exp fwd M={M} K={Kl} BLOCK_M={BM} BLOCK_K={BK}", floats=("log_k",))
            ok &= compile_report(lme._lme_bwd_kernel, dict(BLOCK_M=BM, BLOCK_K=BK), nw, 2,
                                 f"log_mean_exp bwd M={M} K={Kl} BLOCK_M={BM} BLOCK_K={BK}")
    unknown = ops - {"sampled_q", "log_mean_exp", "hmc"}
    if unknown:
        print(f"unknown --ops {sorted(unknown)}", file=sys.stderr)
        return 2
    return finish(ok)


def finish(ok):
    if not ok:
        print(f"some kernel needs more than {SMEM_LIMIT // 1024} KiB of shared memory", file=sys.stderr)
    return 0 if ok else 1


def hmc_reports(H, A, K, precision, batch=256, burn_in=5):
    """The fused HMC chain at the MISA sizes: paper-faithful (B chains) and parallel (B*K chains),
    noise supplied and in-kernel (and tf32x3 dots with --precision tf32), with the launch
    configuration ``kernels/hmc.py`` picks."""
    ok = True
    prec = PREC[precision]
    wdt = "bf16" if prec == 2 else "fp32"
    for mode, C in (("faithful", batch), ("parallel", batch * K)):
        blocks, nw, ns = hmck.launch_config(C, A, H, H, True, prec)
        types = {"seed_ptr": "*i64", "acc_ptr": "*u8",
                 "wc_desc": f"tensordesc<{wdt}[1,{blocks['BLOCK_HC']},{blocks['BLOCK_K']}]>",
                 "wct_desc": f"tensordesc<{wdt}[1,{blocks['BLOCK_H']},{blocks['BLOCK_K']}]>"}
        variants = [(prec, precision, False), (prec, precision, True)]
        if precision == "tf32":
            variants.append((3, "tf32x3", False))
        for p, pname, rng in variants:
            const = dict(blocks, HAS_CHUNK=True, PREC=p, PREC0=0, RNG=rng)
            blk = ",".join(f"{k[6:]}={v}" for k, v in blocks.items())
            ok &= compile_report(hmck._hmc_kernel, const, nw, ns,
                                 f"hmc {mode} C={C} H={H} A={A} {pname} {'rng' if rng else 'noise'} {blk}",
                                 floats=("target_accept", "adapt_rate", "init_clip"), types=types)
    return ok


if __name__ == "__main__":
    sys.exit(main())
