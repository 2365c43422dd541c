"""Counting changed coordinates of one tensor pair under the three rules, fast (the kernel of `rlopt sparsity`).

  bitwise   the stored bits differ (after casting both sides to the comparison dtype)
  atol      |b - a| > atol
  relative  |b - a| > rtol * max(|a|, |b|)

A tensor is compared in slices that fit in cache, with numpy on views of the memory-mapped file. Differences are
taken in float32 (float64 for float64 weights), exactly as the in-training sparsity does. In 16-bit formats most
changed coordinates are settled by their bits alone (`settled_range` proves when a change must pass both float
rules), so only tiny magnitudes and non-finite values take the float arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

RULES = ("bitwise", "atol", "relative")
# Elements per slice, so the temporaries stay in a 1 MB L2 cache whatever the tensor's size: float32 slices of
# the float rules (256 KB each) and int16 slices of the 16-bit bit rules (512 KB; measured 1.7x faster than 1 << 16).
FLOAT_CHUNK = 1 << 16
BITS_CHUNK = 1 << 18
# Gather the changed coordinates first when under 1/GATHER of a slice changed: at ~10% changed, finding them
# costs more than the float rules on the whole slice (measured), so gathering pays only well below that.
GATHER = 32
OPEN_BATCH = 1 << 20  # coordinates the bits leave open, judged together (float temporaries: 4 MB each)


@dataclass(frozen=True)
class Counts:
    """Coordinates compared (n) and how many changed under each rule."""

    n: int = 0
    bitwise: int = 0
    atol: int = 0
    relative: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.n + other.n,
            self.bitwise + other.bitwise,
            self.atol + other.atol,
            self.relative + other.relative,
        )

    def fraction(self, rule: str) -> float:
        return getattr(self, rule) / self.n if self.n else 0.0

    def rules(self) -> dict[str, dict[str, float]]:
        """{rule: {changed, fraction, sparsity_pct}} for the three rules."""
        return {
            rule: {
                "changed": getattr(self, rule),
                "fraction": self.fraction(rule),
                "sparsity_pct": 100.0 * (1.0 - self.fraction(rule)),
            }
            for rule in RULES
        }

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, **self.rules()}


def count_changed(
    a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float, dtype: torch.dtype | None = None
) -> Counts:
    """Coordinates of `b` that differ from `a` under the three rules, both cast to `dtype` (None: as is)."""
    import torch  # heavy: imported on use

    cast = dtype or a.dtype
    settled = settled_range(cast, atol, rtol)
    a, b = a.reshape(-1), b.reshape(-1)  # [n]: views of the memory-mapped file, nothing copied yet
    chunk = FLOAT_CHUNK if settled is None else BITS_CHUNK
    total = Counts()
    # The coordinates the bits leave open, judged by the float rules in batches of up to OPEN_BATCH: one call
    # per slice would cost more in call overhead than in arithmetic; one per tensor could hold all of it.
    open_a: list[torch.Tensor] = []
    open_b: list[torch.Tensor] = []
    n_open = 0
    for start in range(0, a.numel(), chunk):
        a_slice, b_slice = a[start : start + chunk], b[start : start + chunk]  # [c]
        if cast != a.dtype:
            a_slice, b_slice = a_slice.to(cast), b_slice.to(cast)
        if settled is None:
            total += count_slice(a_slice, b_slice, atol, rtol)
            continue
        n_changed, n_bits, rest_a, rest_b = settle_slice(a_slice, b_slice, settled)
        total += Counts(0, n_changed, n_bits, n_bits)
        open_a.append(rest_a)
        open_b.append(rest_b)
        n_open += len(rest_a)
        if n_open >= OPEN_BATCH or start + chunk >= a.numel():
            n_atol, n_relative = float_rules(torch.cat(open_a), torch.cat(open_b), atol, rtol)
            total += Counts(0, 0, n_atol, n_relative)
            open_a, open_b, n_open = [], [], 0
    return Counts(a.numel(), total.bitwise, total.atol, total.relative)


def settled_range(dtype: torch.dtype, atol: float, rtol: float) -> tuple[int, int] | None:
    """Magnitudes, as bits [floor, inf), in which every change of a 16-bit float passes both float rules.

    Why this is exact: two different values of a format with m mantissa bits, both of magnitude >= 2^E, differ
    by at least 2^(E-m) (one ULP at the smaller); float32 holds that bound exactly, so rounding the difference
    cannot take it below, and they pass atol once 2^(E-m) > atol. With 2^F <= M = max(|a|, |b|) < 2^(F+1) they
    differ by at least 2^(F-m), or by 2^(F-1-m) when M = 2^F (the step below a power of two): either way by
    more than rtol * M whenever rtol < 2^(-1-m). A sign flip moves by |a| + |b|, more still. The floor stays
    >= 2^-64, so no float32 product nears the subnormals. Smaller magnitudes, zeros, infinities and NaNs take
    the float rules. None: no such range (a 32/64-bit format, or an rtol too large for the format, e.g.
    float16 at the default 1e-3).
    """
    import numpy as np  # heavy: imported on use
    import torch  # heavy: imported on use

    if dtype not in (torch.bfloat16, torch.float16):
        return None
    mantissa = 1 - math.frexp(torch.finfo(dtype).eps)[1]  # eps = 2^-m: 7 for bfloat16, 10 for float16
    atol32, rtol32 = float(np.float32(atol)), float(np.float32(rtol))  # as the float rules round them
    if rtol32 >= 2.0 ** (-1 - mantissa):
        return None
    exponent = math.frexp(atol32)[1] + mantissa if atol32 > 0 else -64  # atol32 < 2^e, so 2^(E-m) > atol32
    exponent = max(exponent, -64, math.frexp(torch.finfo(dtype).tiny)[1] - 1)
    if 2.0**exponent > torch.finfo(dtype).max:
        return None
    as_bits = [int(torch.tensor(x, dtype=dtype).view(torch.int16)) for x in (2.0**exponent, math.inf)]
    return as_bits[0], as_bits[1]


def unsettled(a_bits: np.ndarray, b_bits: np.ndarray, settled: tuple[int, int]) -> np.ndarray:
    """Where |a| or |b| (16-bit floats as int16 bits) lies outside the settled range; bool, same shape."""
    import numpy as np  # heavy: imported on use

    floor, inf = settled
    # |x| as bits minus the floor, as uint16: below the floor wraps to >= 2^15, so one bound checks both ends.
    a_off, b_off = np.bitwise_and(a_bits, 0x7FFF), np.bitwise_and(b_bits, 0x7FFF)  # the sign dropped
    a_off -= floor
    b_off -= floor
    worst = np.maximum(a_off.view(np.uint16), b_off.view(np.uint16), out=a_off.view(np.uint16))
    return worst >= inf - floor


def settle_slice(
    a: torch.Tensor, b: torch.Tensor, settled: tuple[int, int]
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """One 16-bit slice [c]: how many coordinates changed, how many of those the bits settle (they count under
    every rule), and the values [u] of the rest, which the float rules must judge."""
    import numpy as np  # heavy: imported on use
    import torch  # heavy: imported on use

    a_bits, b_bits = a.view(torch.int16).numpy(), b.view(torch.int16).numpy()  # [c]
    changed = np.not_equal(a_bits, b_bits)  # [c] bool
    n_changed = int(np.count_nonzero(changed))
    if n_changed == 0:
        return 0, 0, a[:0], b[:0]
    if GATHER * n_changed < changed.size:
        moved = np.flatnonzero(changed)  # [k]
        check = moved[unsettled(a_bits[moved], b_bits[moved], settled)]  # [u]
    else:
        check = np.flatnonzero(np.logical_and(changed, unsettled(a_bits, b_bits, settled)))  # [u]
    if check.size == 0:
        return n_changed, n_changed, a[:0], b[:0]
    index = torch.from_numpy(check)  # [u]
    return n_changed, n_changed - check.size, a.index_select(0, index), b.index_select(0, index)


def count_slice(
    a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float, settled: tuple[int, int] | None = None
) -> Counts:
    """The three counts on one slice [c] of one dtype (n left at 0).

    Why numpy: torch's CPU comparisons are several times slower than numpy's; both work on the same memory
    (`.numpy()` is a view). Only changed coordinates can count under the float rules, so they are gathered
    first when few changed. With a `settled` range (16-bit floats, see `settled_range`), the changed
    coordinates inside it count under all three rules from their bits alone; only the rest take the float rules.
    """
    import numpy as np  # heavy: imported on use
    import torch  # heavy: imported on use

    if settled is not None:
        n_changed, n_bits, rest_a, rest_b = settle_slice(a, b, settled)
        n_atol, n_relative = float_rules(rest_a, rest_b, atol, rtol)
        return Counts(0, n_changed, n_bits + n_atol, n_bits + n_relative)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    changed = np.not_equal(a.view(bits).numpy(), b.view(bits).numpy())  # [c] bool
    n_changed = int(np.count_nonzero(changed))
    if n_changed == 0:
        return Counts()  # equal bits are equal values: nothing beyond atol or rtol either
    if GATHER * n_changed < changed.size:
        index = torch.from_numpy(np.flatnonzero(changed))  # [k]
        a, b = a.index_select(0, index), b.index_select(0, index)  # [k]: all the float rules can count
    return Counts(0, n_changed, *float_rules(a, b, atol, rtol))


def float_rules(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[int, int]:
    """(atol, relative) counts of one slice [k], the differences taken in float32 (float64 for float64 weights)
    with the tolerances rounded to that dtype, exactly as torch compares a float32 tensor with a Python float.
    A NaN or infinite weight gives a NaN difference or bound: its coordinate counts under neither rule."""
    import numpy as np  # heavy: imported on use
    import torch  # heavy: imported on use

    if a.numel() == 0:
        return 0, 0
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32
    af, bf = a.to(wide).numpy(), b.to(wide).numpy()  # [k]; may alias the mapped file: never written to
    tol = af.dtype.type
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, inf * 0: quiet NaNs, not warnings
        delta = np.subtract(bf, af)  # [k], then |b - a| in place
        np.abs(delta, out=delta)
        n_atol = int(np.count_nonzero(delta > tol(atol)))
        bound, scratch = np.abs(af), np.abs(bf)  # [k] each, then rtol * max(|a|, |b|) in `bound`
        np.maximum(bound, scratch, out=bound)
        np.multiply(bound, tol(rtol), out=bound)
        return n_atol, int(np.count_nonzero(delta > bound))
