"""Procedural scenes in the real datasets' formats: the embedded default for the demo and the
source of test data (ScanNet scans, S3DIS rooms, Synthia4D frames)."""
from data_prep.synthetic.camera_path import camera_trajectory
from data_prep.synthetic.room import Room, make_room, sample_room_points
from data_prep.synthetic.s3dis_rooms import generate_s3dis_rooms
from data_prep.synthetic.scannet_scene import (SensorModel, generate_scene, generate_scenes,
                                               write_label_map)
from data_prep.synthetic.synthia_frames import generate_synthia_frames

__all__ = ["Room", "make_room", "sample_room_points", "SensorModel", "camera_trajectory",
           "generate_scene", "generate_scenes", "write_label_map", "generate_s3dis_rooms",
           "generate_synthia_frames"]
