"""Transformer recommender and its LoRA adapters."""

from fedrec.model.sasrec import SASRec

__all__ = ["SASRec"]
