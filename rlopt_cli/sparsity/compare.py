"""Update sparsity between two checkpoints, as the papers define it (../shared/paper/NOTES.md, "Update sparsity").

For every parameter tensor present in both checkpoints, count the coordinates that changed under three rules:
  bitwise   the stored bits differ (after casting both sides to the comparison dtype)
  atol      |b - a| > atol                       the papers' rule, atol = 1e-5
  relative  |b - a| > rtol * max(|a|, |b|)       the relative rule of later work, rtol = 1e-3
n counts every compared coordinate (embeddings, norms, biases, an untied lm_head); sparsity = 1 - changed / n.
Optionally, the effective rank of each 2-D update ΔW: singular values needed to reach 99% of Σσ².

Memory: tensors are read one at a time through safetensors' memory map and compared in slices that fit in cache
(`sparsity_count`), so the peak stays near one copy of the largest tensor pair (plus a full fp32 ΔW per matrix
with `rank=True`).

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
from rlopt_cli.sparsity.count import RULES, Counts, count_changed
from rlopt_cli.sparsity.weights import TensorInfo, Weights, is_run_folder, read_pair, resolve_weights

if TYPE_CHECKING:
    import torch

ATOL = 1e-5  # the papers' rule ("PyTorch's default")
RTOL = 1e-3  # the relative rule: a change smaller than 0.1% of the weight does not count
RANK_ENERGY = 0.99  # effective rank: share of Σσ² the leading singular values must reach
DTYPES = ("stored", "bfloat16", "float32")
GROUPS = ("module", "layer", "tensor")
MODULES = (
    *("embedding", "attn.q", "attn.k", "attn.v", "attn.o"),
    *("mlp.gate", "mlp.up", "mlp.down", "norm", "lm_head", "other"),
)
NO_LAYER = "none"  # by_layer key of tensors outside the transformer blocks (embeddings, final norm, lm_head)
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


def effective_rank(delta: torch.Tensor, energy: float = RANK_ENERGY) -> int:
    """Number of leading singular values of ΔW [m, k] whose σ² reach `energy` of Σσ²; 0 for no update."""
    import torch  # heavy: imported on use

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
    import torch  # heavy: imported on use

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
