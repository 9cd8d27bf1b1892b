"""The HTML report's charts of a unet-bench run, drawn by matplotlib as inline SVG: images/s per
row with each row's gate verdict on its bar, and each row's latency distribution (p50 to p99).

matplotlib is the report extra, imported only here and only when a report is written. The SVG is
made deterministic (a fixed hash salt for its ids, no date in its metadata), so the same results
give the same page.
"""

import io

from unet_export.errors import require

VERDICT = {"ok": "passed", "parity_failed": "FAILED", "not_judged": "not judged", "error": "error",
           "unavailable": "not run"}  # fmt: skip
COLOUR = {"ok": "#2e7d32", "parity_failed": "#c62828", "not_judged": "#9e9e9e", "error": "#6d4c41"}
P50, P99 = "#1565c0", "#ef6c00"


def _pyplot():
    mpl = require("matplotlib", extra="report")
    mpl.use("Agg")  # no screen: never a GUI backend, whatever the user's matplotlibrc says
    mpl.rcParams["svg.hashsalt"] = "unet-export"  # element ids from a fixed salt: the same chart, the same bytes
    mpl.rcParams["svg.fonttype"] = "none"  # text stays text: readable in the DOM and searchable
    return require("matplotlib.pyplot", extra="report")


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline in HTML: no XML declaration or DOCTYPE


def row_label(row: dict) -> str:
    return f"{row['backend']} {row['precision']}"


def throughput_chart(rows: list[dict], title: str) -> str:
    """Images/s per row (throughput mode beside latency mode when the run has both), each bar
    labelled with its figure and its gate verdict; a row that did not run has no bar but says so."""
    plt = _pyplot()
    labels = [row_label(r) for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    both = any(r.get("throughput") for r in rows)
    height = 0.38 if both else 0.7
    top = max([r.get("img_per_s") or 0 for r in rows] + [(r.get("throughput") or {}).get("img_per_s") or 0 for r in rows])
    for i, row in enumerate(rows):
        status = row.get("status", "")
        verdict = VERDICT.get(status, status)
        series = [("latency mode", row.get("img_per_s"), 0.0)]
        if both:
            series = [("latency mode", row.get("img_per_s"), -height / 2),
                      ("throughput mode", (row.get("throughput") or {}).get("img_per_s"), height / 2)]  # fmt: skip
        for mode, value, shift in series:
            if value is None:
                ax.text(0, i + shift, f"  {mode}: {verdict}" if both else f"  {verdict}", va="center", fontsize=8)
                continue
            ax.barh(i + shift, value, height=height, color=COLOUR.get(status, "#9e9e9e"),
                    alpha=1.0 if mode == "latency mode" else 0.6)  # fmt: skip
            ax.text(value + top * 0.01, i + shift, f"{value:.1f} img/s  {verdict}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.45 if top else 1)
    ax.set_xlabel("images/s (more is better)" + ("; solid: latency mode, light: throughput mode" if both else ""))
    ax.set_title(title, fontsize=10, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def latency_chart(rows: list[dict], title: str) -> str:
    """Each row's latency per batch: a line from min to max, a dot at p50 and a tick at p99; on a
    log axis when the rows differ by more than 20x (one slow row would flatten the rest)."""
    plt = _pyplot()
    timed = [r for r in rows if (r.get("latency_ms") or {}).get("p50") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(timed), 1) + 1.2))
    for i, row in enumerate(timed):
        lat = row["latency_ms"]
        ax.plot([lat.get("min", lat["p50"]), lat.get("max", lat["p99"])], [i, i], color="#bdbdbd", linewidth=1)
        ax.plot([lat["p50"]], [i], "o", color=P50)
        ax.plot([lat["p99"]], [i], "|", color=P99, markersize=14, markeredgewidth=2)
        ax.text(lat.get("max", lat["p99"]), i, f"  p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms", va="center",
                fontsize=8)  # fmt: skip
    ax.set_yticks(range(len(timed)), [row_label(r) for r in timed])
    ax.invert_yaxis()
    lows = [r["latency_ms"].get("min", r["latency_ms"]["p50"]) for r in timed]
    highs = [r["latency_ms"].get("max", r["latency_ms"]["p99"]) for r in timed]
    if lows and min(lows) > 0 and max(highs) / min(lows) > 20:
        ax.set_xscale("log")
        ax.set_xlim(min(lows) / 1.5, max(highs) * 8)
        scale = "log scale"
    else:
        ax.set_xlim(0, max(highs, default=1.0) * 1.6)
        scale = "linear"
    ax.set_xlabel(f"milliseconds per batch, {scale} (less is better): dot p50, bar p99, grey min to max")
    ax.set_title(title, fontsize=10, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)
