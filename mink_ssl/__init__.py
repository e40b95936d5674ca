"""mink-ssl: self-supervised pretraining of sparse-voxel networks on 3D indoor scenes.

Importing the package is cheap: submodules (and MinkowskiEngine) load only when used.
"""
__version__ = "0.1.0"
