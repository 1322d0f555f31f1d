"""The engines' two parameter objects from one flat set of keyword arguments, for tests that
vary one knob at a time (`kw | {"round_": 4}`)."""

from __future__ import annotations

from dataclasses import fields

from fedrec.train.settings import LocalTraining, RoundContext

_LOCAL = {f.name for f in fields(LocalTraining)}


def engine_args(*, round_: int, clipping_norm: float, device, local_store=None, **local) -> tuple[LocalTraining, RoundContext]:
    """(LocalTraining, RoundContext): `round_`, `clipping_norm`, `device` and `local_store` are
    the round's; every other argument is a `LocalTraining` field."""
    unknown = set(local) - _LOCAL
    assert not unknown, f"not engine arguments: {sorted(unknown)}"
    return LocalTraining(**local), RoundContext(round=round_, clipping_norm=clipping_norm, device=device,
                                                local_store=local_store)  # fmt: skip
