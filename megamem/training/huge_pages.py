"""Large CPU tensors on transparent huge pages, in every process that trains or benchmarks.

A CPU training step makes fresh table gradients of tens of MB each. On a VM, first touching a 32 MB tensor in
4 KB pages costs about 10 ms (8,192 page faults); on 2 MB pages about 3 ms. torch reads THP_MEM_ALLOC_ENABLE
once, at its first CPU allocation, so entry points call this before anything allocates. A value the user set
is kept (THP_MEM_ALLOC_ENABLE=0 turns it off).
"""
import os


def prefer_huge_pages() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
