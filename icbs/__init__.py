"""iCBS: post-training pruning by the iterative Combinatorial Brain Surgeon."""

from icbs.api import prune, prune_layer_by_layer
from icbs.budget import Budget
from icbs.pruner import Pruner
from icbs.report import Report, StepRecord
from icbs.settings import Settings

__all__ = ["Budget", "Pruner", "Report", "Settings", "StepRecord", "prune", "prune_layer_by_layer"]
