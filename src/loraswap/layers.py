"""Slot layers: a base layer plus fixed-shape LoRA slot buffers.

Each slot layer holds, as registered buffers that never change shape, dtype, device or storage:
``lora_A [slots, R, *a_tail]``, ``lora_B [slots, out, R]``, ``scale [slots]`` (float32), ``live [slots, R]``
(bool: the rank rows the slot's adapter fills), an optional ``lora_bias [slots, out]``, an optional
``lora_dora [slots, out]`` (DoRA, see :mod:`loraswap.dora`) and the routing tensors of
:class:`~loraswap.routing.Router`, shared by all layers. Its output is
``base(x) + sum_s w_s * scale_s * (B_s (live_s * A_s x) + bias_s) + (sum_s w_s * dora_s) * (base(x) - b0)``
with ``w`` the row's routing weights and ``b0`` the base layer's bias; a rank row that is not live, a zero
slot or a zero weight adds exactly nothing. A DoRA slot holds ``B_s`` already multiplied by its
magnitude-over-norm ``g_s`` and ``dora_s = g_s - 1``; every other slot holds ``dora_s = 0``, so its rows
add ``delta + 0 * (...)``, which is ``delta`` bit for bit. (Rank rows past the
live ones may hold a previous adapter's values, which a swap does not spend time zeroing, see
:mod:`loraswap.layout`: the dense kernel masks the shrunk activations with a ``where``, not a
product; the gathered kernel never reads those rows, see :meth:`SlotLayer._slot_weights`.)

How a layer picks its kernel: once, in ``__init__`` (at ``attach``), from the router's static
shapes, stored as the Python attribute ``gathered`` that never changes afterwards (no branch on
values that change per batch, so routing never recompiles):

- dense (``gathered`` False; the router has no term tables, i.e. ``Capacity.max_blend == slots``,
  one slot included): every slot goes through one shrink and one expand matmul over ``S * R``
  ranks, each slot's output weighted by ``row_weights`` (per row, or per packed token). Cost: S
  adapters per row.
- gathered (``gathered`` True; ``max_blend`` K below ``slots``, the default for more than one slot):
  each row indexes its own K slots out of the buffers (``lora_A[row_slots]``: ``[B, K, R, *a_tail]``,
  ``lora_B[row_slots]``: ``[B, K, out, R]``, weights ``row_terms``) and runs batched matmuls
  (Linear, Conv1D), a lookup (Embedding) or a grouped convolution (convs, one group per row).
  Cost: K adapters per row plus a copy of their live rank rows, however many slots are resident.

A subclass for another base layer (a sharded one, say) keeps the buffers, implements
:meth:`SlotLayer.spec`, and in ``forward`` calls ``_token_routing``/``_expand`` or
``_gathered_terms``/``_gathered_expand`` according to ``self.gathered``.

Supported base layers mirror PEFT's LoRA: ``nn.Linear``, transformers' ``Conv1D`` (fan_in_fan_out),
``nn.Conv1d/2d/3d`` (groups included: ``lora_B`` is stored dense, block-diagonal per group) and
``nn.Embedding``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Router, coefficients, row_coefficients


def slot_rows(buffer: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """``buffer[slot_ids]``: the rows of ``buffer`` (``[slots, ...]``) that ``slot_ids`` (any shape) names.

    Compiled, an index without a bounds check: the ids come from the router's tables, which hold only checked
    ids (:class:`~loraswap.routing.Router` validates every slot before it writes), and inductor would put the
    check in the gather's inner copy loop, once per vector, which keeps the loop from being a plain vectorised
    copy. Eager, ``index_select``: one block copy per id, 2-3x faster here than an advanced index.
    """
    if torch.compiler.is_compiling():
        return torch.ops.aten._unsafe_index(buffer, [slot_ids])
    return buffer.index_select(0, slot_ids.reshape(-1)).view(*slot_ids.shape, *buffer.shape[1:])


@dataclass(frozen=True)
class SlotSpec:
    """What a base layer needs per slot: ``lora_A`` is ``[R, *a_tail]``, ``lora_B`` is ``[out, R]``.

    ``groups`` splits the rank into per-group blocks (grouped convs); ``b_trailing`` is how many
    size-1 kernel dims PEFT's ``lora_B`` carries (conv) and the slot buffer drops.
    """

    a_tail: tuple[int, ...]
    out: int
    groups: int = 1
    b_trailing: int = 0


class SlotLayer(nn.Module):
    """Common buffers of every slot layer; subclasses define :meth:`spec` and ``forward``."""

    def __init__(
        self,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: torch.Tensor,
        live: torch.Tensor,
        lora_bias: torch.Tensor | None,
        router: Router,
        lora_dora: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("live", live, persistent=False)
        self.register_buffer("lora_bias", lora_bias, persistent=False)
        self.register_buffer("lora_dora", lora_dora, persistent=False)
        self.register_buffer("row_weights", router.row_weights, persistent=False)
        self.register_buffer("per_token", router.per_token, persistent=False)
        self.register_buffer("row_slots", router.row_slots, persistent=False)
        self.register_buffer("row_terms", router.row_terms, persistent=False)
        self.gathered = router.row_slots is not None  # the kernel, fixed at attach: see the module docstring

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that reads ``layer.weight`` keeps working after attach."""
        return self.base_layer.weight

    def _bias_delta(self, coef: torch.Tensor) -> torch.Tensor:
        return coef.to(self.lora_bias.dtype) @ self.lora_bias

    def _with_dora(self, result: torch.Tensor, delta: torch.Tensor, vector: torch.Tensor, channel_dim: int = -1):
        """``result + (delta + vector * (result - b0))``: PEFT's DoRA term ``(g - 1) * base_no_bias(x) + g * s * B(A(x))``
        (``g`` folded into the slot's ``lora_B``), ``vector`` each row's ``sum_s w_s * (g_s - 1)`` broadcast over
        ``result`` along ``channel_dim`` (the output features). Without DoRA in the capacity: ``result + delta``."""
        if self.lora_dora is None:
            return result + delta
        base = result
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            shape = [1] * result.dim()
            shape[channel_dim] = -1
            base = result - bias.view(shape)
        return result + (delta + vector.to(result.dtype) * base)

    def _dense_dora(self, routing: torch.Tensor) -> torch.Tensor | None:
        """Dense kernel: each position's ``sum_s w_s * dora_s`` (``routing [n, S]`` -> ``[n, out]``)."""
        if self.lora_dora is None:
            return None
        return routing.to(self.lora_dora.dtype) @ self.lora_dora

    def _gathered_dora(self, batch: int, slot_ids: torch.Tensor) -> torch.Tensor | None:
        """Gathered kernel: each row's ``sum_k w_k * dora_k`` over its own K slots (``[batch, out]``)."""
        if self.lora_dora is None:
            return None
        row = torch.arange(batch, device=self.row_terms.device).clamp(max=self.row_terms.shape[0] - 1)
        weights = self.row_terms[row].to(self.lora_dora.dtype)
        return torch.bmm(weights[:, None, :], slot_rows(self.lora_dora, slot_ids))[:, 0]

    def _token_routing(self, batch: int, positions: int) -> torch.Tensor:
        """Routing weights ``[positions, S]``: the same in every layer, so the compiled graph computes them once."""
        return coefficients(self.row_weights, self.per_token, batch, positions)

    def _expand(self, hidden: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """Dense kernel: shrunk activations ``[n, S, R]``, ``routing [n, S]`` -> delta ``[n, out]``, bias included.

        With one slot, the routing weight times the scale is one scalar per row, applied to the output
        where it fuses into the residual add (PEFT's order, ``B(Ax) * scale``); with several, each
        slot's weight multiplies its shrunk activations, and one expand matmul sums the slots.
        """
        slots, out, rank = self.lora_B.shape
        hidden = torch.where(self.live, hidden, 0)
        if slots == 1:
            delta = hidden.reshape(-1, rank) @ self.lora_B[0].t()
            delta = delta * (routing * self.scale).to(delta.dtype)
        else:
            weights = (routing.unsqueeze(-1) * self.scale.unsqueeze(-1)).to(hidden.dtype)
            lora_B_t = self._rank_major_B().reshape(slots * rank, out)
            delta = (hidden * weights).reshape(hidden.shape[0], slots * rank) @ lora_B_t
        if self.lora_bias is not None:
            delta = delta + self._bias_delta(routing * self.scale)
        return delta

    def _gathered_terms(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered kernel: each row's slot ids ``[batch, K]`` and weights times scales ``[batch, K]`` (float32).

        Rows past ``max_batch`` read the table's spare last row, like the dense kernel.
        """
        row = torch.arange(batch, device=self.row_slots.device).clamp(max=self.row_slots.shape[0] - 1)
        slot_ids = self.row_slots[row]
        return slot_ids, self.row_terms[row] * slot_rows(self.scale, slot_ids)

    def _rank_major_B(self) -> torch.Tensor:
        """``lora_B`` as ``[slots, R, out]``: the order the layout stores it in (rank row ``k`` holds ``lora_B[:, k]``
        contiguously, see :mod:`loraswap.layout`), so gathering rows of it reads contiguous memory."""
        return self.lora_B.transpose(1, 2)

    def _slot_weights(self, buffer: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Each row's slots of ``buffer`` (``[slots, R, ...]`` -> ``[B, K, R, ...]``).

        Compiled, rank rows that are not live read as zeros without being read: a masked gather, which inductor
        turns into a condition around each load of the copy, so a row on a rank-4 adapter in a rank-32 capacity
        copies 4 rank rows, not 32, and rows a swap left stale (see :mod:`loraswap.layout`) add exactly nothing.
        Eager, where nothing fuses, the rows are copied as they are and :meth:`_mask_hidden` zeroes what the
        rows that are not live produce: one pass over the small shrunk activations, not two over the weights.
        """
        if not torch.compiler.is_compiling():
            return slot_rows(buffer, slot_ids)
        live = slot_rows(self.live, slot_ids)  # [B, K, R]
        mask = live.reshape(*live.shape, *[1] * (buffer.dim() - 2))
        return torch.ops.aten._unsafe_masked_index(buffer, mask, [slot_ids], 0)

    def _mask_hidden(self, hidden: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Eager only (compiled, :meth:`_slot_weights` never reads those rows): shrunk activations ``[B, P, K, R]``
        with the rank rows that are not live zeroed."""
        if torch.compiler.is_compiling():
            return hidden
        return torch.where(slot_rows(self.live, slot_ids)[:, None], hidden, 0)

    def _gathered_expand(self, hidden: torch.Tensor, slot_ids: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Gathered kernel: shrunk activations ``[B, P, K, R]`` -> delta ``[B, P, out]`` through each row's ``lora_B``.

        With one term per row the weight scales the output, as PEFT orders it; with K terms it
        scales each term's shrunk activations and one batched matmul sums the terms.
        """
        batch, positions, terms, rank = hidden.shape
        hidden = self._mask_hidden(hidden, slot_ids)
        lora_B_t = self._slot_weights(self._rank_major_B(), slot_ids)  # [B, K, R, out]
        if terms == 1:
            delta = torch.bmm(hidden.reshape(batch, positions, rank), lora_B_t[:, 0])
            delta = delta * coef.to(delta.dtype)[:, :, None]
        else:
            hidden = hidden * coef.to(hidden.dtype)[:, None, :, None]
            delta = torch.bmm(hidden.reshape(batch, positions, terms * rank), lora_B_t.reshape(batch, terms * rank, -1))
        if self.lora_bias is not None:
            bias = torch.bmm(coef.to(self.lora_bias.dtype)[:, None, :], slot_rows(self.lora_bias, slot_ids))
            delta = delta + bias.to(delta.dtype)
        return delta


class SlotLinear(SlotLayer):
    """``nn.Linear`` with LoRA slots."""

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        return SlotSpec(a_tail=(base_layer.in_features,), out=base_layer.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        batch = x.shape[0] if x.dim() > 1 else 1
        if self.gathered:
            delta, dora = self._gathered_delta(x.reshape(batch, -1, x.shape[-1]).to(self.lora_A.dtype))
            if dora is not None:  # [B, out] -> one vector per row, over its positions
                dora = dora.view(batch, *[1] * (result.dim() - 2), -1) if result.dim() > 1 else dora[0]
        else:
            flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
            routing = self._token_routing(batch, flat.shape[0])
            slots, rank = self.lora_A.shape[:2]
            hidden = flat @ self.lora_A.reshape(slots * rank, -1).t()  # one matmul over every slot
            delta = self._expand(hidden.reshape(-1, slots, rank), routing)
            dora = self._dense_dora(routing)
            dora = None if dora is None else dora.reshape(result.shape)
        return self._with_dora(result, delta.reshape(result.shape).to(result.dtype), dora)

    def _gathered_delta(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, T, in]`` -> ``[B, T, out]``: one batched shrink over each row's own K slots, then the expand;
        and each row's DoRA vector ``[B, out]`` (None without DoRA)."""
        batch, positions, _ = rows.shape
        slot_ids, coef = self._gathered_terms(batch)
        lora_A = self._slot_weights(self.lora_A, slot_ids)  # [B, K, R, in]
        hidden = torch.bmm(rows, lora_A.reshape(batch, -1, lora_A.shape[-1]).transpose(1, 2))
        delta = self._gathered_expand(hidden.reshape(batch, positions, *lora_A.shape[1:3]), slot_ids, coef)
        return delta, self._gathered_dora(batch, slot_ids)


class SlotConv1D(SlotLinear):
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        n_in, n_out = base_layer.weight.shape
        return SlotSpec(a_tail=(n_in,), out=n_out)


class SlotEmbedding(SlotLayer):
    """``nn.Embedding`` with LoRA slots; PEFT's ``lora_embedding_A [r, num_embeddings]`` is a lookup table."""

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        return SlotSpec(a_tail=(base_layer.num_embeddings,), out=base_layer.embedding_dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        batch = x.shape[0] if x.dim() > 1 else 1
        if self.gathered:
            ids = x.reshape(batch, -1)
            slot_ids, coef = self._gathered_terms(batch)
            hidden = self.lora_A.permute(0, 2, 1)[slot_ids[:, None, :], ids[:, :, None]]  # [B, T, K, R]: a lookup
            hidden = torch.where(slot_rows(self.live, slot_ids)[:, None], hidden, 0)  # a lookup reads stale rows too
            delta = self._gathered_expand(hidden, slot_ids, coef)
            dora = self._gathered_dora(batch, slot_ids)
            if dora is not None:
                dora = dora.view(batch, *[1] * (result.dim() - 2), -1) if result.dim() > 1 else dora[0]
        else:
            slots, rank, vocab = self.lora_A.shape
            table = self.lora_A.reshape(slots * rank, vocab).t()
            hidden = F.embedding(x, table).reshape(-1, slots, rank)
            routing = self._token_routing(batch, hidden.shape[0])
            delta = self._expand(hidden, routing)
            dora = self._dense_dora(routing)
            dora = None if dora is None else dora.reshape(result.shape)
        delta = delta.reshape(result.shape)
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            delta = delta * embed_scale.to(delta.dtype)
        return self._with_dora(result, delta.to(result.dtype), dora)


class SlotConv(SlotLayer):
    """``nn.Conv1d/2d/3d`` with LoRA slots, as PEFT builds them: ``lora_A`` is a conv with the base
    layer's kernel, stride and padding; ``lora_B`` a 1x1 conv with the base layer's groups."""

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        kernel = tuple(base_layer.kernel_size)
        return SlotSpec(
            a_tail=(base_layer.in_channels, *kernel),
            out=base_layer.out_channels,
            groups=base_layer.groups,
            b_trailing=len(kernel),
        )

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor, groups: int = 1) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[kernel.dim() - 3]
        return conv(x, kernel, None, self.base_layer.stride, self.base_layer.padding, 1, groups)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        x = x.to(self.lora_A.dtype)
        delta = self._gathered_delta(x) if self.gathered else self._dense_delta(x)
        dora = None
        if self.lora_dora is not None:  # one vector per row, over the output channels (dim 1) of its positions
            batch = result.shape[0]
            if self.gathered:
                dora = self._gathered_dora(batch, self._gathered_terms(batch)[0])
            else:
                dora = self._dense_dora(row_coefficients(self.row_weights, batch))
            dora = dora.view(batch, -1, *[1] * (result.dim() - 2))
        return self._with_dora(result, delta.reshape(result.shape).to(result.dtype), dora, channel_dim=1)

    def _dense_delta(self, x: torch.Tensor) -> torch.Tensor:
        slots, rank = self.lora_A.shape[:2]
        hidden = self._conv(x, self.lora_A.reshape(slots * rank, *self.lora_A.shape[2:]))
        batch = hidden.shape[0]
        hidden = torch.where(self.live[:, :, None], hidden.reshape(batch, slots, rank, -1), 0)
        coef = (row_coefficients(self.row_weights, batch) * self.scale).to(hidden.dtype)
        if slots == 1:  # scale the output instead: it fuses into the residual add
            delta = torch.einsum("brp,or->bop", hidden[:, 0], self.lora_B[0]) * coef[:, :, None]
        else:
            delta = torch.einsum("bsrp,sor->bop", hidden * coef[:, :, None, None], self.lora_B)
        if self.lora_bias is not None:
            delta = delta + self._bias_delta(coef)[:, :, None]
        return delta

    def _gathered_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Each row convolves with its own K slots' ``lora_A``: one grouped convolution, a group per row."""
        batch, channels = x.shape[:2]
        slot_ids, coef = self._gathered_terms(batch)
        lora_A = self._slot_weights(self.lora_A, slot_ids)  # [B, K, R, C, *kernel]
        terms, rank = lora_A.shape[1:3]
        kernel = lora_A.reshape(batch * terms * rank, *lora_A.shape[3:])
        hidden = self._conv(x.reshape(1, batch * channels, *x.shape[2:]), kernel, groups=batch)
        hidden = hidden.reshape(batch, terms, rank, -1).permute(0, 3, 1, 2)  # [B, P, K, R]
        return self._gathered_expand(hidden, slot_ids, coef).transpose(1, 2)


def slot_layer_class(module: nn.Module) -> type[SlotLayer] | None:
    """The slot layer that wraps ``module``, or None when loraswap cannot wrap it."""
    if isinstance(module, nn.Linear) and type(module).__name__ != "NonDynamicallyQuantizableLinear":
        return SlotLinear
    if isinstance(module, nn.Embedding):
        return SlotEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return SlotConv
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return SlotConv1D
    return None
