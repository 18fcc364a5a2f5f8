#!/usr/bin/env python
"""AP@0.5 and AP@0.7 against the collaborators' expected delay, every method trained once.

    python tools/bench_delay.py --config configs/quickstart.yaml --out work_dirs/delay \\
        --checkpoints work_dirs/trained --frames 60
    python tools/bench_delay.py --config configs/quickstart.yaml --out /tmp/delay --steps 2 \\
        --frames 2 --delays 0,100 --set dataset.root=/tmp/bench_syn            # smoke run

The asynchrony protocol of the CoBEVFlow and CoDynTrust evaluations (``--protocol binomial``,
the default): each collaborator's latest observation is ``Binomial(n, p)`` frames old
(``--binomial-n``, 10), ``p = delay / (n * frame period)``, so the expected delay is the
point's; the ego's own observation is current. The draws are the dataset pipeline's
(``pipeline.delay_mode``: seeded per frame, the same for every method). ``--protocol fixed``
makes every collaborator exactly ``delay`` late (a multiple of the frame period),
``--protocol uniform`` draws ``U{0..2 delay}`` frames (mean ``delay``). Where a sequence starts
later than a draw, its first frame is served: the realised mean delay, measured on the frames
scored, is written beside the expected one (short sequences pull it down).

The protocol serves "the latest observation available", so consecutive frames may both be
given the same old observation of a collaborator; the receiver's replay check would refuse it
the second time (``channel.checks.duplicate_window``). The bench turns that one check off
(``duplicate_window: 0``) at every point; every other receive check applies as configured.

For each method: the model is ``--checkpoints DIR/<method>/last.pt`` when that file exists,
otherwise it is trained once with ``--method-config METHOD=CONFIG`` (default: ``--config`` with
``model.fusion.type`` set to the method) and the config's budget (``--steps`` overrides it) into
``OUT/ckpt/<method>``, as tools/bench_bandwidth.py does (an interrupted training continues).
Training never sees a delay unless the method's config asks for one. Each (method, delay) is
scored on the same validation frames, every message through the config's simulated channel,
and appended to ``OUT/delay.csv`` as soon as it is done; points already there are not scored
again, so a killed run continues where it stopped. At the end ``OUT/ap_vs_delay.png`` (AP@0.5
and AP@0.7 against the expected delay) and ``OUT/delay.md`` (the table for the README) are
rewritten from all rows.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from pathlib import Path

from v2xfuse.utils.scripts import load_script

log = logging.getLogger("bench_delay")

__all__ = ["COLUMNS", "DEFAULT_METHODS", "delay_overrides", "main", "run"]

DEFAULT_METHODS = "none,late,late_tc,max,where2comm,codefilling,codyntrust"
PROTOCOLS = ("binomial", "fixed", "uniform")
COLUMNS = ["method", "protocol", "delay_ms", "realised_delay_ms", "ap_30", "ap_50", "ap_70",
           "bytes_per_frame", "frames", "dataset", "split", "sort_mode", "iou_type",
           "eval_range", "checkpoint_step", "rejected_messages"]


def delay_overrides(protocol: str, delay_ms: float, period_ms: float, n: int = 10
                    ) -> list[str]:
    """``pipeline.*`` overrides that make collaborators ``delay_ms`` late on average."""
    if protocol not in PROTOCOLS:
        raise SystemExit(f"--protocol: one of {PROTOCOLS}, got {protocol!r}")
    if delay_ms < 0:
        raise SystemExit(f"--delays: {delay_ms} ms is negative")
    frames = delay_ms / period_ms
    if delay_ms == 0:
        return ["pipeline.delay_frames=0", "pipeline.delay_mode=fixed", "pipeline.delay_p=0.0"]
    if protocol == "binomial":
        p = frames / n
        if p > 1:
            raise SystemExit(f"--delays: {delay_ms} ms needs p = {p:.3g} > 1 with n = {n} frames "
                             f"of {period_ms:g} ms; raise --binomial-n")
        return [f"pipeline.delay_frames={n}", "pipeline.delay_mode=binomial",
                f"pipeline.delay_p={p!r}"]
    span = frames if protocol == "fixed" else 2 * frames
    if abs(span - round(span)) > 1e-6:
        raise SystemExit(f"--delays: {delay_ms} ms is not reachable with {protocol} delays in "
                         f"whole frames of {period_ms:g} ms")
    return [f"pipeline.delay_frames={int(round(span))}", f"pipeline.delay_mode={protocol}",
            "pipeline.delay_p=0.0"]


def _realised_ms(dataset, count: int) -> float:
    """Mean age of the collaborators' observations (ms) over the first ``count`` samples."""
    ages = [float(d) for i in range(min(count, len(dataset)))
            for d in dataset[i].delay_us[1:]]
    return sum(ages) / len(ages) / 1e3 if ages else float("nan")


def _row(method: str, protocol: str, delay_ms: float, realised: float, summary: dict,
         iou_type: str, step: int) -> dict:
    def num(x, fmt):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    refused = summary.get("rejected_messages") or {}
    return {"method": method, "protocol": protocol, "delay_ms": format(delay_ms, "g"),
            "realised_delay_ms": num(realised, ".1f"),
            "ap_30": num(summary["ap_30"], ".4f"), "ap_50": num(summary["ap_50"], ".4f"),
            "ap_70": num(summary["ap_70"], ".4f"),
            "bytes_per_frame": num(summary["bytes_per_frame"], ".1f"),
            "frames": summary["frames"], "dataset": summary["dataset"], "split": summary["split"],
            "sort_mode": summary["sort_mode"], "iou_type": iou_type,
            "eval_range": " ".join(f"{v:g}" for v in summary["range"]) if summary["range"] else "",
            "checkpoint_step": step,
            "rejected_messages": " ".join(f"{k}:{v}" for k, v in refused.items())}


def _method_configs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        method, sep, path = pair.partition("=")
        if not sep or not method or not path:
            raise SystemExit(f"--method-config: expected METHOD=CONFIG, got {pair!r}")
        out[method.strip()] = path.strip()
    return out


def run(args) -> int:
    from v2xfuse import fusion  # noqa: F401  (registers the fusion methods)
    from v2xfuse.builder import build_dataset, history_frames_needed
    from v2xfuse.config import apply_overrides, load_config
    from v2xfuse.engine.checkpoint import detector_from_state
    from v2xfuse.engine.trainer import load_checkpoint
    from v2xfuse.registry import FUSION

    bw = load_script(Path(__file__).with_name("bench_bandwidth.py"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "delay.csv"
    cfg = load_config(args.config, args.overrides)
    if (cfg.get("eval") or {}).get("mode", "opencood") != "opencood":
        raise SystemExit("bench_delay tabulates OpenCOOD AP@0.5/0.7: --set eval.mode=opencood")
    lidar_range = cfg.get("pipeline", {}).get("lidar_range")
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in FUSION]
    for m in unknown:
        log.warning("%s: no fusion method of that type is registered (known: %s); skipped",
                    m, ", ".join(FUSION.names()))
    methods = [m for m in methods if m not in unknown]
    own_configs = _method_configs(args.method_config)
    done = {(r["method"], r["protocol"], float(r["delay_ms"]))
            for r in bw.read_rows(csv_path, COLUMNS)}
    history = max([history_frames_needed({"fusion": {"type": m}}) for m in methods] or [0])
    states: dict[str, dict | None] = {}
    period_ms: float | None = None

    def state_of(method: str) -> dict | None:
        if method not in states:
            train_cfg = load_config(own_configs[method], args.overrides) \
                if method in own_configs else cfg
            ckpt = bw.obtain_checkpoint(train_cfg, method, out_dir, args.checkpoints, args.steps,
                                        args.frames, args.device, not args.quiet)
            state = load_checkpoint(ckpt, args.device)
            trained = state["config"].get("pipeline", {}).get("lidar_range")
            if trained != lidar_range:
                log.warning("%s: %s was trained on lidar_range %s, the bench uses %s; skipped",
                            method, ckpt, trained, lidar_range)
                state = None
            states[method] = state
        return states[method]

    for delay in delays:
        todo = [m for m in methods if (m, args.protocol, delay) not in done]
        if not todo:
            continue
        dataset = None
        for method in todo:
            state = state_of(method)
            if state is None:
                continue
            if dataset is None:  # one dataset per delay, shared by every method
                if period_ms is None:  # the dataset's own frame period, not a constant
                    period_ms = build_dataset(cfg, "val", train=False).adapter.frame_period_us / 1e3
                over = delay_overrides(args.protocol, delay, period_ms, args.binomial_n)
                delay_cfg = apply_overrides(cfg, over + ["channel.checks.duplicate_window=0"])
                dataset = build_dataset(delay_cfg, "val", train=False,
                                        **({"history_frames": history} if history else {}))
                count = min(args.frames or len(dataset), len(dataset))
                if count <= args.cache_frames:
                    dataset = bw.LoadedFrames(dataset, count)
                realised = _realised_ms(dataset, count) if isinstance(dataset, bw.LoadedFrames) \
                    else float("nan")
                log.info("delay %g ms (%s): realised %.1f ms over %d frames", delay,
                         args.protocol, realised, count)
            point_cfg = copy.deepcopy(delay_cfg)
            point_cfg["model"] = copy.deepcopy(state["config"]["model"])
            model = detector_from_state(state, point_cfg, args.device)
            _, summary = bw.evaluate_detector(model, dataset, point_cfg, device=args.device,
                                              max_frames=args.frames or None, split="val")
            iou_type = (point_cfg.get("eval") or {}).get("iou_type", "bev")
            bw.append_row(csv_path, _row(method, args.protocol, delay, realised, summary,
                                         iou_type, int(state.get("step", -1))))
            done.add((method, args.protocol, delay))
    rows = [r for r in bw.read_rows(csv_path, COLUMNS) if r["protocol"] == args.protocol]
    if not rows:
        log.warning("no results to plot")
        return 1
    write_markdown(rows, out_dir / "delay.md")
    plot_ap_vs_delay(rows, out_dir / "ap_vs_delay.png")
    print(f"wrote {csv_path}, {out_dir / 'delay.md'} and {out_dir / 'ap_vs_delay.png'}")
    return 0


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    for mine in out.values():
        mine.sort(key=lambda r: float(r["delay_ms"]))
    return out


def write_markdown(rows: list[dict], path: Path) -> None:
    """Methods as rows, expected delays as columns, ``AP@0.5 / AP@0.7`` per cell; the realised
    mean delays and the protocol in notes below."""
    delays = sorted({float(r["delay_ms"]) for r in rows})
    cell = {(r["method"], float(r["delay_ms"])): r for r in rows}
    lines = ["| method | " + " | ".join(f"{d:g} ms" for d in delays) + " | KB/frame |",
             "|" + "---|" * (len(delays) + 2)]
    for method, mine in _by_method(rows).items():
        vals = [f"{cell[method, d]['ap_50']} / {cell[method, d]['ap_70']}"
                if (method, d) in cell else "-" for d in delays]
        kb = float(mine[0]["bytes_per_frame"] or 0) / 1000
        lines.append(f"| {method} | " + " | ".join(vals) + f" | {kb:.1f} |")
    realised = {float(r["delay_ms"]): r["realised_delay_ms"] for r in rows}
    first = rows[0]
    lines += ["", "AP@0.5 / AP@0.7 against the collaborators' expected delay "
              f"({first['protocol']} protocol); realised mean delay on the frames scored: "
              + ", ".join(f"{d:g} ms -> {realised[d] or '?'} ms" for d in delays) + ". "
              "KB/frame: at the smallest delay (all collaborators' messages, 1 KB = 1000 bytes).",
              "", f"{first['dataset']} {first['split']} split, {first['frames']} frames, "
              f"OpenCOOD AP ({first['sort_mode']} sort, {first['iou_type'].upper()} IoU, range "
              f"{first['eval_range']})."]
    path.write_text("\n".join(lines) + "\n")


def plot_ap_vs_delay(rows: list[dict], path: Path) -> None:
    """AP@0.5 (left) and AP@0.7 (right) against the expected delay, a line per method, ego
    only dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in zip(axes, ("ap_50", "ap_70"), ("AP@0.5", "AP@0.7")):
        top = 0.0
        for k, (method, mine) in enumerate(_by_method(rows).items()):
            pts = [(float(r["delay_ms"]), float(r[key])) for r in mine if r[key] not in ("", None)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = dict(color="0.3", linestyle="--", marker="") if method == "none" else \
                dict(color=colours[k % len(colours)], linestyle="-", marker="o", markersize=4)
            ax.plot(xs, ys, label="ego only" if method == "none" else method, **style)
            top = max(top, *ys)
        ax.set_xlabel("expected delay of the collaborators (ms)")
        ax.set_ylabel(f"{label} ({rows[0]['iou_type'].upper()} IoU)")
        ax.set_ylim(-0.02, min(1.02, max(0.1, 1.15 * top)))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    first = rows[0]
    fig.suptitle(f"AP against delay ({first['protocol']}) \u2014 {first['dataset']} "
                 f"{first['split']} ({first['frames']} frames, {first['sort_mode']} sort)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (dataset, channel, eval)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated fusion methods")
    p.add_argument("--out", required=True, help="output folder (delay.csv, plot, table, ckpt/)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="folder with <method>/last.pt trained models to use instead of training")
    p.add_argument("--method-config", action="append", default=[], metavar="METHOD=CONFIG",
                   help="the config a method is trained with when it has no checkpoint "
                        "(repeatable; default: --config with that fusion type)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps when a model is trained here (default: train.steps)")
    p.add_argument("--delays", default="0,100,200,300,400,500",
                   help="expected delays of the collaborators, ms")
    p.add_argument("--protocol", default="binomial", choices=PROTOCOLS)
    p.add_argument("--binomial-n", type=int, default=10, help="n of the binomial protocol")
    p.add_argument("--frames", type=int, default=0,
                   help="validation frames per point (default: the whole split)")
    p.add_argument("--cache-frames", type=int, default=200,
                   help="keep the evaluated frames in memory when there are at most this many")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: this torch has no usable CUDA device", file=sys.stderr)
            return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
