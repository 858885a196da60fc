"""Per-layer CUDA graphs for training (``training.cuda_graphs``): a layer's forward and backward as two graph
replays instead of their few dozen kernel launches each.

On one GPU GLM-Large's step is bound by its host: launching a layer's kernels one by one costs the CPU more
time than the GPU spends running them (``docs/benchmarks.md``). A CUDA graph replays a captured sequence of
kernels with one launch.

``LayerGraphs(layer)`` captures the layer at its first training call at an input shape and replays it at every
training call from then on, that first one included. Before capturing it runs the layer's forward and backward
``warmup`` times on the capture stream, off the books: on its static inputs, with the parameters' leaf aliases
(no ``.grad`` is written) and the random generators' states put back afterwards, as torch's
``make_graphed_callables`` warms up (Triton autotunes and compiles, cuBLAS picks its kernels, libraries set up
their per-stream state). So every training step runs the same graphs: a run resumed from a checkpoint replays
from its first step on what the uninterrupted run replayed, and its steps are those of the uninterrupted run
whether or not a replay gives the bits of the eager layer. It captures the forward at that first call and the
backward when autograd first reaches it, on static input and output buffers. The graphs are chained: a layer's
static inputs are the previous graphed layer's static outputs, and its output gradients the next one's static
input gradients, so nothing is copied between two layers; the first layer's input and the last one's output
gradient (from the embeddings and the final LayerNorm) are copied in before a replay, and the gradients of the
parameters are handed to autograd as copies (what autograd is handed may outlive the call, in a hook on a
parameter that keeps it, and the next replay would overwrite the static ones). All layers capture into one
memory pool, in the order training runs them (forwards in layer order, backwards in reverse), which is the
order they replay in.

Each layer's last add (its MLP output's bias, dropout and residual add) goes into the next layer's first
LayerNorm, graphed as it runs eagerly (``GLMTransformer.defer_residual_adds``): a layer's graph hands on its MLP
output beside the stream, and the next layer's graph adds it with the previous layer's MLP bias, whose gradient
it returns. Graphed training therefore computes what the eager model computes, on the same kernels.

Random numbers: hidden dropout draws from the default CUDA generator, attention dropout from the tensor-parallel
RNG tracker's streams (``parallel.random``, forked without copying state); every graph registers the tracker's
generators, so each replay draws new numbers, where eager execution would draw them.

Conditions (checked by ``config.validation`` and at start): a CUDA device; training with gradients
(evaluation and generation run eagerly); no activation recomputation (the recompute would run outside the
graph); no pipeline parallelism (a layer's static buffers hold one micro-batch, and a pipeline schedule keeps
several in flight); ZeRO stage 0-2 (ZeRO-3 gathers and frees each layer's parameters around it). One capture
per input shape: a run whose micro-batches change shape captures once per shape.

``tests/test_cuda_graphs_cuda.py`` (collected where CUDA is present; the GPU check runs it) compares graphed with
eager training, and a run resumed from a mid-run state with the uninterrupted one. ``tests/test_cuda_graphs.py``
runs the same on CPUs, with graph stand-ins that re-run what ``_record`` captured at each replay, bit for bit.
On the H200 (2026-11-28), when the layers still ran their first two calls eagerly, one by one and unchained,
graphed training matched eager training to 4e-6 (the test's tolerance was 1e-6, against the eager model's
deferred adds, which the graphs did not make then); not yet run on a GPU since.
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
    # With the residual adds deferred (``GLMTransformer.defer_residual_adds``): the previous layer's MLP output,
    # which this layer adds in its first LayerNorm (a static copy), and a leaf alias of that layer's MLP bias.
    incoming: torch.Tensor | None
    incoming_bias: torch.Tensor | None
    defer: bool  # the layer hands on its MLP output and bias instead of adding them
    params: tuple[nn.Parameter, ...]
    # Leaf aliases of ``params`` (same storage) that the captured forward uses and the captured backward
    # differentiates: see ``LayerGraphs._run``.
    aliases: dict[str, torch.Tensor]
    forward_graph: torch.cuda.CUDAGraph
    # The static outputs: the stream, and with ``defer`` the MLP output.
    outputs: tuple[torch.Tensor, ...] = ()
    # The forward's outputs whose autograd graph the backward differentiates: the static outputs themselves, once
    # captured; a stand-in that re-runs the captured code (tests/test_cuda_graphs.py) keeps its latest run's here.
    live_outputs: tuple[torch.Tensor, ...] = ()
    # With ``defer``: the parameter the layer hands on as its MLP bias (the next layer adds it).
    own_bias: nn.Parameter | None = None
    output_grads: tuple[torch.Tensor, ...] = ()
    backward_graph: torch.cuda.CUDAGraph | None = None
    grads: tuple[torch.Tensor | None, ...] = ()
    # The static inputs are the previous graphed layer's static outputs (not copies of them): its replay writes
    # what this one reads, and the gradients of those inputs go back to it as this graph's static ones.
    chained: bool = False

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """What the backward differentiates, in the order ``_ReplayLayer`` returns the gradients."""
        extra = tuple(t for t in (self.incoming, self.incoming_bias) if t is not None)
        return (self.hidden, *extra, *self.aliases.values())


class LayerGraphs:
    """``layer(hidden, sep, incoming=None, defer=False)`` replayed from CUDA graphs once warmed up (see the module
    docstring). Not a module: the layer stays registered once, under its own name, so state dicts and optimizers
    see it as before."""

    def __init__(self, layer: nn.Module, pool, stream: torch.cuda.Stream, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: at least one forward and backward before a capture, not {warmup}")
        self.layer = layer
        self.pool = pool
        self.stream = stream
        self.warmup = warmup
        self._captures: dict[tuple, _Capture] = {}
        # The graphed layers before and after this one in the stack (``enable_layer_graphs``): a layer's inputs
        # are the previous one's static outputs, and its output gradients the next one's static input gradients.
        self.previous: LayerGraphs | None = None
        self.next: LayerGraphs | None = None

    def __call__(
        self,
        hidden: torch.Tensor,
        sep: torch.Tensor,
        incoming: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        defer: bool = False,
    ):
        if not (self.layer.training and torch.is_grad_enabled() and hidden.requires_grad):
            if incoming is None and not defer:
                return self.layer(hidden, sep)
            return self.layer(hidden, sep, incoming=incoming, defer=defer)
        bias = None if incoming is None else incoming[1]
        key = (
            tuple(hidden.shape), hidden.dtype, tuple(sep.shape), sep.dtype, hidden.device,
            incoming is not None, bias is not None, defer,
        )  # fmt: skip
        capture = self._captures.get(key)
        if capture is None:
            capture = self._captures[key] = self._capture_forward(hidden, sep, incoming, defer)
        outputs = _ReplayLayer.apply(
            self, capture, hidden, sep, None if incoming is None else incoming[0], bias, *capture.params
        )
        if not defer:
            return outputs
        stream, mlp_output = outputs
        return stream, mlp_output, capture.own_bias

    def _new_graph(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        for generator in get_rng_tracker().cuda_generators():
            graph.register_generator_state(generator)
        return graph

    def _graph(self, graph: torch.cuda.CUDAGraph):
        # thread_local: the data loader's pin-memory thread keeps working while a layer is captured mid-training.
        return torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local")

    def _capture_forward(
        self,
        hidden: torch.Tensor,
        sep: torch.Tensor,
        incoming: tuple[torch.Tensor, torch.Tensor | None] | None,
        defer: bool,
    ) -> _Capture:
        named = [(name, p) for name, p in self.layer.named_parameters() if p.requires_grad]
        bias = None if incoming is None else incoming[1]
        tensors = [hidden] if incoming is None else [hidden, incoming[0]]
        chained = self.previous is not None and all(
            _is_static(
                tensor, [c.outputs[index] for c in self.previous._captures.values() if len(c.outputs) > index]
            )
            for index, tensor in enumerate(tensors)
        )
        # Chained: the previous layer's static outputs themselves; else copies, which each replay refreshes.
        hidden, *rest = [t.detach() if chained else t.detach().clone() for t in tensors]
        capture = _Capture(
            hidden=hidden.requires_grad_(True),
            sep=sep.detach().clone(),
            incoming=rest[0].requires_grad_(True) if rest else None,
            incoming_bias=None if bias is None else bias.detach().requires_grad_(True),
            defer=defer,
            params=tuple(p for _, p in named),
            aliases={name: p.detach().requires_grad_(True) for name, p in named},
            forward_graph=self._new_graph(),
            chained=chained,
        )
        self._warm_up(capture)
        capture.outputs = self._record(capture.forward_graph, lambda: self._forward(capture))
        return capture

    def _record(self, graph: torch.cuda.CUDAGraph, launch):
        """Capture what ``launch()`` runs into ``graph``; returns its result, the graph's static outputs."""
        with self._graph(graph):
            return launch()

    def _forward(self, capture: _Capture) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            capture.live_outputs = self._run(capture)
        return capture.live_outputs

    def _backward(self, capture: _Capture) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(
            capture.live_outputs, capture.inputs(), capture.output_grads, allow_unused=True
        )

    def _run(self, capture: _Capture) -> tuple[torch.Tensor, ...]:
        """The layer's forward on the static inputs, with the parameters' leaf aliases in place of the parameters:
        ``(stream,)``, or with ``defer`` ``(stream, MLP output)`` (the MLP bias it hands on is ``own_bias``).

        Autograd hands a leaf's gradient to its AccumulateGrad node on the stream that node was created on. A
        parameter's node outlives an iteration wherever something holds the graph (the previous micro-batch's
        output or loss, DeepSpeed's gradient hooks), so it may date from an eager step on the default stream,
        and a captured backward that syncs with the default (legacy) stream fails with
        cudaErrorStreamCaptureImplicit. The aliases share the parameters' storage (the graph reads the current
        weights) and get their own AccumulateGrad nodes, made on the capture stream.
        """
        arguments = (capture.hidden, capture.sep)
        if capture.incoming is None and not capture.defer:
            return (torch.func.functional_call(self.layer, capture.aliases, arguments),)
        incoming = None if capture.incoming is None else (capture.incoming, capture.incoming_bias)
        stream, mlp_output, bias = torch.func.functional_call(
            self.layer, capture.aliases, arguments, {"incoming": incoming, "defer": capture.defer}
        )
        if bias is not None and capture.own_bias is None:
            name = next(name for name, alias in capture.aliases.items() if alias is bias)
            capture.own_bias = capture.params[list(capture.aliases).index(name)]
        return stream, mlp_output

    def _warm_up(self, capture: _Capture) -> None:
        """``warmup`` forwards and backwards on the capture stream before the capture, off the books: on the
        static inputs (copies of the call's), differentiating the parameters' aliases (no ``.grad`` written), the
        random generators' states put back afterwards (the training draws what it would have drawn)."""
        tracker = get_rng_tracker()
        default_state, streams = torch.cuda.get_rng_state(), tracker.get_states()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), torch.enable_grad():
            for _ in range(self.warmup):
                outputs = self._run(capture)
                torch.autograd.grad(
                    outputs, capture.inputs(), [torch.ones_like(o) for o in outputs], allow_unused=True
                )
                del outputs
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.set_rng_state(default_state)
        tracker.set_states(streams)

    def capture_backward(self, capture: _Capture, output_grads: tuple[torch.Tensor, ...]) -> None:
        """Capture the backward of ``capture``'s forward, the first time autograd reaches it: backwards are then
        captured in the order they run (last layer first), after all forwards, as the pool needs. The static
        output gradients hold ``output_grads`` before the capture, as the static inputs held the call's."""
        # The next graphed layer's static input gradients where they are what autograd hands over (it returns
        # them as they are to a chained layer), else buffers of this graph's own.
        following = [] if self.next is None else [c for c in self.next._captures.values() if c.chained]
        statics = []
        for index, grad in enumerate(output_grads):
            if _is_static(grad, [c.grads[index] for c in following if c.backward_graph is not None]):
                statics.append(grad.detach())
            else:
                statics.append(torch.empty_like(capture.outputs[index]))
                statics[-1].copy_(grad)
        capture.output_grads = tuple(statics)
        capture.backward_graph = self._new_graph()
        capture.grads = self._record(capture.backward_graph, lambda: self._backward(capture))


class _ReplayLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: LayerGraphs, capture: _Capture, hidden, sep, incoming, incoming_bias, *params):
        # incoming_bias and params are inputs so that autograd routes their gradients; the graph reads them in
        # place. The inputs are copied through .data: the captured forward saved the static inputs for its
        # backward, which is captured after this copy, and autograd would refuse a saved tensor whose version
        # counter a copy_ had moved.
        _copy_unless_there(capture.hidden, hidden)
        capture.sep.data.copy_(sep)
        if capture.incoming is not None:
            _copy_unless_there(capture.incoming, incoming)
        capture.forward_graph.replay()
        ctx.graphs, ctx.capture = graphs, capture
        # The static outputs themselves: the next layer copies them into its own input buffers before the next
        # replay.
        outputs = tuple(output.detach() for output in capture.outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *output_grads):
        capture = ctx.capture
        if capture.backward_graph is None:
            ctx.graphs.capture_backward(capture, output_grads)
        else:
            for static, grad in zip(capture.output_grads, output_grads, strict=True):
                _copy_unless_there(static, grad)
        capture.backward_graph.replay()
        # The inputs' gradients go to a chained previous layer as they are (its backward reads them where they
        # are, before this graph replays again); the others, and every parameter's, as copies, made by one
        # multi-tensor kernel instead of a clone per tensor.
        kept = 1 + (capture.incoming is not None) if capture.chained else 0
        defined = [grad for grad in capture.grads[kept:] if grad is not None]
        copies = iter(_copies_of(defined))
        grads = iter(
            [
                *capture.grads[:kept],
                *(None if grad is None else next(copies) for grad in capture.grads[kept:]),
            ]
        )
        hidden_grad = next(grads)
        incoming_grad = None if capture.incoming is None else next(grads)
        bias_grad = None if capture.incoming_bias is None else next(grads)
        return (None, None, hidden_grad, None, incoming_grad, bias_grad, *grads)


def _is_static(tensor: torch.Tensor, statics: list[torch.Tensor | None]) -> bool:
    """Whether ``tensor`` is (a view of the whole of) one of ``statics``."""
    return any(
        static is not None
        and tensor.data_ptr() == static.data_ptr()
        and tensor.shape == static.shape
        and tensor.stride() == static.stride()
        for static in statics
    )


def _copy_unless_there(static: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` into the static buffer ``static``, unless it is already there (a chained layer's input is
    the previous layer's static output; writing into it otherwise is safe too: nothing but this graph reads it
    before the previous layer's next replay). Through ``.data``: autograd must not see the buffer change."""
    if value.data_ptr() != static.data_ptr():
        static.data.copy_(value)


def _copies_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors equal to ``tensors``, written by one multi-tensor copy."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        torch._foreach_copy_(copies, tensors)
    return copies


def enable_layer_graphs(transformer: nn.Module, warmup: int = 2) -> None:
    """Run ``transformer``'s layers (a ``GLMTransformer``'s) through per-layer CUDA graphs in training."""
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    graphs = [LayerGraphs(layer, pool, stream, warmup) for layer in transformer.layers]
    for before, after in zip(graphs, graphs[1:]):
        before.next, after.previous = after, before
    transformer.layer_graphs = graphs
