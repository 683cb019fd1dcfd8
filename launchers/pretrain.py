"""Cluster entry point: one training rank.

    deepspeed --num_gpus 8 launchers/pretrain.py --config configs/memoryformer-tiny.yaml --set data.path=DATA
    torchrun --nproc_per_node 8 launchers/pretrain.py --config configs/memoryformer-tiny.yaml --set data.path=DATA
"""
import sys

from megamem.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
