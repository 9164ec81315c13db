"""Train a BitNet b1.58 model: pretraining, SFT or DPO, chosen by a recipe.

Single process (CPU or one GPU):
    python train.py +recipe=demo_pretrain
    python train.py +recipe=demo_pretrain trainer.max_steps=50 output_dir=outputs/try
One node, several GPUs (DDP, or FSDP2 applied by bitnet-train):
    accelerate launch --num_processes 8 train.py +recipe=pretrain_2b4t
    accelerate launch --config_file bitnet_train/configs/accelerate/fsdp2.yaml \
        train.py +recipe=pretrain_2b4t
Several nodes: bitnet_train/configs/accelerate/fsdp2_two_nodes.yaml, the same command on every
    host with its --machine_rank.
Print the composed config without running: python train.py +recipe=pretrain_2b4t --cfg job
"""

import hydra
from omegaconf import DictConfig

from bitnet_train.train.config import config_dir, register_configs

register_configs()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from bitnet_train.train.run import run_from_hydra

    run_from_hydra(cfg)


if __name__ == "__main__":
    main()
