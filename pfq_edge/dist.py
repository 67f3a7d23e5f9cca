"""torch.distributed for fine-tuning under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on GPU).

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) every helper here is a no-op for one process.
"""

from __future__ import annotations

import os


def init_from_env() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment, once; returns (rank, world size).

    Backend: nccl when CUDA is available, else gloo. One process without torchrun returns (0, 1).
    """
    import torch
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not td.is_initialized():
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return td.get_rank(), td.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def reduce_sum(tensor):
    """``tensor`` summed over all processes (in place); unchanged for one process."""
    import torch.distributed as td

    if rank_and_world()[1] > 1:
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def sum_gradients(model) -> None:
    """Sum every parameter gradient over the processes (each holds the loss of its share / global batch size)."""
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if rank_and_world()[1] == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = reduce_sum(_flatten_dense_tensors(grads))
    with torch.no_grad():
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def barrier() -> None:
    import torch.distributed as td

    if rank_and_world()[1] > 1:
        td.barrier()

