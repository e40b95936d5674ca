"""mink-ssl: self-supervised pretraining of sparse-voxel networks on 3D indoor scenes.

Install with ``make setup`` (it installs torch and builds MinkowskiEngine first; see README).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "mink_ssl" / "__init__.py").read_text())[1]

setup(
    name="mink-ssl",
    version=VERSION,
    description="Self-supervised pretraining of sparse-voxel networks (MinkowskiEngine or spconv) "
                "on 3D scenes",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # the hydra configs (top-level configs/) ship inside the package as mink_ssl/configs, so
    # that a non-editable install (pip install ., a wheel) finds them (mink_ssl/cli/_hydra.py)
    packages=find_packages(include=["mink_ssl", "mink_ssl.*", "data_prep", "data_prep.*"])
    + ["mink_ssl.configs"],
    package_dir={"mink_ssl.configs": "configs"},
    package_data={"mink_ssl.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=[
        # torch and the sparse engines are installed by `make setup` before this package (torch
        # pinned per machine; spconv's wheel chosen for that torch: spconv (CPU), spconv-cuXXX
        # or spconv-triton, which all provide the module `spconv`; MinkowskiEngine 0.5.4 built
        # from source, optional): pip cannot express "one of these wheels", so they are not
        # listed here.
        "torch>=2.0",
        "numpy>=1.24,<3",
        "scipy>=1.10,<2",
        "open3d>=0.18,<0.21",
        "plyfile>=1.0,<2",
        "pillow>=10,<14",  # JPEG/PNG frames of .sens files and exports
        "hydra-core>=1.3,<1.4",
        "tqdm>=4.60,<5",
        "tensorboard>=2.12,<3",
        "matplotlib>=3.7,<4",  # result plots (per-class IoU, precision/recall), headless Agg
        "geomloss>=0.2.6,<0.3",  # Sinkhorn divergence of cluster_render's image fitting loss
    ],
    extras_require={
        "dev": ["pytest>=7,<10", "dockerfile-parse>=2,<3", "hydra-submitit-launcher>=1.2,<1.3"],
        "slurm": ["hydra-submitit-launcher>=1.2,<1.3"],  # hydra/launcher=slurm
    },
    entry_points={
        "console_scripts": [
            "mink-ssl-demo=mink_ssl.cli.demo:main",
            "mink-ssl-transfer=mink_ssl.cli.transfer:main",
            "mink-ssl-prep=data_prep.cli:main",
            "mink-ssl-pretrain=mink_ssl.cli.pretrain:main",
            "mink-ssl-viz=mink_ssl.cli.viz:main",
            "mink-ssl-finetune-seg=mink_ssl.cli.finetune_seg:main",
            "mink-ssl-finetune-det=mink_ssl.cli.finetune_det:main",
            "mink-ssl-weights=mink_ssl.cli.weights:main",
        ],
    },
)
