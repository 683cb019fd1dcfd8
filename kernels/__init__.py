"""Memory Layer kernels, chosen by name and injected into the model.

Every kernel offers the same three operations:
  hash(x, tau, temperature, weighting) -> (codes, p)
  gather_sum(codes, p, tables, bias) -> y        # codes and p already computed (Q, K, V share them)
  hash_gather_sum(x, tables, bias, tau, temperature, weighting) -> y
and must match `reference` in outputs and gradients.
"""
from megamem.kernels.reference import ReferenceKernel

_KERNELS = {ReferenceKernel.name: ReferenceKernel}


def available_kernels() -> list[str]:
    return sorted(_KERNELS)


def get_kernel(name: str):
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown Memory Layer kernel {name!r}; available: {', '.join(available_kernels())}") from None
