"""Segmentation prep: S3DIS (:mod:`.s3dis`), Synthia4D (:mod:`.synthia`) and ScanNet
(:mod:`.scannet_seg`) scenes with per-point labels, written by :mod:`.writer`."""
