"""Memory Layer kernels, chosen by name (`model.kernel`) and injected into the model.

Every kernel offers the same three operations:
  hash(x, tau, temperature, weighting) -> (codes, p)
  gather_sum(codes, p, tables, bias) -> y        # codes and p already computed (Q, K, V share them)
  hash_gather_sum(x, tables, bias, tau, temperature, weighting) -> y
and must match `reference` in outputs and gradients. Codes stay inside one
kernel: their integer type is the kernel's own.

  reference  torch ops (embedding_bag), any device; defines correctness
  cpu        fused C++ for CPU tensors, compiled on first use (cpu_kernel.py)
  auto       per call: cpu for CPU tensors, reference elsewhere
"""
from megamem.kernels.cpu_kernel import CpuKernel
from megamem.kernels.reference import ReferenceKernel


class AutoKernel:
    """Picks the fused CPU path for CPU tensors and the reference path for the rest, call by call."""

    name = "auto"

    @staticmethod
    def _for(tensor):
        return CpuKernel if tensor.device.type == "cpu" else ReferenceKernel

    @staticmethod
    def hash(x, tau, temperature, weighting):
        return AutoKernel._for(x).hash(x, tau, temperature, weighting)

    @staticmethod
    def gather_sum(codes, p, tables, bias):
        return AutoKernel._for(tables).gather_sum(codes, p, tables, bias)

    @staticmethod
    def hash_gather_sum(x, tables, bias, tau, temperature, weighting):
        return AutoKernel._for(x).hash_gather_sum(x, tables, bias, tau, temperature, weighting)


_KERNELS = {kernel.name: kernel for kernel in (ReferenceKernel, CpuKernel, AutoKernel)}


def available_kernels() -> list[str]:
    return sorted(_KERNELS)


def get_kernel(name: str):
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown Memory Layer kernel {name!r}; available: {', '.join(available_kernels())}") from None
