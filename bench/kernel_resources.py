"""Compile the fused-op kernels for Hopper (sm_90) without a GPU and print what ptxas reports:
registers per thread, spill (stack) bytes, shared memory, and whether wgmma was used.

    python bench/kernel_resources.py [--precision tf32|bf16|ieee] [--hidden 256] [--action-dim 6]

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

from misa_fast.kernels import log_mean_exp as lme  # noqa: E402
from misa_fast.kernels import sampled_q as sq  # noqa: E402

PREC = {"ieee": 0, "tf32": 1, "bf16": 2}
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on H100/H200


def compile_report(kern, const, num_warps, num_stages, label, floats=()):
    sig = {}
    for n in kern.arg_names:
        if n in const:
            sig[n] = "constexpr"
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
    a = ap.parse_args(argv)
    H, S, A, K = a.hidden, a.obs_dim, a.action_dim, a.k
    ok = True
    for kind, kern in (("fwd", sq._sq_fwd_kernel), ("trunk", sq._sq_bwd_trunk_kernel), ("head", sq._sq_bwd_head_kernel)):
        blocks, nw, ns = sq.launch_config(kind, K, S, A, H, H)
        const = dict(blocks, HAS_LOGW=False, PREC=PREC[a.precision])
        if kind != "head":
            const["HAS_CHUNK"] = True
        if kind == "trunk":
            const.update(NEED_DOBS=False, NEED_DACT=False, ACCUM_DIN=False)
        ok &= compile_report(kern, const, nw, ns, f"sampled_q {kind} H={H} S={S} A={A} K={K} {a.precision} {blocks}",
                       floats=("norm",))
    for M, Kl in ((256, 50), (100_000, 50), (4096, 1024)):
        BM, BK, nw = lme.launch_config(M, Kl)
        ok &= compile_report(lme._lme_fwd_kernel, dict(BLOCK_M=BM, BLOCK_K=BK), nw, 2,
                       f"log_mean_exp fwd M={M} K={Kl} BLOCK_M={BM} BLOCK_K={BK}", floats=("log_k",))
        ok &= compile_report(lme._lme_bwd_kernel, dict(BLOCK_M=BM, BLOCK_K=BK), nw, 2,
                       f"log_mean_exp bwd M={M} K={Kl} BLOCK_M={BM} BLOCK_K={BK}")
    if not ok:
        print(f"some kernel needs more than {SMEM_LIMIT // 1024} KiB of shared memory", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
