"""LoRA adapters through peft: attach, read and write the adapter state.

An adapter state is an ordered `dict[str, Tensor]` of peft's own state-dict keys (the
adapter name dropped), the exact payload that travels between server and clients.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

AdapterState = dict[str, torch.Tensor]


def attach_lora(base: nn.Module, rank: int, alpha: float, targets: list[str], seed: int) -> PeftModel:
    """Wrap `base` with fresh LoRA adapters; base weights are frozen by peft.

    A is seeded (kaiming, peft's default) and B is zero, so the untrained adapter leaves
    the base model's outputs unchanged.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    return model


def adapter_state(model: PeftModel) -> AdapterState:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: AdapterState) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter state has keys this model lacks: {unexpected[:3]}")


def adapter_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """Trainable LoRA parameters keyed like `adapter_state` (so deltas line up)."""
    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[name.replace(".default", "")] = p
    return params


def adapter_bytes(state: AdapterState) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
