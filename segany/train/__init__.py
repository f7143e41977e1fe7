"""Training and fine-tuning (SAM recipe) and export of SAM-family models.

Entry points: :func:`segany.train.loop.train` with a :class:`segany.train.loop.TrainConfig`,
the ``segany train`` command (:mod:`segany.train.cli`), and
:func:`segany.train.export.load_bundled` for the bundled ``tiny`` model.
"""
from .export import TINY_CONFIG, load_bundled, load_safetensors, save_safetensors

__all__ = ["TINY_CONFIG", "load_bundled", "load_safetensors", "save_safetensors"]
