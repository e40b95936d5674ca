"""The on-disk contracts that ``data_prep`` writes and ``mink_ssl`` reads, in one place.

- :mod:`~mink_ssl.formats.fragments`: the fragment store of RGB-D views (writer and reader);
- :mod:`~mink_ssl.formats.manifest`: the prep outputs' ``manifest.json`` schemas, written and
  checked, and their skipped scenes in one shape;
- :mod:`~mink_ssl.formats.scene_record`: a prepared scene's record and the one definition of a
  finished scene (every file it lists, at its recorded size);
- :mod:`~mink_ssl.formats.model_files`: the format tags of model files and checkpoints, and the
  one checked loader every reader of them goes through.

Nothing here imports torch or MinkowskiEngine at import time (the model-file loader imports
torch when it is called), so a prep machine needs neither.
"""
