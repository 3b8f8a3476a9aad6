"""Several processes, one loop: torch.distributed set up from the launcher's environment.

``ftune train trainer.num_processes=N`` starts N copies of itself through torch's own launcher
(``torch.distributed.run``, what ``torchrun`` is); ``torchrun``, ``accelerate launch`` and SLURM's
``srun`` start them the same way from outside. Each process reads who it is from the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT; or SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
under srun), joins the process group (nccl on CUDA, gloo on CPU) and runs ftune/train.py's loop with
the model wrapped in DistributedDataParallel (``trainer.distributed=ddp``) or sharded by FSDP2
(``trainer.distributed=fsdp``: ``fully_shard`` on each transformer block, then on the root). A rank
that fails writes its one-paragraph error to ``$FTUNE_ERROR_DIR/rank-<r>.txt``; the launcher started
by ``trainer.num_processes`` prints it last.

Under FSDP2 every parameter is a DTensor holding this rank's slice. What leaves the loop (checkpoints,
the saved adapter or weights) is gathered whole first, by every rank together, and written by rank 0
in the same format as one process writes; a checkpoint read back is sliced again
(:func:`whole_parameters`, :func:`whole_optimizer_state`, :func:`shard_like`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftune.errors import FtuneError

ERROR_DIR = "FTUNE_ERROR_DIR"  # where each failing rank writes its error paragraph (set by launch())


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(environ: dict[str, str] | None = None) -> World:
    """The world the launcher describes: torchrun / accelerate variables, else SLURM's, else one process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")))
    return World()


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate, srun with MASTER_ADDR)."""
    return from_env().enabled


_WORLD = World()


def world() -> World:
    return _WORLD


def init(device: torch.device) -> World:
    """Join the process group of the launcher's world (no-op for one process); the device is this rank's."""
    global _WORLD
    w = from_env()
    if not w.enabled:
        _WORLD = w
        return w
    if not torch.distributed.is_available():
        raise FtuneError("This torch build has no torch.distributed, so ftune cannot run on several processes; "
                         "use trainer.num_processes=1 or install a standard torch wheel.")
    for key, value in (("RANK", w.rank), ("WORLD_SIZE", w.world_size), ("LOCAL_RANK", w.local_rank)):
        os.environ.setdefault(key, str(value))  # srun: the SLURM variables, in the names torch reads
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise FtuneError("Running on several processes needs MASTER_ADDR and MASTER_PORT (the rendezvous address); "
                         "start ftune through trainer.num_processes=N, torchrun, accelerate launch, or under srun "
                         "with MASTER_ADDR and MASTER_PORT exported (see the README's 'Many GPUs, many machines').")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        torch.distributed.init_process_group(**kwargs)
    _WORLD = w
    return w


def device_for(device: torch.device, w: World) -> torch.device:
    """On CUDA with several processes each rank takes the GPU of its local rank."""
    if w.enabled and device.type == "cuda" and device.index is None:
        torch.cuda.set_device(w.local_rank)
        return torch.device("cuda", w.local_rank)
    return device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def barrier() -> None:
    if _WORLD.enabled:
        torch.distributed.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over all ranks (the values themselves for one process)."""
    if not _WORLD.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank calls it)."""
    if not _WORLD.enabled:
        return [obj]
    out: list[Any] = [None] * _WORLD.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def write_error(message: str, secondary: bool = False) -> bool:
    """A failing rank's paragraph, for the launcher started by trainer.num_processes to print last.

    False when this process was not started by it (the rank prints the paragraph itself). ``secondary``:
    the process only lost its peers; another rank's own error is shown when there is one."""
    folder = os.environ.get(ERROR_DIR)
    if not folder or not from_env().enabled:
        return False
    try:
        Path(folder, f"rank-{from_env().rank}{'.lost' if secondary else ''}.txt").write_text(message)
    except OSError:
        return False
    return True


def wrap(model: nn.Module, kind: str, device: torch.device, units: Sequence[nn.Module],
         param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """What the training steps call on several processes: the model in DistributedDataParallel (``ddp``), or
    (``fsdp``) the model itself, sharded in place by FSDP2: each of ``units`` (the transformer blocks first,
    inner modules before those that hold them), then the root. Build the optimizer after this: under FSDP2
    the parameters become DTensors (this rank's slice).

    ``param_dtype``: mixed precision, the dtype parameters are gathered and computed in (gradients are
    reduced in float32); ``cpu_offload``: parameters, gradients and optimizer states live in CPU memory."""
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {
        "mesh": init_device_mesh(device.type, (_WORLD.world_size,)),
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
    }
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)  # what no unit holds (without peft: embeddings, final norm, output layer)
    return model


def gradient_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's backward: whether it reduces gradients over processes (the step's last one does).

    DDP: ``no_sync()`` otherwise. FSDP2: ``set_requires_gradient_sync(sync)``; unsynchronised gradients add up
    unsharded, then the last backward reduce-scatters their sum once, as DDP all-reduces it once."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDPModule
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor | None:
    """A sharded tensor (DTensor) gathered whole into rank 0's CPU memory, a collective (every rank calls it;
    the others get None); any other tensor as it is."""
    if not _is_sharded(t):
        return t
    t = t.detach()
    if t.device.type != t.device_mesh.device_type:  # CPU offload: gathered on the GPU (nccl), then brought back
        t = t.to(t.device_mesh.device_type)
    full = t.full_tensor()
    return full.cpu() if _WORLD.main else None


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) cut as ``like`` is: this rank's slice when ``like`` is a DTensor (each rank
    holds the whole value, so no communication), ``value`` itself otherwise."""
    if not _is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.detach().to(device=like.device_mesh.device_type, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to(like.device)


@contextlib.contextmanager
def whole_parameters(model: nn.Module, trainable_only: bool = False) -> Iterator[None]:
    """FSDP2: within the block, rank 0's model holds every parameter whole (in CPU memory), so the method's
    own save and the checkpoint write full tensors in the one-process format, never this rank's slice.

    A collective: every rank enters it (the gathering), only rank 0 should write. ``trainable_only`` gathers
    the parameters that require grad (all a checkpoint holds). Nothing happens without sharded parameters."""
    found: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if _is_sharded(p) and (p.requires_grad or not trainable_only):
            full = whole(p)  # every rank, in the same order
            if full is not None:
                found[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad)
    swapped = []
    for module in model.modules():  # a tied weight is one parameter in two places: both get the same whole one
        for leaf, p in list(module._parameters.items()):
            if p is not None and id(p) in found:
                swapped.append((module, leaf, p))
                module._parameters[leaf] = found[id(p)]
    try:
        yield
    finally:
        for module, leaf, p in swapped:
            module._parameters[leaf] = p


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded states gathered whole: the one-process format (a collective;
    only rank 0's holds the tensors)."""
    state = optimizer.state_dict()
    if not any(_is_sharded(v) for s in state["state"].values() for v in s.values()):
        return state
    return {**state, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in sorted(state["state"].items())}}


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A one-process optimizer state dict cut into this rank's slices where the parameters are sharded."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(_is_sharded(p) for p in params):
        return state
    return {**state, "state": {i: {k: shard_like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape
                                   else v for k, v in s.items()} for i, s in state["state"].items()}}


def check_launch(n: int, device_name: str) -> None:
    """trainer.num_processes must fit the machine: at most one process per GPU on CUDA."""
    if n > 1 and (device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())):
        gpus = torch.cuda.device_count()
        if n > gpus:
            raise FtuneError(f"trainer.num_processes={n} but this machine has {gpus} CUDA GPU(s); one process drives "
                             f"one GPU, so use trainer.num_processes={gpus} (or trainer.device=cpu for CPU processes).")


def launch(n: int, overrides: list[str], device_name: str) -> tuple[int, str | None]:
    """Start ``n`` processes of ``ftune train <overrides>`` through torch.distributed.run's launcher.

    Returns (exit code, the error paragraph of the first failing rank or None).
    """
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_launch(n, device_name)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # ftune prints the failing rank's paragraph itself
    with tempfile.TemporaryDirectory(prefix="ftune-ranks-") as errors:
        os.environ[ERROR_DIR] = errors
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it: n processes share the cores
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id="ftune", rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                              start_method="spawn")
        code, codes = 0, {}
        try:
            elastic_launch(config, sys.executable)("-m", "ftune.cli", "train", *overrides)
        except ChildFailedError as e:
            codes = {rank: f.exitcode for rank, f in e.failures.items()}
            code = next((c for c in codes.values() if c > 0), 1)
        except SignalException as e:  # the launcher itself got SIGTERM/SIGINT: its processes were sent it too
            code = 128 + int(e.sigval)
        finally:
            os.environ.pop(ERROR_DIR, None)
        # the first rank to fail names the cause (the others may only have lost their peers)
        found = sorted(Path(errors).glob("rank-*.txt"), key=lambda p: (p.name.endswith(".lost.txt"),
                                                                           p.stat().st_mtime_ns))
        # a rank killed by a signal; the launcher ends the others with SIGTERM, so another signal names the cause
        signalled = sorted(((c == -15, r, -c) for r, c in codes.items() if c < 0))
        killed = signalled[0][1:] if signalled else None
        if code and killed and not (found and not found[0].name.endswith(".lost.txt")):
            import signal

            rank, sig = killed
            return 128 + sig, (f"Training process {rank} was killed by signal {sig} ({signal.Signals(sig).name}), "
                               f"so the other processes were stopped too. With trainer.save_every set, the same "
                               f"command plus resume=auto continues from the last checkpoint.")
        if code and found:
            rank = int(found[0].name.split("-")[1].split(".")[0])
            return (codes.get(rank) if (codes.get(rank) or 0) > 0 else code), found[0].read_text()
        return code, None
