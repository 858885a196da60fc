"""Next-token logits for rows of blanks being filled: with a KV cache, or by recomputing everything.

A row is one sequence being decoded (a prompt, or one beam of it): its committed answers and the tokens
generated so far for the current blank. Both steppers return the logits of the token that follows, over
the tokenizer's vocabulary, identical on every tensor-parallel rank.

``CachedStepper`` computes Part A's keys and values once and then feeds each row only the Part-B tokens
it has not fed yet. When a row's Part B changes under it (beam search picks a finished hypothesis,
another row's tokens are copied in), the slots past the common prefix are hidden from later queries
and the rest is fed again. ``RecomputeStepper`` runs the full pretraining layout every step, as THUDM's
decoder effectively does; it is the reference the cache is tested against, and the benchmark baseline.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data_tools.layout import pad_layout
from data_tools.tokenizer import CommandTokens
from megatron_glm.generation.prompts import Prompt, part_b, recompute_layout
from megatron_glm.model import GLMModel, KVCache
from megatron_glm.parallel import gather_from_tensor_parallel


@dataclasses.dataclass
class Row:
    prompt: int  # index into the prompts
    answers: list[list[int]]
    generated: list[int]

    def extended(self, token: int) -> Row:
        return Row(self.prompt, [list(a) for a in self.answers], [*self.generated, token])


def _device(model: GLMModel) -> torch.device:
    return next(model.parameters()).device


def _logits(model: GLMModel, hidden: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    return gather_from_tensor_parallel(model.logits(hidden).float())[..., :vocab_limit]


class RecomputeStepper:
    """Every step lays out each row in full (``prompts.recompute_layout``) and runs the whole model."""

    def __init__(
        self, model: GLMModel, prompts: list[Prompt], command: CommandTokens, vocab_limit: int
    ) -> None:
        self.model, self.prompts, self.command, self.vocab_limit = model, prompts, command, vocab_limit
        self.block_positions = model.config.block_position_encoding

    def logits(self, rows: list[Row]) -> torch.Tensor:
        layouts = [
            recompute_layout(
                self.prompts[r.prompt], r.answers, r.generated, self.command, self.block_positions
            )
            for r in rows
        ]
        longest = max(len(layout) for layout in layouts)
        padded = [pad_layout(layout, longest) for layout in layouts]
        device = _device(self.model)
        hidden = self.model(
            torch.tensor(np.stack([p.tokens for p in padded]), device=device),
            torch.tensor(np.stack([p.position_ids for p in padded]), device=device),
            torch.tensor([p.sep for p in padded], device=device),
        )
        last = torch.tensor([len(layout) - 2 for layout in layouts], device=device)
        return _logits(self.model, hidden[torch.arange(len(rows), device=device), last], self.vocab_limit)

    def reorder(self, index: list[int]) -> None:
        """Nothing to do: the rows carry all state."""


class CachedStepper:
    """Decodes against a ``KVCache``: Part A once, then only the tokens each row has not fed yet."""

    def __init__(
        self, model: GLMModel, prompts: list[Prompt], command: CommandTokens, vocab_limit: int
    ) -> None:
        self.model, self.prompts, self.command, self.vocab_limit = model, prompts, command, vocab_limit
        self.block_positions = model.config.block_position_encoding
        self.device = _device(model)
        self.cache: KVCache | None = None
        self.fed: list[list[tuple[int, int, int]]] = []  # per row: the Part-B tokens in the cache, in order
        self.slots: list[list[int]] = []  # per row: the cache slot of each of them
        self.last_logits: torch.Tensor | None = None

    def _prefill(self, rows: list[Row]) -> None:
        part_a = [self.prompts[r.prompt].ids for r in rows]
        longest = max(len(ids) for ids in part_a)
        tokens = torch.zeros(len(rows), longest, dtype=torch.long)
        valid = torch.zeros(len(rows), longest, dtype=torch.bool)
        for i, ids in enumerate(part_a):
            tokens[i, : len(ids)] = torch.tensor(ids)
            valid[i, : len(ids)] = True
        positions = torch.stack(
            (torch.arange(longest).expand(len(rows), -1), torch.zeros_like(tokens)), dim=1
        )
        self.cache = KVCache(self.model.config.num_layers, len(rows), capacity=2 * longest + 64)
        self._forward(tokens, positions, valid)
        self.fed = [[] for _ in rows]
        self.slots = [[] for _ in rows]
        self.last_logits = torch.zeros(len(rows), self.vocab_limit, device=self.device)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.model(
            tokens.to(self.device),
            positions.to(self.device),
            torch.zeros(len(tokens), dtype=torch.long, device=self.device),
            cache=self.cache,
            token_valid=valid.to(self.device),
        )

    def logits(self, rows: list[Row]) -> torch.Tensor:
        if self.cache is None:
            self._prefill(rows)
        start = self.cache.length
        new_tokens = []
        for i, row in enumerate(rows):
            target = part_b(
                self.prompts[row.prompt], row.answers, row.generated, self.command.sop, self.block_positions
            )
            fed = self.fed[i]
            common = 0
            while common < min(len(fed), len(target)) and fed[common] == target[common]:
                common += 1
            if common < len(fed):
                self.cache.invalidate(i, self.slots[i][common:])
                del fed[common:], self.slots[i][common:]
            new_tokens.append(target[common:])
        chunk = max(len(new) for new in new_tokens)
        if chunk == 0:
            return self.last_logits
        tokens = torch.zeros(len(rows), chunk, dtype=torch.long)
        positions = torch.zeros(len(rows), 2, chunk, dtype=torch.long)
        valid = torch.zeros(len(rows), chunk, dtype=torch.bool)
        for i, new in enumerate(new_tokens):
            if new:
                tokens[i, : len(new)] = torch.tensor([t for t, _, _ in new])
                positions[i, 0, : len(new)] = torch.tensor([p for _, p, _ in new])
                positions[i, 1, : len(new)] = torch.tensor([b for _, _, b in new])
                valid[i, : len(new)] = True
                self.fed[i].extend(new)
                self.slots[i].extend(range(start, start + len(new)))
        hidden = self._forward(tokens, positions, valid)
        fresh = [i for i, new in enumerate(new_tokens) if new]
        index = torch.tensor(fresh, device=self.device)
        last = torch.tensor([len(new_tokens[i]) - 1 for i in fresh], device=self.device)
        logits = self.last_logits.clone()
        logits[index] = _logits(self.model, hidden[index, last], self.vocab_limit)
        self.last_logits = logits
        return logits

    def reorder(self, index: list[int]) -> None:
        """Row ``i`` continues old row ``index[i]`` (its cache, fed tokens and last logits)."""
        self.cache.reorder(torch.tensor(index))
        self.fed = [list(self.fed[j]) for j in index]
        self.slots = [list(self.slots[j]) for j in index]
        self.last_logits = self.last_logits[torch.tensor(index, device=self.device)]
