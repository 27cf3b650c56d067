"""Shared reporting for every bench mode: percentiles, the JSON document, the stderr table, the plots.

One place for these so the three modes report the same statistics under the same names, and a result
from ``throughput`` can sit beside one from ``serve`` (against us or a peer) in BENCHMARKS.md.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import sys
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_PERCENTILES = (50, 90, 99)


def percentiles(values: Iterable[float], ps: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` with numpy's default (linear interpolation) definition,
    in pure Python so the client side needs no numpy. Empty input gives None rather than raising: a
    run in which every request failed still has to print its report."""
    xs = sorted(float(v) for v in values)
    out: dict[str, float | None] = {}
    for p in ps:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
        key = f"p{p:g}"
        if not xs:
            out[key] = None
            continue
        pos = (len(xs) - 1) * p / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[key] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def summarize(values: Iterable[float], scale: float = 1.0,
              ps: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float | None]:
    """mean, std, min, max and percentiles of ``values * scale`` (scale=1e3 turns seconds into ms)."""
    xs = [float(v) * scale for v in values]
    n = len(xs)
    mean = sum(xs) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n) if n else None
    return {"mean": mean, "std": std, "min": min(xs) if xs else None, "max": max(xs) if xs else None,
            **percentiles(xs, ps), "count": n}


def env_info() -> dict:
    """What BENCHMARKS.md needs beside a figure: date, versions, device, and the command line."""
    from llmc import __version__

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "llmc": __version__,
            "python": platform.python_version(), "host": platform.node(), "command": " ".join(sys.argv)}
    if "torch" in sys.modules:  # only report torch where this run used it (serve mode does not)
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    return info


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:,.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(title: str, rows: list[tuple[str, object]], latency: dict[str, dict | None] | None = None) -> str:
    """Key/value rows (a value of ``...`` makes the key a section header), then, if given, one line per
    latency metric with its mean and percentiles side by side (milliseconds)."""
    latency = {k: v for k, v in (latency or {}).items() if v and v.get("count")}
    cols = ["mean", *[f"p{p}" for p in DEFAULT_PERCENTILES]]
    lat_lines = []
    if latency:
        lw = max(len(k) for k in [*latency, "latency (ms)"]) + 2
        lat_lines.append(f"{'latency (ms)':<{lw}}" + "".join(f"{c:>11}" for c in cols))
        for k, v in latency.items():
            lat_lines.append(f"{k:<{lw}}" + "".join(f"{_fmt(v.get(c)):>11}" for c in cols))
    width = max([len(k) for k, _ in rows] + [10])
    vals = [_fmt(v) for _, v in rows]
    vwidth = max([len(v) for v in vals] + [8])
    total = max([width + vwidth + 2, len(title)] + [len(ln) for ln in lat_lines])
    vwidth = total - width - 2
    lines = ["=" * total, title.center(total).rstrip(), "=" * total]
    for (k, v), s in zip(rows, vals):
        if v is Ellipsis:
            lines.append(f"--- {k} ".ljust(total, "-"))
        else:
            lines.append(f"{k:<{width}}  {s:>{vwidth}}")
    if lat_lines:
        lines += ["-" * total, *lat_lines]
    lines.append("=" * total)
    return "\n".join(lines)


def _json_safe(obj):
    """inf/nan are not JSON: write them as null (a rate of inf is written as the string "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def emit(result: dict, output: str | None, table: str) -> None:
    """The JSON document to ``output`` (or stdout, so it pipes into jq) and the table to stderr."""
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    sys.stderr.write(table + "\n")
    if output:
        sys.stderr.write(f"results written to {output}\n")


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from llmc.errors import ConfigError

        raise ConfigError("--plot needs matplotlib: pip install 'llmc[bench]'") from None
    matplotlib.use("Agg")  # no display on a GPU box
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(path: str, series: dict[str, list[float]], title: str) -> None:
    """Latency CDFs, one panel per metric (TTFT, TPOT, ITL, E2E), in milliseconds: the shape of a tail
    reads better off a curve than off three percentiles."""
    plt = _pyplot()
    names = [k for k, v in series.items() if v]
    n = max(1, len(names))
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs = sorted(series[name])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post")
        for p, style in zip(DEFAULT_PERCENTILES, (":", "--", "-.")):
            v = percentiles(xs, [p])[f"p{p}"]
            ax.axvline(v, color="gray", linestyle=style, linewidth=0.8, label=f"p{p} {v:.1f}")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_requests(path: str, ttft_ms: list[float], e2e_ms: list[float], title: str) -> None:
    """Per-request latency in submission order: with everything submitted at once, the staircase shows
    how the scheduler admitted the queue (batch waves, preemptions)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    idx = list(range(len(e2e_ms)))
    ax.scatter(idx, e2e_ms, s=6, label="end-to-end")
    ax.scatter(idx, ttft_ms, s=6, label="time to first token")
    ax.set_xlabel("request (submission order)")
    ax.set_ylabel("ms since submission")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
