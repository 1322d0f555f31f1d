"""Per-user dropout for the stacked forward: each user's masks from their own generator.

Why not torch's dropout: it draws from one global generator in the order of the batch, so a
user's masks would depend on who else is in their group. Here they come from the user's
own seed at the user's own length, so a user trains identically in any group, on any
worker, in any placement.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class DropoutMasks:
    """Each user's dropout masks, drawn from the user's own generator at the user's own length.

    Per step a user draws one vector of 16-bit random numbers: their (n_u, d) masks for
    every activation site, then their (heads, n_u, n_u) attention masks, in forward order.
    16 bits per mask entry, four from each 64-bit draw, because one 64-bit draw then
    serves four entries where a float draw serves one, which makes drawing the masks much
    cheaper (experiments/README.md#throughput-what-moved); the price is a drop rate rounded
    to a multiple of 1/65536. The buffers are laid out user-first, so a user as long as the group's
    width draws straight into their own slabs; a shorter one draws into scratch and is
    copied into the left-padded slices (padding always keeps: it never reaches a real
    position). Either way the same bits land in the same places.
    """

    def __init__(self, lengths: np.ndarray, n: int, d: int, heads: int, blocks: int, p: float,
                 seeds: Sequence[int], device: torch.device) -> None:  # fmt: skip
        self.device, self.blocks, self.n = device, blocks, n
        self.lengths = [int(k) for k in lengths]
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        drops = round(p * 65536)  # bits below the threshold drop: `drops` of the 65536 values
        self.threshold, self.scale = -32768 + drops, 65536 / (65536 - drops)
        self.vec = torch.full((len(seeds), 1 + 3 * blocks, n, d), 32767, dtype=torch.int16)
        self.att = torch.full((len(seeds), blocks, heads, n, n), 32767, dtype=torch.int16)
        self.draws = [((1 + 3 * blocks) * k * d, blocks * heads * k * k) for k in self.lengths]
        longest = max((a + b for a, b in self.draws), default=0)
        self.scratch = torch.empty((longest + 3) // 4, dtype=torch.int64)

    def _keep(self, bits: torch.Tensor) -> torch.Tensor:
        """scale where bits >= threshold, else 0. In float arithmetic, in place on one
        buffer, because that was faster than comparing to a bool tensor and converting it
        (experiments/README.md#dropout-keep-mask).
        The bits cross to a GPU as int16, half the bytes of the float mask (a no-op on the
        CPU)."""
        t = self.threshold
        return bits.to(self.device).to(torch.float32).sub_(t - 1).clamp_(0, 1).mul_(self.scale)

    def draw(self) -> list[torch.Tensor]:
        vec, att = self.vec, self.att
        for row, (k, (nv, na), g) in enumerate(zip(self.lengths, self.draws, self.gens)):
            if k == 0:
                continue
            # Full width: the user's slabs are contiguous. With both counts whole 64-bit words,
            # drawing the slabs one after the other gives the scratch path's bits, no copy.
            if k == self.n and nv % 4 == 0 and na % 4 == 0:
                vec[row].view(-1).view(torch.int64).random_(-(2**63), None, generator=g)
                att[row].view(-1).view(torch.int64).random_(-(2**63), None, generator=g)
                continue
            words = self.scratch[: (nv + na + 3) // 4]
            r = words.random_(-(2**63), None, generator=g).view(torch.int16)  # the full 64-bit range
            vec[row, :, -k:, :] = r[:nv].view(vec.shape[1], k, vec.shape[-1])
            att[row, :, :, -k:, -k:] = r[nv : nv + na].view(att.shape[1], att.shape[2], k, k)
        vmask, amask = self._keep(vec), self._keep(att)
        # forward order: embedding, then per block attention probs, attention out, fc1, fc2
        out = [vmask[:, 0]]
        for b in range(self.blocks):
            out += [amask[:, b], vmask[:, 1 + 3 * b], vmask[:, 2 + 3 * b], vmask[:, 3 + 3 * b]]
        return out
