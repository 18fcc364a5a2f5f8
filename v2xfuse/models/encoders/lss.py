"""Lift-splat camera encoder (LSS: Philion & Fidler, ECCV 2020), with BEVDepth's depth
supervision from LiDAR (Li et al., AAAI 2023) as an option.

    images (K, 3, H, W) -> image backbone -> (K, c, h, w), h = H / stride, w = W / stride
      -> 3x3 conv + 1x1 conv -> depth logits (K, D, h, w) and context (K, C, h, w)
    lift:   feature pixel (i, j) at depth bin b is a frustum point carrying
            softmax(depth logits)[b, i, j] * context[:, i, j]   (LSS's outer product)
    place:  its pixel (u, v) and depth d -> lidar_from_camera @ (d * inv(K) @ [u, v, 1])
            -> (x, y, z) in the camera's agent's LiDAR frame -> BEV cell; points outside the
            grid in x, y or outside point_range in z are dropped before pooling
    splat:  v2xfuse.ops.bev_pool_weighted sums the kept points' depth x context per (agent, cell)
            without storing the products -> (N, C, ny, nx): the
            cameras of one agent add into its map; an agent without cameras gets zeros

Pixels follow OpenCV (:mod:`v2xfuse.datasets.images`): image pixel column c has its centre at
u = c. A feature pixel j of a stride-s map covers image columns [j s, (j + 1) s), so it sits at
u = j s + (s - 1) / 2, and a point at u falls in feature column floor((u + 0.5) / s) (rows alike).
Depth is the camera-frame z (the distance along the optical axis, what ``project_points``
returns). ``depth: [d_min, d_max, step]`` makes D = (d_max - d_min) / step bins; bin b holds
depths in [d_min + b step, d_min + (b + 1) step) and its frustum points sit at the bin's centre.

What depends only on the calibration (every frustum point's cell and whether it is kept) is
computed once per forward pass (:meth:`LiftSplat.frustum_cells`); what depends only on the
image size and the bins (the frustum in pixels and depths) is a cached buffer.
``lidar_from_camera`` is used as the matrix it is: after a flip augmentation it is a reflection
times a scale, and DAIR-V2X camera rotations are not exactly orthonormal, so the depth targets
invert it with ``torch.linalg.inv`` and never by transposing.

Depth supervision (``depth_loss_weight`` > 0, training only): each camera's own agent's LiDAR
points are projected into it; every feature pixel that one falls in gets the depth bin of its
nearest point as target, and the loss is the cross-entropy of the predicted depth distribution
on those pixels (BEVDepth supervises the same distribution, with a binary cross-entropy). It
reaches the detector's loss through :class:`~v2xfuse.models.inputs.AuxLosses` (see there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import bev_pool_weighted
from ...registry import ENCODERS
from ...structures.bev import BevGrid
from ...utils.precision import full_precision
from ..backbone import conv_bn_relu
from ..inputs import AgentInputs, CameraFeatures
from .camera_bev import _MEAN, _STD

__all__ = ["LiftSplat", "FrustumCells", "DepthBins", "ResidualImageNet", "IMAGE_BACKBONES",
           "camera_to_lidar", "depth_loss"]

#: ``backbone`` values: our own residual stages, or a torchvision ResNet trunk (no weights)
IMAGE_BACKBONES = ("residual", "resnet18", "resnet34")


@dataclass(frozen=True)
class DepthBins:
    """D bins of width ``step`` from ``d_min``: bin b holds [d_min + b step, d_min + (b + 1) step)."""

    d_min: float
    d_max: float
    step: float

    @classmethod
    def parse(cls, depth) -> "DepthBins":
        d_min, d_max, step = (float(v) for v in depth)
        if not (0.0 < d_min < d_max and step > 0):
            raise ValueError(f"lss depth must be [min, max, step] with 0 < min < max and step > 0, "
                             f"got {list(depth)}")
        return cls(d_min, d_max, step)

    @property
    def count(self) -> int:
        return int(round((self.d_max - self.d_min) / self.step))

    def centres(self, device=None) -> torch.Tensor:
        """(D,) float32 depth of each bin's frustum points."""
        return self.d_min + (torch.arange(self.count, device=device, dtype=torch.float32) + 0.5) * self.step

    def index(self, depth: torch.Tensor) -> torch.Tensor:
        """The bin of each depth, int64; -1 outside [d_min, d_min + D step) (inf included)."""
        b = torch.floor(((depth - self.d_min) / self.step).clamp(-1.0, self.count)).long()
        return torch.where((b >= 0) & (b < self.count), b, torch.full_like(b, -1))


@dataclass
class FrustumCells:
    """Where the kept frustum points of K cameras land (computed once per forward pass).

    Attributes:
        index: (M,) int64 into the flattened (K, D, h, w) frustum, increasing.
        coords: (M, 3) int32 [agent, y, x]: the BEV cell of each, in its agent's map.
    """

    index: torch.Tensor
    coords: torch.Tensor

    def pixels(self, bins: int, h: int, w: int) -> torch.Tensor:
        """(M,) each kept point's feature pixel in the flattened (K, h, w) maps (the frustum
        being (K, bins, h, w))."""
        return (self.index // (bins * h * w)) * (h * w) + self.index % (h * w)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs and a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class ResidualImageNet(nn.Module):
    """A small ResNet-style image backbone: (K, 3, H, W) -> (K, channels[-1], H / 2^S, W / 2^S).

    A 3x3 stride-2 stem of ``channels[0]``, then one stage per further width, each a stride-2
    :class:`BasicBlock` followed by ``blocks - 1`` more; S = len(channels).
    """

    def __init__(self, channels, blocks: int = 1):
        super().__init__()
        channels = [int(c) for c in channels]
        layers = [nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                  nn.ReLU(inplace=True)]
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [BasicBlock(cin, cout, 2)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def torchvision_trunk(name: str, stride: int) -> tuple[nn.Module, int]:
    """(torchvision ResNet ``name`` up to the stage of ``stride`` (8 or 16), its channels), with
    random weights (nothing is downloaded)."""
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"model.encoders.camera.backbone: {name} is torchvision's ResNet, and "
                          f"torchvision is not installed; install it or use backbone: residual") from None
    if stride not in (8, 16):
        raise ValueError(f"lss backbone {name}: stride must be 8 or 16, got {stride}")
    net = getattr(torchvision.models, name)(weights=None)
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2]
    if stride == 16:
        stages.append(net.layer3)
    trunk = nn.Sequential(*stages)
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    return trunk.train(), int(channels)


@ENCODERS.register("lss")
class LiftSplat(nn.Module):
    """Camera images of N agents -> (N, C, ny, nx) maps on ``grid``, in each agent's LiDAR frame,
    by lifting image features to a per-pixel depth distribution and splatting them to BEV.

    Args:
        point_range: (6,) [x0, y0, z0, x1, y1, z1]: the BEV extent in each agent's frame; frustum
            points outside it (z included) are dropped.
        cell: BEV cell size in metres (the builder passes the LiDAR encoder's; required without).
        out_channels: C, the context channels splatted to BEV.
        depth: [min, max, step] metres of the D depth bins (module docstring).
        stride: image pixels per feature pixel (a power of 2; 8 and 16 are usual). Image height
            and width (``pipeline.cameras.image_size``) must be multiples of it.
        image_channels: widths of the residual backbone's stem and stages, log2(stride) of them
            (default 16, 32, 64, ... doubling).
        blocks: basic blocks per residual stage.
        backbone: ``residual`` (:class:`ResidualImageNet`), or ``resnet18`` / ``resnet34``:
            torchvision's trunk (randomly initialised; needs torchvision).
        depth_loss_weight: weight of the depth loss from each camera's agent's own LiDAR
            (module docstring); 0 turns it off.
    """

    sensor = "camera"

    def __init__(self, point_range, cell: float | None = None, out_channels: int = 32,
                 depth=(1.0, 45.0, 1.0), stride: int = 8, image_channels=None, blocks: int = 1,
                 backbone: str = "residual", depth_loss_weight: float = 0.0):
        super().__init__()
        if cell is None:
            raise ValueError("lss: give `cell` (BEV cell size in metres) when no LiDAR encoder "
                             "sets the grid")
        stages = int(round(math.log2(stride))) if stride >= 2 else 0
        if stride < 2 or 2 ** stages != stride:
            raise ValueError(f"lss: stride must be a power of 2 >= 2, got {stride}")
        if backbone not in IMAGE_BACKBONES:
            raise ValueError(f"lss: backbone must be one of {IMAGE_BACKBONES}, got {backbone!r}")
        self.grid = BevGrid(point_range[0], point_range[1], point_range[3], point_range[4], float(cell))
        self.z_range = (float(point_range[2]), float(point_range[5]))
        self.out_channels = int(out_channels)
        self.bins = DepthBins.parse(depth)
        self.stride = int(stride)
        self.depth_loss_weight = float(depth_loss_weight)
        if backbone == "residual":
            widths = image_channels or [16 * 2 ** i for i in range(stages)]
            if len(widths) != stages:
                raise ValueError(f"lss: image_channels needs log2(stride) = {stages} widths, "
                                 f"got {list(widths)}")
            self.image_net = ResidualImageNet(widths, blocks)
            width = self.image_net.out_channels
        else:
            self.image_net, width = torchvision_trunk(backbone, self.stride)
        #: c of the image features a head may sample (``inputs.image_features``)
        self.image_feature_channels = int(width)
        self.depth_net = nn.Sequential(conv_bn_relu(width, width),
                                       nn.Conv2d(width, self.bins.count + self.out_channels, 1))
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("frustum", torch.zeros(0), persistent=False)

    def forward(self, inputs: AgentInputs) -> torch.Tensor:
        """``inputs.cameras`` -> (N, C, ny, nx); agents without a camera get a zero map. In
        training, with ``depth_loss_weight`` > 0 and an ``inputs.losses`` sink, adds
        ``loss_depth`` to it; with an ``inputs.image_features`` sink, puts the image backbone's
        output there (:class:`~v2xfuse.models.inputs.CameraFeatures`), computed once for both."""
        n, ny, nx = inputs.num_agents, self.grid.ny, self.grid.nx
        cams = inputs.cameras
        if cams is None or cams.num_cameras == 0:
            return self.mean.new_zeros((n, self.out_channels, ny, nx))
        h, w = cams.images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"lss: image size {h}x{w} (pipeline.cameras.image_size) must be a "
                             f"multiple of the stride {self.stride}")
        images = (cams.images.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        image_features = self.image_net(images)                            # (K, c, h, w)
        if inputs.image_features is not None:
            inputs.image_features.put(CameraFeatures(image_features, cams.agent, cams.intrinsics,
                                                     cams.lidar_from_camera, (int(h), int(w))))
        out = self.depth_net(image_features)
        d = self.bins.count
        logits, context = out[:, :d], out[:, d:]                           # (K, D, h, w), (K, C, h, w)
        cells = self.frustum_cells(cams.intrinsics, cams.lidar_from_camera, cams.agent, (h, w))
        bev = self.splat(logits.softmax(dim=1), context, cells, n)
        if self.training and self.depth_loss_weight > 0 and inputs.losses is not None:
            target = self.depth_targets(inputs.points, cams, (h, w))
            inputs.losses.add("loss_depth", self.depth_loss_weight * depth_loss(logits, target))
        return bev

    def splat(self, depth: torch.Tensor, context: torch.Tensor, cells: FrustumCells,
              num_agents: int) -> torch.Tensor:
        """Lift and splat: the kept frustum points' ``depth x context`` summed per agent and cell.

        Args:
            depth: (K, D, h, w) the depth distribution of every feature pixel (or any weight).
            context: (K, C, h, w).
            cells: :meth:`frustum_cells` of the same K cameras.
        Returns:
            (num_agents, C, ny, nx).
        """
        k, d, h, w = depth.shape
        pixel = cells.pixels(d, h, w)
        context = context.permute(0, 2, 3, 1).reshape(k * h * w, -1)
        # depth[point] * context[its pixel] summed per cell, the (M, C) products never stored
        return bev_pool_weighted(depth.reshape(-1)[cells.index], context, pixel, cells.coords,
                                 num_agents, self.grid.ny, self.grid.nx)

    def base_frustum(self, image_size, device) -> torch.Tensor:
        """(D, h, w, 3) float32 [u d, v d, d] of every frustum point: feature pixel centres in
        image pixels (module docstring) times the bin centres. Cached per image size."""
        h, w = (int(v) // self.stride for v in image_size)
        shape = (self.bins.count, h, w, 3)
        if tuple(self.frustum.shape) != shape or self.frustum.device != torch.device(device):
            s = self.stride
            u = torch.arange(w, device=device, dtype=torch.float32) * s + (s - 1) / 2
            v = torch.arange(h, device=device, dtype=torch.float32) * s + (s - 1) / 2
            d = self.bins.centres(device)[:, None, None].expand(shape[:3])
            self.frustum = torch.stack([u[None, None, :] * d, v[None, :, None] * d, d], dim=-1)
        return self.frustum

    def frustum_cells(self, intrinsics: torch.Tensor, lidar_from_camera: torch.Tensor,
                      agent: torch.Tensor, image_size) -> FrustumCells:
        """Every frustum point of K cameras in its agent's LiDAR frame, binned to BEV cells; the
        ones outside the grid (x, y) or the z range of ``point_range`` are dropped.

        Args:
            intrinsics: (K, 3, 3) of the images as the batch has them.
            lidar_from_camera: (K, 4, 4) any invertible affine map (used as given, never inverted).
            agent: (K,) int64 agent of each camera.
            image_size: (H, W) of the images.
        """
        base = self.base_frustum(image_size, lidar_from_camera.device)      # (D, h, w, 3)
        xyz = camera_to_lidar(intrinsics, lidar_from_camera, base)          # (K, D, h, w, 3)
        g = self.grid
        ix = torch.floor((xyz[..., 0] - g.x_min) / g.cell)
        iy = torch.floor((xyz[..., 1] - g.y_min) / g.cell)
        z = xyz[..., 2]
        keep = ((ix >= 0) & (ix < g.nx) & (iy >= 0) & (iy < g.ny)
                & (z >= self.z_range[0]) & (z < self.z_range[1]))
        index = torch.nonzero(keep.reshape(-1)).squeeze(1)
        per_camera = base.shape[0] * base.shape[1] * base.shape[2]
        coords = torch.stack([agent[index // per_camera].to(torch.int32),
                              iy.reshape(-1)[index].to(torch.int32),
                              ix.reshape(-1)[index].to(torch.int32)], dim=1)
        return FrustumCells(index, coords)

    @torch.no_grad()
    @full_precision
    def depth_targets(self, points: torch.Tensor | None, cameras, image_size) -> torch.Tensor:
        """Each feature pixel's depth bin from its camera's agent's own LiDAR points.

        Args:
            points: (P, 5) [agent, x, y, z, intensity] in the agents' LiDAR frames, or None.
            cameras: the K cameras (:class:`~v2xfuse.datasets.batch.CameraBatch`).
            image_size: (H, W).
        Returns:
            (K, h, w) int64: the bin of the nearest point (smallest depth) that projects into
            the feature pixel, -1 where none does (or its depth is outside the bins). Cameras of
            an agent without points are all -1.
        """
        h, w = (int(v) // self.stride for v in image_size)
        k = cameras.num_cameras
        nearest = torch.full((k * h * w,), math.inf, dtype=torch.float32, device=cameras.agent.device)
        if points is not None and len(points):
            cam_from_lidar = torch.linalg.inv(cameras.lidar_from_camera.to(torch.float64))
            project = (cameras.intrinsics.to(torch.float64) @ cam_from_lidar[:, :3, :]).float()
            owner = points[:, 0].long()
            for a in torch.unique(cameras.agent).tolist():
                xyz = points[owner == a, 1:4]
                if not len(xyz):
                    continue
                cams = torch.nonzero(cameras.agent == a).squeeze(1)             # (k_a,)
                uvw = torch.einsum("kij,pj->kpi", project[cams, :, :3], xyz) + project[cams, None, :, 3]
                depth = uvw[..., 2]
                front = depth > 1e-3
                u = uvw[..., 0] / depth.clamp(min=1e-3)
                v = uvw[..., 1] / depth.clamp(min=1e-3)
                col = torch.floor((u + 0.5) / self.stride)
                row = torch.floor((v + 0.5) / self.stride)
                ok = front & (col >= 0) & (col < w) & (row >= 0) & (row < h) \
                    & (self.bins.index(depth) >= 0)
                flat = (cams[:, None] * (h * w) + row.clamp(0, h - 1).long() * w
                        + col.clamp(0, w - 1).long())
                nearest.scatter_reduce_(0, flat[ok], depth[ok], reduce="amin")
        target = self.bins.index(nearest)
        return target.view(k, h, w)


@full_precision
def camera_to_lidar(intrinsics: torch.Tensor, lidar_from_camera: torch.Tensor,
                    scaled_pixels: torch.Tensor) -> torch.Tensor:
    """Pixels at depths, in each camera's LiDAR frame: ``lidar_from_camera @ (inv(K) @ [u d, v d, d])``.

    Args:
        intrinsics: (K, 3, 3); lidar_from_camera: (K, 4, 4), used as given (not inverted).
        scaled_pixels: (..., 3) [u d, v d, d]: pixel (u, v) times its camera-frame depth d.
    Returns:
        (K, ..., 3) float32.
    """
    l64 = lidar_from_camera.to(torch.float64)
    # one 3x3 per camera, composed in float64: lidar_from_camera[:3, :3] @ inv(K)
    rays = (l64[:, :3, :3] @ torch.linalg.inv(intrinsics.to(torch.float64))).float()
    xyz = torch.einsum("kij,pj->kpi", rays, scaled_pixels.reshape(-1, 3).float())
    xyz = xyz + l64[:, None, :3, 3].float()
    return xyz.view(len(rays), *scaled_pixels.shape)


def depth_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the depth distribution over the feature pixels with a target.

    Args:
        logits: (K, D, h, w); target: (K, h, w) int64 bin, -1 where there is none.
    Returns:
        scalar; 0 (still attached to ``logits``) when no pixel has a target.
    """
    valid = target >= 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    picked = logits.permute(0, 2, 3, 1)[valid]                                  # (V, D)
    return F.cross_entropy(picked, target[valid])
