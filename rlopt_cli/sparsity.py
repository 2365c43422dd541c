"""Update sparsity between two checkpoints, as the papers define it (../shared/paper/NOTES.md, "Update sparsity").

For every parameter tensor present in both checkpoints, count the coordinates that changed under three rules:
  bitwise   the stored bits differ (after casting both sides to the comparison dtype)
  atol      |b - a| > atol                       the papers' rule, atol = 1e-5
  relative  |b - a| > rtol * max(|a|, |b|)       the relative rule of later work, rtol = 1e-3
n counts every compared coordinate (embeddings, norms, biases, an untied lm_head); sparsity = 1 - changed / n.
Optionally, the effective rank of each 2-D update ΔW: singular values needed to reach 99% of Σσ².

Memory: tensors are read one at a time through safetensors' memory map and compared in slices that fit in cache,
so the peak stays near one copy of the largest tensor pair (plus a full fp32 ΔW per matrix with `rank=True`).
Speed: in 16-bit checkpoints most changed coordinates are settled by their bits alone (`settled_range` proves
when a change must pass both float rules); only tiny magnitudes and non-finite values take the float rules.

Deliberate simplifications: differences are taken in float32 (float64 for float64 weights), exactly as the
in-training sparsity does; non-float tensors (integer buffers) are skipped; tensors are matched by name only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlopt_cli.errors import RloptError, close_matches
from rlopt_cli.sparsity_io import TensorInfo, Weights, is_run_folder, read_pair, resolve_weights

if TYPE_CHECKING:
    import numpy as np
    import torch

ATOL = 1e-5  # the papers' rule ("PyTorch's default")
RTOL = 1e-3  # the relative rule: a change smaller than 0.1% of the weight does not count
RANK_ENERGY = 0.99  # effective rank: share of Σσ² the leading singular values must reach
DTYPES = ("stored", "bfloat16", "float32")
GROUPS = ("module", "layer", "tensor")
RULES = ("bitwise", "atol", "relative")
MODULES = (
    *("embedding", "attn.q", "attn.k", "attn.v", "attn.o"),
    *("mlp.gate", "mlp.up", "mlp.down", "norm", "lm_head", "other"),
)
NO_LAYER = "none"  # by_layer key of tensors outside the transformer blocks (embeddings, final norm, lm_head)
# Elements per slice, so the temporaries stay in a 1 MB L2 cache whatever the tensor's size: float32 slices of
# the float rules (256 KB each) and int16 slices of the 16-bit bit rules (512 KB; measured 1.7x faster than 1 << 16).
FLOAT_CHUNK = 1 << 16
BITS_CHUNK = 1 << 18
# Gather the changed coordinates first when under 1/GATHER of a slice changed: at ~10% changed, finding them
# costs more than the float rules on the whole slice (measured), so gathering pays only well below that.
GATHER = 32

# First match wins: norms first, so Qwen3's q_norm/k_norm are norms, not attention projections.
_MODULE_PATTERNS = [
    ("norm", r"norm|(^|\.)ln_\w*\."),
    ("embedding", r"embed_tokens|embed_positions|word_embeddings|position_embeddings|(^|\.)(wte|wpe)\."),
    ("lm_head", r"(^|\.)(lm_head|embed_out)\."),
    ("attn.q", r"(^|\.)q_proj\."),
    ("attn.k", r"(^|\.)k_proj\."),
    ("attn.v", r"(^|\.)v_proj\."),
    ("attn.o", r"(^|\.)(o_proj|out_proj)\."),
    ("mlp.gate", r"(^|\.)gate_proj\."),
    ("mlp.up", r"(^|\.)up_proj\."),
    ("mlp.down", r"(^|\.)down_proj\."),
]
_MODULE_RES = [(module, re.compile(pattern)) for module, pattern in _MODULE_PATTERNS]
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def module_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `attn.q`; unknown names -> `other`."""
    return next((module for module, regex in _MODULE_RES if regex.search(name)), "other")


def layer_index(name: str) -> int | None:
    """`model.layers.12.mlp.up_proj.weight` -> 12; None outside the transformer blocks."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def natural_key(name: str) -> list[Any]:
    """Sort layers.2 before layers.10 (re.split alternates text and digits, so types line up)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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


@dataclass(frozen=True)
class TensorResult:
    """One compared tensor: where it sits in the model, its counts, and its update's effective rank."""

    name: str
    module: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: str  # as stored in A (safetensors spelling)
    counts: Counts
    rank: int | None = None  # effective rank of ΔW; 2-D tensors only, when asked

    def row(self) -> dict[str, Any]:
        """The per-tensor table row (CSV and `--by tensor`)."""
        row: dict[str, Any] = {
            "name": self.name,
            "module": self.module,
            "layer": "" if self.layer is None else self.layer,
            "shape": "x".join(map(str, self.shape)),
            "dtype": self.dtype,
            "n": self.counts.n,
        }
        row |= {rule: getattr(self.counts, rule) for rule in RULES}
        row |= {f"{rule}_frac": self.counts.fraction(rule) for rule in RULES}
        if len(self.shape) == 2:
            row |= {"effective_rank": "" if self.rank is None else self.rank, "full_rank": min(self.shape)}
        else:
            row |= {"effective_rank": "", "full_rank": ""}
        return row


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True)
class SparsityResult:
    """Everything `rlopt sparsity` reports; `to_dict()` is the `--json` object."""

    a: str
    b: str
    dtype: str
    atol: float
    rtol: float
    tensors: tuple[TensorResult, ...]
    skipped: tuple[Skipped, ...]
    with_rank: bool = False

    @property
    def total(self) -> Counts:
        return sum((t.counts for t in self.tensors), Counts())

    def by(self, group: str) -> dict[str, Counts]:
        """Counts per module type (fixed order) or per layer index (numeric order, then `none`)."""
        out: dict[str, Counts] = {}
        for t in self.tensors:
            key = t.module if group == "module" else NO_LAYER if t.layer is None else str(t.layer)
            out[key] = out.get(key, Counts()) + t.counts
        order = list(MODULES) if group == "module" else sorted(out, key=natural_key)
        return {key: out[key] for key in order if key in out}

    def rank_summary(self) -> dict[str, Any]:
        """Per-matrix effective ranks and their means (count, and % of full rank)."""
        ranked = [(t.name, t.rank, min(t.shape)) for t in self.tensors if t.rank is not None and min(t.shape)]
        rows = [
            {"name": name, "effective_rank": r, "full_rank": full, "pct": 100.0 * r / full}
            for name, r, full in ranked
        ]
        mean = sum(r for _, r, _ in ranked) / len(ranked) if ranked else None
        mean_pct = sum(100.0 * r / full for _, r, full in ranked) / len(ranked) if ranked else None
        return {"energy": RANK_ENERGY, "mean": mean, "mean_pct": mean_pct, "tensors": rows}

    def to_dict(self) -> dict[str, Any]:
        total = self.total
        out: dict[str, Any] = {
            "a": self.a,
            "b": self.b,
            "dtype": self.dtype,
            "atol": self.atol,
            "rtol": self.rtol,
            "n_params": total.n,
            "rules": total.rules(),
            "by_module": {k: c.to_dict() for k, c in self.by("module").items()},
            "by_layer": {k: c.to_dict() for k, c in self.by("layer").items()},
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "tensors": [t.row() for t in self.tensors],
        }
        if self.with_rank:
            out["rank"] = self.rank_summary()
        return out


def check_options(atol: float, rtol: float, dtype: str) -> None:
    """One-line errors for a tolerance that is negative (or NaN) or an unknown dtype."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if not (math.isfinite(value) and value >= 0):
            raise RloptError(f"{flag} must be a finite number >= 0, got {value}")
    if dtype not in DTYPES:
        raise RloptError(
            f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPES)}{close_matches(dtype, DTYPES)}"
        )


def is_float(info: TensorInfo) -> bool:
    return info.dtype.startswith("F") or info.dtype == "BF16"  # F64, F32, F16, F8_*, BF16


def plan(wa: Weights, wb: Weights, dtype: str) -> tuple[list[str], list[Skipped]]:
    """Names to compare, and the rest with the reason; one-line errors when nothing can be compared."""
    tied = wa.ties_embeddings or wb.ties_embeddings
    names = sorted(set(wa.tensors) | set(wb.tensors), key=natural_key)
    has_embedding = any(module_type(n) == "embedding" for n in names)
    common: list[str] = []
    skipped: list[Skipped] = []
    for name in names:
        ia, ib = wa.tensors.get(name), wb.tensors.get(name)
        if ia is None or ib is None:
            reason = f"only in {'A' if ib is None else 'B'}"
        elif ia.shape != ib.shape:
            reason = f"shape differs: A {list(ia.shape)}, B {list(ib.shape)}"
        elif not (is_float(ia) and is_float(ib)):
            reason = f"not floating point ({ia.dtype}): a buffer, not a parameter"
        elif tied and has_embedding and module_type(name) == "lm_head":
            reason = "tied to the input embedding (config.json): counted once, as embedding"
        else:
            common.append(name)
            continue
        skipped.append(Skipped(name, reason))
    if not common:
        raise RloptError(
            f"{wa.path} and {wb.path} share no comparable tensor ({len(wa.tensors)} vs {len(wb.tensors)} "
            "tensors); compare two checkpoints of the same model"
        )
    differ = [n for n in common if wa.tensors[n].dtype != wb.tensors[n].dtype]
    if dtype == "stored" and differ:
        ia, ib = wa.tensors[differ[0]], wb.tensors[differ[0]]
        raise RloptError(
            f"{ia.name} is stored as {ia.dtype} in A but {ib.dtype} in B; "
            "pass --dtype bfloat16 or --dtype float32 to compare both in one dtype"
        )
    return common, skipped


def count_changed(
    a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float, dtype: torch.dtype | None = None
) -> Counts:
    """Coordinates of `b` that differ from `a` under the three rules, both cast to `dtype` (None: as is)."""
    cast = dtype or a.dtype
    settled = settled_range(cast, atol, rtol)
    a, b = a.reshape(-1), b.reshape(-1)  # [n]: views of the memory-mapped file, nothing copied yet
    chunk = FLOAT_CHUNK if settled is None else BITS_CHUNK
    total = Counts()
    for start in range(0, a.numel(), chunk):
        a_slice, b_slice = a[start : start + chunk], b[start : start + chunk]  # [c]
        if cast != a.dtype:
            a_slice, b_slice = a_slice.to(cast), b_slice.to(cast)
        total += count_slice(a_slice, b_slice, atol, rtol, settled)
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
    import numpy as np
    import torch

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
    import numpy as np

    floor, inf = settled
    # |x| as bits minus the floor, as uint16: below the floor wraps to >= 2^15, so one bound checks both ends.
    a_off, b_off = np.bitwise_and(a_bits, 0x7FFF), np.bitwise_and(b_bits, 0x7FFF)  # the sign dropped
    a_off -= floor
    b_off -= floor
    worst = np.maximum(a_off.view(np.uint16), b_off.view(np.uint16), out=a_off.view(np.uint16))
    return worst >= inf - floor


def count_slice(
    a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float, settled: tuple[int, int] | None = None
) -> Counts:
    """The three counts on one slice [c] of one dtype (n left at 0).

    Why numpy: torch's CPU comparisons are several times slower than numpy's; both work on the same memory
    (`.numpy()` is a view). Only changed coordinates can count under the float rules, so they are gathered
    first when few changed. With a `settled` range (16-bit floats, see `settled_range`), the changed
    coordinates inside it count under all three rules from their bits alone; only the rest take the float rules.
    """
    import numpy as np
    import torch

    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    a_bits, b_bits = a.view(bits).numpy(), b.view(bits).numpy()  # [c]
    changed = np.not_equal(a_bits, b_bits)  # [c] bool
    n_changed = int(np.count_nonzero(changed))
    if n_changed == 0:
        return Counts()  # equal bits are equal values: nothing beyond atol or rtol either
    sparse = GATHER * n_changed < changed.size
    if settled is not None:
        if sparse:
            moved = np.flatnonzero(changed)  # [k]
            check = moved[unsettled(a_bits[moved], b_bits[moved], settled)]  # [u]
        else:
            check = np.flatnonzero(np.logical_and(changed, unsettled(a_bits, b_bits, settled)))  # [u]
        n_bits = n_changed - check.size  # settled by their bits: counted under every rule
        index = torch.from_numpy(check)  # [u]
        n_atol, n_relative = float_rules(a.index_select(0, index), b.index_select(0, index), atol, rtol)
        return Counts(0, n_changed, n_bits + n_atol, n_bits + n_relative)
    if sparse:
        index = torch.from_numpy(np.flatnonzero(changed))  # [k]
        a, b = a.index_select(0, index), b.index_select(0, index)  # [k]: all the float rules can count
    return Counts(0, n_changed, *float_rules(a, b, atol, rtol))


def float_rules(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[int, int]:
    """(atol, relative) counts of one slice [k], the differences taken in float32 (float64 for float64 weights)
    with the tolerances rounded to that dtype, exactly as torch compares a float32 tensor with a Python float.
    A NaN or infinite weight gives a NaN difference or bound: its coordinate counts under neither rule."""
    import numpy as np
    import torch

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


def effective_rank(delta: torch.Tensor, energy: float = RANK_ENERGY) -> int:
    """Number of leading singular values of ΔW [m, k] whose σ² reach `energy` of Σσ²; 0 for no update."""
    import torch

    s2 = torch.linalg.svdvals(delta.float()).double().square()  # [min(m, k)], descending
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cumulative = s2.cumsum(0)  # [min(m, k)]
    first = int(torch.searchsorted(cumulative, torch.tensor([energy * total], dtype=torch.float64)))
    return min(first + 1, s2.numel())


def compare_tensor(ia: TensorInfo, ib: TensorInfo, opts: dict[str, Any]) -> TensorResult:
    """Read one tensor from both checkpoints and count its changes (and its update's rank when asked)."""
    with read_pair(ia, ib) as (a, b):
        counts = count_changed(a, b, opts["atol"], opts["rtol"], opts["cast"])
        rank = None
        if opts["rank"] and a.dim() == 2:
            cast = opts["cast"] or a.dtype
            delta = b.to(cast).float() - a.to(cast).float()  # [m, k] fp32 ΔW: full-size temporaries
            rank = effective_rank(delta) if counts.bitwise else 0
            del delta
    name = ia.name
    return TensorResult(name, module_type(name), layer_index(name), ia.shape, ia.dtype, counts, rank)


def compare(
    wa: Weights,
    wb: Weights,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    dtype: str = "stored",
    rank: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> SparsityResult:
    """Compare two resolved checkpoints tensor by tensor; `on_progress(done_bytes, total_bytes)` after each."""
    import torch

    check_options(atol, rtol, dtype)
    names, skipped = plan(wa, wb, dtype)
    cast = None if dtype == "stored" else getattr(torch, dtype)
    opts = {"atol": atol, "rtol": rtol, "cast": cast, "rank": rank}
    total_bytes = sum(wa.tensors[n].nbytes + wb.tensors[n].nbytes for n in names)
    done = 0
    results = []
    with torch.no_grad():
        for name in names:
            results.append(compare_tensor(wa.tensors[name], wb.tensors[name], opts))
            done += wa.tensors[name].nbytes + wb.tensors[name].nbytes
            if on_progress is not None:
                on_progress(done, total_bytes)
    return SparsityResult(
        str(wa.path), str(wb.path), dtype, atol, rtol, tuple(results), tuple(skipped), with_rank=rank
    )


def resolve_pair(a: str | Path, b: str | Path, step: int | None = None) -> tuple[Weights, Weights]:
    """Both checkpoint arguments resolved to their weights; `step` applies to whichever is a run folder."""
    if step is not None and not (is_run_folder(a) or is_run_folder(b)):
        raise RloptError(f"--step picks a checkpoint of a run folder, but neither {a} nor {b} is one")
    return resolve_weights(a, step), resolve_weights(b, step)


def sparsity(
    a: str | Path,
    b: str | Path,
    *,
    step: int | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    dtype: str = "stored",
    rank: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> SparsityResult:
    """Update sparsity from checkpoint `a` to `b` (folders, run folders or .safetensors files)."""
    check_options(atol, rtol, dtype)
    wa, wb = resolve_pair(a, b, step)
    return compare(wa, wb, atol=atol, rtol=rtol, dtype=dtype, rank=rank, on_progress=on_progress)
