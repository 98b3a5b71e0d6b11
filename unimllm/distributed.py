"""Process-group set-up and the one place where DeepSpeed engines are built.

Works the same under the ``deepspeed`` launcher (one node or a hostfile), ``torchrun`` and a plain
``python`` process (a world of one): the rank/world come from the environment those launchers set,
and missing variables default to a single local process. CPU uses gloo, CUDA uses nccl.

Models never import this module (house style: parallelism is applied in one place).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. ``device`` is the torch device to put models and batches on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op the first time it starts in an environment
    (about 30 s with a C++ compiler; a fresh clone's ``make demo`` paid it in its first step). Our CPU runs
    communicate through torch.distributed's gloo, so the op is marked incompatible and never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed() -> None:
    """Destroy the process group, if any (a failed run's way out), and forget the groups DeepSpeed cloned from it,
    so that :func:`init_distributed` can start a new one in this process (an in-process caller's next run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and not name.startswith("__") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            if isinstance(value, dict):
                value.clear()
            else:
                setattr(groups, name, None)


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed once (gloo on CPU, nccl on CUDA) and return this process's place."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # a world of one: any free port
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dev = torch.device("cpu")
        _no_shm_comm_op()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sums(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum scalar metrics over ranks (no-op for a world of one). Collective: every rank calls it, and ranks
    may hold different keys (a key missing on a rank counts as 0 there)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(values)
    keys = sorted(set().union(*gather_objects(sorted(values))))
    if not keys:
        return {}
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce; no-op for a world of one)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one for a world of one)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def deepspeed_config(*, micro_batch: int, grad_accum: int, zero_stage: int, precision: str,
                     grad_clip: float, zero3_persist_below: int = -1) -> dict:
    """The DeepSpeed config dict, generated from our dataclass values (never a hand-kept JSON)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "gradient_clipping": float(grad_clip),  # always explicit: DeepSpeed's default is 1.0, not off
    }
    if zero_stage == 3 and zero3_persist_below >= 0:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = zero3_persist_below
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif precision == "bf16-autocast":
        # The engine's forward turns an outer CUDA autocast OFF unless this section asks for it (on CPU it
        # leaves it alone): without it a bf16-autocast run on a GPU silently computed in fp32. No module is
        # "lower-precision safe", so gradients stay fp32, all-reduce included.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return cfg


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module, zero_stage: int):
    """Full parameters of ``module`` inside the block on every rank (ZeRO-3 gathers; collective)."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def _clip_in_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip (and record ``optimizer.last_grad_norm``) right before each step, after the gradient all-reduce."""
    step = optimizer.step
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def clipped_step(*args: Any, **kwargs: Any) -> Any:
        optimizer.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    optimizer.step = clipped_step  # type: ignore[method-assign]


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> Any:
    """Wrap ``model`` + a client torch optimizer in a DeepSpeed engine (ZeRO 0-3 per ``ds_config``).

    Without ZeRO and mixed precision, DeepSpeed clips but does not keep the gradient norm, so there the
    clipping runs in the optimizer step instead (same maths) and the norm is kept for logging.
    """
    import deepspeed  # imported here: `tokenizer/` and `llm/` never need it

    plain = ds_config["zero_optimization"]["stage"] == 0 and "bf16" not in ds_config and "fp16" not in ds_config
    clip = ds_config.get("gradient_clipping", 0)
    if plain and clip > 0:
        ds_config = {**ds_config, "gradient_clipping": 0.0}  # DeepSpeed must not clip first (the norm would be post-clip)
        _clip_in_step(optimizer, clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine


def grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the engine's last optimizer step, when known."""
    gn = engine.get_global_grad_norm()
    if gn is None:
        gn = getattr(engine.optimizer, "last_grad_norm", None)
    return None if gn is None else float(gn)
