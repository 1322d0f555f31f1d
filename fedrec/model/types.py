"""The adapter payload's type and key names: importable without peft, by any layer."""

from __future__ import annotations

import torch

# An adapter state: peft's own state-dict keys (the adapter name dropped) plus our item
# adapter's, ordered; the exact payload that travels between server and clients.
AdapterState = dict[str, torch.Tensor]

ITEM_DELTA = "item_delta."  # marks the item-side adapter's tensors in an adapter state
LOCAL_MARK = ".lora_B."  # under lora-share=a-only these tensors stay on the user's device


def is_local(key: str) -> bool:
    return LOCAL_MARK in key
