"""The report's figures (matplotlib, Agg backend, imported only when a report is drawn).

Every figure has a title, axis labels with units and a legend; the machine the numbers were
measured on is written under the title, because absolute times only hold for that machine.
"""

from __future__ import annotations

from pathlib import Path

from mllm_deploy.tools.bench import speedups, visual_summary

FIGSIZE = (9.0, 4.6)
DPI = 110
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, title: str, subtitle: str, path: Path) -> Path:
    ax.set_title(f"{title}\n", fontsize=12, fontweight="bold")
    ax.text(0.5, 1.015, subtitle, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="#555555")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _labels(results: list[dict]) -> list[str]:
    """Bundle names in first-seen order, with method and visual tokens (first → last layer)."""
    seen: dict[str, str] = {}
    for r in results:
        seen.setdefault(r["name"], f"{r['name']}\n{r['method']}, {visual_summary(r['visual_tokens'])} vis.")
    return list(seen.values())


def _grouped_bars(results: list[dict], value, spread, ylabel: str, title: str, subtitle: str, path: Path,
                  fmt: str = "{:.1f}") -> Path:
    """One group per bundle, one bar per backend; ``spread(result)`` gives (low, high) whiskers or None."""
    plt = _pyplot()
    names = list(dict.fromkeys(r["name"] for r in results))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    width = 0.8 / len(backends)
    top = max((value(r) for r in results), default=0.0)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for i, backend in enumerate(backends):
        xs, heights, lows, highs = [], [], [], []
        for j, name in enumerate(names):
            match = [r for r in results if r["name"] == name and r["backend"] == backend]
            if not match:
                continue
            v = value(match[0])
            low, high = spread(match[0]) or (v, v)
            xs.append(j + (i - (len(backends) - 1) / 2) * width)
            heights.append(v)
            lows.append(max(v - low, 0))
            highs.append(max(high - v, 0))
        whiskers = {"yerr": [lows, highs], "capsize": 4, "error_kw": {"elinewidth": 1, "ecolor": "#333333"}}
        bars = ax.bar(xs, heights, width * 0.92, color=COLOURS[i % len(COLOURS)], label=backend,
                      **(whiskers if any(lows) or any(highs) else {}))
        # values sit inside the bars, where no whisker crosses them; bars too short for text get theirs on top
        tall = [h >= 0.08 * top for h in heights]
        ax.bar_label(bars, labels=[fmt.format(h) if t else "" for h, t in zip(heights, tall)], label_type="center",
                     fontsize=8, color="white", fontweight="bold")
        ax.bar_label(bars, labels=["" if t else fmt.format(h) for h, t in zip(heights, tall)], padding=2, fontsize=8)
    ax.set_xticks(range(len(names)), _labels(results), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    # outside the axes, so that no bar or whisker hides under it
    ax.legend(title="backend", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, ax, title, subtitle, path)


def prefill_latency(results: list[dict], path: Path, subtitle: str) -> Path:
    return _grouped_bars(
        results, lambda r: r["prefill_ms"]["median"], lambda r: (r["prefill_ms"]["min"], r["prefill_ms"]["max"]),
        "prefill time [ms]", "Prefill latency per recipe (bars: median, whiskers: min–max)", subtitle, path)


def decode_throughput(results: list[dict], path: Path, subtitle: str) -> Path:
    def spread(r):  # the slowest step gives the lowest rate
        d = r["decode_ms_per_token"]
        return 1000.0 / d["max"], 1000.0 / d["min"]

    return _grouped_bars(results, lambda r: r["tokens_per_s"], spread, "decode throughput [tokens/s]",
                         "Decode speed (bars: 1000 / median step, whiskers: slowest–fastest step)", subtitle, path,
                         fmt="{:.0f}")


def kv_cache(results: list[dict], path: Path, subtitle: str) -> Path:
    # MiB, as the report's tables and bench-mllm's (small models get more decimals, not another unit)
    largest = max(r["kv_cache_bytes"] for r in results) / 2**20
    return _grouped_bars(results, lambda r: r["kv_cache_bytes"] / 2**20, lambda r: None,
                         "KV cache after prefill [MiB]", "KV-cache memory per recipe (all layers, K and V)",
                         subtitle, path, fmt="{:.1f}" if largest >= 10 else "{:.3f}")


def speedup_vs_flops(results: list[dict], path: Path, subtitle: str) -> Path | None:
    """Measured prefill speedup against the FLOPs model's, one point per recipe and backend."""
    points = [(r, s) for r in results if r["method"] != "dense" and (s := speedups(r, results)) and s["flops"]]
    if not points:
        return None  # no dense bundle in the run (nothing to take a ratio to), or nothing but dense
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    backends = list(dict.fromkeys(r["backend"] for r, _ in points))
    for i, backend in enumerate(backends):
        mine = [(r, s) for r, s in points if r["backend"] == backend]
        ax.scatter([s["flops"] for _, s in mine], [s["prefill"] for _, s in mine], s=60, zorder=3,
                   color=COLOURS[i % len(COLOURS)], marker=MARKERS[i % len(MARKERS)], label=backend)
        for r, s in mine:
            ax.annotate(f"{r['name']} ({s['efficiency']:.2f})", (s["flops"], s["prefill"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
    values = [v for _, s in points for v in (s["flops"], s["prefill"])]
    low, high = min(values + [1.0]) * 0.9, max(values) * 1.1
    ax.plot([low, high], [low, high], "--", color="#777777", lw=1, label="ideal (measured = FLOPs speedup)")
    ax.scatter([1.0], [1.0], marker="*", s=140, color="black", zorder=3, label="dense (reference, 1×)")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("FLOPs speedup vs dense, exact FLOPs model [×]")
    ax.set_ylabel("measured prefill speedup vs dense [×]")
    ax.legend(title="backend; label: recipe (measured / FLOPs)", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, ax, "Measured vs FLOPs-model speedup of prefill", subtitle, path)


def accuracy_vs_flops(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Accuracy with its 95% interval against the recipe's FLOPs reduction, one series per eval file."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for i, (label, results) in enumerate(series):
        xs = [100 * r["flops_reduction"] for r in results]
        ys = [100 * r["accuracy"] for r in results]
        err = [[100 * (r["accuracy"] - r["ci_low"]) for r in results],
               [100 * (r["ci_high"] - r["accuracy"]) for r in results]]
        ax.errorbar(xs, ys, yerr=err, fmt=MARKERS[i % len(MARKERS)], color=COLOURS[i % len(COLOURS)], capsize=4,
                    markersize=7, label=label)
        # labels of neighbouring points alternate above and below, so close recipes do not print over each other
        order = sorted(range(len(results)), key=lambda k: (xs[k], ys[k]))
        for rank, k in enumerate(order):
            r, x, y = results[k], xs[k], ys[k]
            ax.annotate(r.get("name") or Path(r["bundle"]).name, (x, y), textcoords="offset points",
                        xytext=(6, 6 if rank % 2 == 0 else -12), fontsize=8)
    ax.set_xlabel("prefill FLOPs reduction vs dense [%]")
    ax.set_ylabel("exact-match accuracy [%]")
    ax.margins(x=0.12, y=0.12)
    ax.legend(title="evaluation (error bars: 95% Wilson CI)", fontsize=8, title_fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    return _finish(fig, ax, "Accuracy vs compute saved", "each point: one bundle; dense at 0%", path)
