"""Detection prep: ScanNet v2 (:mod:`.scannet_det`) and SUN RGB-D (:mod:`.sunrgbd`) scenes with
oriented boxes, written by :mod:`.writer`."""
