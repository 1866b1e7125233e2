"""Data-parallel distillation on torch.distributed: one code path for 1 or N processes.

Launch with `torchrun --nproc-per-node N -m llamba distill ...` (multi-node: torchrun's rendezvous flags).
A plain `llamba distill ...` is the N = 1 case of the same loop: `DistContext.from_env()` sees no torchrun
variables and every collective below becomes the identity.

- Student: FSDP2 (`fully_shard` per block, then the root) or DDP, under a mixed-precision policy (bf16 params and
  compute, fp32 master weights and gradient reductions) where the device supports bf16.
- Teacher: replicated under no_grad (bf16 on GPU); it is frozen, so it needs no sharding for models that fit.
- Checkpoints: torch.distributed.checkpoint (DCP) writes sharded state that loads on any world size.
- Data: rank r takes sequences r, r + N, r + 2N, ... of each global batch, so ranks read disjoint data and the
  global batch (and the result) does not depend on N.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "fsdp", "ddp", "none")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | None = None) -> DistContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (gloo on CPU, nccl on GPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, local, dev)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float | torch.Tensor) -> float:
        """The mean over ranks of a scalar (metrics, budgets); identity for one process."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world_size
        return float(t)

    def broadcast_object(self, obj):
        """Rank 0's value of any picklable object on every rank (so all ranks agree on budgets and resume points)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """global_batch: (B, ...) with B divisible by world_size -> this rank's (B / world_size, ...) rows."""
        if global_batch.shape[0] % self.world_size:
            raise ValueError(f"global batch {global_batch.shape[0]} is not divisible by world size {self.world_size}; "
                             "choose --batch-size as a multiple of the number of processes")
        return global_batch[self.rank :: self.world_size]


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def wrap_student(model: nn.Module, ctx: DistContext, strategy: str = "auto", block_cls: type | None = None,
                 activation_checkpointing: bool = False, mixed_precision: bool = True) -> nn.Module:
    """Shard or replicate the student for data-parallel training; returns the module to train.

    strategy: 'fsdp' (FSDP2 `fully_shard` per block then root), 'ddp', 'none' (one process), or 'auto'
    (fsdp when distributed, none otherwise). Mixed precision (bf16 compute, fp32 reductions) only where the
    device supports bf16; fp32 master weights stay in the optimizer either way."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = "fsdp" if ctx.distributed else "none"
    model = model.to(ctx.device)
    if activation_checkpointing and block_cls is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block_cls))
    if strategy == "none":
        return model
    if not dist.is_initialized():  # FSDP/DDP asked for in one process: a one-member group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision and bf16_supported(ctx.device) else MixedPrecisionPolicy()
    if block_cls is not None:
        for module in model.modules():
            if isinstance(module, block_cls):
                fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded, CPU) model state on every rank; export it from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext,
                 extra: dict | None = None) -> None:
    """Write model + optimizer with DCP into `path` atomically (temp dir, then rename by rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported DCP case
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": model_sd, "optim": optim_sd, "extra": extra or {}}, checkpoint_id=str(tmp))
    ctx.barrier()
    if ctx.is_main:
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra_template: dict | None = None) -> dict:
    """Restore a DCP checkpoint written on any world size into this (possibly resharded) model/optimizer.
    Returns the `extra` dict (its keys must be given in extra_template, DCP loads in place)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    state = {"model": model_sd, "optim": optim_sd, "extra": dict(extra_template or {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["extra"]


def memory_plan(student: nn.Module, teacher: nn.Module | None, ctx: DistContext, strategy: str, seq_len: int,
                micro_batch: int, activation_checkpointing: bool = False) -> dict[str, float]:
    """Bytes per rank (GiB): student params, gradients, AdamW state (2 fp32 moments), teacher, activations.

    Activations are estimated as ~34 * d * tokens bytes per block without checkpointing (a Llama-block rule of
    thumb, fp32) and one block's worth plus the residual streams with it."""
    gib = 2**30
    shards = ctx.world_size if strategy in ("fsdp", "auto") and ctx.distributed else 1
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    cfg = getattr(student, "config", None)
    d, layers = (cfg.d_model, cfg.n_layer) if cfg is not None else (1024, 1)
    tokens = seq_len * micro_batch
    per_block = 34 * d * tokens
    acts = (per_block + layers * d * tokens * 4) if activation_checkpointing else layers * per_block
    teacher_bytes = n_teacher * (2 if bf16_supported(ctx.device) else 4)
    plan = {
        "student params": 4 * n_student / shards / gib,
        "gradients": 4 * n_student / shards / gib,
        "AdamW state": 8 * n_student / shards / gib,
        "teacher": teacher_bytes / gib,
        "activations": acts / gib,
    }
    plan["total"] = sum(plan.values())
    return plan


def available_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def check_memory_plan(plan: dict[str, float], ctx: DistContext) -> str:
    """A one-line plan for the log; raises MemoryError with the fix when the total cannot fit."""
    line = ", ".join(f"{k} {v:.2f}" for k, v in plan.items()) + " GiB per rank"
    free = available_memory_gib(ctx.device)
    if plan["total"] > free:
        raise MemoryError(f"memory plan needs {plan['total']:.1f} GiB per rank but {free:.1f} GiB is free; lower "
                          "--batch-size/--seq-len, add --activation-checkpointing, or use more processes (FSDP)")
    return line
