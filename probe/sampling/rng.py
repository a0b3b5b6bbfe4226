"""Counter-based uniforms for batching-invariant sampling.

`counter_uniforms(seed, keys, samples, steps)` gives one uniform in [0, 1) per (row, step) as a pure
function of (seed, key, sample, step): no generator state, so a row draws the same numbers whether
it is sampled alone, in a batch of 512, on CPU or on CUDA. The sampler uses one uniform per row per
step for inverse-CDF sampling.

What it is: a 32-bit integer hash (Wellons' "lowbias32" finaliser) absorbing the words of the
counter one at a time, twice with different salts, giving 53 random bits per uniform. Everything
is int64 tensor arithmetic kept exact: values stay in [0, 2^32) and 32-bit multiplies are split
into 16-bit halves, so nothing overflows int64 and CPU and CUDA agree bit for bit.

What it is not: a cryptographic or statistically certified generator (it is not Philox). It is
good enough for sampling tokens (checked by a chi-square test in `tests/test_sampler.py`) and not
meant for anything adversarial.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

_M32 = 0xFFFFFFFF
_SALT_A, _SALT_B = 0x243F6A88, 0x85A308D3  # digits of pi: the two independent 32-bit streams


def _mul32(x: Int[Tensor, "*s"], c: int) -> Int[Tensor, "*s"]:
    """x * c mod 2^32 for x in [0, 2^32) without int64 overflow (c split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32  # each product < 2^48


def hash32(x: Int[Tensor, "*s"]) -> Int[Tensor, "*s"]:
    """A bijective 32-bit mixer (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _words(x: Int[Tensor, "*s"]) -> tuple[Int[Tensor, "*s"], Int[Tensor, "*s"]]:
    """The low and high 32-bit words of an int64 tensor (two's complement for negatives)."""
    return x & _M32, (x >> 32) & _M32


def _absorb(h: Int[Tensor, "*s"], words: list[Int[Tensor, "*s"]]) -> Int[Tensor, "*s"]:
    for w in words:
        h = hash32(h ^ w)
    return h


def counter_uniforms(
    seed: int, keys: Int[Tensor, " rows"], samples: Int[Tensor, " rows"], steps: int
) -> Float[Tensor, "rows steps"]:
    """Uniforms in [0, 1), float64, 53 random bits each: entry [r, t] depends only on
    (seed, keys[r], samples[r], t). Shapes: keys and samples are int64 `[rows]`; out `[rows, steps]`.
    """
    dev = keys.device
    seed_t = torch.tensor(seed, dtype=torch.int64, device=dev)
    t = torch.arange(steps, dtype=torch.int64, device=dev)[None, :]  # [1, steps]
    words = [*_words(seed_t), *_words(keys.long()), *_words(samples.long())]
    words = [w.reshape(-1, 1) for w in words]  # [rows or 1, 1], broadcast against t
    start = torch.zeros(keys.shape[0], 1, dtype=torch.int64, device=dev)  # [rows, 1]
    a, b = (hash32(_absorb(start + salt, words) ^ t) for salt in (_SALT_A, _SALT_B))  # [rows, steps]
    bits53 = (a << 21) | (b >> 11)  # < 2^53, exact in float64
    return bits53.double() * (1.0 / (1 << 53))
