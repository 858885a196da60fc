"""The tensor-parallel communication of the model, as four small autograd functions.

Each pairs a forward collective with its adjoint in the backward pass:

| function                        | forward                  | backward                 |
|---------------------------------|--------------------------|--------------------------|
| ``copy_to_tensor_parallel``     | identity                 | all-reduce (sum)         |
| ``reduce_from_tensor_parallel`` | all-reduce (in place)    | identity                 |
| ``scatter_to_tensor_parallel``  | keep this rank's slice   | all-gather               |
| ``gather_from_tensor_parallel`` | all-gather               | keep this rank's slice   |

Slices and gathers are along the last dimension. With one tensor-parallel rank every function is the
identity and no communication happens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel import state


def _all_reduce_in_place(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, group=state.get_tensor_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world_size = state.get_tensor_parallel_world_size()
    if x.shape[-1] % world_size:
        raise ValueError(
            f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {world_size}"
        )
    return x.chunk(world_size, dim=-1)[state.get_tensor_parallel_rank()].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(state.get_tensor_parallel_world_size())]
    dist.all_gather(parts, x, group=state.get_tensor_parallel_group())
    return torch.cat(parts, dim=-1)


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # A buffer of its own: the gradient autograd hands a backward may be shared (an addition's backward
        # passes one tensor to both of its inputs) or an expanded view (a sum's backward), neither of which
        # may be summed in place.
        return _all_reduce_in_place(grad.clone(memory_format=torch.contiguous_format))


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # Summed in place, without a copy: the callers pass a temporary that nothing else reads (a matmul's
        # output, the masked embeddings). Marked dirty, so autograd refuses a leaf that requires grad or a
        # tensor saved for another backward instead of silently using the sum.
        ctx.mark_dirty(x)
        return _all_reduce_in_place(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ScatterToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _gather_last_dim(grad)


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _split_last_dim(grad)


def _single_rank() -> bool:
    return state.get_tensor_parallel_world_size() == 1


def copy_to_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: the input gradients are summed."""
    return x if _single_rank() else _CopyToTensorParallel.apply(x)


def reduce_from_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    """Leave a tensor-parallel region by summing the ranks' partial results, in place: ``x`` (contiguous)
    becomes the sum; pass a temporary that nothing else reads."""
    return x if _single_rank() else _ReduceFromTensorParallel.apply(x)


def scatter_to_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of the last dimension."""
    return x if _single_rank() else _ScatterToTensorParallel.apply(x)


def gather_from_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dimension."""
    return x if _single_rank() else _GatherFromTensorParallel.apply(x)
