"""ScanNet: ``.sens`` and exported-frame IO, fragments, overlap and view pairs."""
