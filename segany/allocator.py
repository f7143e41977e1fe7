"""Large tensors on transparent huge pages.

SAM's CPU inference makes many short-lived multi-MB tensors (encoder activations, the decoder's
image-token maps, full-size masks). PyTorch's CPU allocator can align allocations of 2 MB and
more to 2 MB and ``madvise(MADV_HUGEPAGE)`` them, but only when ``THP_MEM_ALLOC_ENABLE=1`` is set
before its first large allocation. On the 2-core VMs this project is measured on, a 4 KiB page
fault costs ~5 us and the decoder's working set spans thousands of pages: with huge pages a click
took 23-25 ms in every process, without them 23 or 30 ms depending on the process (measured with
random ViT-B weights after an image embedding; the encoder time did not change).

``import segany`` sets the variable (unless it is already set) so this works for every entry
point that imports segany before it allocates large tensors, which includes the ``segany``
command. ``SEGANY_ALLOCATOR=default`` leaves the environment alone. The cost is memory rounded up
to 2 MB per large tensor. Kernels with THP disabled ignore the advice.
"""
from __future__ import annotations

import os

ENV = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Ask PyTorch for huge pages on large CPU tensors; False when opted out or set otherwise."""
    if os.environ.get("SEGANY_ALLOCATOR", "").lower() == "default":
        return False
    return os.environ.setdefault(ENV, "1") == "1"
