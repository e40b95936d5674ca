"""``mink-ssl-finetune-seg``: Hydra entry point of segmentation fine-tuning (see
configs/finetune_seg.yaml; benchmark recipes in configs/finetune/).

    mink-ssl-finetune-seg finetune=s3dis data.root=data/s3dis pretrained=runs/pt/backbone.pth
    mink-ssl-finetune-seg finetune=scannet data.root=data/scannet_seg pretrained=null

Several processes: ``torchrun --nproc_per_node N -m mink_ssl.cli.finetune_seg ...`` with an
explicit ``hydra.run.dir=...`` so that every rank agrees on the run directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mink_ssl.cli.pretrain import CONFIG_DIR, check_group_choices

PROG = "mink-ssl-finetune-seg"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from mink_ssl.engine.finetune_seg import FinetuneSegConfig

    ConfigStore.instance().store(name="finetune_seg_schema", node=FinetuneSegConfig)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    try:  # the model group is shared with pretraining; Hydra lists `finetune=` options itself
        check_group_choices([a for a in sys.argv[1:] if a.lstrip("+~").startswith("model=")])
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    _register_schema()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="finetune_seg", version_base="1.3")
    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from mink_ssl.engine.finetune_seg import finetune_seg

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            finetune_seg(OmegaConf.to_object(cfg), out_dir)
        except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            sys.exit(2)

    run()


if __name__ == "__main__":
    main()
