"""Procedural ScanNet-like scenes: the embedded default for the demo and the source of test data."""
from data_prep.synthetic.room import Room, make_room, sample_room_points

__all__ = ["Room", "make_room", "sample_room_points"]
