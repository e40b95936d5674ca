"""ScanNet raw data: ``.sens`` and exported-frame IO, the scene folders of a ``scans/`` folder,
label maps."""
