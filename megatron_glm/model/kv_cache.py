"""Keys and values kept between decoding steps, so each new token costs one token's forward.

THUDM/GLM decodes with Transformer-XL "mems" and recomputes every layer's keys and values over the
whole prefix at every step; the cache stores them instead. The first chunk written is Part A: its
tokens see each other bidirectionally. Every later chunk is Part B: a token there sees all of Part A
and, causally, the Part-B tokens written before it (and itself), which is GLM's ``sep`` mask.

Rows of a batch have different lengths, so the cache keeps a ``valid`` flag per slot: padding of a
short Part A, padding fed to a row that has finished, and slots discarded by ``invalidate`` (a beam
row whose Part B is rewritten) are visible to no query. Slot order then only matters for causality.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys/values ``[rows, local heads, slots, head dim]`` and the slots' validity ``[rows, slots]``.

    ``GLMModel.forward(..., cache=cache)`` calls ``begin`` once (which builds the step's attention mask),
    each layer ``store``, then ``commit``. Buffers are allocated on the first store (head count, dtype and
    device come from the model) and grow by doubling.
    """

    def __init__(self, num_layers: int, rows: int, capacity: int = 64) -> None:
        self.num_layers, self.rows, self.capacity = num_layers, rows, max(1, capacity)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None  # [rows, capacity] bool
        self.length = 0  # slots written
        self.prefix_length: int | None = None  # Part A: the first chunk's length
        self.mask: torch.Tensor | None = None  # [rows, 1, chunk, length + chunk] for the step under way
        self._chunk = 0

    def begin(self, chunk_valid: torch.Tensor) -> None:
        """Start a step writing ``chunk_valid.shape[1]`` slots; ``chunk_valid`` [rows, chunk] flags real tokens."""
        rows, chunk = chunk_valid.shape
        if rows != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows, the step has {rows}")
        if self.valid is None:
            self.valid = torch.zeros(rows, self.capacity, dtype=torch.bool, device=chunk_valid.device)
        self._reserve(self.length + chunk)
        start, end = self.length, self.length + chunk
        self.valid[:, start:end] = chunk_valid
        if self.prefix_length is None:
            self.prefix_length = chunk
        slots = torch.arange(end, device=chunk_valid.device)
        query_slots = torch.arange(start, end, device=chunk_valid.device)
        visible = (slots.view(1, -1) < self.prefix_length) | (slots.view(1, -1) <= query_slots.view(-1, 1))
        self.mask = (visible.unsqueeze(0) & self.valid[:, None, :end]).unsqueeze(1)
        self._chunk = chunk

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's ``[rows, heads, chunk, d]`` keys/values of ``layer``; all written so far back."""
        if self.keys[layer] is None:
            shape = (self.rows, key.shape[1], self.capacity, key.shape[3])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        elif self.keys[layer].shape[2] < self.capacity:
            self.keys[layer] = _grow(self.keys[layer], self.capacity)
            self.values[layer] = _grow(self.values[layer], self.capacity)
        start, end = self.length, self.length + self._chunk
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self) -> None:
        self.length += self._chunk
        self.mask, self._chunk = None, 0

    def invalidate(self, row: int, slots: list[int] | torch.Tensor) -> None:
        """Hide ``slots`` of ``row`` from every later query (their tokens were taken back)."""
        self.valid[row, slots] = False

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beam search); the row count may change."""
        index = index.to(self.valid.device)
        self.rows = len(index)
        self.valid = self.valid.index_select(0, index)
        for layer in range(self.num_layers):
            if self.keys[layer] is not None:
                self.keys[layer] = self.keys[layer].index_select(0, index)
                self.values[layer] = self.values[layer].index_select(0, index)

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        while self.capacity < needed:
            self.capacity *= 2
        self.valid = _grow(self.valid, self.capacity, dim=1)


def _grow(tensor: torch.Tensor, capacity: int, dim: int = 2) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = capacity - shape[dim]
    return torch.cat((tensor, tensor.new_zeros(shape)), dim=dim)
