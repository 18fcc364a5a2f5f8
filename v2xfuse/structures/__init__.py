"""Frames, boxes, transforms and the multi-agent frame schema (conventions live here only)."""
from .boxes import (BOX_DIM, CORNER_SIGNS, box_corners, boxes_bev_corners, corners_to_boxes,
                    points_in_boxes, transform_boxes, wrap_angle)
from .coop import AGENT_KINDS, AgentObs, CameraObs, CoopFrame
from .detections import Detections
from .transforms import (invert_transform, make_transform, pose_from_xyz_rpy, relative_transform,
                         rotation_from_rpy, rotation_z, rpy_from_rotation, transform_points, yaw_of)

__all__ = [
    "BOX_DIM", "CORNER_SIGNS", "box_corners", "boxes_bev_corners", "corners_to_boxes",
    "points_in_boxes", "transform_boxes", "wrap_angle",
    "AGENT_KINDS", "AgentObs", "CameraObs", "CoopFrame", "Detections",
    "invert_transform", "make_transform", "pose_from_xyz_rpy", "relative_transform",
    "rotation_from_rpy", "rotation_z", "rpy_from_rotation", "transform_points", "yaw_of",
]
