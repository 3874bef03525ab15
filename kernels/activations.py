"""The critics' hidden activations, shared by the sampled-Q and HMC kernels: the value and the
derivative at the pre-activation, selected by a compile-time code (``ACTIVATIONS``)."""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"elu": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "tanh": 4, "gelu": 5, "gelu_tanh": 6}


@triton.jit
def tanh(z):
    # 1 - 2 / (exp(2z) + 1): +-1, not NaN, where exp overflows or underflows
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def act(z, ACT: tl.constexpr, ALPHA):
    """The hidden activation (constexpr ACT, see ACTIVATIONS; ALPHA: ELU's alpha / the leaky slope)."""
    if ACT == 0:
        out = tl.where(z > 0, z, ALPHA * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
    elif ACT == 1:
        out = tl.maximum(z, 0.0)
    elif ACT == 2:
        out = tl.where(z > 0, z, ALPHA * z)
    elif ACT == 3:
        out = z * tl.sigmoid(z)
    elif ACT == 4:
        out = tanh(z)
    elif ACT == 5:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:  # 0.5 z (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
    return out


@triton.jit
def dact(z, ACT: tl.constexpr, ALPHA):
    """d act / dz at the pre-activation z (0 at z = 0 for the ReLU family, as torch's backward)."""
    if ACT == 0:
        out = tl.where(z > 0, 1.0, ALPHA * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 1:
        out = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        out = tl.where(z > 0, 1.0, ALPHA)
    elif ACT == 3:
        sg = tl.sigmoid(z)
        out = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 4:
        t = tanh(z)
        out = 1.0 - t * t
    elif ACT == 5:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:  # s = sigmoid(2u): d (z s) / dz = s (1 + z (1 - s) 2u'), 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2)
        sg = tl.sigmoid(1.5957691216057308 * z * (1.0 + 0.044715 * z * z))
        out = sg * (1.0 + z * (1.0 - sg) * (1.5957691216057308 * (1.0 + 0.134145 * z * z)))
    return out
