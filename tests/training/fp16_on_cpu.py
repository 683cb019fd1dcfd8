"""`megamem ...` on a CPU that DeepSpeed is told has fp16, so that its fp16 optimizer (dynamic loss scaling, its
overflow skip) runs in the CPU suite. DeepSpeed refuses fp16 on CPUs, where it is slow, not wrong; megamem asks it
(megamem.training.preflight.check_layout). GPUs run fp16 for real in scripts/gpu_check.sh.

    python tests/training/fp16_on_cpu.py train CONFIG --set train.precision=fp16 ...
"""
import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True

from megamem.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
