"""The random control's documented draw, re-implemented on plain Python ints for the tests.

``attanchor.anchoring.select.placement_hash`` computes the same values with int64 tensor
arithmetic (16-bit halves to avoid overflow); here products are exact and reduced mod 2**32.
"""

from __future__ import annotations

_M32 = 0xFFFFFFFF


def _ref_mix(x: int) -> int:
    """lowbias32 on Python ints (exact products, then mod 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def ref_hash(seed: int, sample: int, epoch: int, offset: int) -> int:
    x = _ref_mix(seed & _M32)
    for v in (sample & _M32, (sample >> 32) & _M32, epoch & _M32, offset & _M32):
        x = _ref_mix(x ^ v)
    return x


def ref_slot(seed: int, sample: int, epoch: int, offset: int, n_images: int) -> int:
    """Which of the n images of its segment hosts the candidate at ``offset`` of a sample."""
    return (ref_hash(seed, sample, epoch, offset) * n_images) >> 32
