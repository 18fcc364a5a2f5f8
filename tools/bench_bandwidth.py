#!/usr/bin/env python
"""AP against bytes per frame: every fusion method, each swept along its bandwidth knob.

    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out work_dirs/bandwidth
    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out work_dirs/bandwidth \\
        --methods none,max,where2comm --checkpoints work_dirs/trained --frames 20
    python tools/bench_bandwidth.py --config configs/quickstart.yaml --out /tmp/bw --steps 2 \\
        --frames 2 --set dataset.root=/tmp/bench_syn                      # smoke run

A method is a fusion type or a name in :data:`METHOD_MODELS` (``query``: the query head ego only;
``quest``: its query streams), whose config gives the model's head and fusion. For each method: the
model is the first ``DIR/<method>/last.pt`` of the ``--checkpoints DIR`` folders (repeatable),
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

Loss (``--packet-loss 0,0.3,0.6,0.9``): each method is scored at its operating point with the
channel losing, at each rate, each query packet on its own (``channel.packet_loss``, the
methods in :data:`PACKET_LOSS_METHODS`) or whole messages (``channel.loss``, the map methods);
the row's knob names the key that applied. Rows go to ``OUT/loss.csv`` (resumable as above),
``OUT/loss.md`` and ``OUT/ap_vs_loss.png`` (tools/bench_bandwidth_report.py writes the reports).

A method whose fusion type is not registered is skipped with a warning. The model architecture
comes from the checkpoint's config; dataset, pipeline, channel and evaluation settings come from
``--config`` and ``--set``, so every method is scored on the same frames and link.
"""
from __future__ import annotations

import argparse
import copy
import csv
import functools
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from v2xfuse.utils.scripts import load_script

log = logging.getLogger("bench_bandwidth")

__all__ = ["SweepPoint", "SWEEPS", "METHOD_MODELS", "PACKET_LOSS_METHODS", "COLUMNS", "main",
           "run", "evaluate_detector", "fusion_type", "loss_points"]

REPO = Path(__file__).resolve().parents[1]


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
    # The stream's size: the senders' queries scoring at least the threshold (a query is about
    # 480 bytes, configs/experimental/quest.yaml), so fewer, smaller messages as it rises.
    "quest": _values("score_threshold", "model.fusion.score_threshold", (0.05, 0.2, 0.7)),
    "query": SINGLE,
}

DEFAULT_METHODS = "none,early,late,max,attfuse,where2comm,codefilling,query,quest"

#: bench method -> the config its model comes from, for the methods that are not just a fusion
#: type on the bench config's detector: their ``model.head``, ``model.fusion`` and
#: ``model.sender_frame`` replace the bench config's (encoder, backbone and data stay the
#: bench's, so every method is trained on the same features). ``query`` is the query head with
#: no cooperation (fusion ``none``): QUEST's ego-only baseline.
METHOD_MODELS: dict[str, Path] = {
    "query": REPO / "configs" / "experimental" / "query.yaml",
    "quest": REPO / "configs" / "experimental" / "quest.yaml",
    "acco": REPO / "configs" / "experimental" / "acco.yaml",
}
METHOD_MODEL_KEYS = ("head", "fusion", "sender_frame")

#: methods whose messages are split into packets (one per query): ``--packet-loss`` drops
#: their packets independently (``channel.packet_loss``); every other method loses whole
#: messages at the same rate (``channel.loss``).
PACKET_LOSS_METHODS = frozenset({"quest"})

COLUMNS = ["method", "knob", "value", "bytes_per_frame", "bytes_per_frame_p95", "log2_bytes",
           "ap_30", "ap_50", "ap_70", "latency_ms_median", "frames", "dataset", "split",
           "sort_mode", "iou_type", "eval_range", "checkpoint_step"]
ATTACK_COLUMNS = COLUMNS + ["rejected_messages"]


@functools.lru_cache(maxsize=None)
def _method_model(method: str) -> dict:
    from v2xfuse.config import load_config

    path = METHOD_MODELS[method]
    model = load_config(path).get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fusion"), dict):
        raise SystemExit(f"{path}: METHOD_MODELS[{method!r}] needs a model.fusion section")
    return model


def fusion_type(method: str) -> str:
    """The fusion type a bench method runs (``query`` -> ``none``; a fusion type -> itself)."""
    if method in METHOD_MODELS:
        return _method_model(method)["fusion"].get("type", "none")
    return method


def loss_points(method: str, rates: list[float]) -> list[SweepPoint]:
    """One point per loss rate, the knob naming the channel key that applies it; a method
    that sends nothing gets its single point (no loss can touch it)."""
    if fusion_type(method) == "none":
        return SINGLE
    key = "channel.packet_loss" if method in PACKET_LOSS_METHODS else "channel.loss"
    return [SweepPoint(key, f"{p:g}", (f"{key}={p}",)) for p in rates]


def _rates(text: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--packet-loss: expected comma-separated rates, got {text!r}") from None
    bad = [p for p in rates if not 0.0 <= p <= 1.0]
    if not rates or bad:
        raise SystemExit(f"--packet-loss: rates must lie in [0, 1], got {text!r}")
    return sorted(set(rates))


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
    """``cfg`` set up to train ``method``: its fusion section kept when it already names the
    method's fusion (and head), else replaced (by the :data:`METHOD_MODELS` config's sections
    for the methods listed there)."""
    out = copy.deepcopy(cfg)
    model = out["model"]
    if method not in METHOD_MODELS:
        if model.get("fusion", {}).get("type") != method:
            model["fusion"] = {"type": method}
        return out
    own = _method_model(method)
    if (model.get("fusion", {}).get("type") == own["fusion"].get("type")
            and model.get("head", {}).get("type") == own.get("head", {}).get("type")):
        return out
    for key in METHOD_MODEL_KEYS:
        if key in own:
            model[key] = copy.deepcopy(own[key])
        else:
            model.pop(key, None)
    return out


def obtain_checkpoint(cfg: dict, method: str, out_dir: Path,
                      checkpoints: Path | list[Path] | None, steps: int | None,
                      val_frames: int | None, device: str, progress: bool) -> Path:
    """The method's ``last.pt``: the first ``<folder>/<method>/last.pt`` of ``checkpoints``
    (one folder or several, searched in order), or trained into OUT/ckpt/<method>."""
    from v2xfuse.engine.trainer import Trainer, load_checkpoint

    folders = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints or [])
    for folder in folders:
        if (Path(folder) / method / "last.pt").is_file():
            return Path(folder) / method / "last.pt"
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


def _attack_list(text: str | None) -> list[str]:
    from v2xfuse.comm.attack import ATTACKS

    if not text:
        return []
    names = list(ATTACKS) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"--attacks: unknown {unknown}; known: {', '.join(ATTACKS)} or all")
    return names



def _points(method: str, attacks: list[str], fraction: float,
            rates: list[float]) -> list[SweepPoint]:
    """The points ``method`` is scored at in this run's mode."""
    if attacks:  # an ego alone receives nothing to attack
        points = attack_points(attacks, fraction)
        return points[:1] if fusion_type(method) == "none" else points
    if rates:
        return loss_points(method, rates)
    if method not in SWEEPS:
        log.warning("%s: no sweep in SWEEPS, evaluating its single operating point", method)
    return SWEEPS.get(method, SINGLE)


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
    rates = _rates(args.packet_loss) if args.packet_loss else []
    if attacks and rates:
        raise SystemExit("--attacks and --packet-loss are separate runs: give one of them")
    csv_path, columns = ((out_dir / "attacks.csv", ATTACK_COLUMNS) if attacks else
                         (out_dir / "loss.csv", COLUMNS) if rates else
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
        if fusion_type(method) not in FUSION:
            log.warning("%s: no fusion method of that type is registered (known: %s, and %s); "
                        "skipped", method, ", ".join(FUSION.names()), ", ".join(METHOD_MODELS))
            continue
        points = _points(method, attacks, args.attack_fraction, rates)
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
            history = max(history_frames_needed({"fusion": {"type": fusion_type(m)}})
                          for m in methods if fusion_type(m) in FUSION)
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
    report = load_script(Path(__file__).with_name("bench_bandwidth_report.py"))
    if attacks:
        report.write_attack_markdown(rows, out_dir / "attacks.md", args.attack_fraction)
        print(f"wrote {csv_path} and {out_dir / 'attacks.md'}")
        return 0
    if rates:
        report.write_loss_markdown(rows, out_dir / "loss.md")
        report.plot_ap_vs_loss(rows, out_dir / "ap_vs_loss.png")
        print(f"wrote {csv_path}, {out_dir / 'loss.md'} and {out_dir / 'ap_vs_loss.png'}")
        return 0
    report.write_markdown(rows, out_dir / "results.md")
    report.plot_ap_vs_bytes(rows, out_dir / "ap_vs_bytes.png")
    print(f"wrote {csv_path}, {out_dir / 'results.md'} and {out_dir / 'ap_vs_bytes.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (dataset, channel, eval)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods: fusion types, or names in METHOD_MODELS "
                        "(query, quest)")
    p.add_argument("--out", required=True, help="output folder (results.csv, plots, ckpt/)")
    p.add_argument("--checkpoints", type=Path, action="append", default=[],
                   help="folder with <method>/last.pt trained models to use instead of "
                        "training (repeatable: the folders are searched in order)")
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
    p.add_argument("--packet-loss", default=None, metavar="RATES",
                   help="comma-separated loss rates (e.g. 0,0.3,0.6,0.9): score each method at "
                        "its operating point under each (per query packet for "
                        f"{', '.join(sorted(PACKET_LOSS_METHODS))}, per message for the others) "
                        "instead of sweeping its bandwidth (OUT/loss.csv, loss.md, "
                        "ap_vs_loss.png)")
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
