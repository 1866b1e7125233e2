"""Data-parallel distillation on torch.distributed: one code path for 1 or N processes.

Launch with `torchrun --nproc-per-node N -m llamba distill ...` (multi-node: torchrun's rendezvous flags).
A plain `llamba distill ...` is the N = 1 case of the same loop: `DistContext.from_env()` sees no torchrun
variables and every collective below becomes the identity.

- Student: FSDP2 (`fully_shard` per block, then the root) or DDP, under a mixed-precision policy (bf16 params and
  compute, fp32 master weights and gradient reductions) where the device supports bf16. Stage 3 wraps the whole
  model in DDP; stages 1-2 call and backpropagate the blocks one at a time, so each block gets its own DDP wrapper
  (one forward, one backward per wrapper, as DDP requires).
- Teacher: frozen, under no_grad (bf16 where supported); replicated, or sharded with FSDP2 (`fully_shard` per
  decoder layer) when it does not fit beside the student (`teacher_strategy`).
- Checkpoints: torch.distributed.checkpoint (DCP) writes sharded state that loads on any world size.
- Data: rank r takes sequences r, r + N, r + 2N, ... of each global batch, so ranks read disjoint data and the
  global batch (and the result) does not depend on N (streaming: distill/stream.py keeps the same row order).
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

from llamba.atomic import replace_dir
from llamba.devices import resolve_device
from llamba.errors import ResourceError, UsageError

STRATEGIES = ("auto", "fsdp", "ddp", "none")
TEACHER_STRATEGIES = ("auto", "replicate", "fsdp")


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
        dev = resolve_device(device)
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
        t = torch.as_tensor(
            value, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
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

    def all_gather_object(self, obj) -> list:
        """Every rank's value of a picklable object, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def rows(self, batch_size: int) -> slice:
        """This rank's rows r, r + N, r + 2N, ... of a global batch of batch_size (divisible by N)."""
        if batch_size % self.world_size:
            raise UsageError(
                f"global batch {batch_size} is not divisible by world size {self.world_size}; "
                "choose --batch-size as a multiple of the number of processes"
            )
        return slice(self.rank, batch_size, self.world_size)

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """global_batch: (B, ...) with B divisible by world_size -> this rank's (B / world_size, ...) rows."""
        return global_batch[self.rows(global_batch.shape[0])]


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_strategy(strategy: str, ctx: DistContext) -> str:
    """'auto' -> 'fsdp' when distributed, 'none' in one process; other names are checked and returned."""
    if strategy not in STRATEGIES:
        raise UsageError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "fsdp" if ctx.distributed else "none"
    return strategy


def _ensure_group() -> None:
    if not dist.is_initialized():  # FSDP/DDP asked for in one process: a one-member group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
    )


def _fully_shard(model: nn.Module, unit_cls: type | None, policy=None) -> None:
    """FSDP2: every `unit_cls` submodule its own unit (gathered only while it runs), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = policy or MixedPrecisionPolicy()
    if unit_cls is not None:
        for module in model.modules():
            if isinstance(module, unit_cls):
                fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap_student(
    model: nn.Module,
    ctx: DistContext,
    strategy: str = "auto",
    block_cls: type | None = None,
    activation_checkpointing: bool = False,
    mixed_precision: bool = True,
    ddp_per_block: bool = False,
) -> nn.Module:
    """Shard or replicate the student for data-parallel training; returns the module to train.

    strategy: 'fsdp' (FSDP2 `fully_shard` per block then root), 'ddp', 'none' (one process), or 'auto'
    (fsdp when distributed, none otherwise). Mixed precision (bf16 params and compute, fp32 reductions) only where
    the device supports bf16; fp32 master weights stay in the optimizer either way. With ddp_per_block the model
    itself stays plain and `ddp_blocks` wraps the blocks (stages 1-2)."""
    strategy = resolve_strategy(strategy, ctx)
    model = model.to(ctx.device)
    if activation_checkpointing and block_cls is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block_cls))
    if strategy == "none" or (strategy == "ddp" and ddp_per_block):
        return model
    _ensure_group()
    if strategy == "ddp":
        return _ddp(model, ctx)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision and bf16_supported(ctx.device)
        else None
    )
    _fully_shard(model, block_cls, policy)
    return model


def ddp_blocks(blocks, ctx: DistContext) -> list[nn.Module]:
    """One DDP wrapper per block that has trainable parameters (stages 1-2: each block runs its own forward and
    backward). The wrappers share the blocks' parameters, so the plain student keeps the weights for the optimizer
    and the checkpoints."""
    _ensure_group()
    return [_ddp(b, ctx) if any(p.requires_grad for p in b.parameters()) else b for b in blocks]


def wrap_teacher(teacher: nn.Module, ctx: DistContext, strategy: str) -> nn.Module:
    """strategy 'fsdp': FSDP2 `fully_shard` per decoder layer then the root (each rank holds 1/N of the weights;
    a layer is gathered only while it runs); 'replicate': unchanged. The teacher stays frozen and in its dtype."""
    if strategy == "fsdp":
        _ensure_group()
        _fully_shard(teacher, type(teacher.model.layers[0]))
        # FSDP2 keeps the root (embeddings, final norm, LM head) gathered after forward, expecting a backward
        teacher.register_forward_hook(lambda module, args, out: module.reshard())
    return teacher


def resolve_teacher_strategy(strategy: str, ctx: DistContext, plan: dict[str, float]) -> str:
    """'auto' -> 'fsdp' when distributed and the plan with a replicated teacher does not fit, else 'replicate'."""
    if strategy not in TEACHER_STRATEGIES:
        raise UsageError(f"teacher strategy must be one of {TEACHER_STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "fsdp" if ctx.distributed and plan["total"] > available_memory_gib(ctx.device) else "replicate"
    return strategy


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded, CPU) model state on every rank; export it from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return get_model_state_dict(
        unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    extra: dict | None = None,
) -> None:
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
        replace_dir(tmp, path)  # fsync, then path -> path.old, tmp -> path
    ctx.barrier()


def load_sharded(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra_template: dict | None = None
) -> dict:
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


def memory_plan(
    student: nn.Module,
    teacher: nn.Module | None,
    ctx: DistContext,
    rows: tuple[int, int],
    strategy: str = "none",
    teacher_strategy: str = "replicate",
    activation_checkpointing: bool = False,
    stage_bytes: float = 0.0,
) -> dict[str, float]:
    """Bytes per rank (GiB) of a step on `rows` = (micro-batch per rank, sequence length): student params,
    gradients, AdamW state (2 fp32 moments), teacher (its dtype, 1/N of it when sharded), activations, and
    `stage_bytes` (the stage record's own estimate).

    Activations are estimated as ~34 * d * tokens bytes per block without checkpointing (a Llama-block rule of
    thumb, fp32) and one block's worth plus the residual streams with it."""
    gib = 2**30
    shards = ctx.world_size if resolve_strategy(strategy, ctx) == "fsdp" else 1
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    cfg = getattr(student, "config", None)
    d, layers = (cfg.d_model, cfg.n_layer) if cfg is not None else (1024, 1)
    tokens = rows[0] * rows[1]
    per_block = 34 * d * tokens
    acts = (per_block + layers * d * tokens * 4) if activation_checkpointing else layers * per_block
    teacher_bytes = n_teacher * (2 if bf16_supported(ctx.device) else 4)
    if teacher_strategy == "fsdp":
        teacher_bytes /= ctx.world_size
    plan = {
        "student params": 4 * n_student / shards / gib,
        "gradients": 4 * n_student / shards / gib,
        "AdamW state": 8 * n_student / shards / gib,
        "teacher": teacher_bytes / gib,
        "activations": acts / gib,
    }
    if stage_bytes:  # what the stage itself holds at once (stage 1: one layer's l x l attention maps)
        plan["stage extra"] = stage_bytes / gib
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
        raise ResourceError(
            f"memory plan needs {plan['total']:.1f} GiB per rank but {free:.1f} GiB is free; lower "
            "--batch-size/--seq-len, add --activation-checkpointing, or use more processes "
            "(--strategy fsdp, --teacher-strategy fsdp)"
        )
    return line
