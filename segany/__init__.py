"""segany: Segment Anything (Kirillov et al., 2023), faithful to the official checkpoints, fast
on CPU, trainable.

Drop-in names from ``segment_anything`` 1.0: ``sam_model_registry``, ``SamPredictor``,
``SamAutomaticMaskGenerator``. segany's own API: ``load_model``, ``Segmenter``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import allocator as _allocator

_allocator.enable_huge_pages()  # before any large tensor exists (see allocator.py)

from .modeling import Sam, build_sam  # noqa: E402
from .modeling.common import weights_changed  # noqa: E402

__all__ = ["Sam", "build_sam", "weights_changed", "__version__"]


def __getattr__(name):  # lazy: keep `import segany` light
    if name in ("sam_model_registry", "load_model", "list_models"):
        from . import checkpoints

        return getattr(checkpoints, name)
    if name in ("SamPredictor", "Segmenter"):
        from . import predictor

        return getattr(predictor, name)
    if name == "SamAutomaticMaskGenerator":
        from . import automatic

        return automatic.SamAutomaticMaskGenerator
    raise AttributeError(f"module 'segany' has no attribute {name!r}")
