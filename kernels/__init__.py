"""Memory Layer kernels, chosen by name (`model.kernel`) and injected into the model.

Every kernel offers the same three operations:
  hash(x, tau, temperature, weighting) -> (codes, p)
  gather_sum(codes, p, tables, bias) -> y        # codes and p already computed (Q, K, V share them)
  hash_gather_sum(x, tables, bias, tau, temperature, weighting, with_codes=False) -> y, or (y, codes, p)
and must match `reference` in outputs and gradients. Each kernel's hash returns
codes in an integer type of its own; gather_sum accepts codes of any integer type
(tensor parallelism ships them as uint8, or int16 above 8 bits).

  reference  torch ops (embedding_bag), any device; defines correctness
  cpu        fused C++ for CPU tensors, compiled on first use (cpu_kernel.py)
  triton     fused Triton kernels for CUDA tensors (triton_kernel.py; imported on first use, so that
             TRITON_INTERPRET=1 can be set before its kernels are defined)
  auto       per call: cpu for CPU tensors of float32, bfloat16 or float16, triton for CUDA tensors,
             reference for the rest (float64, Triton missing)
"""
import functools
import importlib.util

from megamem.kernels.cpu_kernel import DTYPES as CPU_DTYPES
from megamem.kernels.cpu_kernel import CpuKernel
from megamem.kernels.reference import ReferenceKernel


@functools.cache
def _triton():
    if importlib.util.find_spec("triton") is None:
        raise ValueError("model.kernel=triton needs the triton package (installed with CUDA builds of torch, "
                         "or `pip install triton`)")
    from megamem.kernels.triton_kernel import TritonKernel

    return TritonKernel


class AutoKernel:
    """Picks the fused path for the tensor's device and dtype, call by call."""

    name = "auto"

    @staticmethod
    def _for(tensor):
        if tensor.device.type == "cpu" and tensor.dtype in CPU_DTYPES:
            return CpuKernel
        if tensor.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return _triton()
        return ReferenceKernel

    @staticmethod
    def hash(x, tau, temperature, weighting):
        return AutoKernel._for(x).hash(x, tau, temperature, weighting)

    @staticmethod
    def gather_sum(codes, p, tables, bias):
        return AutoKernel._for(tables).gather_sum(codes, p, tables, bias)

    @staticmethod
    def hash_gather_sum(x, tables, bias, tau, temperature, weighting, with_codes=False):
        return AutoKernel._for(x).hash_gather_sum(x, tables, bias, tau, temperature, weighting, with_codes)


_KERNELS = {kernel.name: kernel for kernel in (ReferenceKernel, CpuKernel, AutoKernel)}


def available_kernels() -> list[str]:
    return sorted([*_KERNELS, "triton"])


def get_kernel(name: str):
    if name == "triton":
        return _triton()
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown Memory Layer kernel {name!r}; available: {', '.join(available_kernels())}") from None
