"""ScanNet pair prep for pretraining: scenes -> fragments every ``frame_skip`` frames -> overlap
(:mod:`.overlap`) -> pair lists; one scene in :mod:`.scene`, the run in :mod:`.prep`."""
