"""Blank-filling speed with and without the KV cache, side by side in one run.

A randomly initialized GLM (the shape below; generation speed does not depend on the weights) fills one
[gMASK] blank per prompt; ``min_tokens = max_tokens`` makes every run generate exactly ``max_tokens``
tokens per prompt, so both modes do the same work. Without the cache every step recomputes the whole
sequence (THUDM/GLM recomputes its memories every step); with it, Part A is encoded once and each step
feeds one token per row.

    python benchmarks/bench_generate.py                          # glm-tiny shape, 4 prompts x 200 tokens
    python benchmarks/bench_generate.py --strategy beam --beams 4

tokens/s = prompts x max_tokens / wall seconds (the median of ``--repeats`` runs, after one warm-up).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from data_tools.tokenizer import load_tokenizer
from megatron_glm import parallel
from megatron_glm.config import ModelConfig
from megatron_glm.generation import GenerationConfig, generate_ids, prompt_from_ids
from megatron_glm.model import GLMModel

TOKENIZER = load_tokenizer("bert-base-uncased")
VOCAB = TOKENIZER.padded_vocab_size(128)  # 30592, as glm-tiny
COMMAND = TOKENIZER.command


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=200, help="Part A length (default 200)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    parser.add_argument("--prompts", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--strategy", choices=("greedy", "beam"), default="greedy")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parallel.initialize_parallel(1, 1)
    config = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        max_position_embeddings=max(512, args.prompt_tokens + 1),
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GLMModel(config, VOCAB, seed=1).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(args.prompts):
        text = torch.randint(1000, 30000, (args.prompt_tokens - 2,), generator=generator).tolist()
        prompts.append(prompt_from_ids([COMMAND.cls, *text, COMMAND.gmask], COMMAND))
    settings = GenerationConfig(
        strategy=args.strategy, max_tokens=args.max_tokens, min_tokens=args.max_tokens, num_beams=args.beams
    )
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"# {device.type} ({name}), {torch.get_num_threads()} threads; model {args.layers} x {args.hidden}, "
        f"{args.heads} heads; {args.prompts} prompts x {args.prompt_tokens} tokens; {args.max_tokens} generated "
        f"each; {args.strategy}" + (f" ({args.beams} beams)" if args.strategy == "beam" else "")
    )
    results = {}
    for use_cache in (True, False):
        times = []
        for repeat in range(args.repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            answers = generate_ids(model, prompts, COMMAND, VOCAB, settings, use_cache=use_cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat > 0:
                times.append(time.perf_counter() - start)
        assert all(len(a[0]) == args.max_tokens for a in answers)
        results[use_cache] = args.prompts * args.max_tokens / statistics.median(times)
    print("| KV cache | tokens/s |\n|---|---|")
    for use_cache in (True, False):
        print(f"| {'on' if use_cache else 'off'} | {results[use_cache]:,.1f} |")
    print(f"speed-up: {results[True] / results[False]:.1f}x")


if __name__ == "__main__":
    main()
