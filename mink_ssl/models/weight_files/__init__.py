"""Weights files in and out: the safe reader, the released layouts, and the converters.

    from mink_ssl.models.weight_files import read_weights
    wf = read_weights("hardest_contrastive.pth")   # nothing in the file is run
    wf.layout, wf.architecture, wf.state_dict
"""
from mink_ssl.models.weight_files.layouts import WeightsFile, infer_architecture, read_weights
from mink_ssl.models.weight_files.safe_pickle import UnsafeFileError, safe_torch_load

__all__ = ["WeightsFile", "UnsafeFileError", "infer_architecture", "read_weights",
           "safe_torch_load"]
