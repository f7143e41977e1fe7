"""Interactive-segmentation benchmark (``segany eval``).

>>> from segany.evaluate import load_dataset, evaluate, SamMethod, GrabCutMethod
>>> ds = load_dataset("../shared/data/horses", split="val")
>>> report = evaluate(ds, SamMethod(load_model("tiny")), protocols=("clicks", "box"), limit=10)
>>> report["clicks"]["noc90"], report["box"]["miou_gt_box"]

See :mod:`segany.evaluate.metrics` for the simulated user and :mod:`segany.evaluate.runner`
for the protocols.
"""
from .methods import GrabCutMethod, Method, SamMethod
from .metrics import (
    Click,
    jitter_box,
    mask_box,
    mask_iou,
    next_click,
    noc,
    proposal_recall,
    simulate_clicks,
    summarize_clicks,
)
from .plot import plot_miou
from .runner import PROTOCOLS, DatasetError, evaluate, load_dataset, pool, summarize, table

__all__ = [
    "Click", "DatasetError", "GrabCutMethod", "Method", "PROTOCOLS", "SamMethod", "evaluate",
    "jitter_box", "load_dataset", "mask_box", "mask_iou", "next_click", "noc", "plot_miou", "pool",
    "proposal_recall", "simulate_clicks", "summarize", "summarize_clicks", "table",
]
