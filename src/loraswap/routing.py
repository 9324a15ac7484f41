"""Which slots each row (or packed token) of the next forward reads, as tensors the graph reads.

The dense kernel (``Capacity.max_blend == slots``, one slot included) reads one float table
``row_weights[max_batch + 1, slots]`` shared by every slot layer: row ``i`` adds
``sum_s row_weights[i, s] * scale_s * B_s A_s x_i``. ``activate`` fills every row with one one-hot
vector, ``route`` gives each row its own one-hot (or zeros for -1), ``blend`` gives rows weighted
mixtures. A 0-dim ``per_token`` flag makes the table index packed token positions instead of batch rows.

When ``Capacity.max_blend`` (K, default 1) is below the slot count, the same routing is kept as K terms
per row instead: ``row_slots[max_batch + 1, K]`` (slot ids) and ``row_terms[max_batch + 1, K]`` (their
weights, 0 for unused terms). Slot layers then gather each row's own K slots instead of computing all
of them (see :mod:`loraswap.layers`), so a row costs K adapters' compute however many slots are
resident; a row may then mix at most K slots, and per-token routing (which would gather per token)
needs the dense capacity ``max_blend=slots``.

Changing any of this is a write into fixed tensors, so the compiled graph never sees a new Python value
and never recompiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
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


class _HostTable:
    """A routing tensor and the numpy array its writes go through.

    On CPU the array is a view of the tensor's own memory, so a write is one numpy assignment; elsewhere it is
    a host copy that :meth:`send` copies over. ``route`` runs once per batch, right after a forward has evicted
    torch's dispatch code from the CPU caches: built from a dozen small torch ops it took 140-250 us there
    (``loraswap bench mixed``'s model, 2-core CPU), about 2% of the forward; with numpy writes, 45-71 us.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self._host = tensor if tensor.device.type == "cpu" else torch.zeros_like(tensor, device="cpu")
        self.array = self._host.numpy()

    def send(self) -> None:
        if self._host is not self.tensor:
            self.tensor.copy_(self._host, non_blocking=True)  # from pageable memory: the host copy is free at return


class Router:
    """Owns the routing tensors; every write goes through their host arrays (:class:`_HostTable`), after checking."""

    def __init__(self, slots: int, max_batch: int, device: torch.device, max_blend: int = 1) -> None:
        self.slots = slots
        self.max_batch = max_batch
        self.max_blend = min(max_blend, slots)
        self.rows = max_batch + 1
        self.per_token = torch.zeros((), dtype=torch.bool, device=device)
        terms = (self.rows, self.max_blend)
        gathered = self.max_blend < slots
        self.row_weights = None if gathered else torch.zeros(self.rows, slots, dtype=torch.float32, device=device)
        self.row_slots = torch.zeros(terms, dtype=torch.long, device=device) if gathered else None
        self.row_terms = torch.zeros(terms, dtype=torch.float32, device=device) if gathered else None
        self._tables = {name: _HostTable(tensor) for name, tensor in self.named_tables().items()}
        self._written_rows = self.rows  # rows the last write may have left non-zero
        self.activate(0)

    def named_tables(self) -> dict[str, torch.Tensor]:
        """The tensors slot layers read: ``per_token`` with ``row_weights`` (dense kernel), or ``row_slots`` and
        ``row_terms`` (gathered kernel)."""
        names = ("per_token", "row_weights") if self.row_slots is None else ("per_token", "row_slots", "row_terms")
        return {name: getattr(self, name) for name in names}

    def _array(self, name: str) -> np.ndarray:
        return self._tables[name].array

    def _send(self, *names: str) -> None:
        for name in names:
            self._tables[name].send()

    def _set_per_token(self, per_token: bool) -> tuple[str, ...]:
        """Set the flag; the names of the tables to send (none when it already held ``per_token``)."""
        flag = self._array("per_token")
        if bool(flag) == per_token:
            return ()
        flag[()] = per_token
        return ("per_token",)

    def _write(self, table: torch.Tensor, rows: int) -> None:
        """Write a dense ``[rows, slots]`` table (its K-term form for a gathering capacity), after checking it fits."""
        if self.row_slots is None:
            self._array("row_weights")[:] = table.numpy()
            self._send("row_weights", *self._set_per_token(False))
        else:
            slot_ids, weights = self._terms(table)
            self._array("row_slots")[:] = slot_ids.numpy()
            self._array("row_terms")[:] = weights.numpy()
            self._send("row_slots", "row_terms")
        self._written_rows = rows

    def _terms(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slot ids, weights)`` of each row's non-zero entries, at most ``max_blend`` of them."""
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
        if self.row_slots is None:
            table = self._array("row_weights")
            table[:] = 0
            table[:, slot] = 1
            self._send("row_weights", *self._set_per_token(False))
        else:
            self._array("row_slots")[:] = slot
            terms = self._array("row_terms")
            terms[:] = 0
            terms[:, 0] = 1
            self._send("row_slots", "row_terms")
        self._written_rows = self.rows

    def route(self, ids: Sequence[int], per_token: bool = False) -> None:
        """Row (or token) ``i`` reads slot ``ids[i]`` at weight 1, or nothing for -1; rows past the list read nothing.

        Runs once per batch in a serving loop, so it writes only the rows it routes and the ones the last write
        left non-zero, with a few numpy assignments.
        """
        ids = [int(i) for i in ids]
        unit = "token" if per_token else "row"
        if len(ids) > self.max_batch:
            raise SlotError(
                f"route got {len(ids)} {unit}s but the routing table holds {self.max_batch}; "
                f"attach with Capacity(max_batch={len(ids)}) or more"
            )
        if ids and (min(ids) < -1 or max(ids) >= self.slots):
            position = next(p for p, slot in enumerate(ids) if slot != -1 and not 0 <= slot < self.slots)
            self.check_slot(ids[position], f"{unit} {position} routed to slot")
        self._check_per_token(per_token)
        rows, cleared = len(ids), max(len(ids), self._written_rows)
        slot_ids = [max(slot, 0) for slot in ids]  # -1 reads slot 0 at weight 0
        weights = [float(slot != -1) for slot in ids]
        if self.row_slots is None:
            table = self._array("row_weights")
            table[:cleared] = 0
            table[range(rows), slot_ids] = weights
            self._send("row_weights", *self._set_per_token(per_token))
        else:
            terms = self._array("row_terms")
            terms[:cleared] = 0
            terms[:rows, 0] = weights
            self._array("row_slots")[:rows, 0] = slot_ids  # rows past ``rows`` keep checked ids, at weight 0
            self._send("row_slots", "row_terms")
        self._written_rows = rows

    def blend(self, weights: BlendWeights | Sequence[BlendWeights]) -> None:
        """One mapping for every row, or one mapping per row (rows past the list use the base model)."""
        if isinstance(weights, Mapping):
            self._write(self._blend_row(weights, "blend").expand(self.rows, self.slots).contiguous(), self.rows)
            return
        if len(weights) > self.max_batch:
            raise SlotError(
                f"blend got {len(weights)} rows but the routing table holds {self.max_batch}; "
                f"attach with Capacity(max_batch={len(weights)}) or more"
            )
        table = torch.zeros(self.rows, self.slots)
        for position, row in enumerate(weights):
            table[position] = self._blend_row(row, f"blend row {position}")
        self._write(table, len(weights))

    def _blend_row(self, weights: BlendWeights, what: str) -> torch.Tensor:
        row = torch.zeros(self.slots)
        for slot, weight in weights.items():
            self.check_slot(slot, f"{what}: slot")
            weight = float(weight)
            if not math.isfinite(weight):
                raise SlotError(f"{what}: slot {slot} has weight {weight}; weights must be finite")
            row[slot] = weight
        return row
