"""How evenly the attention forward's query blocks spread over a GPU's program slots, under three schedules: the
block-per-program grid as the GPU dispatches it (each block to the first free slot, in launch order), and a
persistent grid of P programs taking blocks in turn (static round-robin), for P = the slots and P = the slots - 1.

A model, not a measurement: a block costs one unit per key block it visits (``hi`` of the kernel: keys below
``max(sep, its last query + 1)``) plus one for the program's start. GLM's blocks differ in cost: later query blocks
see more keys, and with each sample's own ``sep`` (training) blocks of the same index differ between samples.
Prints the makespan of each schedule over the ideal (total work / slots)::

    python benchmarks/attention_schedule.py                      # 132 SMs x 2 programs, 16K tokens, 16 heads
    python benchmarks/attention_schedule.py --slots 216 --lengths 512 2048
"""

from __future__ import annotations

import argparse
import heapq
import math
import random


def block_costs(length: int, rows: int, seps: list[int], block_m: int, block_n: int) -> list[int]:
    """Each block's cost in launch order: a head's query blocks together, the later (costlier) ones first."""
    blocks = math.ceil(length / block_m)
    costs = []
    for sep in seps:
        for j in range(blocks):
            rows_end = min((blocks - j) * block_m, length)
            costs.append(1 + math.ceil(min(max(sep, rows_end), length) / block_n))
    assert len(costs) == rows * blocks
    return costs


def dispatched(costs: list[int], slots: int) -> int:
    """Makespan when each block goes to the first slot that frees up, in launch order (the GPU's block grid)."""
    finish = [0] * slots
    for cost in costs:
        heapq.heappush(finish, heapq.heappop(finish) + cost)
    return max(finish)


def round_robin(costs: list[int], programs: int) -> int:
    """Makespan when program p takes blocks p, p + P, p + 2P, ... (a persistent grid without a shared counter)."""
    loads = [0] * programs
    for index, cost in enumerate(costs):
        loads[index % programs] += cost
    return max(loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=264, help="programs resident at once (SMs x per SM)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per call (batch = tokens / length)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    print(f"# makespan / ideal, {args.slots} slots, {args.tokens} tokens per call, {args.heads} heads\n")
    print("| T | sep | tile | blocks | block grid | persistent, P = slots | persistent, P = slots - 1 |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        rows = max(1, args.tokens // length) * args.heads
        batch = rows // args.heads
        uniform = [length // 2] * rows
        per_sample = [
            sep for sep in (rng.randint(0, length) for _ in range(batch)) for _ in range(args.heads)
        ]
        for name, seps in (("T/2", uniform), ("per sample", per_sample)):
            for block_m, block_n in ((64, 64), (128, 64)):
                costs = block_costs(length, rows, seps, block_m, block_n)
                ideal = sum(costs) / args.slots
                print(
                    f"| {length} | {name} | {block_m} x {block_n} | {len(costs)} | "
                    f"{dispatched(costs, args.slots) / ideal:.2f} | {round_robin(costs, args.slots) / ideal:.2f} | "
                    f"{round_robin(costs, args.slots - 1) / ideal:.2f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
