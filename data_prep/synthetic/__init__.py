"""Procedural ScanNet-like scenes: the embedded default for the demo and the source of test data."""
from data_prep.synthetic.room import Room, make_room, sample_room_points
from data_prep.synthetic.scannet_scene import (SensorModel, camera_trajectory, generate_scene,
                                               generate_scenes)

__all__ = ["Room", "make_room", "sample_room_points", "SensorModel", "camera_trajectory",
           "generate_scene", "generate_scenes"]
