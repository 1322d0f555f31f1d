"""LoRA adapters through peft: attach, freeze, read and write the adapter state
(`fedrec.model.types.AdapterState`)."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from collections.abc import Callable

from fedrec.model.item_adapters import ItemAdapter
from fedrec.model.sasrec import SASRec
from fedrec.model.types import ITEM_DELTA, AdapterState


def attach_lora(
    base: SASRec, rank: int, alpha: float, targets: list[str], seed: int,
    item_adapter: Callable[[], ItemAdapter] | None = None,
) -> PeftModel:  # fmt: skip
    """Wrap `base` with fresh LoRA adapters; base weights are frozen by peft.

    A is seeded (kaiming, peft's default) and B is zero, so the untrained adapter leaves
    the base model's outputs unchanged. `item_adapter` builds our own delta on the (tied)
    item-embedding table (fedrec.model.item_adapters), under the same seed; it travels
    with the adapter.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        if item_adapter is not None:
            base.item_delta = item_adapter().to(base.item_emb.weight.device)
    return model


def freeze_random_factors(model: PeftModel) -> None:
    """FFA-LoRA (Sun et al., ICLR 2024): keep the randomly initialised factor of every
    adapter fixed at its seeded value and train only the zero-initialised one, so clients
    train and send half the tensors and stay in one shared subspace."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or name.endswith(ITEM_DELTA + "B"):
            p.requires_grad_(False)


def freeze_lora(model: PeftModel) -> None:
    """lora-train=none: the projection adapters stay at init (B = 0, a no-op) and only the
    item-side adapter trains and travels."""
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(False)


def _item_delta_params(model: PeftModel) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ITEM_DELTA in n}


def adapter_state(model: PeftModel) -> AdapterState:
    state = dict(get_peft_model_state_dict(model)) | _item_delta_params(model)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: AdapterState) -> None:
    result = set_peft_model_state_dict(model, {k: v for k, v in state.items() if ITEM_DELTA not in k})
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    own = _item_delta_params(model)
    unexpected += [k for k in state if ITEM_DELTA in k and k not in own]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        raise ValueError(f"adapter state does not fit this model: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def adapter_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """Trainable LoRA parameters keyed like `adapter_state` (so deltas line up)."""
    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[name.replace(".default", "")] = p
    return params


def adapter_bytes(state: AdapterState) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
