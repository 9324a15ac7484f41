"""Slot layers: a base layer plus fixed-shape LoRA slot buffers.

Each slot layer holds, as registered buffers that never change shape, dtype, device or storage:
``lora_A [slots, R, *a_tail]``, ``lora_B [slots, out, R]``, ``scale [slots]`` (float32), an optional
``lora_bias [slots, out]``, and the routing tensors shared by all layers. Its output is
``base(x) + sum_s w_s * scale_s * (B_s A_s x + bias_s)`` with ``w`` the row's routing weights.
All slots go through one shrink and one expand matmul (or, with ``Capacity.max_blend`` below the
slot count, each row gathers its own slots), so swapping, activating or routing never changes the
graph; a zero slot or a zero weight adds exactly nothing.

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
    """Common buffers of every slot layer; subclasses define :meth:`spec` and :meth:`lora_delta`."""

    def __init__(
        self,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: torch.Tensor,
        lora_bias: torch.Tensor | None,
        router: Router,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("lora_bias", lora_bias, persistent=False)
        self.register_buffer("row_weights", router.row_weights, persistent=False)
        self.register_buffer("per_token", router.per_token, persistent=False)
        self.register_buffer("row_slots", router.row_slots, persistent=False)
        self.register_buffer("row_terms", router.row_terms, persistent=False)

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, so code that reads ``layer.weight`` keeps working after attach."""
        return self.base_layer.weight

    def _bias_delta(self, coef: torch.Tensor) -> torch.Tensor:
        return coef.to(self.lora_bias.dtype) @ self.lora_bias

    def _token_routing(self, batch: int, positions: int) -> torch.Tensor:
        """Routing weights ``[positions, S]``: the same in every layer, so the compiled graph computes them once."""
        return coefficients(self.row_weights, self.per_token, batch, positions)

    def _expand(self, hidden: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """Shrunk activations ``[n, S, R]`` and ``routing [n, S]`` -> LoRA delta ``[n, out]``, bias included.

        With one slot, the routing weight times the scale is one scalar per row, applied to the output
        where it fuses into the residual add (PEFT's order, ``B(Ax) * scale``); with several, each
        slot's weight multiplies its shrunk activations, and one expand matmul sums the slots.
        """
        slots, out, rank = self.lora_B.shape
        if slots == 1:
            delta = hidden.reshape(-1, rank) @ self.lora_B[0].t()
            delta = delta * (routing * self.scale).to(delta.dtype)
        else:
            weights = (routing.unsqueeze(-1) * self.scale.unsqueeze(-1)).to(hidden.dtype)
            lora_B = self.lora_B.permute(1, 0, 2).reshape(out, slots * rank)
            delta = (hidden * weights).reshape(hidden.shape[0], slots * rank) @ lora_B.t()
        if self.lora_bias is not None:
            delta = delta + self._bias_delta(routing * self.scale)
        return delta


class SlotLinear(SlotLayer):
    """``nn.Linear`` with LoRA slots."""

    @staticmethod
    def spec(base_layer: nn.Module) -> SlotSpec:
        return SlotSpec(a_tail=(base_layer.in_features,), out=base_layer.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        batch = x.shape[0] if x.dim() > 1 else 1
        if self.row_slots is not None:
            delta = self._gathered_delta(x.reshape(batch, -1, x.shape[-1]).to(self.lora_A.dtype))
        else:
            flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
            routing = self._token_routing(batch, flat.shape[0])
            slots, rank = self.lora_A.shape[:2]
            hidden = flat @ self.lora_A.reshape(slots * rank, -1).t()  # one matmul over every slot
            delta = self._expand(hidden.reshape(-1, slots, rank), routing)
        return result + delta.reshape(result.shape).to(result.dtype)

    def _gathered_delta(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, T, in]`` -> ``[B, T, out]`` through each row's own ``max_blend`` slots only.

        Each row gathers its slots' A and B (``[B, K, R, in]``, ``[B, K, out, R]``), so the cost is
        K adapters' compute per row however many slots are resident.
        """
        index = torch.arange(rows.shape[0], device=rows.device).clamp(max=self.row_slots.shape[0] - 1)
        slot_ids = self.row_slots[index]
        coef = (self.row_terms[index] * self.scale[slot_ids]).to(rows.dtype)
        hidden = torch.einsum("bti,bkri->btkr", rows, self.lora_A[slot_ids]) * coef[:, None, :, None]
        delta = torch.einsum("btkr,bkor->bto", hidden, self.lora_B[slot_ids])
        if self.lora_bias is not None:
            delta = delta + torch.einsum("bk,bko->bo", coef, self.lora_bias[slot_ids]).unsqueeze(1)
        return delta


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
        slots, rank, vocab = self.lora_A.shape
        table = self.lora_A.reshape(slots * rank, vocab).t()
        hidden = F.embedding(x, table).reshape(-1, slots, rank)
        batch = x.shape[0] if x.dim() > 1 else 1
        delta = self._expand(hidden, self._token_routing(batch, hidden.shape[0])).reshape(result.shape)
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            delta = delta * embed_scale.to(delta.dtype)
        return result + delta.to(result.dtype)


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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        slots, rank = self.lora_A.shape[:2]
        kernel = self.lora_A.reshape(slots * rank, *self.lora_A.shape[2:])
        conv = (F.conv1d, F.conv2d, F.conv3d)[kernel.dim() - 3]
        hidden = conv(x.to(kernel.dtype), kernel, None, self.base_layer.stride, self.base_layer.padding)
        batch = hidden.shape[0]
        spatial = hidden.shape[2:]
        coef = (row_coefficients(self.row_weights, batch) * self.scale).to(hidden.dtype)
        if slots == 1:  # scale the output instead: it fuses into the residual add
            delta = torch.einsum("brp,or->bop", hidden.reshape(batch, rank, -1), self.lora_B[0]) * coef[:, :, None]
        else:
            hidden = hidden.reshape(batch, slots, rank, -1) * coef[:, :, None, None]
            delta = torch.einsum("bsrp,sor->bop", hidden, self.lora_B)
        delta = delta.reshape(batch, -1, *spatial)
        if self.lora_bias is not None:
            delta = delta + self._bias_delta(coef).reshape(batch, -1, *([1] * len(spatial)))
        return result + delta.to(result.dtype)


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
