"""User-level privacy: update clipping (noise and accounting build on it)."""

from fedrec.privacy.clipping import clip_update, update_norm

__all__ = ["clip_update", "update_norm"]
