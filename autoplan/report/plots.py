"""Charts of sweep and frontier rows (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..units import format_tokens

PLOT_MISSING = "install autoplan[plot] for --plot"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(PLOT_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _seq_axis(axis, values, which: str = "x") -> None:
    """Log2 axis with sequence-length ticks (8k, 128k, 1M) at the given values."""
    ticks = sorted({int(v) for v in values if v > 0})
    set_scale, set_ticks, set_labels = ((axis.set_xscale, axis.set_xticks, axis.set_xticklabels) if which == "x" else
                                        (axis.set_yscale, axis.set_yticks, axis.set_yticklabels))
    set_scale("log", base=2)
    if ticks:
        set_ticks(ticks)
        set_labels([format_tokens(v) for v in ticks])
    from matplotlib.ticker import NullLocator

    (axis.xaxis if which == "x" else axis.yaxis).set_minor_locator(NullLocator())


def plot(rows: list[dict], path: str, title: str) -> None:
    """A figure for sweep rows (max seq_len, tokens/s/GPU and MFU against the knob) or
    frontier rows (tokens/s/GPU against seq_len, one line per layout family)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda v, _pos: f"{v:,.0f}")
    if rows and "family" in rows[0]:
        fig, axis = plt.subplots(figsize=(9, 5.5))
        styles = {"FSDP": ("o", "-"), "FSDP+CP": ("s", "--"), "FSDP+TP": ("^", "-."), "FSDP+TP+CP": ("D", ":"),
                  "PP": ("v", (0, (5, 1, 1, 1)))}
        for family in styles:
            points = [(r["seq_len"], r["tokens_per_second_per_gpu"]) for r in rows
                      if r["family"] == family and r["fits"]]
            if not points:
                continue
            marker, line = styles[family]
            axis.plot(*zip(*points), marker=marker, linestyle=line, markersize=7, linewidth=2, alpha=0.85,
                      label=f"{family} (fits up to {format_tokens(max(p[0] for p in points))})")
        _seq_axis(axis, [r["seq_len"] for r in rows])
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(thousands)
        axis.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
        axis.set_xlabel("sequence length (tokens, log2 scale)")
        axis.set_ylabel("tokens/s per GPU (predicted, log scale)")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(title="layout family (best plan of each)")
    else:
        knob = rows[0]["knob"] if rows else ""
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        values = [r["value"] for r in rows]
        numeric = knob in ("cp", "gpus", "seqlen")
        x = values if numeric else list(range(len(values)))
        label = {"cp": "context-parallel degree (log2 scale)", "gpus": "GPUs (log2 scale)",
                 "seqlen": "target sequence length (tokens, log2 scale)", "gpu": "GPU type"}.get(knob, knob)
        if numeric and knob != "seqlen":
            tick_text = [str(v) for v in values]
            if knob == "cp" and len({r["gpus"] for r in rows}) > 1:
                tick_text = [f"{v}\n({r['gpus']} GPUs)" for v, r in zip(values, rows)]
        elif numeric:
            tick_text = [format_tokens(v) for v in values]
        else:
            tick_text = [str(v) for v in values]
        series = [("max_seq_len", "longest sequence that fits (tokens)"),
                  ("tokens_per_second_per_gpu", "tokens/s per GPU"), ("mfu", "MFU (%)")]
        for axis, (key, ylabel) in zip(axes, series):
            fits = [r["max_seq_len"] > 0 if key == "max_seq_len" else r["fits"] for r in rows]
            points = [(xi, r[key] * (100 if key == "mfu" else 1)) for xi, r, ok in zip(x, rows, fits) if ok]
            if points and numeric:
                axis.plot(*zip(*points), marker="o", linewidth=2)
            elif points:  # GPU types: categories, not a trend
                axis.bar(*zip(*points), width=0.6, alpha=0.8)
            for xi, yi in points if len(points) <= 12 else []:
                text = format_tokens(int(yi)) if key == "max_seq_len" else (
                    f"{yi:.1f}%" if key == "mfu" else f"{yi:,.0f}")
                axis.annotate(text, (xi, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
            for xi, ok in zip(x, fits):
                if not ok:
                    axis.annotate("does not fit", (xi, 0.04), xycoords=("data", "axes fraction"), ha="center",
                                  fontsize=8, color="firebrick")
            axis.set_xlabel(label)
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
            if numeric:
                axis.set_xscale("log", base=2)
                axis.minorticks_off()
                axis.set_xlim(min(x) / 1.3, max(x) * 1.3)  # every point's slot, drawn or not
            axis.set_xticks(x)
            axis.set_xticklabels(tick_text)
            if key == "max_seq_len":
                _seq_axis(axis, [p[1] for p in points], which="y")
                if points:
                    low, high = min(p[1] for p in points), max(p[1] for p in points)
                    axis.set_ylim(low / 1.6, high * 1.6)
            else:
                top = max([p[1] for p in points] or [1.0])
                axis.set_ylim(0, top * 1.18)
                if key != "mfu":
                    axis.yaxis.set_major_formatter(thousands)
        seqs = {r["seq_len"] for r in rows if r["fits"]}
        if knob != "seqlen":
            at = f"at seq_len {format_tokens(next(iter(seqs)))}" if len(seqs) == 1 else "at each point's longest seq_len"
            axes[1].set_title(at, fontsize=10)
            axes[2].set_title(at, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

