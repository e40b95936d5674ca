"""Synthetic transfer benchmark, from a source checkout (see README.md here):

    python experiments/synthetic_transfer/run.py --out runs/transfer --preset full

The code is :mod:`mink_ssl.tools.transfer_benchmark`; installed, the same command is
``mink-ssl-transfer``.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from mink_ssl.cli.transfer import main

    sys.exit(main())
