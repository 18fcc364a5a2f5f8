#!/usr/bin/env python
"""AP against bytes per frame: every fusion method, each swept along its bandwidth knob.

    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out work_dirs/bandwidth
    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out work_dirs/bandwidth \\
        --methods none,max,where2comm --checkpoints work_dirs/trained --frames 20
    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out /tmp/bw --steps 2 \\
        --frames 2 --set dataset.root=/tmp/bench_syn                      # smoke run

For each method: the model is ``--checkpoints DIR/<method>/last.pt`` when that file exists,
otherwise it is trained with the config's ``train`` budget (``--steps`` overrides it) into
``OUT/ckpt/<method>`` (an interrupted training continues). Then each point of the method's row
in :data:`SWEEPS` is evaluated on the same validation frames, every message serialised through
the config's simulated channel, and appended to ``OUT/results.csv`` as soon as it is done.
Points already in that file are not evaluated again, so a killed run continues where it stopped.
At the end ``OUT/ap_vs_bytes.png`` (AP@0.5 against bytes per frame, log scale) and
``OUT/results.md`` (a markdown table) are rewritten from all rows.

Robustness (``--attacks nan,inf,...`` or ``--attacks all``): instead of its bandwidth sweep each
method is scored at its configured operating point clean and with the channel playing each
attack (``channel.attack``, see v2xfuse/comm/attack.py) on ``--attack-fraction`` of the
senders; ``scale`` is also scored with the receiver's clamping to the trained feature range
turned off (``scale_unclamped``), which measures that defence. Rows go to ``OUT/attacks.csv``
(with the rejected messages by reason) and ``OUT/attacks.md`` (AP@0.5 per method and attack)::

    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out work_dirs/bench \
        --checkpoints work_dirs/bench/ckpt --attacks all

A method whose fusion type is not registered is skipped with a warning. The model architecture
comes from the checkpoint's config; dataset, pipeline, channel and evaluation settings come from
``--config`` and ``--set``, so every method is scored on the same frames and link.
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench_bandwidth")

__all__ = ["SweepPoint", "SWEEPS", "COLUMNS", "main", "run", "evaluate_detector"]


@dataclass(frozen=True)
class SweepPoint:
    """One evaluation setting of a method's bandwidth knob.

    Attributes:
        knob: what is varied ("-" for methods with a single operating point).
        value: its value, as written in results.csv.
        overrides: ``key.path=value`` config overrides applied before the model is built.
        codecs: (payload name, codec name) pairs replacing the method's ``codecs`` entries.
    """

    knob: str
    value: str
    overrides: tuple[str, ...] = ()
    codecs: tuple[tuple[str, str], ...] = ()


SINGLE = [SweepPoint("-", "-")]


def _values(knob: str, key: str, values, extra: tuple[str, ...] = ()) -> list[SweepPoint]:
    return [SweepPoint(knob, str(v), (f"{key}={v}", *extra)) for v in values]


def _codec_precisions(payload: str = "features") -> list[SweepPoint]:
    return [SweepPoint("codec", c, codecs=((payload, c),)) for c in ("float32", "float16", "int8")]


#: method -> the points evaluated on its trained model. Adding a method is one entry.
SWEEPS: dict[str, list[SweepPoint]] = {
    "none": SINGLE,
    "early": SINGLE,
    # The detector's score threshold filters the senders' boxes (fewer boxes sent) and, as
    # deployed, the ego's own ones too.
    "late": _values("score_threshold", "model.post.score_threshold", (0.1, 0.2, 0.3, 0.5, 0.7)),
    "max": _codec_precisions(),
    "attfuse": _codec_precisions(),
    "where2comm": (_values("threshold", "model.fusion.threshold",
                           (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5), ("model.fusion.top_k=0",))
                   + _values("top_k", "model.fusion.top_k", (64, 256, 1024, 4096))),
    # The codebook size is learned with the model (another k is another model): only the
    # selection thresholds are swept at evaluation.
    # CoDynTrust sends its regions' features: their precision is its knob here (its delay
    # robustness is tools/bench_delay.py's).
    "codyntrust": _codec_precisions(),
    # ACCO fuses object queries: bench it with --config configs/experimental/acco.yaml (the
    # query head); its knob is the anchors sent per collaborator and fusion layer.
    "acco": _values("top_k", "model.fusion.top_k", (16, 32, 64)),
    "codefilling": (_values("fill_threshold", "model.fusion.fill_threshold",
                            (0.3, 0.5, 0.7, 1.0))
                    + _values("conf_threshold", "model.fusion.conf_threshold",
                              (0.01, 0.1, 0.3, 0.5))),
}

DEFAULT_METHODS = "none,early,late,max,attfuse,where2comm,codefilling"

COLUMNS = ["method", "knob", "value", "bytes_per_frame", "bytes_per_frame_p95", "log2_bytes",
           "ap_30", "ap_50", "ap_70", "latency_ms_median", "frames", "dataset", "split",
           "sort_mode", "iou_type", "eval_range", "checkpoint_step"]
ATTACK_COLUMNS = COLUMNS + ["rejected_messages"]


def attack_points(attacks: list[str], fraction: float, seed: int = 0) -> list[SweepPoint]:
    """The clean point, then one per attack on ``fraction`` of the senders; ``scale`` also
    without the receiver's clamping (methods without that knob skip it)."""
    points = [SweepPoint("attack", "clean")]
    for a in attacks:
        over = (f"channel.attack.type={a}", f"channel.attack.fraction={fraction}",
                f"channel.attack.seed={seed}")
        points.append(SweepPoint("attack", a, over))
        if a == "scale":
            points.append(SweepPoint("attack", "scale_unclamped",
                                     over + ("model.fusion.clamp_features=false",)))
    return points


def evaluate_detector(*args, **kwargs):
    """:func:`v2xfuse.engine.evaluate.evaluate_detector` (imported on first use; patchable)."""
    from v2xfuse.engine.evaluate import evaluate_detector as evaluate

    return evaluate(*args, **kwargs)


# --------------------------------------------------------------------------------- results.csv
def read_rows(path: Path, columns: list[str] = COLUMNS) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and list(reader.fieldnames) != columns:
            raise SystemExit(f"{path}: columns {reader.fieldnames} are not this tool's {columns}; "
                             f"move it away or pick another --out")
        return list(reader)


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def make_row(method: str, point: SweepPoint, summary: dict, iou_type: str, step: int) -> dict:
    def num(x, fmt):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    return {"method": method, "knob": point.knob, "value": point.value,
            "bytes_per_frame": num(summary["bytes_per_frame"], ".1f"),
            "bytes_per_frame_p95": num(summary["bytes_per_frame_p95"], ".1f"),
            "log2_bytes": num(summary["log2_bytes"], ".3f"),
            "ap_30": num(summary["ap_30"], ".4f"), "ap_50": num(summary["ap_50"], ".4f"),
            "ap_70": num(summary["ap_70"], ".4f"),
            "latency_ms_median": num(summary["latency_ms_median"], ".2f"),
            "frames": summary["frames"], "dataset": summary["dataset"], "split": summary["split"],
            "sort_mode": summary["sort_mode"], "iou_type": iou_type,
            "eval_range": " ".join(f"{v:g}" for v in summary["range"]) if summary["range"] else "",
            "checkpoint_step": step}


def make_attack_row(method: str, point: SweepPoint, summary: dict, iou_type: str,
                    step: int) -> dict:
    refused = summary.get("rejected_messages") or {}
    return {**make_row(method, point, summary, iou_type, step),
            "rejected_messages": " ".join(f"{k}:{v}" for k, v in refused.items())}


class LoadedFrames:
    """The first ``count`` samples of ``dataset``, read once and kept in memory, so that every
    point is scored on the same frames without reading them again."""

    def __init__(self, dataset, count: int):
        self.samples = [dataset[i] for i in range(min(count, len(dataset)))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


# ------------------------------------------------------------------------------------ models
def method_config(cfg: dict, method: str) -> dict:
    """``cfg`` with fusion method ``method`` (its fusion section kept when it already names it)."""
    out = copy.deepcopy(cfg)
    if out["model"].get("fusion", {}).get("type") != method:
        out["model"]["fusion"] = {"type": method}
    return out


def obtain_checkpoint(cfg: dict, method: str, out_dir: Path, checkpoints: Path | None,
                      steps: int | None, val_frames: int | None, device: str,
                      progress: bool) -> Path:
    """The method's ``last.pt``: given under ``checkpoints``, or trained into OUT/ckpt/<method>."""
    from v2xfuse.engine.trainer import Trainer, load_checkpoint

    if checkpoints is not None and (checkpoints / method / "last.pt").is_file():
        return checkpoints / method / "last.pt"
    train_cfg = method_config(cfg, method)
    train_cfg.setdefault("train", {})
    if steps:
        train_cfg["train"]["steps"] = steps
    if val_frames:
        train_cfg["train"]["val_frames"] = val_frames
    work = out_dir / "ckpt" / method
    ckpt = work / "last.pt"
    wanted = int(train_cfg["train"].get("steps", 1000))
    if ckpt.is_file() and int(load_checkpoint(ckpt)["step"]) >= wanted:
        return ckpt
    log.info("%s: training %d steps into %s", method, wanted, work)
    Trainer(train_cfg, work, device=device, tensorboard=False, progress=progress).fit(resume=True)
    return ckpt


def point_config(cfg: dict, model_cfg: dict, point: SweepPoint) -> dict:
    """The bench config with the checkpoint's model section and the point's overrides."""
    from v2xfuse.config import apply_overrides

    out = copy.deepcopy(cfg)
    out["model"] = copy.deepcopy(model_cfg)
    return apply_overrides(out, list(point.overrides))


def evaluate_point(method: str, point: SweepPoint, cfg: dict, state: dict, dataset,
                   device: str, frames: int | None) -> dict | None:
    """Build the model for ``point``, load the weights, score it; None (warned) if the method
    does not have the point's knob."""
    from v2xfuse.engine.checkpoint import detector_from_state

    point_cfg = point_config(cfg, state["config"]["model"], point)
    try:
        model = detector_from_state(state, point_cfg, device)
    except KeyError as exc:
        log.warning("%s %s=%s: skipped, the model does not take it (%s)", method, point.knob,
                    point.value, exc)
        return None
    if point.codecs:
        codecs = dict(model.fusion.codecs)
        missing = [name for name, _ in point.codecs if name not in codecs]
        if missing:
            log.warning("%s %s=%s: skipped, the method sends no payload %s", method, point.knob,
                        point.value, missing)
            return None
        model.fusion.codecs = {**codecs, **dict(point.codecs)}  # instance attribute only
    _, summary = evaluate_detector(model, dataset, point_cfg, device=device, max_frames=frames,
                                   split="val")
    iou_type = (point_cfg.get("eval") or {}).get("iou_type", "bev")
    row = make_attack_row if point.knob == "attack" else make_row
    return row(method, point, summary, iou_type, int(state.get("step", -1)))


def run(args) -> int:
    from tqdm import tqdm

    from v2xfuse import fusion  # noqa: F401  (registers the fusion methods)
    from v2xfuse.builder import build_dataset, history_frames_needed
    from v2xfuse.config import load_config
    from v2xfuse.engine.trainer import load_checkpoint
    from v2xfuse.registry import FUSION

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    attacks = _attack_list(args.attacks)
    csv_path, columns = ((out_dir / "attacks.csv", ATTACK_COLUMNS) if attacks else
                         (out_dir / "results.csv", COLUMNS))
    cfg = load_config(args.config, args.overrides)
    if (cfg.get("eval") or {}).get("mode", "opencood") != "opencood":
        raise SystemExit("bench_bandwidth tabulates OpenCOOD AP@0.3/0.5/0.7; this config scores "
                         "with eval.mode dair: --set eval.mode=opencood")
    lidar_range = cfg.get("pipeline", {}).get("lidar_range")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    done = {(r["method"], r["knob"], r["value"]) for r in read_rows(csv_path, columns)}
    dataset = None
    for method in methods:
        if method not in FUSION:
            log.warning("%s: no fusion method of that type is registered (known: %s); skipped",
                        method, ", ".join(FUSION.names()))
            continue
        if attacks:  # an ego alone receives nothing to attack
            points = attack_points(attacks, args.attack_fraction)
            points = points[:1] if method == "none" else points
        else:
            if method not in SWEEPS:
                log.warning("%s: no sweep in SWEEPS, evaluating its single operating point",
                            method)
            points = SWEEPS.get(method, SINGLE)
        todo = [p for p in points if (method, p.knob, p.value) not in done]
        if not todo:
            log.info("%s: every point already in %s", method, csv_path)
            continue
        ckpt = obtain_checkpoint(cfg, method, out_dir, args.checkpoints, args.steps,
                                 args.frames, args.device, not args.quiet)
        state = load_checkpoint(ckpt, args.device)
        trained_range = state["config"].get("pipeline", {}).get("lidar_range")
        if trained_range != lidar_range:
            log.warning("%s: %s was trained on lidar_range %s, the bench uses %s; skipped",
                        method, ckpt, trained_range, lidar_range)
            continue
        if dataset is None:  # one dataset for every method: the most history any needs
            history = max(history_frames_needed({"fusion": {"type": m}})
                          for m in methods if m in FUSION)
            dataset = build_dataset(cfg, "val", train=False,
                                    **({"history_frames": history} if history else {}))
            count = min(args.frames or len(dataset), len(dataset))
            if count <= args.cache_frames:
                dataset = LoadedFrames(dataset, count)
        for point in tqdm(todo, desc=method, unit="point", disable=args.quiet,
                          dynamic_ncols=True):
            row = evaluate_point(method, point, cfg, state, dataset, args.device,
                                 args.frames or None)
            if row is not None:
                append_row(csv_path, row)
                done.add((method, point.knob, point.value))
    rows = read_rows(csv_path, columns)
    if not rows:
        log.warning("no results to plot")
        return 1
    if attacks:
        write_attack_markdown(rows, out_dir / "attacks.md", args.attack_fraction)
        print(f"wrote {csv_path} and {out_dir / 'attacks.md'}")
        return 0
    write_markdown(rows, out_dir / "results.md")
    plot_ap_vs_bytes(rows, out_dir / "ap_vs_bytes.png")
    print(f"wrote {csv_path}, {out_dir / 'results.md'} and {out_dir / 'ap_vs_bytes.png'}")
    return 0


# ------------------------------------------------------------------------------------ report
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


def _attack_list(text: str | None) -> list[str]:
    from v2xfuse.comm.attack import ATTACKS

    if not text:
        return []
    names = list(ATTACKS) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"--attacks: unknown {unknown}; known: {', '.join(ATTACKS)} or all")
    return names


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (dataset, channel, eval)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated fusion methods")
    p.add_argument("--out", required=True, help="output folder (results.csv, plots, ckpt/)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="folder with <method>/last.pt trained models to use instead of training")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps when a model is trained here (default: train.steps)")
    p.add_argument("--frames", type=int, default=0,
                   help="validation frames per point (default: the whole split)")
    p.add_argument("--cache-frames", type=int, default=200,
                   help="keep the evaluated frames in memory when there are at most this many")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--attacks", default=None,
                   help="comma-separated channel attacks (or 'all'): score each method under "
                        "them instead of sweeping its bandwidth (OUT/attacks.csv, attacks.md)")
    p.add_argument("--attack-fraction", type=float, default=1 / 3,
                   help="probability that a sender is hostile in a frame (default 1/3)")
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
