"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

For ``Y = X A^T + b`` with A of shape ``[out, in]``:

* ``ColumnParallelLinear`` splits A by output rows: each rank computes its slice of Y from the full X.
* ``RowParallelLinear`` splits A by input columns: each rank multiplies its slice of X (typically the
  output of a column-parallel layer) and the partial products are summed across ranks.

A column-parallel layer followed by a row-parallel one (attention, MLP) needs a single all-reduce in
the forward pass and one in the backward pass.

Initialization builds the full master weight on the CPU in fp32 from the caller's generator and keeps
this rank's shard, so a model at any tensor-parallel size starts from exactly the weights of the
single-rank model with the same seed. Sharded parameters carry ``tensor_model_parallel = True`` (with
``partition_dim`` and ``partition_stride``), which DeepSpeed reads so that gradient norms count
replicated parameters once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel import state
from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    scatter_to_tensor_parallel,
)
from megatron_glm.parallel.sharding import divide, shard

# Fills a full (unsharded) fp32 master weight in place, drawing from the generator. Default: N(0, 0.02).
InitMethod = Callable[[torch.Tensor, torch.Generator], None]


def normal_init(std: float) -> InitMethod:
    """N(0, std) initialization."""

    def init(weight: torch.Tensor, generator: torch.Generator) -> None:
        nn.init.normal_(weight, mean=0.0, std=std, generator=generator)

    return init


def _mark_tensor_parallel(param: nn.Parameter, dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


@torch.no_grad()
def _initialize_shard(
    param: nn.Parameter,
    full_shape: tuple[int, ...],
    init_method: InitMethod,
    generator: torch.Generator,
    dim: int,
    stride: int = 1,
) -> None:
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master, generator)
    rank, world_size = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
    param.copy_(shard(master, dim, rank, world_size, stride))


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A and b split along the output dimension.

    ``stride`` > 1 splits the output into ``stride`` groups first (query/key/value for ``stride=3``)
    and gives each rank its slice of every group; see ``megatron_glm.parallel.sharding``. The output
    stays split (``[..., out / tp]``) unless ``gather_output``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if gather_output and stride > 1:
            raise ValueError(
                "gather_output would concatenate the ranks' strided slices out of order; "
                "use stride=1 or keep the output split"
            )
        tp = state.get_tensor_parallel_world_size()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.stride = gather_output, stride
        self.init_method = init_method or normal_init(0.02)
        local = divide(out_features, tp * stride, "output features (x stride)") * stride
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        _mark_tensor_parallel(self.weight, dim=0, stride=stride)
        if bias:
            self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype))
            _mark_tensor_parallel(self.bias, dim=0, stride=stride)
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self, generator: torch.Generator) -> None:
        _initialize_shard(
            self.weight,
            (self.out_features, self.in_features),
            self.init_method,
            generator,
            dim=0,
            stride=self.stride,
        )
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tensor_parallel(x), self.weight, self.bias)
        return gather_from_tensor_parallel(y) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), stride={self.stride}"


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A split along the input dimension; the partial products are summed.

    The input is expected split along its last dimension (``input_is_parallel``, the output of a
    column-parallel layer) or is split here. The bias is replicated and added once, after the sum; with
    ``skip_bias_add`` (Megatron-LM's flag) the forward returns ``(sum, bias)`` and leaves the add to the caller,
    which fuses it into what follows (``kernels.layer_norm``'s and ``kernels.dropout_add``'s ``x_bias``); under
    ZeRO-3 it returns ``(sum + bias, None)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tp = state.get_tensor_parallel_world_size()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.init_method = init_method or normal_init(0.02)
        local = divide(in_features, tp, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        _mark_tensor_parallel(self.weight, dim=1)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self, generator: torch.Generator) -> None:
        _initialize_shard(
            self.weight, (self.out_features, self.in_features), self.init_method, generator, dim=1
        )
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x)
        y = reduce_from_tensor_parallel(F.linear(x, self.weight))
        if not self.skip_bias_add:
            return y if self.bias is None else y + self.bias
        if self.bias is None or hasattr(self.bias, "ds_id"):
            # Under DeepSpeed's ZeRO-3 (partitioned parameters carry a ds_id) the bias is added here: handed to
            # the caller, it would become an "external" parameter that ZeRO-3 gathers outside its own module.
            return y if self.bias is None else y + self.bias, None
        return y, self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}"


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows ``[start, end)`` of the vocabulary held by ``rank``."""
    per_rank = divide(vocab_size, world_size, "vocabulary size")
    return rank * per_rank, (rank + 1) * per_rank


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows are split over the tensor-parallel ranks in contiguous ranges.

    Each rank looks up the ids in its range, writes zeros for the others, and the ranks' results are
    summed, so every rank ends with the full embeddings.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        rank, tp = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.init_method = init_method or normal_init(0.02)
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, rank, tp)
        self.weight = nn.Parameter(
            torch.empty(self.vocab_end - self.vocab_start, embedding_dim, device=device, dtype=dtype)
        )
        _mark_tensor_parallel(self.weight, dim=0)

    def reset_parameters(self, generator: torch.Generator) -> None:
        _initialize_shard(
            self.weight, (self.num_embeddings, self.embedding_dim), self.init_method, generator, dim=0
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_start == 0 and self.vocab_end == self.num_embeddings:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        embeddings = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(embeddings)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (rows {self.vocab_start}..{self.vocab_end - 1} here)"


def vocab_parallel_logits(hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
    """Logits against a vocab-parallel (tied) embedding table: ``[..., V / tp]``, this rank's vocab range."""
    return F.linear(copy_to_tensor_parallel(hidden), word_embeddings)
