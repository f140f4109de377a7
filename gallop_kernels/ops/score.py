"""Triton helpers every selection kernel shares: load theta and grad, score, order key.

``signed_key`` is ``keys.signed_key(keys.score(...))`` bit for bit, for
the criteria with a streaming read (gallop, saft, magnitude, pafi).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_f32(ptrs, mask):
    """Load in the tensor's dtype and widen exactly to float32."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if x.dtype == tl.bfloat16:
        # bf16 is the high half of a float32. Widening by the shift keeps subnormals,
        # which the interpreter's bf16 -> fp32 cast (triton 3.6 _convert_float)
        # gets wrong; on the GPU both are one integer op.
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def signed_key(theta_ptrs, grad_ptrs, mask, eps, CRITERION: tl.constexpr):
    """Signed int32 order key of the score of the weights at ``theta_ptrs`` / ``grad_ptrs``."""
    if CRITERION == "gallop":
        g = load_f32(grad_ptrs, mask)
        t = load_f32(theta_ptrs, mask)
        # Triton's '/' is an approximate divide on the GPU; the reference divides
        # correctly rounded, and a one-ulp difference moves ties at the threshold.
        s = tl.math.div_rn(tl.abs(g), tl.abs(t) + eps)
    elif CRITERION == "saft":
        s = tl.abs(load_f32(grad_ptrs, mask))
    elif CRITERION == "magnitude":
        s = tl.abs(load_f32(theta_ptrs, mask))
    else:  # pafi; 0 - |x| (not -|x|) turns -0.0 into +0.0, as in the reference
        s = 0.0 - tl.abs(load_f32(theta_ptrs, mask))
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)
