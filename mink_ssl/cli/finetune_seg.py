"""``mink-ssl-finetune-seg``: Hydra entry point of segmentation fine-tuning (see
configs/finetune_seg.yaml; benchmark recipes in configs/finetune/).

    mink-ssl-finetune-seg recipe=s3dis data.root=data/s3dis pretrained=runs/pt/backbone.pth
    mink-ssl-finetune-seg recipe=scannet data.root=data/scannet_seg pretrained=null

Several processes: ``torchrun --nproc_per_node N -m mink_ssl.cli.finetune_seg ...`` with an
explicit ``hydra.run.dir=...`` so that every rank agrees on the run directory.
"""
from __future__ import annotations

from mink_ssl.cli._hydra import hydra_main, register_schema

PROG = "mink-ssl-finetune-seg"


def _register_schema() -> None:
    from mink_ssl.tasks.segmentation import FinetuneSegConfig

    register_schema("finetune_seg_schema", FinetuneSegConfig)


def _task(cfg, out_dir) -> None:
    from mink_ssl.tasks.segmentation import finetune_seg

    finetune_seg(cfg, out_dir)


def _check(cfg) -> None:
    from mink_ssl.tasks.segmentation.config import check_seg_config

    check_seg_config(cfg)

def main() -> None:
    # the model group is shared with pretraining; `recipe=` selects a configs/finetune/ recipe (its error lists them); `finetune=` is its older name
    hydra_main(PROG, "finetune_seg", _register_schema, _task, groups=("model",), check=_check,
               recipe_group="finetune")


if __name__ == "__main__":
    main()
