"""Flower ClientApp and client-side data sources."""
