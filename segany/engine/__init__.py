"""The data engine: annotate many images resumably (one machine or a Ray cluster) and work with
the SA-1B folders that result (``segany annotate``, ``segany dataset``).

Python API::

    from segany.engine import EngineOptions, run_job
    summary = run_job(["photos/"], "out/", EngineOptions(amg={"points_per_side": 16}))
"""
from .annotate import Annotator, EngineOptions, JobError, is_done, load_engine_model, prepare, run_job
from .inputs import InputError, Item, collect

__all__ = ["Annotator", "EngineOptions", "InputError", "Item", "JobError", "collect", "is_done",
           "load_engine_model", "prepare", "run_job"]
