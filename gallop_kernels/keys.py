"""Scores and order keys: the bottom of the selection stack.

Every selection path (the reference plan in reference.py, the shared plan in radix.py,
the host and Triton kernels, the distributed path) scores weights with :func:`score`
and orders them by :func:`signed_key`. This module imports no other part of the
package but the criterion names, so the plan and the reference both build on it
without importing each other.

Order keys: the float32 score's bit pattern mapped so that integer order equals
float order (the radix-sort trick). A larger key is a better weight.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from .criteria import CRITERIA

U32 = 0xFFFFFFFF
SIGN = 0x80000000  # unsigned key = signed key + SIGN
CHUNK = 1 << 20  # weights scored at a time when looking for a non-finite score (radix.Config.chunk)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & U32
    return x ^ (x >> 16)


def random_score(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) from a hash of (seed, global flat position).

    Counter-based, so any chunk of any parameter can be scored independently and
    every device (and kernel) gets the same numbers.
    """
    salt = _hash32(torch.tensor(seed & U32, dtype=torch.int64))
    hi = _hash32(((positions >> 32) ^ salt) & U32)
    h = _hash32((positions & U32) ^ hi)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def score(
    criterion: str,
    param: torch.Tensor,
    grad: torch.Tensor | None,
    eps: float = 1e-8,
    *,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Float32 score of every weight (flattened); a larger score is selected first.

    gallop: |g| / (|theta| + eps); saft: |g|; magnitude: |theta|;
    pafi: -|theta| (smallest magnitude first); random: uniform from ``seed`` and
    the weight's global position ``offset + flat index``.
    """
    if criterion == "gallop":
        return grad.reshape(-1).float().abs() / (param.reshape(-1).float().abs() + eps)
    if criterion == "saft":
        return grad.reshape(-1).float().abs()
    if criterion == "magnitude":
        return param.reshape(-1).float().abs()
    if criterion == "pafi":
        # 0 - |x| turns -0.0 into +0.0, so equal magnitudes get equal keys.
        return 0.0 - param.reshape(-1).float().abs()
    if criterion == "random":
        pos = torch.arange(param.numel(), device=param.device, dtype=torch.int64) + offset
        return random_score(pos, seed)
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")


def signed_key(s: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int32 *signed order keys* whose integer order is the float order
    (the unsigned order key of the radix-sort trick minus 2**31, at half the memory).

    Non-negative floats already order like their bits; negative ones need their
    magnitude bits flipped.
    """
    bits = s.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_to_score(key: int) -> float:
    """The float32 score of one unsigned order key (a signed key + 2**31)."""
    bits = key - SIGN if key >= SIGN else U32 - key
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@dataclass
class Source:
    """One tensor in a selection: its name, (param, grad) and global flat offset."""

    name: str
    param: torch.Tensor
    grad: torch.Tensor | None
    offset: int

    @property
    def numel(self) -> int:
        return self.param.numel()


def chunk_scores(src: Source, criterion: str, eps: float, seed: int, chunk: int):
    """Yield (start, float32 scores) for consecutive chunks of one source."""
    p = src.param.detach().reshape(-1)
    g = None if src.grad is None else src.grad.detach().reshape(-1)
    for start in range(0, p.numel(), chunk):
        stop = min(start + chunk, p.numel())
        gs = None if g is None else g[start:stop]
        yield start, score(criterion, p[start:stop], gs, eps, seed=seed, offset=src.offset + start)


def raise_nonfinite(sources: list[Source], criterion: str, eps: float, seed: int = 0, chunk: int = CHUNK) -> None:
    """Raise ValueError naming the first weight whose score is NaN or Inf."""
    for src in sources:
        for start, s in chunk_scores(src, criterion, eps, seed, chunk):
            bad = (~torch.isfinite(s)).nonzero()
            if bad.numel():
                i = start + int(bad[0])
                what = "NaN" if torch.isnan(s[i - start]) else "Inf"
                grad = "" if src.grad is None else f", grad={src.grad.reshape(-1)[i].item()!r}"
                raise ValueError(
                    f"parameter {src.name!r}: {criterion} score is {what} at flat index {i} "
                    f"(param={src.param.reshape(-1)[i].item()!r}{grad}); check the weights and "
                    f"gradients for NaN/Inf, or use eps > 0"
                )
