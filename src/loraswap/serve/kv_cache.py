"""A fixed-shape KV cache whose rows are independent sequences at their own positions (token-level batching).

transformers' ``StaticCache`` writes every row at one shared ``cumulative_length``: it serves a batch that
started together. Under token-level batching each row of the decode batch is a request of its own, at its own
length, joining and leaving between steps. So the buffers here are the static cache's (``[max_batch, kv_heads,
max_model_len, head_dim]`` per layer, allocated once, ``mark_static_address``'d), and the two caches that
write them differ only in *where*:

- :class:`DecodeCache` (``[max_batch, heads, 1, dim]`` per step): ``scatter_`` puts row ``b``'s new key and
  value at ``positions[b]`` and hands attention the whole buffer; :func:`decode_mask` (``[max_batch, 1, 1,
  max_model_len]``, additive) lets row ``b`` see its positions ``0..positions[b]`` only, so stale entries a
  previous request left in the row are never read.
- :class:`PrefillCache` (``[1, heads, T, dim]``, ``T`` a prompt bucket): writes positions ``0..T-1`` of row
  ``row`` (a 0-dim tensor, so every row shares one graph) and hands attention the prompt's own keys and values
  (a prompt starts at position 0 and sees nothing before it). Padding past the prompt is written too, at
  positions the decode mask hides until the row's own tokens overwrite them.

Both are ``transformers.Cache`` objects with prepared layers: a model's attention calls ``cache.update(k, v,
layer_idx)`` as it does for any cache. The masks are passed 4D (transformers then uses them as they are) and
``position_ids`` explicitly, so no cache length is ever asked for. Every tensor a compiled step reads
(buffers, ``positions``, ``row``) keeps its shape and storage for the engine's life: steps never recompile.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _RowsLayer(CacheLayerMixin):
    """One attention layer's buffers ``[max_batch, heads, max_model_len, dim]`` and how a step writes them."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self._write = write

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist from the start
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._write(self.keys, self.values, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RowBuffers:
    """The KV buffers of every attention layer, allocated once from the model's config."""

    def __init__(self, config, max_batch: int, max_model_len: int, dtype: torch.dtype, device: torch.device) -> None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = text.num_hidden_layers
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (max_batch, heads, max_model_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)
        self.max_batch, self.max_model_len = max_batch, max_model_len

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in (*self.keys, *self.values))


class DecodeCache(Cache):
    """One new token per row, written at that row's own position (``positions[b]``, a fixed ``[max_batch]`` tensor)."""

    def __init__(self, buffers: RowBuffers, positions: torch.Tensor) -> None:
        self.positions = positions
        super().__init__(layers=[_RowsLayer(k, v, self._write) for k, v in zip(buffers.keys, buffers.values)])

    def _write(self, keys, values, key_states, value_states):
        batch, heads, _, dim = key_states.shape
        index = self.positions.view(batch, 1, 1, 1).expand(batch, heads, 1, dim)
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index.expand(batch, heads, 1, value_states.shape[-1]), value_states)
        return keys, values


class PrefillCache(Cache):
    """One prompt (``[1, heads, T, dim]``) written at positions ``0..T-1`` of row ``row`` (a 0-dim tensor)."""

    def __init__(self, buffers: RowBuffers, row: torch.Tensor) -> None:
        self.row = row
        super().__init__(layers=[_RowsLayer(k, v, self._write) for k, v in zip(buffers.keys, buffers.values)])

    def _write(self, keys, values, key_states, value_states):
        length = key_states.shape[2]
        row = self.row.view(1)
        keys.narrow(2, 0, length).index_copy_(0, row, key_states)
        values.narrow(2, 0, length).index_copy_(0, row, value_states)
        return key_states, value_states


def decode_mask(positions: torch.Tensor, max_model_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, 1, max_model_len]``: row ``b`` attends to its positions ``0..positions[b]``."""
    visible = torch.arange(max_model_len, device=positions.device) <= positions.view(-1, 1)
    return _additive(visible, dtype).view(positions.shape[0], 1, 1, max_model_len)


def prefill_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask ``[1, 1, T, T]`` for one prompt (padding sits after it, so a plain causal mask)."""
    visible = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return _additive(visible, dtype).view(1, 1, length, length)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, the dtype's lowest value elsewhere (not -inf: a fully hidden row stays finite)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)
