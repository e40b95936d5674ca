"""Geometric ops: boxes and their IoU, farthest point sampling, ball query, 3D NMS."""
from mink_ssl.ops.nms import nms_3d
from mink_ssl.ops.fps_ball_query import ball_query, farthest_point_sampling, pad_by_scene

__all__ = ["ball_query", "farthest_point_sampling", "nms_3d", "pad_by_scene"]
