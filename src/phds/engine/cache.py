"""A KV cache of fixed rows ("slots") where every row has its own length: the engine's batch cache.

Shape suffixes: B rows in the forward, H key/value heads, L cache capacity (positions), Q new tokens per row,
D head dim.

Each request owns one row and stores its tokens at positions 0..n-1 of that row, so rows of different lengths
sit side by side without left padding: a forward writes its Q new keys per row at that row's own offset
(`begin_B`), and the attention mask built by `attention_masks` hides every position a row has not written (and
positions outside a sliding window). Rows that join are prefilled straight into their row; a row that leaves is
replaced by moving the last row into its place (`move_row`), so running rows are always rows 0..B-1 and a
forward reads the cache as a view, never a gather.

Capacity grows by doubling up to `max_len`, so a short workload does not allocate `max_batch_size x max_seq_len`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values, `(rows, H, L, D)`; allocated on the first write (shapes from the model:
    DeepSeek's MLA has different key and value head dims)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, capacity = self.cache.num_rows, self.cache.capacity
        self.keys = key_states.new_zeros(rows, key_states.shape[1], capacity, key_states.shape[3])
        self.values = value_states.new_zeros(rows, value_states.shape[1], capacity, value_states.shape[3])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        if not self.is_initialized or capacity <= self.keys.shape[2]:
            return
        pad = capacity - self.keys.shape[2]
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.cache
        first, rows, span = c.first_row, key_states.shape[0], c.span
        if c.uniform_begin is not None:  # every row writes at the same offset: a plain slice copy
            start = c.uniform_begin
            self.keys[first : first + rows, :, start : start + key_states.shape[2]] = key_states
            self.values[first : first + rows, :, start : start + key_states.shape[2]] = value_states
        else:  # decode with ragged lengths: one position per row (Q == 1)
            row_B = torch.arange(first, first + rows, device=key_states.device)
            self.keys[row_B, :, c.begin_B] = key_states[:, :, 0]
            self.values[row_B, :, c.begin_B] = value_states[:, :, 0]
        return self.keys[first : first + rows, :, :span], self.values[first : first + rows, :, :span]

    def move_row(self, source: int, target: int) -> None:
        if self.is_initialized:
            self.keys[target] = self.keys[source]
            self.values[target] = self.values[source]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.span, 0

    def get_seq_length(self) -> int:
        # Positions before this forward's new tokens: transformers takes it as the queries' offset when it builds a
        # causal mask (the new tokens' span made a prefill's mask see the whole prompt: wrong for eager attention).
        return self.cache.span - self.cache.num_new

    def get_max_length(self) -> int:
        return self.cache.max_len


class SlotCache(Cache):
    """KV cache with `num_rows` rows of up to `max_len` positions each, every row at its own length.

    Before each forward the engine calls `prepare(first_row, begin_B, num_new)`: the forward's rows are
    `first_row .. first_row + B - 1` and row b writes its `num_new` new tokens at positions `begin_B[b]...`.

    Example: `cache = SlotCache(num_layers=2, num_rows=8, max_len=256)`.
    """

    def __init__(self, *, num_layers: int, num_rows: int, max_len: int, initial_len: int = 256):
        self.num_rows = num_rows
        self.max_len = max_len
        self.capacity = min(max_len, initial_len)
        self.first_row = 0
        self.begin_B = torch.zeros(1, dtype=torch.long)
        self.uniform_begin: int | None = 0
        self.span = 0
        self.num_new = 0
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @torch.inference_mode()
    def prepare(self, first_row: int, begin: list[int], num_new: int, device: torch.device | None = None) -> None:
        """Set where the next forward writes: rows `first_row...`, row b at positions `begin[b] .. + num_new`."""
        end = max(begin) + num_new
        if end > self.max_len:
            raise ValueError(f"a row needs {end} cache positions but the cache holds max_len={self.max_len}")
        if len(set(begin)) > 1 and num_new != 1:
            raise ValueError("rows at different offsets can only decode one token each")
        while end > self.capacity:
            self.capacity = min(self.max_len, self.capacity * 2)
            for layer in self.layers:
                layer.grow(self.capacity)
        self.first_row = first_row
        self.begin_B = torch.tensor(begin, dtype=torch.long, device=device)
        self.uniform_begin = begin[0] if len(set(begin)) == 1 else None
        self.span = end
        self.num_new = num_new

    @torch.inference_mode()
    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` over row `target` (a leaving row's place is taken by the last running row)."""
        for layer in self.layers:
            layer.move_row(source, target)


def attention_masks(
    config, begin_B: torch.Tensor, lengths_B: torch.Tensor, num_new: int, span: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D attention mask(s) `(B, 1, Q, span)` for rows whose new tokens sit at `begin_B + 0..Q-1` and whose
    real length after this forward is `lengths_B` (shorter than `begin_B + Q` for right-padded prefill rows).

    A key is visible when it is written (`< lengths_B`), not in the future (causal) and, for sliding-window layers,
    inside the window. Returns what the model's forward accepts: a dict by layer type for models configured with
    `layer_types`, else one tensor. Boolean for SDPA-style attention, additive float for eager attention.

    Example: `attention_masks(model.config, torch.tensor([5]), torch.tensor([6]), 1, 6, torch.float32)`.
    """
    device = begin_B.device
    query_QB = begin_B.unsqueeze(0) + torch.arange(num_new, device=device).unsqueeze(1)  # position of each new token
    query_BQ1 = query_QB.T.unsqueeze(-1)
    key_1L = torch.arange(span, device=device).view(1, 1, span)
    visible_BQL = (key_1L <= query_BQ1) & (key_1L < lengths_B.view(-1, 1, 1))
    window = getattr(config, "sliding_window", None)
    sliding_BQL = visible_BQL & (key_1L > query_BQ1 - window) if window else visible_BQL

    def encode(mask_BQL: torch.Tensor) -> torch.Tensor:
        mask = mask_BQL.unsqueeze(1)
        if config._attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return {kind: encode(sliding_BQL if kind == "sliding_attention" else visible_BQL) for kind in set(layer_types)}
    use_window = window and getattr(config, "use_sliding_window", True)
    return encode(sliding_BQL if use_window else visible_BQL)
