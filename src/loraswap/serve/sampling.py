"""Per-row sampling on the device, inside the compiled step: greedy, temperature, top-p, seeded.

Each row carries its own ``temperature`` (0 = greedy), ``top_p`` and ``seed`` as fixed ``[max_batch]`` tensors,
so one graph serves every mix. A per-row ``torch.Generator`` cannot be used in one batched op, so the noise is
counter-based instead (as Philox is): a hash of ``(seed, position, token id)`` gives each row its own uniform
``u`` and the token is ``argmax(logits / temperature + Gumbel(u))`` over the top-p set, which draws from the
softmax. A request's tokens then depend on its seed and its own positions only, never on which rows it shared a
step with: a ``seed`` makes a request reproducible under any traffic.

The hash works on 31-bit integers in int64 (products stay below 2**62), so nothing relies on overflow.
"""

from __future__ import annotations

import torch

_MASK = 0x7FFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A few rounds of multiply-xorshift on 31-bit values."""
    for multiplier in (1103515245, 1664525, 22695477):
        x = (x * multiplier + 12345) & _MASK
        x = x ^ (x >> 13)
    return x


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` uniforms in (0, 1), a function of each row's seed and position only."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    state = _mix((seeds.view(-1, 1) & _MASK) ^ 0x5BD1E995)
    state = _mix(state ^ (positions.view(-1, 1) & _MASK))
    state = _mix(state ^ token.view(1, -1))
    return ((state >> 7).to(torch.float32) + 0.5) / float(1 << 24)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor):
    """Next token ``[rows]`` from ``logits [rows, vocab]``: argmax where ``temperature`` is 0, else a seeded draw."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature)).view(-1, 1)
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    beyond = (probs.cumsum(dim=-1) - probs) > top_p.view(-1, 1)  # the first token is always kept
    ordered = ordered.masked_fill(beyond, float("-inf"))
    noise = uniform_noise(seeds, positions, logits.shape[-1])
    gumbel = (-torch.log(-torch.log(noise))).gather(-1, order)  # token j's noise, in sorted order
    drawn = order.gather(-1, (ordered + gumbel).argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, drawn, greedy)
