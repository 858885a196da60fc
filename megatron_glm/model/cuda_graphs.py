"""Per-layer CUDA graphs for training (``training.cuda_graphs``): a layer's forward and backward as two graph
replays instead of their few dozen kernel launches each.

On one GPU GLM-Large's step is bound by its host: launching a layer's kernels one by one costs the CPU more
time than the GPU spends running them (``docs/benchmarks.md``). A CUDA graph replays a captured sequence of
kernels with one launch.

``LayerGraphs(layer)`` captures the layer at its first training call at an input shape and replays it at every
training call from then on, that first one included. Before capturing it runs the layer's forward and backward
``warmup`` times on the capture stream, off the books: on a copy of the input, with the parameters' leaf aliases
(no ``.grad`` is written) and the random generators' states put back afterwards, as torch's
``make_graphed_callables`` warms up (Triton autotunes and compiles, cuBLAS picks its kernels, libraries set up
their per-stream state). So every training step runs the same graphs: a run resumed from a checkpoint replays
from its first step on what the uninterrupted run replayed, and its steps are those of the uninterrupted run
whether or not a replay gives the bits of the eager layer. It captures the forward at that first call and the
backward when autograd first reaches it, on static input and output buffers: the forward copies its input into
the static buffer and replays; the backward copies the output gradient in, replays, and hands autograd copies of
the gradients (what autograd is handed may outlive the call, in a hook on a parameter that keeps it, and the
next replay would overwrite the static ones). All layers capture into one memory pool, in the order training runs them (forwards in layer order,
backwards in reverse), which is the order they replay in.

Random numbers: hidden dropout draws from the default CUDA generator, attention dropout from the tensor-parallel
RNG tracker's streams (``parallel.random``, forked without copying state); every graph registers the tracker's
generators, so each replay draws new numbers, where eager execution would draw them.

Conditions (checked by ``config.validation`` and at start): a CUDA device; training with gradients
(evaluation and generation run eagerly); no activation recomputation (the recompute would run outside the
graph); no pipeline parallelism (a layer's static buffers hold one micro-batch, and a pipeline schedule keeps
several in flight); ZeRO stage 0-2 (ZeRO-3 gathers and frees each layer's parameters around it). One capture
per input shape: a run whose micro-batches change shape captures once per shape.

The graphed layers run one by one: the eager model's deferred residual adds (each layer's last add in the next
LayerNorm, ``GLMTransformer.defer_residual_adds``) are not used, so graphed training rounds as the eager model
does layer by layer, not bit for bit as its default path.

``tests/test_cuda_graphs_cuda.py`` (collected where CUDA is present; the GPU check runs it) compares graphed with
eager training, and a run resumed from a mid-run state with the uninterrupted one. ``tests/test_cuda_graphs.py``
runs the same on CPUs, with graph stand-ins that re-run what ``_record`` captured at each replay, bit for bit.
On the H200 (2026-11-28), when the layers still ran their first two calls eagerly, graphed training matched
eager training to 4e-6 (the test's tolerance was then 1e-6, against the deferred path); not yet run on a GPU
since.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megatron_glm.parallel import get_rng_tracker


@dataclasses.dataclass
class _Capture:
    """A layer's graphs at one input shape, and the static buffers they read and write."""

    hidden: torch.Tensor
    sep: torch.Tensor
    params: tuple[nn.Parameter, ...]
    # Leaf aliases of ``params`` (same storage) that the captured forward uses and the captured backward
    # differentiates: see ``LayerGraphs._run``.
    aliases: dict[str, torch.Tensor]
    forward_graph: torch.cuda.CUDAGraph
    output: torch.Tensor | None = None
    # The forward's output whose autograd graph the backward differentiates: the static output itself, once
    # captured; a stand-in that re-runs the captured code (tests/test_cuda_graphs.py) keeps its latest run's here.
    live_output: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    backward_graph: torch.cuda.CUDAGraph | None = None
    grads: tuple[torch.Tensor | None, ...] = ()


class LayerGraphs:
    """``layer(hidden, sep)`` replayed from CUDA graphs once warmed up (see the module docstring). Not a module:
    the layer stays registered once, under its own name, so state dicts and optimizers see it as before."""

    def __init__(self, layer: nn.Module, pool, stream: torch.cuda.Stream, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: at least one forward and backward before a capture, not {warmup}")
        self.layer = layer
        self.pool = pool
        self.stream = stream
        self.warmup = warmup
        self._captures: dict[tuple, _Capture] = {}

    def __call__(self, hidden: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        if not (self.layer.training and torch.is_grad_enabled() and hidden.requires_grad):
            return self.layer(hidden, sep)
        key = (tuple(hidden.shape), hidden.dtype, tuple(sep.shape), sep.dtype, hidden.device)
        capture = self._captures.get(key)
        if capture is None:
            capture = self._captures[key] = self._capture_forward(hidden, sep)
        return _ReplayLayer.apply(self, capture, hidden, sep, *capture.params)

    def _new_graph(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        for generator in get_rng_tracker().cuda_generators():
            graph.register_generator_state(generator)
        return graph

    def _graph(self, graph: torch.cuda.CUDAGraph):
        # thread_local: the data loader's pin-memory thread keeps working while a layer is captured mid-training.
        return torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local")

    def _capture_forward(self, hidden: torch.Tensor, sep: torch.Tensor) -> _Capture:
        named = [(name, p) for name, p in self.layer.named_parameters() if p.requires_grad]
        capture = _Capture(
            hidden=hidden.detach().clone().requires_grad_(True),
            sep=sep.detach().clone(),
            params=tuple(p for _, p in named),
            aliases={name: p.detach().requires_grad_(True) for name, p in named},
            forward_graph=self._new_graph(),
        )
        self._warm_up(capture)
        capture.output = self._record(capture.forward_graph, lambda: self._forward(capture))
        return capture

    def _record(self, graph: torch.cuda.CUDAGraph, launch):
        """Capture what ``launch()`` runs into ``graph``; returns its result, the graph's static outputs."""
        with self._graph(graph):
            return launch()

    def _forward(self, capture: _Capture) -> torch.Tensor:
        with torch.enable_grad():
            capture.live_output = self._run(capture)
        return capture.live_output

    def _backward(self, capture: _Capture) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(
            capture.live_output,
            (capture.hidden, *capture.aliases.values()),
            capture.output_grad,
            allow_unused=True,
        )

    def _run(self, capture: _Capture) -> torch.Tensor:
        """The layer's forward on the static input, with the parameters' leaf aliases in place of the parameters.

        Autograd hands a leaf's gradient to its AccumulateGrad node on the stream that node was created on. A
        parameter's node outlives an iteration wherever something holds the graph (the previous micro-batch's
        output or loss, DeepSpeed's gradient hooks), so it may date from an eager step on the default stream,
        and a captured backward that syncs with the default (legacy) stream fails with
        cudaErrorStreamCaptureImplicit. The aliases share the parameters' storage (the graph reads the current
        weights) and get their own AccumulateGrad nodes, made on the capture stream.
        """
        return torch.func.functional_call(self.layer, capture.aliases, (capture.hidden, capture.sep))

    def _warm_up(self, capture: _Capture) -> None:
        """``warmup`` forwards and backwards on the capture stream before the capture, off the books: on the
        static input (a copy of the call's), differentiating the parameters' aliases (no ``.grad`` written), the
        random generators' states put back afterwards (the training draws what it would have drawn)."""
        tracker = get_rng_tracker()
        default_state, streams = torch.cuda.get_rng_state(), tracker.get_states()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), torch.enable_grad():
            for _ in range(self.warmup):
                output = self._run(capture)
                torch.autograd.grad(
                    output,
                    (capture.hidden, *capture.aliases.values()),
                    torch.ones_like(output),
                    allow_unused=True,
                )
                del output
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.set_rng_state(default_state)
        tracker.set_states(streams)

    def capture_backward(self, capture: _Capture, output_grad: torch.Tensor) -> None:
        """Capture the backward of ``capture``'s forward, the first time autograd reaches it: backwards are then
        captured in the order they run (last layer first), after all forwards, as the pool needs. The static
        output gradient holds ``output_grad`` before the capture, as the static input held the call's input."""
        capture.output_grad = torch.empty_like(capture.output)
        capture.output_grad.copy_(output_grad)
        capture.backward_graph = self._new_graph()
        capture.grads = self._record(capture.backward_graph, lambda: self._backward(capture))


class _ReplayLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: LayerGraphs, capture: _Capture, hidden, sep, *params):
        # params are inputs so that autograd routes their gradients; the graph reads them in place. The inputs are
        # copied through .data: the captured forward saved the static input for its backward, which is captured
        # after this copy, and autograd would refuse a saved tensor whose version counter a copy_ had moved.
        capture.hidden.data.copy_(hidden)
        capture.sep.data.copy_(sep)
        capture.forward_graph.replay()
        ctx.graphs, ctx.capture = graphs, capture
        # The static output itself: the next layer copies it into its own input buffer before the next replay.
        return capture.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, output_grad):
        capture = ctx.capture
        if capture.backward_graph is None:
            ctx.graphs.capture_backward(capture, output_grad)
        else:
            capture.output_grad.copy_(output_grad)
        capture.backward_graph.replay()
        # Copies, made by one multi-tensor kernel instead of a clone per parameter.
        defined = [grad for grad in capture.grads if grad is not None]
        copies = iter(_copies_of(defined))
        grads = [None if grad is None else next(copies) for grad in capture.grads]
        return (None, None, grads[0], None, *grads[1:])


def _copies_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors equal to ``tensors``, written by one multi-tensor copy."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        torch._foreach_copy_(copies, tensors)
    return copies


def enable_layer_graphs(transformer: nn.Module, warmup: int = 2) -> None:
    """Run ``transformer``'s layers (a ``GLMTransformer``'s) through per-layer CUDA graphs in training."""
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    transformer.layer_graphs = [LayerGraphs(layer, pool, stream, warmup) for layer in transformer.layers]
