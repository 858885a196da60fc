"""Stand-ins for CUDA's graph primitives, so that per-layer CUDA graphs (``training.cuda_graphs``) run on CPUs.

A stand-in graph runs the code ``LayerGraphs._record`` captures when it is captured, and again at every replay
after the first (which the capture's own run stands for, computed from the same static inputs), writing the
results into the static outputs the capture returned. Everything around the graphs then runs as on a GPU: the
static buffers, the copies in and out, the warm-ups, the gradients' routing, the random generators. What a real
capture and replay do is ``tests/test_cuda_graphs_cuda.py``'s to check, on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from megatron_glm.model.cuda_graphs import LayerGraphs


class StandInGraph:
    replays = 0  # over every stand-in graph of the process

    def register_generator_state(self, generator) -> None:
        pass

    def record(self, launch: Callable):
        self.launch, self.outputs, self.fresh = launch, launch(), True
        return self.outputs

    def replay(self) -> None:
        StandInGraph.replays += 1
        if self.fresh:  # the capture's own run computed this replay's outputs, from the same inputs
            self.fresh = False
            return
        outputs = self.launch()
        pairs = zip(self.outputs, outputs) if isinstance(outputs, tuple) else [(self.outputs, outputs)]
        for static, fresh in pairs:
            if static is not None:
                static.detach().copy_(fresh)


class StandInStream:
    def wait_stream(self, stream) -> None:
        pass


def install(setattr_: Callable = setattr) -> None:
    """Put the stand-ins in place of ``torch.cuda``'s graph, stream and generator-state calls and of
    ``LayerGraphs._record``'s capture (``setattr_``: ``monkeypatch.setattr`` in a test)."""
    setattr_(torch.cuda, "CUDAGraph", StandInGraph)
    setattr_(torch.cuda, "graph_pool_handle", lambda: None)
    setattr_(torch.cuda, "Stream", StandInStream)
    setattr_(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    setattr_(torch.cuda, "current_stream", lambda: StandInStream())
    setattr_(torch.cuda, "get_rng_state", torch.get_rng_state)
    setattr_(torch.cuda, "set_rng_state", torch.set_rng_state)
    setattr_(LayerGraphs, "_record", lambda self, graph, launch: graph.record(launch))
