"""Multi-process training under torchrun: gloo on CPU, nccl on GPU.

Every rank draws the same sample indices and augmentation (same seed), then takes its own share of
each global batch, so the ranks together see exactly the batches of a single-process run. Only
rank 0 writes logs and checkpoints.
"""
import os

import torch
import torch.distributed as dist

from .errors import UserError


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def launched_by_torchrun():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def cuda_index(local_rank):
    """The CUDA device of the process with LOCAL_RANK `local_rank`: that index where the process sees all
    the node's GPUs, index 0 where it sees one GPU only (a scheduler that binds one GPU to each process,
    as SLURM can)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise UserError(f'LOCAL_RANK {local_rank} has no GPU of its own: this process sees {count} CUDA devices; '
                    f'show each process all the node\'s GPUs or exactly one (CUDA_VISIBLE_DEVICES)')


def init(device_type):
    """Join the process group torchrun describes; returns the CUDA index of this rank (or None)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return None
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device_type == 'cuda':
        index = cuda_index(local_rank)
        torch.cuda.set_device(index)
        dist.init_process_group('nccl')
        return index
    dist.init_process_group('gloo')
    return None


def sync_batchnorm(module):
    """The module's BatchNorm layers replaced in place by SyncBatchNorm (statistics over the global batch;
    same state_dict keys), when more than one process runs; returns the module."""
    if world_size() > 1:
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def wrap(module, device):
    """DistributedDataParallel around a module with trainable parameters, when running under torchrun."""
    if not dist.is_initialized():
        return module
    device_ids = [device.index] if device.type == 'cuda' else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_min(tensor):
    """The elementwise minimum over the ranks, in place (e.g. the first step where any rank went wrong)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def average_buffers(module):
    """BN running statistics that each rank updated on its own data (stage 2, shift_bn) -> their mean."""
    if not dist.is_initialized():
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world_size()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_in_sync(*modules):
    """Raise if the ranks' weights differ; returns the number of ranks compared."""
    if not dist.is_initialized():
        return 1
    flat = torch.cat([p.detach().double().flatten() for m in modules for p in m.parameters()])
    checksum = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device)).sum()])
    gathered = [torch.zeros_like(checksum) for _ in range(world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError('the ranks ended with different weights; please report this')
    return len(gathered)


def shard(start, stop):
    """This rank's part of the global batch [start, stop): every world_size-th sample."""
    return slice(start + rank(), stop, world_size())


def finish():
    """Leave the process group before the interpreter exits: gloo worker threads still alive at exit
    abort the process ('terminate called without an active exception', seen in the 2-rank test)."""
    if dist.is_initialized():
        dist.destroy_process_group()
