"""Compile every Triton kernel configuration misa-fast can launch, for real GPUs, without a GPU.

    python devtools/kernel_resources.py --out bench/results     # sm_80 + sm_90, every binary: the table
    python devtools/kernel_resources.py --arch 90 --scope pairwise   # fewer compiles (see distinct_jobs)
    python devtools/kernel_resources.py --list                  # the distinct configurations, no compile

Every binary (470 for both architectures) takes ~25 minutes on two cores, ``--scope pairwise``
(110) ~3 minutes; a rerun on unchanged kernel sources takes about a minute (a Triton cache of
their own: :func:`source_keyed_cache_dir`). Other code can call
:func:`compile_table` (rows as dicts) and :func:`problems`.

For each distinct kernel it reports what ptxas made of it: registers per thread, spill bytes
(the stack frame cuobjdump reports; Triton kernels keep nothing else on the stack), static shared
memory, the matrix instructions in the PTX (``wgmma.mma_async`` on Hopper, ``mma.sync`` otherwise,
none where every dot runs on the FMA units) and their operand type (tf32 / bf16).
``tests/devtools/test_kernels_aot.py`` runs it in CI and fails on a compile error, on spills above
the budget of :func:`spill_budget` or on shared memory above the architecture's limit.

How the configurations are found (nothing here restates a launch by hand):

1. *Launches are recorded, not described.* :func:`record_launches` replaces the ``@triton.jit``
   kernel objects in ``misa_fast.kernels.*`` by recorders whose ``kernel[grid](*args, **kwargs)``
   keeps the arguments instead of launching, and lets the ops' dispatch take the Triton path for
   CPU tensors. Then the real code runs on CPU tensors of the real shapes: the MISA agent
   (``MISA.compute_losses`` and the backward pass, as ``update`` does) for every preset of
   ``misa_fast.agents.misa_config`` with each environment's observation / action sizes, and the ops the way the
   agent calls them with the settings it does not exercise by default (every HMC mode and dot
   precision, supplied noise and in-kernel RNG, every sampled-Q precision), plus the log-mean-exp
   op at the sizes of its callers. Launch configurations (block sizes, warps, stages, flags such as
   ``HAS_LOGW`` / ``ACCUM_DIN``, the tensor descriptors, the placeholder pointers of absent
   arguments) therefore come from the ops' own launch code. Launch code that sizes itself to the
   device sees no GPU here: it assumes 132 SMs (``kernels/hmc_kernels.py``), which gives an A100's choices
   as well at these sizes.
2. *Specialisation is Triton's own.* Each recorded launch goes through the binder Triton's JIT
   builds for a kernel (``triton.runtime.jit.create_function_from_signature`` with the backend of
   the target GPU, then ``JITFunction._pack_args``), exactly as ``JITFunction.run`` does on a CUDA
   device: argument types from the tensors' dtypes, ``tt.divisibility = 16`` for 16-byte-aligned
   pointers and for integers divisible by 16, integers equal to 1 turned into constants, the
   options (``num_warps``, ``num_stages`` and the backend defaults). CPU and CUDA allocations are
   both at least 64-byte aligned, so the pointer attributes are those of a GPU run. The resulting
   ``ASTSource`` is compiled by ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, Triton's
   bundled ptxas included; cuobjdump (also bundled) reads the cubin.
3. *Deduplication.* Launches with the same kernel, signature, constants, attributes and options
   compile to the same binary: each is compiled once per architecture and the table lists every
   configuration that maps to it. The compiles run in a process pool (one per core).
4. *Reading the binary.* Registers and stack from ``cuobjdump --dump-resource-usage``, shared
   memory from Triton's metadata, MMA instructions from the PTX, and for each ``_mm`` call site the
   kind of dot it became (``warp_group_dot`` = wgmma, MMA v2 layout = mma.sync, blocked = FMA) from
   the locations in the final TTGIR.

Not a benchmark: nothing runs on a GPU. The numbers are static properties of the binaries.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernel imports: real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from misa_fast.kernels import hmc_kernels as hmck  # noqa: E402
from misa_fast.kernels import log_mean_exp_kernels as lme  # noqa: E402
from misa_fast.kernels import sampled_q_kernels as sq  # noqa: E402

ARCHS = (80, 90)
# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Spill budgets, in bytes of stack per thread (what cuobjdump reports; Triton kernels use the
# stack for nothing but spills). Measured 2026-12-02 (bench/results/kernels-aot-2026-12-02.md):
# on sm_90 every tensor-core kernel spills at most 80 B (a few words in some HMC chain variants),
# sampled-Q none, so DEFAULT_SPILL_BUDGET fails any change that makes one of them really spill.
# The kernels in KNOWN_SPILLS spill a lot today; their budgets are ratchets at today's worst + 1/8
# so that CI catches them getting worse. They are defects to fix, not accepted costs.
DEFAULT_SPILL_BUDGET = 128
KNOWN_SPILLS = {
    # fp32 ("ieee") sampled-Q dots run on the FMA units with (BLOCK_C, BLOCK_H) operand tiles in
    # registers: kilobytes of spills at H = 256, on both architectures
    ("sq_fwd_kernel", "ieee"): 2944,
    ("sq_bwd_trunk_kernel", "ieee"): 1664,
    ("sq_bwd_head_kernel", "ieee"): 12480,
    # sm_80: the launch configurations were chosen from sm_90 compiles; without wgmma (operands in
    # shared memory) the same tiles need more than 255 registers
    # 2026-12-03: the pendulum preset's 256-wide networks (A = 1, supplied noise, no split) spill
    # 2904 B on sm_80, a new configuration rather than a regression of the others (budget before: 2432)
    ("hmc_kernel", 80): 3264,
    ("sq_bwd_head_kernel", 80): 1856,
    # 2026-12-03, critics beyond the presets' (subset compiles: CORL's 3x256 ReLU, every activation,
    # 4x256): on sm_80 the trunk spills 488 B at 4 hidden layers (320 before), the middle-layer kernel
    # 352 B; on sm_90 every sampled-Q configuration of that subset stays <= 120 B (ieee), <= 56 B (tf32)
    ("sq_bwd_trunk_kernel", 80): 552,
    ("sq_bwd_mid_kernel", 80): 400,
}


def spill_budget(kernel: str, arch: int, precision: Optional[str]) -> int:
    """The spill budget of a compiled kernel (``kernel`` as in the table, e.g. "hmc_kernel")."""
    budgets = [DEFAULT_SPILL_BUDGET, KNOWN_SPILLS.get((kernel, arch), 0)]
    if precision == "ieee":
        budgets.append(KNOWN_SPILLS.get((kernel, "ieee"), 0))
    return max(budgets)


FAMILIES = ("sampled_q", "hmc", "log_mean_exp")

# Environments of the presets: (preset, observation dim, action dim), D4RL sizes.
ENVIRONMENTS: Dict[str, Tuple[str, int, int]] = {
    "hopper": ("locomotion", 11, 3),
    "halfcheetah": ("locomotion", 17, 6),
    "walker2d": ("locomotion", 17, 6),
    "ant": ("locomotion", 27, 8),
    "antmaze": ("antmaze", 29, 8),
    "pen": ("adroit", 45, 24),
    "door": ("adroit", 39, 28),
    "hammer": ("adroit", 46, 26),
    "relocate": ("adroit", 39, 30),
    "kitchen": ("kitchen", 59, 9),
    "pendulum": ("pendulum", 3, 1),
}
HMC_MODES = ("faithful", "adaptive", "parallel")
HMC_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
SAMPLED_Q_PRECISIONS = ("ieee", "tf32", "bf16")
# log_mean_exp callers: SPOT's importance-weighted density (B, L samples; official L = 1) and the
# MI bound estimates of misa_fast.agents.mi_bounds (per state over K, then over the batch).
LOG_MEAN_EXP_SHAPES = {
    "spot iwae L=1": ((256, 1), 1),
    "spot iwae L=10": ((256, 10), 1),
    "mi_bounds per state": ((256, 50), 1),
    "mi_bounds over batch": ((256,), 0),
}
BATCH = 256


# ----------------------------------------------------------------------------------------------
# 1. recording launches
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call the code made, with the configurations that made it."""

    module: str  # e.g. "misa_fast.kernels.hmc_kernels"
    name: str  # the kernel's attribute name in that module
    grid: tuple
    args: tuple
    kwargs: dict
    label: str  # which configuration launched it
    agent_default: bool  # launched by a preset's default agent configuration


class _Recorder:
    """Stands in for a JITFunction: ``rec[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, module: str, name: str, log: "LaunchLog"):
        self.module, self.name, self.log = module, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.launches.append(Launch(self.module, self.name, grid, args, kwargs, self.log.label,
                                            self.log.agent_default))

        return launch


class LaunchLog:
    def __init__(self):
        self.launches: List[Launch] = []
        self.label = ""
        self.agent_default = False

    @contextlib.contextmanager
    def labelled(self, label: str, agent_default: bool = False) -> Iterator[None]:
        saved = self.label, self.agent_default
        self.label, self.agent_default = label, agent_default
        try:
            yield
        finally:
            self.label, self.agent_default = saved


KERNEL_MODULES = (sq, hmck, lme)


def _jit_kernels(module) -> Dict[str, triton.runtime.JITFunction]:
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, triton.runtime.JITFunction)
            and name.endswith("_kernel")}


@contextlib.contextmanager
def record_launches() -> Iterator[LaunchLog]:
    """Within the block, kernel launches are recorded (not run) and the ops take the Triton path for
    CPU tensors as they would for CUDA tensors ("auto" dispatch; unsupported shapes still fall back
    to the torch reference)."""
    from misa_fast.ops import dispatch

    log = LaunchLog()
    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def resolve_as_if_cuda(backend=None, *tensors, members=False):
        if dispatch.requested_backend(backend) == "torch":
            return "torch"
        if not members and dispatch.member_batched(*tensors):  # as on CUDA: the torch reference under vmap
            return "torch"
        return "triton"

    for module in KERNEL_MODULES:
        if not _jit_kernels(module):
            raise RuntimeError(f"{module.__name__} holds no JITFunction kernels: it was imported under "
                               "TRITON_INTERPRET=1; run this in a fresh process without it")
    try:
        for module in KERNEL_MODULES:
            for name in _jit_kernels(module):
                patch(module, name, _Recorder(module.__name__, name, log))
        # every module that imported the dispatcher by name (dispatch itself included); the
        # registered operators launch their kernels where kernel_runs_on says a kernel runs
        replacements = {"resolve_backend": (dispatch.resolve_backend, resolve_as_if_cuda),
                        "kernel_runs_on": (dispatch.kernel_runs_on, lambda *tensors: True)}
        for mod in list(sys.modules.values()):
            if not getattr(mod, "__name__", "").startswith("misa_fast"):
                continue
            for name, (real, replacement) in replacements.items():
                if getattr(mod, name, None) is real:
                    patch(mod, name, replacement)
        yield log
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _random_batch(obs_dim: int, act_dim: int, generator: torch.Generator) -> dict:
    return {
        "observations": torch.randn(BATCH, obs_dim, generator=generator),
        "actions": torch.rand(BATCH, act_dim, generator=generator) * 1.8 - 0.9,
        "rewards": torch.randn(BATCH, generator=generator),
        "next_observations": torch.randn(BATCH, obs_dim, generator=generator),
        "terminals": torch.zeros(BATCH),
    }


def _agent_step(log: LaunchLog, env: str, overrides: dict, label: str, agent_default: bool,
                hmc_variants: bool = False) -> None:
    """What one MISA update launches: the losses and the backward pass (the optimizer steps launch
    nothing of ours). With ``hmc_variants``, the HMC op is also called the way the agent calls it
    in every mode, space, precision and noise source."""
    from misa_fast import ops
    from misa_fast.agents.learner import as_batch
    from misa_fast.agents.misa import MISA
    from misa_fast.agents.misa_config import preset
    from misa_fast.ops import hmc_reference as hmc_lib

    preset_name, obs_dim, act_dim = ENVIRONMENTS[env]
    cfg = preset(preset_name, device="cpu", **overrides)
    agent = MISA(cfg, obs_dim, act_dim)
    real_hmc_sample = ops.hmc_sample

    def hmc_sample_and_variants(mean, std, layers, state_half, actions, **kwargs):
        launched = len(log.launches)
        result = real_hmc_sample(mean, std, layers, state_half, actions, **kwargs)
        if not hmc_variants or len(log.launches) == launched:  # the torch path: no kernel to vary
            return result
        gen = torch.Generator().manual_seed(0)
        for mode in HMC_MODES:
            for precision in HMC_PRECISIONS:
                noise = hmc_lib.draw_noise(mode, actions.shape[0], kwargs["num_samples"], kwargs["burn_in"],
                                           actions.shape[1], gen)
                for source, supplied in (("noise", noise), ("rng", None)):
                    for space in hmc_lib.SPACES:
                        variant = dict(kwargs, mode=mode, space=space, precision=precision,
                                       adapt=mode == "adaptive", noise=supplied, generator=gen)
                        with log.labelled(f"{env} hmc {mode} {space} {precision} {source}"):
                            real_hmc_sample(mean, std, layers, state_half, actions, **variant)
        return result

    # The HMC sampler is a parameter of the agent's loss function: this one also launches the variants.
    losses = agent.loss_function(run_chain=hmc_sample_and_variants)
    batch = as_batch(_random_batch(obs_dim, act_dim, torch.Generator().manual_seed(0)), agent.device)
    with log.labelled(label, agent_default):
        out = losses(agent.state_tensors(), batch, agent.draw_noise(BATCH))
        sum(out.losses.values()).backward()


def _members_step(log: LaunchLog, env: str, count: int = 2) -> None:
    """What the loss computation of ``count`` seeds trained together launches (misa-fast train
    --seeds) and its backward pass: the HMC chains and the sampled-Q log-partition of every member
    in one launch (grid axis for the member, member strides)."""
    from misa_fast.agents.members import stack_agents, stack_tree
    from misa_fast.agents.misa import MISA
    from misa_fast.agents.misa_config import preset

    preset_name, obs_dim, act_dim = ENVIRONMENTS[env]
    agents = [MISA(preset(preset_name, device="cpu", seed=seed), obs_dim, act_dim) for seed in range(count)]
    stacked = stack_agents(agents)
    gen = torch.Generator().manual_seed(0)
    batch = stack_tree([_random_batch(obs_dim, act_dim, gen) for _ in range(count)])
    with log.labelled(f"{_describe_agent(env, {})}, {count} seeds in one launch", True):
        out = stacked.compute_losses(batch, stacked.draw_noise(BATCH))
        sum(loss.sum() for loss in out.losses.values()).backward()


def _describe_agent(env: str, overrides: dict) -> str:
    from misa_fast.agents.misa_config import preset

    cfg = preset(ENVIRONMENTS[env][0], **overrides)
    parts = [f"{env} agent", cfg.energy_bound]
    if cfg.energy_network != "q":
        parts.append("T_psi")
    sq_precision = getattr(cfg, "sampled_q_precision", "tf32")
    parts.append(f"sampled_q {sq_precision}")
    if cfg.use_hmc:
        parts.append(f"hmc {cfg.hmc_mode} {cfg.hmc_precision} noise")
    return " ".join(parts)


def enumerate_launches(envs: Sequence[str] = tuple(ENVIRONMENTS)) -> List[Launch]:
    """Every kernel launch of the configurations described in the module docstring."""
    from misa_fast import ops
    from misa_fast.agents.misa_config import MISAConfig

    has_sq_precision_key = "sampled_q_precision" in MISAConfig.field_types()
    torch.manual_seed(0)
    with record_launches() as log:
        for env in envs:
            # the preset as shipped (what `misa-fast train` runs), HMC variants through the agent's call
            _agent_step(log, env, {}, _describe_agent(env, {}), True, hmc_variants=True)
            # several seeds trained together (misa-fast train --seeds): one HMC launch for every member
            _members_step(log, env)
            # the sampled-Q log-partition at every precision
            for precision in SAMPLED_Q_PRECISIONS:
                if has_sq_precision_key:
                    overrides = {"sampled_q_precision": precision, "use_hmc": False}
                    _agent_step(log, env, overrides, _describe_agent(env, overrides), False)
                else:  # older configs: the op at the agent's shapes with the precision forced
                    _sampled_q_at_precision(log, env, precision)
            # the agent's other regularisers that launch our kernels: CQL (log-weights, 3N proposals)
            # and MISA-T (a separate one-network energy: E = 1)
            for overrides in ({"energy_bound": "cql", "use_hmc": False}, {"energy_network": "separate"}):
                try:
                    label = _describe_agent(env, overrides)
                except ValueError:  # not a valid setting of this preset (MISA-T excludes Lagrange)
                    continue
                _agent_step(log, env, overrides, label, False)
        # critics other than the presets': CORL's CQL (3x256 ReLU modules, 3 x 10 importance-weighted
        # proposals, a temperature), every activation, 4 hidden layers, in both kernel families
        _other_critics(log)
        for label, (shape, dim) in LOG_MEAN_EXP_SHAPES.items():
            x = torch.randn(shape, requires_grad=True)
            with log.labelled(f"log_mean_exp {label} {tuple(shape)} dim={dim}"):
                ops.log_mean_exp(x, dim=dim).sum().backward()
    return log.launches


OTHER_ACTIVATIONS = ("relu", "elu", "leaky_relu", "silu", "tanh", "gelu", "gelu_tanh")
CORL_SIZES = dict(batch=256, proposals=3 * 10, hidden=(256, 256, 256), temperature=1.0)


def _other_critics(log: LaunchLog) -> None:
    """The ops with critics the presets do not use, at halfcheetah's dims: CORL-style CQL critics
    (twin 3x256 ReLU modules whose forward concatenates (s, a), B = 256, 3 x 10 proposals with
    log-weights, T * logsumexp) at every sampled-Q precision; each activation with the presets'
    2x256 twin critics (sampled-Q tf32, HMC faithful tf32x3 with supplied noise); 4 hidden layers of
    256 (sampled-Q tf32, HMC faithful tf32x3)."""
    from misa_fast import nets, ops
    from misa_fast.ops import hmc_reference as hmc_lib

    _, obs_dim, act_dim = ENVIRONMENTS["halfcheetah"]
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(BATCH, obs_dim, generator=gen)

    def critic_module(hidden, act):
        dims = [obs_dim + act_dim, *hidden]
        mods = []
        for i, o in zip(dims[:-1], dims[1:]):
            mods += [torch.nn.Linear(i, o), act()]
        return torch.nn.Sequential(*mods, torch.nn.Linear(dims[-1], 1))

    k = CORL_SIZES["proposals"]
    actions = torch.rand(BATCH, k, act_dim, generator=gen) * 2 - 1
    log_w = torch.randn(BATCH, k, generator=gen)
    critics = [critic_module(CORL_SIZES["hidden"], torch.nn.ReLU) for _ in range(2)]
    for precision in SAMPLED_Q_PRECISIONS:
        with log.labelled(f"corl cql 3x256 relu sampled_q {precision}"):
            ops.sampled_q_log_mean_exp(obs, actions, critics, log_w, "none", temperature=CORL_SIZES["temperature"],
                                       precision=precision).sum().backward()

    def hmc_call(critic, label):
        layers = critic.stacked_layers(detach=True)
        half = critic.first_layer_state_half(obs, detach=True)
        mean, std = torch.zeros(BATCH, act_dim), torch.full((BATCH, act_dim), 0.3)
        init = torch.rand(BATCH, act_dim, generator=gen) * 1.6 - 0.8
        noise = hmc_lib.draw_noise("faithful", BATCH, 50, 5, act_dim, gen)
        with log.labelled(label):
            ops.hmc_sample(mean, std, layers, half, init, mode="faithful", num_samples=50, burn_in=5,
                           step_size=0.3, noise=noise, precision="tf32x3")

    samples = torch.rand(BATCH, 50, act_dim, generator=gen) * 2 - 1
    for act in OTHER_ACTIVATIONS:
        critic = nets.TwinCritic(obs_dim, act_dim, (256, 256))
        critic_layers = nets.StackedLayers(critic.stacked_layers(), act)
        with log.labelled(f"activation {act} 2x256 sampled_q tf32"):
            ops.sampled_q_log_mean_exp(obs, samples, critic_layers, precision="tf32").sum().backward()
        critic.activation = act  # stacked_layers() now carries it (forward is not called here)
        hmc_call(critic, f"activation {act} 2x256 hmc faithful tf32x3 noise")
    deep = nets.TwinCritic(obs_dim, act_dim, (256, 256, 256, 256), activation="relu")
    with log.labelled("depth 4x256 relu sampled_q tf32"):
        ops.sampled_q_log_mean_exp(obs, samples, deep, precision="tf32").sum().backward()
    hmc_call(deep, "depth 4x256 relu hmc faithful tf32x3 noise")


def _sampled_q_at_precision(log: LaunchLog, env: str, precision: str) -> None:
    """For configs without a sampled-Q precision key: the op at the agent's shapes and layout
    (stacked twin critics, K policy samples per state), forward and backward."""
    from misa_fast import nets, ops
    from misa_fast.agents.misa_config import preset

    preset_name, obs_dim, act_dim = ENVIRONMENTS[env]
    cfg = preset(preset_name)
    critic = nets.EnsembleCritic(obs_dim, act_dim, cfg.critic_hidden, cfg.num_critics)
    obs = torch.randn(BATCH, obs_dim)
    actions = torch.rand(BATCH, cfg.num_samples, act_dim) * 2 - 1
    with log.labelled(f"{env} sampled_q {precision} (op at the agent's shapes)"):
        ops.sampled_q_log_mean_exp(obs, actions, critic.stacked_layers(), normalizer="k",
                                   precision=precision).sum().backward()


# ----------------------------------------------------------------------------------------------
# 2. Triton's specialisation of a recorded launch
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompileJob:
    module: str
    name: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict  # the parsed backend options (num_warps, num_stages, ...)
    declared_constexprs: tuple  # the kernel's tl.constexpr parameters (the rest of constexprs: ints == 1)

    def key(self) -> str:
        """Identifies the binary: equal keys, equal compiles."""
        return self._digest(self.attrs)

    def structural_key(self) -> str:
        """The key without the divisibility attributes: jobs that differ only in which pointers and
        ints are known to be multiples of 16 (address arithmetic and vector widths) share it."""
        return self._digest(None)

    def _digest(self, attrs) -> str:
        text = repr((self.module, self.name, self.arch, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     None if attrs is None else sorted(attrs.items()), sorted(self.options.items())))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


_BINDERS: Dict[Tuple[str, str, int], tuple] = {}


def _binder(kernel, module: str, name: str, arch: int):
    """The backend and binder ``JITFunction.create_binder`` makes, for ``arch`` instead of the
    current device."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (module, name, arch)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = backend, create_function_from_signature(kernel.signature, kernel.params, backend)
    return _BINDERS[key]


def specialize(launch: Launch, arch: int) -> CompileJob:
    """The (signature, constants, attributes, options) ``JITFunction.run`` would compile for this
    launch on an sm_<arch> device."""
    from triton import knobs

    kernel = getattr(sys.modules[launch.module], launch.name)
    backend, binder = _binder(kernel, launch.module, launch.name, arch)
    kwargs = dict(launch.kwargs)
    # the two options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    declared = tuple(p.name for p in kernel.params if p.is_constexpr)
    return CompileJob(launch.module, launch.name, arch, signature, constexprs, attrs, dict(options.__dict__), declared)


# ----------------------------------------------------------------------------------------------
# 3. compiling and reading the binary
# ----------------------------------------------------------------------------------------------
_MMA_PATTERNS = (
    ("wgmma", re.compile(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.f32\.(\w+)\.(\w+)")),
    ("mma.sync", re.compile(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.f32\.(\w+)\.(\w+)\.f32")),
)


def mma_kinds(ptx: str) -> Dict[str, int]:
    """Matrix instructions in the PTX: {"wgmma.tf32": count, "mma.sync.bf16": count, ...}. A tf32x3
    dot shows up as three tf32 MMAs per tile; an fp32 ("ieee") dot as none (FMA units)."""
    kinds: Dict[str, int] = {}
    for name, pattern in _MMA_PATTERNS:
        for match in pattern.finditer(ptx):
            kind = f"{name}.{match.group(1)}"
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
_FILE_LINE = re.compile(r'^"([^"]+)":(\d+):\d+')


def _flatten_loc(expr: str, defs: Dict[str, str], depth: int = 0) -> List[Tuple[str, int]]:
    """An MLIR location as (file, line) pairs, innermost (callee) first."""
    expr = expr.strip()
    if depth > 64:
        return []
    if expr.startswith("#loc"):
        return _flatten_loc(defs.get(expr, ""), defs, depth + 1)
    if expr.startswith("callsite("):
        inner = expr[len("callsite("):-1]
        # "callee at caller": split at the top-level " at "
        level = 0
        for i, ch in enumerate(inner):
            if ch in "(<[":
                level += 1
            elif ch in ")>]":
                level -= 1
            elif level == 0 and inner.startswith(" at ", i):
                return _flatten_loc(inner[:i], defs, depth + 1) + _flatten_loc(inner[i + 4:], defs, depth + 1)
        return []
    match = _FILE_LINE.match(expr)
    if match:
        return [(match.group(1), int(match.group(2)))]
    named = re.match(r'^"[^"]*"\((.*)\)$', expr)  # a named location wrapping another
    if named:
        return _flatten_loc(named.group(1), defs, depth + 1)
    return []


def dot_sites(ttgir: str) -> Dict[str, List[str]]:
    """Where each kind of dot comes from: {"wgmma": ["sampled_q.py:164", ...], "mma.sync": [...],
    "fma": [...]}, each site the line that calls the ``_mm`` helper (the first line of the call chain
    that is not a ``tl.dot`` itself), read from the final TTGIR's locations: a ``warp_group_dot`` is
    a wgmma, a ``tt.dot`` into an MMA v2 layout is mma.sync, one into a blocked layout runs on FMAs."""
    import linecache

    defs = dict(_LOC_DEF.findall(ttgir))
    mma_v2 = set(re.findall(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 2", ttgir, re.M))
    sites: Dict[str, List[str]] = {}
    for line in ttgir.splitlines():
        if "= ttng.warp_group_dot " in line:
            kind = "wgmma"
        elif "= tt.dot " in line:
            result = line.rsplit("->", 1)[-1]
            kind = "mma.sync" if any(f", {m}>" in result for m in mma_v2) else "fma"
        else:
            continue
        loc = re.search(r"loc\((#loc\d*|callsite\(.*\)|\".*)\)\s*$", line)
        chain = _flatten_loc(loc.group(1), defs) if loc else []
        site = next((f"{os.path.basename(f)}:{n}" for f, n in chain if "tl.dot(" not in linecache.getline(f, n)),
                    "?")
        if site not in sites.setdefault(kind, []):
            sites[kind].append(site)
    return {k: sorted(v, key=lambda x: (x.split(":")[0], int(x.split(":")[1]) if x != "?" else 0))
            for k, v in sites.items()}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_job(job: CompileJob) -> dict:
    """Compile one job and read its resources. Returns a dict (error set on failure)."""
    from triton.compiler import ASTSource

    kernel = getattr(sys.modules.get(job.module) or __import__(job.module, fromlist=["_"]), job.name)
    start = time.perf_counter()
    result = {"error": None}
    try:
        src = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as err:  # noqa: BLE001 - reported per kernel, the caller decides
        result["error"] = f"{type(err).__name__}: {str(err)[-2000:]}"
        result["compile_seconds"] = round(time.perf_counter() - start, 2)
        return result
    result["compile_seconds"] = round(time.perf_counter() - start, 2)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    match = re.search(r"REG:(\d+) STACK:(\d+)", dump.stdout)
    if match is None:
        result["error"] = f"cuobjdump printed no resource usage: {(dump.stdout + dump.stderr)[-500:]}"
        return result
    result.update(registers=int(match.group(1)), spill_bytes=int(match.group(2)),
                  shared_bytes=int(compiled.metadata.shared), mma=mma_kinds(compiled.asm["ptx"]),
                  dots=dot_sites(compiled.asm["ttgir"]))
    return result


# ----------------------------------------------------------------------------------------------
# 4. the table
# ----------------------------------------------------------------------------------------------
PRECISION_NAMES = {0: "ieee", 1: "tf32", 2: "bf16", 3: "tf32x3"}


def _config_text(job: CompileJob) -> str:
    """The constants (block sizes, flags, precision), the int arguments Triton turned into
    constants (== 1) or marked divisible by 16, warps and stages."""
    names = list(job.signature)
    parts = []
    for (pos,), value in sorted(job.constexprs.items()):
        name = names[pos]
        if name not in job.declared_constexprs:
            continue
        if name.startswith("PREC"):
            value = PRECISION_NAMES.get(value, value)
        elif isinstance(value, bool):
            value = int(value)
        parts.append(f"{name.replace('BLOCK_', 'B')}={value}")
    ones = [names[pos] for (pos,), _ in sorted(job.constexprs.items()) if names[pos] not in job.declared_constexprs]
    if ones:
        parts.append("==1:" + ",".join(ones))
    div16 = [names[pos] for (pos,), a in sorted(job.attrs.items())
             if a and job.signature[names[pos]][0] == "i" and ["tt.divisibility", 16] in [list(x) for x in a]]
    if div16:
        parts.append("%16:" + ",".join(div16))
    # pointers Triton cannot assume 16-byte aligned (e.g. critic c > 0's slice of a stacked (E, 1) bias)
    unaligned = [name for pos, name in enumerate(names) if job.signature[name].startswith("*")
                 and not job.attrs.get((pos,))]
    if unaligned:
        parts.append("unaligned:" + ",".join(unaligned))
    parts.append(f"warps={job.options['num_warps']} stages={job.options['num_stages']}")
    return " ".join(parts)


def _mma_text(mma: Dict[str, int]) -> str:
    return "+".join(f"{k}x{v}" for k, v in sorted(mma.items())) if mma else "none (fp32 FMA)"


def _precision(job: CompileJob) -> Optional[str]:
    """The precision of the kernel's big dots (PREC), None for kernels without dots."""
    names = list(job.signature)
    for (pos,), value in job.constexprs.items():
        if names[pos] == "PREC":
            return PRECISION_NAMES.get(value, str(value))
    return None


def _family(module: str) -> str:
    return module.rsplit(".", 1)[-1].removesuffix("_kernels")


SCOPES = ("all", "structural", "pairwise")


def distinct_jobs(launches: Sequence[Launch], archs: Sequence[int],
                  scope: str = "all") -> List[Tuple[CompileJob, List[Launch], int]]:
    """One job per distinct compiled kernel and architecture, with the launches that map to it and
    the number of distinct binaries it stands for.

    ``scope``: "all", every distinct binary; "structural", one binary per code path: jobs that differ
    only in divisibility attributes are merged and one of them compiled (one an agent default
    launches, where there is one), about half the compiles; "pairwise", per kernel and
    architecture the structural jobs every preset's default agent launches, plus as few others as
    cover every pair of settings (constants, integers specialised to 1, warps, stages, descriptor
    types) that some launch combines: each setting and each pair of settings is compiled together
    at least once (e.g. every precision with every chain layout and with both noise sources). On
    2026-12-02: 470 binaries, 212 structural, 110 pairwise."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    jobs: Dict[str, Tuple[CompileJob, List[Launch], set]] = {}
    for arch in archs:
        for launch in launches:
            job = specialize(launch, arch)
            group = job.key() if scope == "all" else job.structural_key()
            if group not in jobs:
                jobs[group] = (job, [], set())
            elif launch.agent_default and not any(u.agent_default for u in jobs[group][1]):
                jobs[group] = (job, jobs[group][1], jobs[group][2])
            jobs[group][1].append(launch)
            jobs[group][2].add(job.key())
    triples = [(job, users, len(keys)) for job, users, keys in jobs.values()]
    return _pairwise_cover(triples) if scope == "pairwise" else triples


def _settings(job: CompileJob) -> frozenset:
    """What distinguishes a job's code: (name, value) of every constant (constexprs and ints == 1),
    descriptor types, warps and stages."""
    names = list(job.signature)
    out = {(names[pos], value) for (pos,), value in job.constexprs.items()}
    out |= {(name, ty) for name, ty in job.signature.items() if ty.startswith("tensordesc")}
    out |= {("num_warps", job.options["num_warps"]), ("num_stages", job.options["num_stages"])}
    return frozenset(out)


def _pairwise_cover(triples):
    """Per (kernel, arch): the agent-default jobs, then greedily the job covering the most pairs of
    settings not yet compiled together, until every pair some job has is covered."""
    by_kernel: Dict[Tuple[str, int], list] = {}
    for triple in triples:
        by_kernel.setdefault((triple[0].name, triple[0].arch), []).append(triple)
    chosen = []
    for group in by_kernel.values():
        group.sort(key=lambda t: _config_text(t[0]))
        pairs = [{frozenset(p) for p in itertools.combinations_with_replacement(sorted(_settings(t[0]), key=repr), 2)}
                 for t in group]
        uncovered = set().union(*pairs)
        picked = [i for i, t in enumerate(group) if any(u.agent_default for u in t[1])]
        for i in picked:
            uncovered -= pairs[i]
        while uncovered:
            best = max(range(len(group)), key=lambda i: len(pairs[i] & uncovered))
            picked.append(best)
            uncovered -= pairs[best]
        chosen += [group[i] for i in sorted(set(picked))]
    return chosen


def source_keyed_cache_dir() -> str:
    """A Triton cache folder of its own for the kernel package as it is now (its files' paths and
    contents). Triton keys its cache by the kernels' source text alone, so a binary compiled before
    an edit that moved lines (a helper taken out of the file, say) is found again afterwards,
    and the locations in its TTGIR then point at the wrong lines: :func:`dot_sites` would read
    them from the file as it is now."""
    digest = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(hmck.__file__))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            digest.update(os.path.join(folder, name).encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
    return os.path.join(tempfile.gettempdir(), "misa-fast-kernel-resources", digest.hexdigest()[:16])


def _pool_compile(jobs: Sequence[CompileJob], workers: int) -> List[dict]:
    if "TRITON_CACHE_DIR" not in os.environ:  # set before the workers start: they inherit it
        os.environ["TRITON_CACHE_DIR"] = source_keyed_cache_dir()
    if workers <= 1 or len(jobs) <= 1:
        return [compile_job(job) for job in jobs]
    # fork where there is one: the workers inherit the imported kernels whatever name this module
    # was imported under (they only compile: no torch/OpenMP work happens after the fork)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        return list(pool.map(compile_job, jobs))


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    for module in ("misa_fast.kernels.sampled_q_kernels", "misa_fast.kernels.hmc_kernels",
                   "misa_fast.kernels.log_mean_exp_kernels"):
        __import__(module)


def compile_table(archs: Sequence[int] = ARCHS, envs: Sequence[str] = tuple(ENVIRONMENTS),
                  families: Sequence[str] = FAMILIES, workers: Optional[int] = None,
                  scope: str = "all", launches: Optional[Sequence[Launch]] = None) -> List[dict]:
    """Compile every distinct kernel configuration for each architecture in ``archs``
    (``scope``: see :func:`distinct_jobs`; ``launches``: already enumerated ones, else
    :func:`enumerate_launches` of ``envs``).

    Returns one row per (distinct kernel, arch) with keys kernel, family, config, arch, num_warps,
    num_stages, registers, spill_bytes, shared_bytes, mma (e.g. "wgmma.tf32x24", "none (fp32 FMA)"),
    mma_counts, dots (per kind of dot, the ``_mm`` call sites: see :func:`dot_sites`), precision
    (PREC, None without dots), spill_budget (:func:`spill_budget`), used_by (the configurations
    launching it), agent_default (launched by some preset's default agent), binaries (distinct
    binaries the row stands for: 1 with scope "all"), key, compile_seconds, error (None, or the
    compiler's message). :func:`problems` lists what fails the budgets."""
    launches = [x for x in (enumerate_launches(envs) if launches is None else launches)
                if _family(x.module) in families]
    triples = distinct_jobs(launches, archs, scope)
    triples.sort(key=lambda p: (FAMILIES.index(_family(p[0].module)), p[0].name, p[0].arch, _config_text(p[0])))
    workers = workers if workers is not None else min(len(triples), os.cpu_count() or 1)
    results = _pool_compile([job for job, _, _ in triples], workers)
    rows = []
    for (job, users, binaries), res in zip(triples, results):
        labels = sorted(dict.fromkeys(u.label for u in users))
        rows.append({
            "kernel": job.name.lstrip("_"),
            "family": _family(job.module),
            "config": _config_text(job),
            "arch": job.arch,
            "num_warps": job.options["num_warps"],
            "num_stages": job.options["num_stages"],
            "registers": res.get("registers"),
            "spill_bytes": res.get("spill_bytes"),
            "shared_bytes": res.get("shared_bytes"),
            "mma": _mma_text(res["mma"]) if "mma" in res else None,
            "precision": _precision(job),
            "spill_budget": spill_budget(job.name.lstrip("_"), job.arch, _precision(job)),
            "mma_counts": res.get("mma", {}),
            "dots": res.get("dots", {}),
            "used_by": labels,
            "agent_default": any(u.agent_default for u in users),
            "binaries": binaries,
            "key": job.key(),
            "compile_seconds": res["compile_seconds"],
            "error": res["error"],
        })
    return rows


def problems(rows: Sequence[dict]) -> List[str]:
    """Compile errors, spills above the row's budget and shared memory above the architecture's
    limit."""
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']} [{r['config']}] (used by {r['used_by'][0]}, ...)"
        if r["error"]:
            out.append(f"{where}: compile error: {r['error']}")
            continue
        if r["spill_bytes"] > r["spill_budget"]:
            out.append(f"{where}: {r['spill_bytes']} spill bytes > budget {r['spill_budget']}")
        limit = SMEM_LIMIT.get(r["arch"], SMEM_LIMIT[90])  # other archs: Hopper's, a guess
        if r["shared_bytes"] > limit:
            out.append(f"{where}: {r['shared_bytes']} B shared memory > {limit} B")
    return out


def _users_text(labels: Sequence[str]) -> str:
    """The labels grouped by what follows the environment: "hmc faithful tf32 noise: ant, hopper"."""
    groups: Dict[str, List[str]] = {}
    for label in labels:
        env, _, rest = label.partition(" ")
        if env in ENVIRONMENTS:
            groups.setdefault(rest, []).append(env)
        else:
            groups.setdefault(label, [])
    return "; ".join(f"{rest}: {', '.join(envs)}" if envs else rest for rest, envs in groups.items())


def _dots_text(dots: Dict[str, List[str]]) -> str:
    return "; ".join(f"{kind} " + ",".join(site.split(":")[1] for site in sites)
                     for kind, sites in sorted(dots.items()))


def dot_site_summary(rows: Sequence[dict]) -> List[str]:
    """Per architecture and ``_mm`` call site, what its dot became across the compiled kernels."""
    seen: Dict[Tuple[int, str], Dict[str, int]] = {}
    for r in rows:
        for kind, sites in r.get("dots", {}).items():
            for site in sites:
                counts = seen.setdefault((r["arch"], site), {})
                counts[kind] = counts.get(kind, 0) + 1
    return [f"| sm_{arch} | {site} | " + ", ".join(f"{k} in {n}" for k, n in sorted(c.items())) + " |"
            for (arch, site), c in sorted(seen.items(), key=lambda x: (x[0][0], x[0][1].split(":")[0],
                                                                       int(x[0][1].split(":")[1]) if ":" in x[0][1]
                                                                       and x[0][1].split(":")[1].isdigit() else 0))]


def markdown(rows: Sequence[dict], title: str, intro: str = "") -> str:
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro.strip(), ""]
    by_family: Dict[str, List[dict]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    for arch in sorted({r["arch"] for r in rows}):
        sub = [r for r in rows if r["arch"] == arch and not r["error"]]
        if not sub:
            continue
        lines.append(f"- sm_{arch}: {len([r for r in rows if r['arch'] == arch])} distinct kernels, "
                     f"max registers {max(r['registers'] for r in sub)}, "
                     f"max spill {max(r['spill_bytes'] for r in sub)} B, "
                     f"spilling kernels {sum(r['spill_bytes'] > 0 for r in sub)}, "
                     f"max shared {max(r['shared_bytes'] for r in sub) / 1024:.1f} KiB")
        defaults = [r for r in sub if r["agent_default"]]
        if defaults:
            worst = max(defaults, key=lambda r: r["spill_bytes"])
            lines.append(f"  - launched by the presets' default agents: {len(defaults)} kernels, max registers "
                         f"{max(r['registers'] for r in defaults)}, max spill {worst['spill_bytes']} B "
                         f"({worst['kernel']}, {worst['config'].split(' ==1')[0]})")
    lines += ["", "## What each dot compiles to", "",
              "Per `_mm` call site (file:line of the call), the instruction its dot became, over the kernels "
              "compiled for each architecture (fma: fp32 FMA units, ieee precision).", "",
              "| arch | call site | kernels |", "|---|---|---|"] + dot_site_summary(rows) + [""]
    header = ("| kernel | config | arch | regs | spill B | smem KiB | MMA instructions | dots (line) | agent default "
              "| used by |\n|---|---|---|---|---|---|---|---|---|---|")
    for family, sub in by_family.items():
        lines += [f"## {family}", "", header]
        for r in sub:
            if r["error"]:
                lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | compile error | | | | | | "
                             f"{_users_text(r['used_by'])} |")
                continue
            lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | {r['registers']} | {r['spill_bytes']} "
                         f"| {r['shared_bytes'] / 1024:.1f} | {r['mma']} | {_dots_text(r.get('dots', {}))} "
                         f"| {'yes' if r['agent_default'] else ''} | {_users_text(r['used_by'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _intro() -> str:
    from misa_fast.agents.misa_config import MISAConfig

    cfg = MISAConfig()
    defaults = (f"sampled-Q {getattr(cfg, 'sampled_q_precision', 'tf32')}, HMC {cfg.hmc_mode} {cfg.hmc_precision} "
                "with supplied noise")
    return INTRO.replace("{defaults}", defaults)


INTRO = """Generated by `python devtools/kernel_resources.py --out bench/results` (no GPU involved): every
kernel launch of each preset's MISA update and of the ops as the agent calls them (all HMC modes,
precisions and noise sources; every sampled-Q precision; CQL and MISA-T; log-mean-exp at its
callers' sizes), specialised by Triton's own JIT binder for the target and compiled with the
bundled ptxas. One row per distinct binary; *used by* lists the configurations that launch it.
Beyond the presets: CORL-style CQL critics (3x256 ReLU, 3 x 10 proposals, a temperature), every
activation, and 4 hidden layers. Spill = the stack
frame cuobjdump reports (bytes per thread). Config: constexprs, then the integer arguments Triton
specialised to 1 (`==1`) or marked divisible by 16 (`%16`), pointers it could not assume 16-byte
aligned, warps and stages. Agent default: launched by a preset's default configuration
({defaults}). Spill budget: see `spill_budget` in devtools/kernel_resources.py."""


def write_table(rows: Sequence[dict], out_dir: str, date: Optional[str] = None, note: str = "",
                scope: str = "all", configurations: Sequence[str] = ()) -> Tuple[str, str]:
    """Write ``kernels-aot-<date>.md`` and ``.json`` to ``out_dir``; returns their paths.
    ``configurations``: the labels of every enumerated launch (compiled or, with a narrower scope,
    represented by another binary)."""
    date = date or datetime.date.today().isoformat()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"kernels-aot-{date}")
    meta = {"date": date, "scope": scope, "configurations": sorted(set(configurations)),
            "triton": triton.__version__, "torch": torch.__version__,
            "default_spill_budget_bytes": DEFAULT_SPILL_BUDGET,
            "known_spills": {f"{k[0]}@{k[1]}": v for k, v in KNOWN_SPILLS.items()}, "note": note}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=1)
    title = f"Triton kernels compiled ahead of time ({date}, triton {triton.__version__})"
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, title, _intro()))
        if note:
            f.write("\n" + note.strip() + "\n")
    return stem + ".md", stem + ".json"


def print_table(rows: Sequence[dict], file=sys.stdout) -> None:
    for r in rows:
        if r["error"]:
            print(f"{r['kernel']:22s} sm_{r['arch']} {r['config']}\n    COMPILE ERROR {r['error'][:300]}", file=file)
            continue
        print(f"{r['kernel']:22s} sm_{r['arch']} regs={r['registers']:3d} spill={r['spill_bytes']:4d} "
              f"smem_KiB={r['shared_bytes'] / 1024:6.1f} mma={r['mma']:24s} {r['config']}"
              f"{'  [agent default]' if r['agent_default'] else ''}  ({len(r['used_by'])} configs)", file=file)


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS,
                    help="compute capability to compile for (repeatable; default: 80 and 90)")
    ap.add_argument("--envs", default=",".join(ENVIRONMENTS), help="comma-separated environments")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated kernel families")
    ap.add_argument("--out", default=None, help="folder to write kernels-aot-<date>.{md,json} to")
    ap.add_argument("--date", default=None, help="date in the file names (default: today)")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--scope", default="all", choices=SCOPES,
                    help="all: every distinct binary; structural: one per code path (see distinct_jobs)")
    ap.add_argument("--list", action="store_true", help="only list the distinct configurations (no compile)")
    a = ap.parse_args(argv)

    archs = tuple(a.arch) if a.arch else ARCHS
    envs = [e for e in a.envs.split(",") if e]
    unknown = [e for e in envs if e not in ENVIRONMENTS]
    if unknown:
        print(f"unknown environments {unknown}; choose from {list(ENVIRONMENTS)}", file=sys.stderr)
        return 2
    families = [f for f in a.families.split(",") if f]
    if a.list:
        launches = [x for x in enumerate_launches(envs) if _family(x.module) in families]
        for job, users, _ in distinct_jobs(launches, archs, a.scope):
            print(f"{job.name:22s} sm_{job.arch} {_config_text(job)}  <- {len(users)} launches: {users[0].label} ...")
        return 0
    start = time.perf_counter()
    launches = [x for x in enumerate_launches(envs) if _family(x.module) in families]
    rows = compile_table(archs, envs, families, a.workers, a.scope, launches)
    print_table(rows)
    print(f"{len(rows)} kernels compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if a.out:
        for path in write_table(rows, a.out, a.date, scope=a.scope, configurations=[x.label for x in launches]):
            print(f"wrote {path}", file=sys.stderr)
    bad = problems(rows)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
