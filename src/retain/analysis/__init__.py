"""Update analysis: how large, dense and low-rank a fine-tune's weight change is."""

from retain.analysis.tracker import UpdateTracker
from retain.analysis.updates import density, energy_rank, layer_index, next_token_kl, param_group, summarize

__all__ = ["UpdateTracker", "density", "energy_rank", "layer_index", "next_token_kl", "param_group", "summarize"]
