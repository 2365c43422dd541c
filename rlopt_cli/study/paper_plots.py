"""Figures of the paper study (PNG, matplotlib Agg). Each function returns the series it drew, so tests check
the data, not pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Series = dict[str, Any]


def _figure(cols: int = 1, width: float = 5.5) -> tuple[Any, Any]:
    import matplotlib  # heavy: imported on use

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported on use

    fig, axes = plt.subplots(1, cols, figsize=(width * cols, 3.8), squeeze=False)
    return fig, axes[0]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # heavy: imported on use

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_if_positive(values: list[float]) -> str:
    """A log axis needs a positive value; a run whose weights never moved has none (then a linear axis)."""
    return "log" if any(v > 0 for v in values) else "linear"


def per_layer(fractions: dict[str, dict[str, float]], path: Path) -> Series:
    """Changed fraction (bf16 bitwise) per layer index, one line per optimizer (paper Fig. 3)."""
    fig, (ax,) = _figure()
    for label, by_layer in fractions.items():
        layers = list(by_layer)
        ax.plot(range(len(layers)), [100 * by_layer[k] for k in layers], marker="o", label=label)
        ax.set_xticks(range(len(layers)), layers)
    ax.set(
        xlabel="layer (none = embeddings, final norm, lm_head)",
        ylabel="parameters changed (%)",
        yscale=log_if_positive([v for by_layer in fractions.values() for v in by_layer.values()]),
    )
    ax.legend()
    _save(fig, path)
    return fractions


def probe_histograms(probes: dict[str, dict[str, Any]], path: Path) -> Series:
    """Histograms of sqrt(v) and |g| at a probe step, SFT vs RL (AdamW)."""
    fig, axes = _figure(2)
    series: Series = {}
    for ax, key, title in zip(axes, ("hist_sqrt_v", "hist_abs_grad"), ("sqrt(v_t)", "|g_t|"), strict=True):
        for label, stats in probes.items():
            hist = stats.get(key)
            if not hist or not hist["edges"]:
                continue
            centres = [(a * b) ** 0.5 for a, b in zip(hist["edges"][:-1], hist["edges"][1:], strict=True)]
            ax.plot(centres, hist["counts"], label=label)
            series[f"{label}/{key}"] = hist["counts"]
        ax.set(xscale="log", xlabel=title, ylabel="coordinates", title=f"{title} at the probe step")
        ax.legend()
    _save(fig, path)
    return series


def ulp_ratios(hists: dict[str, list[int]], bin_labels: list[str], path: Path) -> Series:
    """Distribution of |dw| / ulp_bf16(w0) over coordinates, one bar group per optimizer."""
    fig, (ax,) = _figure(width=7)
    width = 0.8 / max(1, len(hists))
    for i, (label, counts) in enumerate(hists.items()):
        total = sum(counts) or 1
        ax.bar([x + i * width for x in range(len(counts))], [c / total for c in counts], width, label=label)
    ax.set_xticks([x + 0.4 for x in range(len(bin_labels))], bin_labels, rotation=45, fontsize=7)
    ax.axvline(6.4, color="grey", linestyle=":")  # the bin that starts at one ULP
    ax.set(xlabel="log10(|w_T - w_0| / ulp_bf16(w_0))", ylabel="fraction of coordinates")
    ax.legend()
    _save(fig, path)
    return hists


def scale_trend(rows: list[dict[str, Any]], path: Path) -> Series:
    """Changed fraction vs parameter count for SGD and AdamW, their ratio, and the step size in ULPs."""
    fig, axes = _figure(2)
    series: Series = {}
    for opt in sorted({r["optimizer"] for r in rows}):
        pts = sorted(
            (r["n_params"], r["changed_bf16"], r["median_step_ulp"]) for r in rows if r["optimizer"] == opt
        )
        series[opt] = pts
        axes[0].plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=opt)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=opt)
    changed = [r["changed_bf16"] for r in rows]
    steps = [r["median_step_ulp"] for r in rows]
    axes[0].set(
        xscale="log", yscale=log_if_positive(changed), xlabel="parameters", ylabel="changed in bf16 (%)"
    )
    axes[1].set(
        xscale="log", yscale=log_if_positive(steps), xlabel="parameters", ylabel="median |dw| / ulp_bf16(w0)"
    )
    for ax in axes:
        ax.legend()
    _save(fig, path)
    return series
