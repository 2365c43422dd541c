"""The optimizer probe computes its statistics tensor by tensor, in chunks: the same numbers as the whole-vector
computation it replaced (written out below as the reference), without ever building a whole-model tensor.

Tolerances, measured here against the same whole-vector computation in fp64 (the truth): the old fp32
computation reduces the whole ~230k-element vector in fp32 and is off by up to 2.7e-5 (relative; RMSProp's
momentum norm, whose entries span many decades), the probe (fp32 per chunk, summed in fp64) by at most 5e-8.
So norms and spreads must match the fp64 truth within 1e-6 relative (the tight check: a wrong beta, a biased
std or a chunk counted twice moves them by far more) and the old fp32 numbers within 5e-5 (the old code's own
rounding, with a margin). Cosines are bounded by 1 and compared absolutely, within 1e-6 of both. Histogram
counts and edges must equal the old fp32 ones exactly: the same fp32 values go into the same bins.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlopt_cli.algo import probe as probe_module
from rlopt_cli.algo.optimizers import build_optimizer
from rlopt_cli.algo.probe import FIRST_MOMENT, HIST_BINS, SECOND_MOMENT, Probe
from tests.tiny_hf import tiny_model

TOL_FP32 = 5e-5  # relative, vs the old fp32 computation
TOL_FP64 = 1e-6  # relative, vs the same computation in fp64
TOL_COS = 1e-6  # absolute, vs both


# ---- the whole-vector computation the probe used to do (the reference) ----


def _flat_state(
    optimizer: Any, params: list[torch.Tensor], keys: tuple[str, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        value = next((state[k] for k in keys if isinstance(state.get(k), torch.Tensor)), None)
        if value is None:
            return None
        parts.append(value.detach().to(dtype).flatten())
    return torch.cat(parts)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))


def _log_histogram(values: torch.Tensor) -> dict[str, list[float]]:
    mags = values.abs()
    nonzero = mags[mags > 0]
    if nonzero.numel() == 0:
        return {"edges": [], "counts": [], "zeros": [float(mags.numel())]}
    lo, hi = float(nonzero.min().log10()), float(nonzero.max().log10()) + 1e-6
    edges = torch.logspace(lo, hi, HIST_BINS + 1)
    bins = torch.linspace(lo, hi, HIST_BINS + 1, dtype=values.dtype)
    counts = torch.histogram(nonzero.log10().cpu(), bins=bins).hist
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "zeros": [float(mags.numel() - nonzero.numel())],
    }


class WholeVectorProbe:
    dtype = torch.float32

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.grad is not None]
        self.grad = torch.cat([p.grad.detach().to(self.dtype).flatten() for p in self.params])
        self.m_prev = _flat_state(optimizer, self.params, FIRST_MOMENT, self.dtype)

    def after_step(self) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        m_t = _flat_state(self.optimizer, self.params, FIRST_MOMENT, self.dtype)
        v_t = _flat_state(self.optimizer, self.params, SECOND_MOMENT, self.dtype)
        g = self.grad
        stats: dict[str, Any] = {"grad_norm": float(g.norm()), "n": g.numel()}
        if m_t is not None and "betas" in group:
            beta1 = group["betas"][0]
            recovered = (m_t - (1 - beta1) * g) / beta1
            stats["cos_m_prev_g"] = _cos(recovered, g)
            stats["history_ratio"] = float(recovered.norm() / g.norm().clamp(min=1e-30))
        if self.m_prev is not None:
            stats["cos_m_prev_g_snapshot"] = _cos(self.m_prev, g)
            stats.setdefault("history_ratio", float(self.m_prev.norm() / g.norm().clamp(min=1e-30)))
        if v_t is not None:
            sqrt_v = v_t.sqrt()
            stats["sqrt_v_std"] = float(sqrt_v.std())
            stats["sqrt_v_mean"] = float(sqrt_v.mean())
            stats["hist_sqrt_v"] = _log_histogram(sqrt_v)
        stats["hist_abs_grad"] = _log_histogram(g)
        return stats


class WholeVectorProbe64(WholeVectorProbe):
    """The same computation in fp64: the truth both are compared with."""

    dtype = torch.float64


# ---- helpers ----


def backward(model: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 259, (2, 12), generator=gen)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def probed_step(model: Any, optimizer: Any, *probes: type) -> list[dict[str, Any]]:
    taken = [cls(model, optimizer) for cls in probes]
    optimizer.step()
    return [t.after_step() for t in taken]


OPTIMIZERS = {
    "adamw": ("adamw", 1e-3, {}),
    "rmsprop": ("rmsprop", 1e-3, {"momentum": 0.9}),  # momentum: a first moment for the snapshot cosine
    "rmsprop-plain": ("rmsprop", 1e-3, {}),  # no first moment: only the spread and the histograms
}


@pytest.mark.parametrize("chunk", [probe_module.CHUNK, 1000])  # 1000: every big tensor spans many chunks
@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_chunked_statistics_equal_the_whole_vector_ones(
    which: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe_module, "CHUNK", chunk)
    model = tiny_model("qwen3")  # tied embeddings: the shared tensor is one parameter, counted once
    name, lr, args = OPTIMIZERS[which]
    optimizer = build_optimizer(model.parameters(), name, lr, 0.0, args)
    for step in range(3):  # the third step has a history in the moments
        backward(model, step)
        new, old, exact = probed_step(model, optimizer, Probe, WholeVectorProbe, WholeVectorProbe64)
        assert new.keys() == old.keys() == exact.keys()
        assert new["n"] == old["n"] == sum(p.numel() for p in model.parameters())
        # At the first step AdamW's m_{t-1} is 0 and the recovered one is rounding noise (~1e-8 of g): its
        # cosine with g means nothing, only its smallness does.
        ill_posed = ("cos_m_prev_g", "history_ratio") if step == 0 and which == "adamw" else ()
        for key in ill_posed:
            assert new[key] < 1e-5 or key == "cos_m_prev_g"
        for ref, tol in ((old, TOL_FP32), (exact, TOL_FP64)):
            for key in ("cos_m_prev_g", "cos_m_prev_g_snapshot"):
                if key in ref and key not in ill_posed:
                    assert new[key] == pytest.approx(ref[key], abs=TOL_COS), key
            for key in ("grad_norm", "history_ratio", "sqrt_v_std", "sqrt_v_mean"):
                if key in ref and key not in ill_posed:
                    assert new[key] == pytest.approx(ref[key], rel=tol, abs=1e-30), key
        for key in ("hist_abs_grad", "hist_sqrt_v"):
            if key in old:
                assert new[key] == old[key], key
    assert "sqrt_v_std" in new and ("cos_m_prev_g_snapshot" in new) == (which != "rmsprop-plain")
    if which == "adamw":
        assert new["cos_m_prev_g"] == pytest.approx(new["cos_m_prev_g_snapshot"], abs=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the size, in elements, of the largest new storage any torch op allocates (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = [*args, *(kwargs or {}).values()]
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_the_probe_never_builds_a_tensor_bigger_than_a_chunk(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = 1000
    monkeypatch.setattr(probe_module, "CHUNK", chunk)
    model = tiny_model("qwen3")
    largest_param = max(p.numel() for p in model.parameters())
    assert largest_param > 10 * chunk  # so the bound below says something
    optimizer = build_optimizer(
        model.parameters(), name, 1e-3, 0.0, {"momentum": 0.9} if name == "rmsprop" else {}
    )
    backward(model, 0)
    optimizer.step()  # moments exist: every statistic is computed below
    backward(model, 1)
    for cls, bound in ((Probe, chunk), (WholeVectorProbe, None)):
        watch = LargestTensor()
        with watch:
            taken = cls(model, optimizer)
        optimizer.step()  # outside the watch: the step's own temporaries are not the probe's
        with watch:
            taken.after_step()
        if bound is not None:
            assert watch.largest <= bound
        else:  # the reference concatenates the model: the watch sees it, so the bound above could fail
            assert watch.largest >= sum(p.numel() for p in model.parameters())
        backward(model, 2)


def test_a_gradient_changed_by_the_step_is_refused() -> None:
    model = tiny_model("qwen3")
    optimizer = build_optimizer(model.parameters(), "adamw", 1e-3, 0.0, {})
    backward(model, 0)
    taken = Probe(model, optimizer)
    optimizer.step()
    next(model.parameters()).grad.mul_(2)
    with pytest.raises(RuntimeError, match="changed the gradient"):
        taken.after_step()
