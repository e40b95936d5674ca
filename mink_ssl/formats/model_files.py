"""Model files and checkpoints: their format tags and the one checked loader.

Every file mink-ssl saves with ``torch.save`` is a plain container (``weights_only=True``
loads it) whose ``format`` entry names what it is:

================================  ===========================================  ==============
format                            written by                                   backbone entry
================================  ===========================================  ==============
``mink_ssl.model/1``              ``save_model`` (pretraining's backbone.pth)  ``state_dict``
``mink_ssl.checkpoint/1``         pretraining checkpoints                      ``backbone``
``mink_ssl.seg_model/1``          segmentation fine-tuning's model.pth         ``backbone``
``mink_ssl.seg_checkpoint/1``     segmentation fine-tuning checkpoints         ``backbone``
``mink_ssl.det_model/1``          detection fine-tuning's model.pth            ``backbone``
``mink_ssl.det_checkpoint/1``     detection fine-tuning checkpoints            ``backbone``
================================  ===========================================  ==============
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mink_ssl.io import CHECKSUM, content_digest, verify_checksum, with_checksum  # noqa: F401

MODEL_FORMAT = "mink_ssl.model/1"
CHECKPOINT_FORMAT = "mink_ssl.checkpoint/1"
SEG_MODEL_FORMAT = "mink_ssl.seg_model/1"
SEG_CHECKPOINT_FORMAT = "mink_ssl.seg_checkpoint/1"
DET_MODEL_FORMAT = "mink_ssl.det_model/1"
DET_CHECKPOINT_FORMAT = "mink_ssl.det_checkpoint/1"

#: which entry of each format holds the backbone's state dict (what ``pretrained=`` loads)
BACKBONE_ENTRY = {
    MODEL_FORMAT: "state_dict",
    CHECKPOINT_FORMAT: "backbone",
    SEG_MODEL_FORMAT: "backbone",
    SEG_CHECKPOINT_FORMAT: "backbone",
    DET_MODEL_FORMAT: "backbone",
    DET_CHECKPOINT_FORMAT: "backbone",
}


def format_of(obj) -> str:
    """The ``format`` tag of a loaded file, or its type's name when it is not a dict."""
    return obj.get("format") if isinstance(obj, dict) else type(obj).__name__


def load_tagged(path: str | os.PathLike, formats: Sequence[str], what: str,
                map_location="cpu", missing: str = "", expected: str | None = None) -> dict:
    """The tagged container in ``path``, read with ``torch.load(weights_only=True)``, its
    checksum verified where it has one.

    ``what`` says what the caller wants ("a mink-ssl model file"); a missing file is a
    ``FileNotFoundError`` (with the ``missing`` hint appended), and a file whose format is not
    one of ``formats`` a ``ValueError`` naming the format found and the ones expected (or
    ``expected``, the caller's words for them).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist{missing}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's readers raise many types for a damaged file
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise ValueError(f"{path} cannot be read as {what}: it is damaged, truncated or not a "
                         f"torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); use "
                         "another copy, or the previous checkpoint") from e
    found = format_of(obj)
    if found not in formats:
        expected = expected or " or ".join(repr(f) for f in formats)
        raise ValueError(f"{path} is not {what} (format {found!r}, expected {expected})")
    verify_checksum(obj, path)
    return obj
