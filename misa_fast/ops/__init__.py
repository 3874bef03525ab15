"""Fused ops: Triton kernels (``misa_fast.kernels``) behind operators registered with
``torch.library`` (``torch.ops.misa_fast.*``: ``log_mean_exp_op``, ``sampled_q_op``,
``hmc_chains_op``), each with a plain-torch reference and a dispatcher (Triton for CUDA tensors, the
reference elsewhere).

Backend selection: ``backend=`` per call, the :func:`use_backend` context manager, or the
environment variable ``MISA_FAST_OPS`` = ``auto`` (default) | ``triton`` | ``torch``.
"""
from misa_fast.nets import Activation, StackedLayers
from misa_fast.ops.critics import CriticArchitectureError
from misa_fast.ops.dispatch import ENV_VAR, resolve_backend, resolve_precision, triton_available, use_backend
from misa_fast.ops.hmc import hmc_chains_op, hmc_sample, hmc_sample_reference
from misa_fast.ops.log_mean_exp import LogMeanExp, log_mean_exp, log_mean_exp_op, log_mean_exp_reference
from misa_fast.ops.sampled_q import (
    SampledQLogMeanExp,
    critic_layers,
    sampled_q_log_mean_exp,
    sampled_q_log_mean_exp_reference,
    sampled_q_op,
    sampled_q_values_reference,
)

__all__ = [
    "Activation",
    "CriticArchitectureError",
    "ENV_VAR",
    "LogMeanExp",
    "SampledQLogMeanExp",
    "critic_layers",
    "hmc_chains_op",
    "hmc_sample",
    "hmc_sample_reference",
    "log_mean_exp",
    "log_mean_exp_op",
    "log_mean_exp_reference",
    "resolve_backend",
    "resolve_precision",
    "sampled_q_log_mean_exp",
    "sampled_q_log_mean_exp_reference",
    "sampled_q_op",
    "sampled_q_values_reference",
    "StackedLayers",
    "triton_available",
    "use_backend",
]
