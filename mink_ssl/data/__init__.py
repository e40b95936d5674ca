"""Datasets, transforms, collate functions and batch dataclasses."""
