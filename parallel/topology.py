"""Process groups: torch.distributed from the launcher's environment, then
megatron-core parallel_state with tensor=1, pipeline=1, context=cp and the
remaining ranks data-parallel.

Works from torchrun (RANK/WORLD_SIZE/MASTER_*), from plain `srun` (SLURM_*),
or as a single process with no launcher at all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    dp: int
    dp_rank: int
    cp: int
    cp_rank: int
    device: torch.device
    backend: str

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return parallel_state.get_context_parallel_group() if self.cp > 1 else None

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Plain `srun` (one task per rank, no torchrun) sets SLURM_* but not RANK."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "running under srun without torchrun: export MASTER_ADDR (the first node of "
            "$SLURM_JOB_NODELIST) and MASTER_PORT, or submit launch/slurm.sbatch"
        )


def check_device(device: str, local_rank: int = 0) -> None:
    """ValueError (one line, naming trainer.device) when `device` cannot be used by this rank."""
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' is invalid: torch sees no CUDA device on this machine "
                         f"({torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                         "use trainer.device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"trainer.device='cuda' is invalid: local rank {local_rank} has no GPU of its own "
                         f"({torch.cuda.device_count()} visible); start at most {torch.cuda.device_count()} "
                         "processes per node")


def init_topology(cp: int = 1, backend: str = "auto", device: str = "auto", timeout_s: int = 600) -> Topology:
    """Start torch.distributed (if not yet started) and megatron-core's groups."""
    _env_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device, local_rank)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world % cp:
        raise ValueError(f"parallel.cp={cp} must divide the world size {world}")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        context_parallel_size=cp, create_gloo_process_groups=False,
    )
    return Topology(
        rank=rank, world_size=world, local_rank=local_rank,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cp=cp, cp_rank=parallel_state.get_context_parallel_rank(),
        device=dev, backend=backend,
    )


def deepspeed_mpu() -> SimpleNamespace:
    """megatron-core's groups in the shape DeepSpeed's `mpu` argument expects.

    DeepSpeed reduces gradients (and shards ZeRO state) over whatever
    `get_data_parallel_group` returns; here that is dp x cp, because context-
    parallel ranks hold different tokens of the same sequences and their
    gradients must be combined too. The model-parallel group is tensor-parallel
    (size 1 in ltrain).
    """
    ps = parallel_state

    def dp_group():
        return ps.get_data_parallel_group(with_context_parallel=True)

    return SimpleNamespace(
        get_data_parallel_group=dp_group,
        get_data_parallel_rank=lambda: dist.get_rank(dp_group()),
        get_data_parallel_world_size=lambda: dist.get_world_size(dp_group()),
        get_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_tensor_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_tensor_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_tensor_model_parallel_src_rank=ps.get_tensor_model_parallel_src_rank,
    )


def destroy_topology() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
