"""Config sections -> objects: datasets (generating the synthetic one on first use) and the detector.

Classes keep plain keyword ``__init__``s; this module is the only place that reads config
dictionaries for them, so a typo in a config fails here, naming the key.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

from torch import nn

from .datasets import CoopSampler, DatasetError, Opv2vAdapter, PipelineConfig
from .models.detector import CoopDetector
from .models.encoders.fuser import MultiSensorEncoder, sensors_of
from .models.heads import Head
from .models.inputs import SENSORS
from .registry import BACKBONES, DATASETS, ENCODERS, FUSION, HEADS, SENSOR_FUSERS
from .structures.bev import BevGrid

log = logging.getLogger(__name__)

__all__ = ["build_adapter", "build_dataset", "build_detector", "build_encoder", "build_head",
           "ensure_synthetic", "synthetic_target", "kwargs_for", "history_frames_needed"]


def _register_builtin() -> None:
    """Import the modules whose import registers encoders, fusion methods, heads and datasets."""
    from . import fusion  # noqa: F401  (fusion/__init__ imports every method)
    from .models import backbone, encoders, heads, sparse_backbone  # noqa: F401
    if "opv2v" not in DATASETS:
        DATASETS.register("opv2v")(Opv2vAdapter)


def kwargs_for(cls, section: dict, what: str, skip: tuple[str, ...] = ("type",)) -> dict:
    """``section`` minus ``skip`` keys, checked against ``cls.__init__``'s parameters."""
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out = {k: v for k, v in section.items() if k not in skip}
    unknown = [k for k in out if k not in params] if not accepts_any else []
    if unknown:
        known = [p for p in params if p not in ("self", "args", "kwargs")]
        raise KeyError(f"{what}: unknown keys {unknown} for {cls.__name__} (known: {known})")
    return out


# dataset.type -> (generator format, the dataset's folder inside the generated tree)
SYNTHETIC_FORMATS = {"opv2v": ("opv2v", None),
                     "dair_v2x_c": ("dair", "cooperative-vehicle-infrastructure"),
                     "v2x_seq_spd": ("v2xseq", "V2X-Seq-SPD")}


# What a dataset.synthetic section may say (sim: SimConfig overrides, v2xfuse/sim/config.py).
SYNTHETIC_KEYS = {"scenes", "frames", "seed", "cameras", "camera_scale", "splits", "sim"}


def synthetic_target(dataset_cfg: dict) -> tuple[str, Path]:
    """(generator format, folder the whole generated tree goes to) of a config's synthetic
    dataset. DAIR-V2X-C and V2X-Seq roots may name the dataset folder itself; the tree (that
    folder, the split file beside it, the manifest) is then generated into its parent."""
    kind = dataset_cfg["type"]
    if kind not in SYNTHETIC_FORMATS:
        raise KeyError(f"dataset.synthetic: the generator writes {sorted(SYNTHETIC_FORMATS)} "
                       f"datasets, not {kind!r}")
    fmt, folder = SYNTHETIC_FORMATS[kind]
    out = Path(dataset_cfg.get("generate_dir") or dataset_cfg["root"])
    if folder is not None and out.name == folder:
        out = out.parent
    return fmt, out


def ensure_synthetic(dataset_cfg: dict) -> None:
    """Make sure ``dataset.root`` holds data before an adapter reads it.

    With a ``dataset.synthetic`` section: reuse the dataset generated earlier for the same
    section, else generate it, but only into a missing or empty folder or one we generated
    (:class:`~v2xfuse.sim.ForeignDataError` otherwise, for instance when ``--set
    dataset.root=...`` points a synthetic config at a real dataset). Without one: a missing or
    empty root is a :class:`~v2xfuse.datasets.DatasetError` that says what to point it at.
    """
    spec = dataset_cfg.get("synthetic")
    if not spec:
        _check_real_root(dataset_cfg)
        return
    from .sim import SimConfig, ensure_dataset

    unknown = sorted(set(spec) - SYNTHETIC_KEYS)
    if unknown:
        raise KeyError(f"dataset.synthetic: unknown keys {unknown} (known: {sorted(SYNTHETIC_KEYS)})")
    fmt, out = synthetic_target(dataset_cfg)
    sim_cfg = SimConfig.from_dict(spec.get("sim"))
    sim_cfg.cameras = bool(spec.get("cameras", False))
    sim_cfg.scale_cameras(float(spec.get("camera_scale", 1.0)))
    _, what = ensure_dataset(fmt, out, int(spec["scenes"]), int(spec["frames"]),
                             int(spec.get("seed", 0)), sim_cfg, splits=spec.get("splits"),
                             progress=True)
    if what != "reused":
        log.info("%s the synthetic %s dataset in %s", what, fmt, out)
    split_file = dataset_cfg.get("split_file")
    if split_file and Path(split_file).resolve().parent != out.resolve():
        log.warning("dataset.split_file %s is not the split file generated in %s", split_file, out)


def _check_real_root(dataset_cfg: dict) -> None:
    root = dataset_cfg.get("root")
    if root is None:
        return
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        return
    what = "does not exist" if not root.exists() else \
        "is not a folder" if not root.is_dir() else "is empty"
    raise DatasetError(
        f"dataset not found: dataset.root {root} {what}. Point it at your copy of the "
        f"{dataset_cfg.get('type')} dataset (--set dataset.root=/path/to/it; the config's "
        f"comments show the expected layout). Configs without a dataset.synthetic section never "
        f"generate data; for generated data use configs/quickstart.yaml or "
        f"configs/quickstart_dair.yaml.")


def build_adapter(dataset_cfg: dict, split: str, **extra):
    """The dataset adapter for split ``split`` ("train", "val", "test": names mapped through
    ``dataset.splits`` to the dataset's own split names)."""
    _register_builtin()
    cls = DATASETS.get(dataset_cfg["type"])
    split_name = dataset_cfg.get("splits", {}).get(split, split)
    section = {k: v for k, v in dataset_cfg.items()
               if k not in ("type", "splits", "synthetic", "generate_dir")}
    section.update(extra)
    return cls(split=split_name, **kwargs_for(cls, section, f"dataset ({dataset_cfg['type']})"))


def history_frames_needed(model_cfg: dict | None) -> int:
    """How many earlier observations per agent the model's fusion method asks for (its
    contract's ``history_frames``; 0 without a model section)."""
    if not model_cfg:
        return 0
    _register_builtin()
    return FUSION.get((model_cfg.get("fusion") or {}).get("type", "none")).contract.history_frames


def build_dataset(cfg: dict, split: str, train: bool, seed: int = 0, **extra) -> CoopSampler:
    """A map-style dataset of :class:`~v2xfuse.datasets.Sample` for ``split``.

    With ``pipeline.cameras`` the adapter decodes images (``load_images``); without, it never
    does, so LiDAR-only training pays nothing for cameras. When the config's fusion method
    needs more history than ``dataset.history_frames`` (late_tc needs 1), the dataset serves
    that many: the method's contract says so, and it could not run without."""
    needed = history_frames_needed(cfg.get("model"))
    if needed > int(cfg["dataset"].get("history_frames", 0)):
        log.info("dataset.history_frames: %d, as model.fusion %s needs", needed,
                 cfg["model"]["fusion"]["type"])
        extra.setdefault("history_frames", needed)
    ensure_synthetic(cfg["dataset"])
    pipeline = PipelineConfig.from_dict(cfg.get("pipeline"))
    if pipeline.cameras is not None:
        extra.setdefault("load_images", True)
    adapter = build_adapter(cfg["dataset"], split, **extra)
    return CoopSampler(adapter, pipeline, train=train, seed=seed)


def build_encoder(model: dict, point_range):
    """The per-agent encoder of a ``model`` section.

    ``model.encoders: {lidar: {type: ...}, camera: {type: ...}}`` names one encoder per sensor
    (``SENSORS`` order; the first one's grid is the others', so a camera encoder without its
    own ``cell`` takes the LiDAR one's) and ``model.sensor_fuser`` (default ``{type: conv}``)
    fuses their maps. The older ``model.encoder: {type: ...}`` is the LiDAR encoder alone.
    With a single sensor and no ``sensor_fuser`` the encoder is returned as it is: no fuser
    layer, the parameter names and maps of a LiDAR-only model from before per-sensor encoders.
    """
    if model.get("encoder") is not None and model.get("encoders") is not None:
        raise KeyError("model: give either `encoder` (the LiDAR encoder) or `encoders` (one per "
                       "sensor), not both (set the other to null)")
    sections = dict(model.get("encoders") or {"lidar": model.get("encoder")})
    sections = {k: v for k, v in sections.items() if v is not None}
    unknown = set(sections) - set(SENSORS)
    if unknown or not sections:
        raise KeyError(f"model.encoders: sensors must be among {SENSORS}, got {sorted(sections)}")
    encoders, grid = {}, None
    for sensor in (s for s in SENSORS if s in sections):
        where = f"model.encoders.{sensor}" if model.get("encoders") else "model.encoder"
        section = dict(sections[sensor])
        cls = ENCODERS.get(section["type"])
        if getattr(cls, "sensor", None) != sensor:
            raise KeyError(f"{where}: {section['type']!r} encodes {getattr(cls, 'sensor', '?')}, "
                           f"not {sensor}")
        kwargs = kwargs_for(cls, section, where)
        if grid is not None and "cell" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("cell", grid.cell)
        encoders[sensor] = cls(point_range=point_range, **kwargs)
        grid = grid or encoders[sensor].grid
        if encoders[sensor].grid != grid:
            raise ValueError(f"{where}: grid {encoders[sensor].grid} differs from the first "
                             f"encoder's {grid}")
    if len(encoders) == 1 and model.get("sensor_fuser") is None:
        return next(iter(encoders.values()))
    fuser_cfg = dict(model.get("sensor_fuser") or {"type": "conv"})
    fuser_cls = SENSOR_FUSERS.get(fuser_cfg.get("type", "conv"))
    fuser = fuser_cls([e.out_channels for e in encoders.values()],
                      **kwargs_for(fuser_cls, fuser_cfg, "model.sensor_fuser"))
    return MultiSensorEncoder(encoders, fuser)


def build_detector(cfg: dict) -> CoopDetector:
    """The detector of ``cfg["model"]`` on the range ``cfg["pipeline"]["lidar_range"]``.

    Shapes flow forward: the encoder tells the backbone its channels, the backbone tells the
    fusion method and the head theirs; the config never repeats them. The encoder is
    :func:`build_encoder`'s.
    """
    _register_builtin()
    model = cfg["model"]
    pipeline = PipelineConfig.from_dict(cfg.get("pipeline"))
    encoder = build_encoder(model, pipeline.lidar_range)
    if "camera" in sensors_of(encoder) and pipeline.cameras is None:
        raise KeyError("model.encoders.camera reads images: set pipeline.cameras "
                       "(image_size: [H, W]) so that the batches carry them")
    backbone = build_backbone(model.get("backbone"), encoder)
    fusion_cfg = dict(model.get("fusion", {"type": "none"}))
    fusion_cls = FUSION.get(fusion_cfg["type"])
    fusion_kwargs = kwargs_for(fusion_cls, fusion_cfg, "model.fusion")
    params = inspect.signature(fusion_cls.__init__).parameters
    if "channels" in params:
        fusion_kwargs["channels"] = backbone.out_channels
    if "grid" in params:
        fusion_kwargs["grid"] = encoder.grid.scaled(backbone.out_stride)
    head = None
    images = image_feature_channels(encoder)
    if "query_dims" in params:
        # A method fusing object queries is sized by the head's queries (and changes no map
        # channels): the head comes first.
        head = build_head(model.get("head"), backbone.out_channels,
                          encoder.grid.scaled(backbone.out_stride), image_channels=images)
        if not hasattr(head, "embed_dims"):
            raise ValueError(f"model.fusion.type {fusion_cfg['type']!r} fuses object queries: "
                             f"the {type(head).__name__} has none (model.head.type: query)")
        fusion_kwargs["query_dims"] = head.embed_dims
    fusion = fusion_cls(**fusion_kwargs)
    if head is None:
        head = build_head(model.get("head"), getattr(fusion, "out_channels",
                                                     backbone.out_channels),
                          encoder.grid.scaled(backbone.out_stride),
                          uncertainty=fusion.contract.uncertainty, image_channels=images)
    agent_head = model.get("agent_head", "shared")
    if agent_head not in ("shared", "separate"):
        raise ValueError(f"model.agent_head: {agent_head!r} is not 'shared' or 'separate'")
    if agent_head == "separate":
        agent_head = build_head(model.get("head"), getattr(fusion, "out_channels",
                                                           backbone.out_channels),
                                encoder.grid.scaled(backbone.out_stride),
                                uncertainty=fusion.contract.uncertainty, image_channels=images)
    post = model.get("post", {})
    return CoopDetector(encoder, backbone, fusion, head,
                        agent_loss_weight=float(model.get("agent_loss_weight", 0.0)),
                        sender_frame=str(model.get("sender_frame", "own")),
                        agent_head=None if agent_head == "shared" else agent_head,
                        **kwargs_for(CoopDetector, post, "model.post",
                                     skip=("encoder", "backbone", "fusion", "head",
                                           "agent_loss_weight", "sender_frame", "agent_head")))


def image_feature_channels(encoder) -> int | None:
    """c of the image features the model's camera encoder gives a head that samples them
    (:class:`~v2xfuse.models.inputs.CameraFeatures`), or None when it has no such encoder."""
    if isinstance(encoder, MultiSensorEncoder):
        camera = encoder.encoders["camera"] if "camera" in encoder.encoders else None
    else:
        camera = encoder if getattr(encoder, "sensor", None) == "camera" else None
    return getattr(camera, "image_feature_channels", None)


def build_backbone(backbone_cfg: dict | None, encoder: nn.Module) -> nn.Module:
    """The BEV backbone ``model.backbone.type`` names in ``BACKBONES`` (default ``dense``) on
    the encoder's maps; its options are the section's other keys. A backbone with
    ``sparse_input`` reads the encoder's occupied cells (``encoder.pillars``), which only a
    pillar encoder has."""
    section = dict(backbone_cfg or {})
    name = section.get("type", "dense")
    cls = BACKBONES.get(name)
    backbone = cls(encoder.out_channels, **kwargs_for(cls, section, "model.backbone"))
    if getattr(backbone, "sparse_input", False) and not hasattr(encoder, "pillars"):
        raise ValueError(f"model.backbone.type {name!r} reads sparse pillars; the encoder "
                         f"{type(encoder).__name__} has none (use model.encoder.type: "
                         f"pointpillars with a LiDAR-only model)")
    return backbone


def build_head(head_cfg: dict | None, in_channels: int, grid: BevGrid,
               uncertainty: bool = False, image_channels: int | None = None) -> Head:
    """The head ``model.head.type`` names in ``HEADS`` (default ``anchor``) on maps of
    ``in_channels`` over ``grid``.

    Its options are the section's other keys, or those under ``model.head.<type>``: a config may
    hold several heads' options side by side (``head: {type: anchor, anchor: {...}, center:
    {...}}``) and ``--set model.head.type=center`` then switches heads; only the chosen head's
    own keys reach it. A key the chosen head does not take fails here, naming it and the heads
    it belongs to. ``uncertainty``: the fusion method's contract needs detections with
    uncertainty, so the head predicts it (a head without that option, or a config that turns
    it off, fails here).
    """
    _register_builtin()
    section = dict(head_cfg or {})
    name = section.pop("type", "anchor")
    try:
        cls = HEADS.get(name)
    except KeyError as exc:
        raise KeyError(f"model.head.type: {exc.args[0]}") from None
    own = dict(section.pop(name, None) or {})
    flat = {k: v for k, v in section.items() if k not in HEADS}  # others' sections stay unread
    twice = sorted(set(flat) & set(own))
    if twice:
        raise KeyError(f"model.head: {twice} given both in model.head and model.head.{name}")
    options = {**flat, **own}
    known = _head_options(cls)
    unknown = [k for k in options if k not in known]
    if unknown:
        owners = {k: [h for h in HEADS.names() if h != name and k in _head_options(HEADS.get(h))]
                  for k in unknown}
        where = "".join(f"; {k!r} is an option of the {' and '.join(repr(h) for h in hs)} head"
                        for k, hs in owners.items() if hs)
        raise KeyError(f"model.head: unknown keys {unknown} for the {name!r} head "
                       f"({cls.__name__}, options: {known}){where}. Keep each head's options "
                       f"under model.head.<type> to switch heads with --set model.head.type")
    if uncertainty:
        if "uncertainty" not in known:
            raise KeyError(f"model.head: the fusion method needs detections with uncertainty; "
                           f"the {name!r} head ({cls.__name__}) does not predict it")
        if options.get("uncertainty") is False:
            raise KeyError(f"model.head.{name}.uncertainty: false, but the fusion method "
                           f"needs detections with uncertainty")
        options["uncertainty"] = True
    if "image_channels" in inspect.signature(cls.__init__).parameters:
        options["image_channels"] = image_channels  # from the camera encoder, never the config
    return cls(in_channels, grid, **options)


def _head_options(cls) -> list[str]:
    """The keyword options of a head class (what the config may set: not the channels, the
    grid and the image features' channels, which come from the stages before it)."""
    return [p for p in inspect.signature(cls.__init__).parameters
            if p not in ("self", "in_channels", "grid", "image_channels")]
