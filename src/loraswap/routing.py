"""Which slots each row (or packed token) of the next forward reads, as tensors the graph reads.

Routing lives in one float table ``row_weights[max_batch + 1, slots]`` shared by every slot layer:
row ``i`` adds ``sum_s row_weights[i, s] * scale_s * B_s A_s x_i``. ``activate`` fills every
row with one one-hot vector, ``route`` gives each row its own one-hot (or zeros for -1),
``blend`` gives rows weighted mixtures. A 0-dim ``per_token`` flag makes the table index packed
token positions instead of batch rows. Changing any of this is a copy into fixed tensors, so
the compiled graph never sees a new Python value and never recompiles.

When ``Capacity.max_blend`` (K, default 1) is below the slot count, the same routing is also kept
as K terms per row: ``row_slots[max_batch + 1, K]`` (slot ids) and ``row_terms[max_batch + 1, K]``
(their weights, 0 for unused terms). Slot layers then gather each row's own K slots instead of
computing all of them (see :mod:`loraswap.layers`), so a row costs K adapters' compute however
many slots are resident; a row may then mix at most K slots, and per-token routing (which would
gather per token) needs the dense capacity ``max_blend=slots``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .errors import SlotError

BlendWeights = Mapping[int, float]


def coefficients(row_weights: torch.Tensor, per_token: torch.Tensor, batch: int, positions: int) -> torch.Tensor:
    """Slot weights ``[positions, slots]`` for a forward whose ``positions`` flattened inputs come from ``batch`` rows.

    Rows (or tokens) past ``max_batch`` read the table's spare last row, which ``activate`` and
    uniform ``blend`` fill like every other and ``route`` leaves at zero (base model only).
    """
    position = torch.arange(positions, device=row_weights.device)
    row = position // max(positions // max(batch, 1), 1)
    index = torch.where(per_token, position, row).clamp(max=row_weights.shape[0] - 1)
    return row_weights[index]


def row_coefficients(row_weights: torch.Tensor, batch: int) -> torch.Tensor:
    """Slot weights ``[batch, slots]`` for layers that see whole rows (convolutions)."""
    row = torch.arange(batch, device=row_weights.device).clamp(max=row_weights.shape[0] - 1)
    return row_weights[row]


class Router:
    """Owns the routing tensors; every write is an in-place copy of a host-built table."""

    def __init__(self, slots: int, max_batch: int, device: torch.device, max_blend: int = 1) -> None:
        self.slots = slots
        self.max_batch = max_batch
        self.max_blend = min(max_blend, slots)
        self.rows = max_batch + 1
        self.row_weights = torch.zeros(self.rows, slots, dtype=torch.float32, device=device)
        self.per_token = torch.zeros((), dtype=torch.bool, device=device)
        self.row_slots: torch.Tensor | None = None
        self.row_terms: torch.Tensor | None = None
        if self.max_blend < slots:
            self.row_slots = torch.zeros(self.rows, self.max_blend, dtype=torch.long, device=device)
            self.row_terms = torch.zeros(self.rows, self.max_blend, dtype=torch.float32, device=device)
            self._first_term = torch.zeros(self.rows, self.max_blend)
            self._first_term[:, 0] = 1.0
        self._per_token_written = False
        self._one_hot = torch.eye(slots, dtype=torch.float32)
        self.activate(0)

    def _write(self, table: torch.Tensor, per_token: bool) -> None:
        """Write a dense ``[rows, slots]`` table (and its K-term form), after checking it fits."""
        if self.row_slots is not None:
            terms = self._terms(table, per_token)
            self.row_slots.copy_(terms[0], non_blocking=True)
            self.row_terms.copy_(terms[1], non_blocking=True)
        self._write_dense(table, per_token)

    def _write_dense(self, table: torch.Tensor, per_token: bool) -> None:
        self.row_weights.copy_(table, non_blocking=True)
        if per_token != self._per_token_written:  # a second tiny write would double activate's cost
            self.per_token.fill_(per_token)
            self._per_token_written = per_token

    def _terms(self, table: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot ids, weights)`` of each row's non-zero entries, at most ``max_blend`` of them."""
        self._check_per_token(per_token)
        used = (table != 0).sum(dim=1)
        if int(used.max()) > self.max_blend:
            row = int(used.argmax())
            raise SlotError(
                f"row {row} mixes {int(used[row])} slots but Capacity.max_blend is {self.max_blend}; "
                f"attach with Capacity(max_blend={int(used[row])}) or more (each row then costs that many "
                "adapters' compute)"
            )
        slot_ids = table.abs().topk(self.max_blend, dim=1).indices
        return slot_ids, table.gather(1, slot_ids)

    def _check_per_token(self, per_token: bool) -> None:
        """Per-token routing needs the dense capacity: a gathering one reads each row's slots, not each token's."""
        if per_token and self.row_slots is not None:
            raise SlotError(
                f"per-token routing needs every slot computed for every token, but this capacity gathers "
                f"each row's {self.max_blend} slot(s) (Capacity.max_blend={self.max_blend}); attach with "
                f"Capacity(max_blend={self.slots}) (= slots) to route packed tokens"
            )

    def check_slot(self, slot: int, what: str = "slot") -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise SlotError(
                f"{what} {slot!r} is outside the {self.slots} slot(s) allocated; use 0..{self.slots - 1} "
                "or attach with a larger Capacity.slots"
            )

    def activate(self, slot: int) -> None:
        self.check_slot(slot)
        if self.row_slots is not None:
            self.row_slots.fill_(slot)
            self.row_terms.copy_(self._first_term, non_blocking=True)
        self._write_dense(self._one_hot[slot].expand(self.rows, self.slots), per_token=False)

    def route(self, ids: Sequence[int], per_token: bool = False) -> None:
        ids = [int(i) for i in ids]
        unit = "token" if per_token else "row"
        if len(ids) > self.max_batch:
            raise SlotError(
                f"route got {len(ids)} {unit}s but the routing table holds {self.max_batch}; "
                f"attach with Capacity(max_batch={len(ids)}) or more"
            )
        for position, slot in enumerate(ids):
            if slot != -1:
                self.check_slot(slot, f"{unit} {position} routed to slot")
        self._check_per_token(per_token)
        slot_ids = torch.zeros(self.rows, dtype=torch.long)  # rows past the list: slot 0 at weight 0
        weights = torch.zeros(self.rows)
        if ids:
            routed = torch.tensor(ids)
            slot_ids[: len(ids)] = routed.clamp(min=0)
            weights[: len(ids)] = (routed != -1).float()
        self._write_one_hot(slot_ids, weights, per_token)

    def _write_one_hot(self, slot_ids: torch.Tensor, weights: torch.Tensor, per_token: bool) -> None:
        """Each row reads one slot at a weight (0 or 1): the K-term form is that slot as the first term, built
        without the general path's top-k (``route`` runs once per batch in a serving loop)."""
        if self.row_slots is not None:
            terms = self._first_term * weights[:, None]
            self.row_slots.copy_(slot_ids[:, None].expand(-1, self.max_blend), non_blocking=True)
            self.row_terms.copy_(terms, non_blocking=True)
        table = torch.zeros(self.rows, self.slots).scatter_(1, slot_ids[:, None], weights[:, None])
        self._write_dense(table, per_token)

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        """One mapping for every row, or one mapping per row (rows past the list use the base model)."""
        if isinstance(weights, Mapping):
            self._write(self._blend_row(weights, "blend").expand(self.rows, self.slots), per_token=False)
            return
        if len(weights) > self.max_batch:
            raise SlotError(
                f"blend got {len(weights)} rows but the routing table holds {self.max_batch}; "
                f"attach with Capacity(max_batch={len(weights)}) or more"
            )
        table = torch.zeros(self.rows, self.slots)
        for position, row in enumerate(weights):
            table[position] = self._blend_row(row, f"blend row {position}")
        self._write(table, per_token=False)

    def _blend_row(self, weights: BlendWeights, what: str) -> torch.Tensor:
        row = torch.zeros(self.slots)
        for slot, weight in weights.items():
            self.check_slot(slot, f"{what}: slot")
            weight = float(weight)
            if not math.isfinite(weight):
                raise SlotError(f"{what}: slot {slot} has weight {weight}; weights must be finite")
            row[slot] = weight
        return row
