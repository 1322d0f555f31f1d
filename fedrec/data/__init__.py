"""Interaction data: loaders, synthetic generator, leave-one-out and public/private split."""

from fedrec.data.interactions import DataError, Interactions
from fedrec.data.load import load_interactions
from fedrec.data.split import SplitData, split_users

__all__ = ["DataError", "Interactions", "SplitData", "load_interactions", "split_users"]
