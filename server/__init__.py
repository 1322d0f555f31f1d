"""Flower ServerApp and the fedrec strategy."""
