"""The reports of tools/bench_bandwidth.py: markdown tables and plots written from its CSV rows.

Every function takes the rows as read back from the CSV (dicts of strings), so a report can be
rewritten from a finished or partial run without evaluating anything:
``results.md`` and ``ap_vs_bytes.png`` (bandwidth sweep), ``attacks.md`` (robustness) and
``loss.md`` and ``ap_vs_loss.png`` (AP@0.5 against the channel's loss rate).
"""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["write_markdown", "write_attack_markdown", "plot_ap_vs_bytes", "write_loss_markdown",
           "plot_ap_vs_loss", "LOSS_KINDS"]

#: the channel key a loss row varies -> how the report names it.
LOSS_KINDS = {"channel.packet_loss": "per packet (each query on its own)",
              "channel.loss": "per message (whole message)",
              "-": "nothing sent"}


def _float(text: str) -> float:
    return float(text) if text not in ("", None) else float("nan")


def write_markdown(rows: list[dict], path: Path) -> None:
    """A markdown table of every row (KB = 1000 bytes), with the protocol in a note below."""
    head = ("| method | knob | value | KB/frame | p95 KB/frame | log2 bytes | AP@0.3 | AP@0.5 "
            "| AP@0.7 | latency ms |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        kb, p95 = _float(r["bytes_per_frame"]) / 1000, _float(r["bytes_per_frame_p95"]) / 1000
        lines.append(f"| {r['method']} | {r['knob']} | {r['value']} | {kb:.2f} | {p95:.2f} | "
                     f"{r['log2_bytes'] or '-'} | {r['ap_30']} | {r['ap_50']} | {r['ap_70']} | "
                     f"{r['latency_ms_median']} |")
    first = rows[0]
    lines.append("")
    lines.append(f"{first['dataset']} {first['split']} split, {first['frames']} frames, "
                 f"OpenCOOD AP ({first['sort_mode']} sort, {first['iou_type'].upper()} IoU, range "
                 f"{first['eval_range']}); bytes are the serialised messages of all "
                 f"collaborators per frame.")
    path.write_text("\n".join(lines) + "\n")


def write_attack_markdown(rows: list[dict], path: Path, fraction: float) -> None:
    """AP@0.5 per method (rows) clean, ego-only and under each attack (columns), then the
    messages each attack had refused, by reason."""
    ego = next((r["ap_50"] for r in rows if r["method"] == "none"), "-")
    attacks = list(dict.fromkeys(r["value"] for r in rows if r["value"] != "clean"))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    cell = {(r["method"], r["value"]): r for r in rows}
    lines = ["| method | ego only | clean | " + " | ".join(attacks) + " |",
             "|" + "---|" * (3 + len(attacks))]
    for m in methods:
        vals = [cell[(m, a)]["ap_50"] if (m, a) in cell else "-" for a in ["clean", *attacks]]
        lines.append(f"| {m} | {ego} | " + " | ".join(vals) + " |")
    lines += ["", f"AP@0.5 with the channel playing each attack on {fraction:.3g} of the "
              "senders (each sender in each frame hostile with that probability).", "",
              "| method | attack | rejected messages (reason:count) |", "|---|---|---|"]
    for r in rows:
        if r.get("rejected_messages"):
            lines.append(f"| {r['method']} | {r['value']} | {r['rejected_messages']} |")
    first = rows[0]
    lines += ["", f"{first['dataset']} {first['split']} split, {first['frames']} frames, "
              f"OpenCOOD AP ({first['sort_mode']} sort, {first['iou_type'].upper()} IoU)."]
    path.write_text("\n".join(lines) + "\n")


def plot_ap_vs_bytes(rows: list[dict], path: Path) -> None:
    """AP@0.5 against mean bytes per frame (log x): a line per method and knob, ego-only as a
    dashed horizontal line, single-point methods as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-o", "--s", ":^", "-.D"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    plotted_any, top = False, 0.0
    for m_index, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        colour = colours[m_index % len(colours)]
        if method == "none":
            ego_ap = _float(mine[0]["ap_50"])
            ax.axhline(ego_ap, color="0.3", linestyle="--", linewidth=1.2,
                       label="ego only (no messages)")
            top = max(top, 0.0 if math.isnan(ego_ap) else ego_ap)
            continue
        knobs = list(dict.fromkeys(r["knob"] for r in mine))
        for k_index, knob in enumerate(knobs):
            pts = sorted((_float(r["bytes_per_frame"]), _float(r["ap_50"]))
                         for r in mine if r["knob"] == knob)
            pts = [(b, ap) for b, ap in pts if b > 0 and not math.isnan(ap)]  # log axis
            if not pts:
                continue
            xs, ys = zip(*pts)
            label = method if knob == "-" and len(knobs) == 1 else f"{method} ({knob})"
            if len(pts) == 1:
                ax.plot(xs, ys, marker="*" if method == "early" else "o", markersize=12,
                        linestyle="none", color=colour, label=label)
            else:
                ax.plot(xs, ys, styles[k_index % len(styles)], color=colour, label=label,
                        markersize=5)
            if knob == "codec":  # categorical values: name each point
                for r in mine:
                    if r["knob"] == knob and _float(r["bytes_per_frame"]) > 0:
                        ax.annotate(r["value"], (_float(r["bytes_per_frame"]), _float(r["ap_50"])),
                                    textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=colour)
            top = max(top, *ys)
            plotted_any = True
    if plotted_any:
        ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, min(1.02, max(0.1, 1.15 * top)))
    ax.set_xlabel("communication volume: mean bytes per frame, all collaborators "
                  "(log\u2082 scale)")
    ax.set_ylabel(f"AP@0.5 ({rows[0]['iou_type'].upper()} IoU)")
    first = rows[0]
    ax.set_title(f"AP@0.5 vs bytes per frame \u2014 {first['dataset']} {first['split']} "
                 f"({first['frames']} frames, {first['sort_mode']} sort)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_loss_markdown(rows: list[dict], path: Path) -> None:
    """AP@0.5 per method (rows) at each loss rate (columns), with the kind of loss that applied
    and the bytes sent per frame without loss; the protocol in a note below."""
    rates = sorted({float(r["value"]) for r in rows if r["knob"] != "-"})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], float(r["value"]) if r["knob"] != "-" else None): r for r in rows}
    lines = ["| method | loss applied | KB/frame sent | "
             + " | ".join(f"AP@0.5 at {p:g}" for p in rates) + " |",
             "|" + "---|" * (3 + len(rates))]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        knob = mine[0]["knob"]
        if knob == "-":  # nothing sent: the same AP whatever the link drops
            vals = [mine[0]["ap_50"]] * len(rates)
        else:
            vals = [cell[(m, p)]["ap_50"] if (m, p) in cell else "-" for p in rates]
        kb = _float(mine[0]["bytes_per_frame"]) / 1000
        kind = LOSS_KINDS.get(knob, knob) + ("" if knob == "-" else f" (`{knob}`)")
        lines.append(f"| {m} | {kind} | {kb:.2f} | " + " | ".join(vals) + " |")
    first = rows[0]
    lines += ["", "Each rate is the probability that the channel loses a unit of what a "
              "collaborator sends: a whole message for the map methods (`channel.loss`), each "
              "query packet independently for query streams (`channel.packet_loss`). KB/frame "
              "is what was put on the link (lost bytes count too).", "",
              f"{first['dataset']} {first['split']} split, {first['frames']} frames, "
              f"OpenCOOD AP ({first['sort_mode']} sort, {first['iou_type'].upper()} IoU, range "
              f"{first['eval_range']})."]
    path.write_text("\n".join(lines) + "\n")


def plot_ap_vs_loss(rows: list[dict], path: Path) -> None:
    """AP@0.5 against the loss rate: a line per method (its legend says which loss applied),
    the methods that send nothing as dashed horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        colour = colours[index % len(colours)]
        if mine[0]["knob"] == "-":
            ax.axhline(_float(mine[0]["ap_50"]), color=colour, linestyle="--", linewidth=1.2,
                       label=f"{method} (sends nothing)")
            continue
        pts = sorted((float(r["value"]), _float(r["ap_50"])) for r in mine)
        kind = "per query" if mine[0]["knob"] == "channel.packet_loss" else "per message"
        ax.plot(*zip(*pts), "-o", color=colour, markersize=5, label=f"{method} ({kind} loss)")
    ax.set_xlabel("loss rate (probability that a message, or a query packet, is lost)")
    ax.set_ylabel(f"AP@0.5 ({rows[0]['iou_type'].upper()} IoU)")
    first = rows[0]
    ax.set_title(f"AP@0.5 vs loss \u2014 {first['dataset']} {first['split']} "
                 f"({first['frames']} frames)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
