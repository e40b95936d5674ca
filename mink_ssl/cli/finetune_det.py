"""``mink-ssl-finetune-det``: Hydra entry point of detection fine-tuning (see
configs/finetune_det.yaml; benchmark recipes in configs/detection/).

    mink-ssl-finetune-det recipe=scannet data.root=data/scannet_det \
        pretrained=runs/pt/backbone.pth
    mink-ssl-finetune-det recipe=sunrgbd data.root=data/sunrgbd pretrained=null

Several processes: ``torchrun --nproc_per_node N -m mink_ssl.cli.finetune_det ...`` with an
explicit ``hydra.run.dir=...`` so that every rank agrees on the run directory.
"""
from __future__ import annotations

from mink_ssl.cli._hydra import hydra_main, register_schema

PROG = "mink-ssl-finetune-det"


def _register_schema() -> None:
    from mink_ssl.tasks.detection import FinetuneDetConfig

    register_schema("finetune_det_schema", FinetuneDetConfig)


def _task(cfg, out_dir) -> None:
    from mink_ssl.tasks.detection import finetune_det

    finetune_det(cfg, out_dir)


def _check(cfg) -> None:
    from mink_ssl.tasks.detection.config import check_det_config

    check_det_config(cfg)

def main() -> None:
    # the model group is shared with pretraining; `recipe=` selects a configs/detection/ recipe (its error lists them); `detection=` is its older name
    hydra_main(PROG, "finetune_det", _register_schema, _task, groups=("model",), check=_check,
               recipe_group="detection")


if __name__ == "__main__":
    main()
