"""Decoding strategies over a stepper: greedy, sampling and beam search, blank by blank.

Every blank of a batch of prompts is filled left to right; blank j of all prompts that have one is
decoded together. An answer has at most ``max_tokens`` tokens and ends at ``[eop]`` (or the end-of-text
token), which is not part of it. ``min_tokens`` forbids ending earlier; ``no_repeat_ngram_size`` n
forbids a token that would repeat an n-gram of the answer.

Beam search (as the HF ``BeamSearchScorer`` THUDM's seq2seq decoder uses): each step keeps the best
``num_beams`` unfinished answers among the best ``2 x num_beams`` extensions; an extension by ``[eop]``
among the best ``num_beams`` is a finished hypothesis. A hypothesis scores ``log P / L^length_penalty``
with L the tokens scored (the answer and its ``[eop]``; an answer cut at ``max_tokens`` has no ``[eop]``).
A prompt is done once it has ``num_beams`` hypotheses and no unfinished answer can still beat the worst
(the bound is exact, so enough beams make the search exhaustive); answers still running at
``max_tokens`` become hypotheses too. The best hypothesis is the answer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from megatron_glm.generation.prompts import GenerationError, Prompt
from megatron_glm.generation.steppers import Row

STRATEGIES = ("greedy", "sample", "beam")


@dataclasses.dataclass
class GenerationConfig:
    strategy: str = "greedy"
    max_tokens: int = 32
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 1234
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off

    def check(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be at least 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens={self.min_tokens} must lie in [0, max_tokens={self.max_tokens}]")
        if self.temperature <= 0:
            problems.append(
                f"temperature={self.temperature} must be positive (use strategy greedy for argmax)"
            )
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must lie in (0, 1]")
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams} must be at least 1")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0")
        if problems:
            raise GenerationError("; ".join(problems))


class Stepper(Protocol):
    def logits(self, rows: list[Row]) -> torch.Tensor: ...

    def reorder(self, index: list[int]) -> None: ...


def banned_ngram_tokens(tokens: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``tokens``."""
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}


def constrain(
    scores: torch.Tensor, rows: list[Row], config: GenerationConfig, stops: list[int]
) -> torch.Tensor:
    """``scores`` [rows, V] with the forbidden tokens at -inf (too-early stops, repeated n-grams)."""
    scores = scores.clone()
    for i, row in enumerate(rows):
        if len(row.generated) < config.min_tokens:
            scores[i, stops] = -math.inf
        banned = banned_ngram_tokens(row.generated, config.no_repeat_ngram_size)
        if banned:
            scores[i, sorted(banned)] = -math.inf
    return scores


def filter_logits(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set of tokens with probability >= top_p)."""
    logits = logits / config.temperature
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cumulative - torch.softmax(ordered, dim=-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _decode_blank_token_by_token(
    stepper: Stepper,
    rows: list[Row],
    active: list[bool],
    config: GenerationConfig,
    stops: list[int],
    generator: torch.Generator | None,
) -> None:
    """Greedy (``generator`` None) or sampled answers for the current blank of the ``active`` rows."""
    running = list(active)
    for _ in range(config.max_tokens):
        if not any(running):
            return
        scores = constrain(stepper.logits(rows).float().cpu(), rows, config, stops)
        if generator is None:
            chosen = scores.argmax(dim=-1).tolist()
        else:
            probabilities = torch.softmax(filter_logits(scores, config), dim=-1)
            chosen = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1).tolist()
        for i, token in enumerate(chosen):
            if not running[i]:
                continue
            if token in stops:
                running[i] = False
            else:
                rows[i].generated.append(int(token))


@dataclasses.dataclass
class Hypotheses:
    """The best ``size`` finished answers of one prompt, as ``(score, tokens)`` best first."""

    size: int
    items: list[tuple[float, list[int]]] = dataclasses.field(default_factory=list)

    def add(self, score: float, tokens: list[int]) -> None:
        self.items.append((score, list(tokens)))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size :]

    def worst(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.size else -math.inf


def _normalized(log_probability: float, length: int, penalty: float) -> float:
    return log_probability / (max(length, 1) ** penalty)


def _best_future_score(log_probability: float, length: int, max_tokens: int, penalty: float) -> float:
    """An upper bound on the score of any hypothesis grown from an unfinished answer of ``length`` tokens.

    Log-probabilities only fall as tokens are added; the scored length L of a finished hypothesis lies in
    ``[length (cut at max_tokens) or length + 1, max_tokens]``, and ``log P / L^penalty`` is largest at the
    largest L when the penalty is positive, at the smallest when negative.
    """
    if penalty > 0:
        return log_probability / max_tokens**penalty
    if penalty < 0:
        shortest = length if length >= max_tokens else length + 1
        return log_probability / shortest**penalty
    return log_probability


def beam_search_blank(
    stepper: Stepper,
    rows: list[Row],
    active: list[bool],
    beams: int,
    config: GenerationConfig,
    stops: list[int],
) -> list[Hypotheses | None]:
    """Beam search for the current blank; ``rows`` hold ``beams`` consecutive rows per prompt, all alike
    at the start. Returns each prompt's best ``beams`` hypotheses (None for inactive prompts), best
    first; ``rows`` are reordered."""
    prompts = len(rows) // beams
    vocab = None
    sums = torch.full((prompts, beams), -math.inf, dtype=torch.float64)
    sums[:, 0] = 0.0
    hypotheses = [Hypotheses(beams) for _ in range(prompts)]
    done = [not active[p * beams] for p in range(prompts)]
    stop_set = set(stops)
    for step in range(config.max_tokens):
        if all(done):
            break
        log_probs = torch.log_softmax(stepper.logits(rows).double().cpu(), dim=-1)
        log_probs = constrain(log_probs, rows, config, stops)
        vocab = log_probs.shape[-1]
        candidates = (sums.unsqueeze(-1) + log_probs.view(prompts, beams, vocab)).view(prompts, -1)
        top_scores, top_index = torch.topk(candidates, min(2 * beams, beams * vocab), dim=-1)
        origins, new_rows, new_sums = [], [], torch.full_like(sums, -math.inf)
        for p in range(prompts):
            kept = []
            if not done[p]:
                for rank, (score, index) in enumerate(zip(top_scores[p].tolist(), top_index[p].tolist())):
                    if score == -math.inf:
                        break
                    beam, token = divmod(index, vocab)
                    source = rows[p * beams + beam]
                    if token in stop_set:
                        if rank < beams:
                            hypotheses[p].add(
                                _normalized(score, step + 1, config.length_penalty), source.generated
                            )
                        continue
                    kept.append((score, beam, token))
                    if len(kept) == beams:
                        break
            for k in range(beams):
                if k < len(kept):
                    score, beam, token = kept[k]
                    origins.append(p * beams + beam)
                    new_rows.append(rows[p * beams + beam].extended(token))
                    new_sums[p, k] = score
                else:
                    # No live extension left for this slot (or the prompt is done): keep a dead copy.
                    origins.append(p * beams)
                    new_rows.append(rows[p * beams])
            if not done[p]:
                best_running = max(
                    (
                        _best_future_score(s, step + 1, config.max_tokens, config.length_penalty)
                        for s, _, _ in kept
                    ),
                    default=-math.inf,
                )
                if not kept or (len(hypotheses[p].items) >= beams and best_running <= hypotheses[p].worst()):
                    done[p] = True
        stepper.reorder(origins)
        rows[:] = [Row(r.prompt, [list(a) for a in r.answers], list(r.generated)) for r in new_rows]
        sums = new_sums
    for p in range(prompts):
        if done[p]:
            continue
        for k in range(beams):
            if sums[p, k] > -math.inf:
                row = rows[p * beams + k]
                hypotheses[p].add(
                    _normalized(float(sums[p, k]), len(row.generated), config.length_penalty), row.generated
                )
    return [hypotheses[p] if active[p * beams] else None for p in range(prompts)]


def generate_answers(
    stepper: Stepper, prompts: list[Prompt], config: GenerationConfig, stops: list[int]
) -> list[list[list[int]]]:
    """Every blank of every prompt answered, left to right: ``answers[prompt][blank]`` token ids."""
    config.check()
    beams = config.num_beams if config.strategy == "beam" else 1
    rows = [Row(p, [], []) for p in range(len(prompts)) for _ in range(beams)]
    generator = torch.Generator().manual_seed(config.seed) if config.strategy == "sample" else None
    for blank in range(max(len(p.blanks) for p in prompts)):
        active = [blank < len(prompts[row.prompt].blanks) for row in rows]
        for row, is_active in zip(rows, active):
            row.generated = [] if is_active else row.generated
        if config.strategy == "beam":
            found = beam_search_blank(stepper, rows, active, beams, config, stops)
            for i, row in enumerate(rows):
                hypotheses = found[i // beams]
                if hypotheses is not None:
                    row.answers.append(list(hypotheses.items[0][1]) if hypotheses.items else [])
                    row.generated = []
        else:
            _decode_blank_token_by_token(stepper, rows, active, config, stops, generator)
            for row, is_active in zip(rows, active):
                if is_active:
                    row.answers.append(row.generated)
                    row.generated = []
    return [rows[p * beams].answers for p in range(len(prompts))]
