"""Checkpoints that resume a run exactly, written so that a kill never corrupts the latest one.

    <output_dir>/checkpoints/step-000050/
      trainable.safetensors   every parameter that requires grad, by name
      optimizer.pt scheduler.pt scaler.pt rng.pt method.pt   (torch.load(weights_only=True))
      best.safetensors        trainer.keep_best: the trainable tensors of the best evaluation so far (absent
                              when that is this step's, or without keep_best)
      strategy.pt             the training strategy's state (distill: its loss sums), when the run has one
      rng-ranks.pt            several processes: every rank's random state (rank r resumes with its own
                              when the resumed run has as many processes; rank 0's otherwise)
      state.json              step, epoch, position in the epoch's batches, tokens seen, the loss of the
                              logging window not yet logged, skipped NaN batches, the best evaluation so far
                              and the evaluations since (early stopping), identity, file sizes

A checkpoint is written to ``.tmp-step-N``, flushed to disk and renamed when complete; rename is
atomic, so any ``step-N`` directory is whole. Only the last ``keep`` are kept. Resuming reads and
checks every file of a checkpoint before anything of it is applied, so a damaged one changes nothing:
``resume=auto`` then falls back to the one before it (and says so).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ftune.errors import FtuneError, TrainingFailed

FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng.pt", "method.pt")
BEST_FILE = "best.safetensors"  # trainer.keep_best, when the best evaluation is not the checkpoint's own step
STRATEGY_FILE = "strategy.pt"  # written when the run has a strategy (checkpoints before strategies lack it)
RANKS_RNG_FILE = "rng-ranks.pt"  # several processes: each rank's random state, in rank order
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # batches of this epoch already consumed
    tokens: int = 0  # real (non-pad) tokens trained on
    train_seconds: float = 0.0
    loss_sum: float = 0.0  # summed step losses of the logging window not yet logged
    loss_count: int = 0  # steps in that window
    skipped_nan: int = 0  # batches skipped because their loss was NaN/inf (trainer.skip_nan_batches)
    best_step: int | None = None  # the step of the best evaluation of trainer.metric_for_best so far
    best_value: float | None = None  # its value
    evals_without_improvement: int = 0  # evaluations since then (trainer.early_stopping_patience)


class CheckpointDamaged(FtuneError):
    """A checkpoint whose files cannot be read (truncated, corrupt, missing)."""


class CheckpointMismatch(FtuneError):
    """A readable checkpoint of another run: different model, method, task or trainable tensors."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry) to disk, so a crash after the rename finds it whole."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def checkpoint_dirs(root: Path) -> list[Path]:
    """The complete checkpoints under ``root`` (``step-N`` directories), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, loop: LoopState, model, optimizer, scheduler, scaler, method,
                    identity: dict[str, Any], keep: int, best: dict[str, torch.Tensor] | None = None,
                    strategy=None, rank_rng: list[dict[str, Any]] | None = None) -> Path:
    """Write ``root/step-N`` atomically; refuse (TrainingFailed) to save non-finite weights.

    ``optimizer``: the optimizer, or its state dict (FSDP2: gathered whole, the one-process format).
    ``best``: the trainable tensors of the best evaluation so far (trainer.keep_best), as best.safetensors.
    ``rank_rng``: several processes: every rank's random state (:func:`rng_state` of each), as rng-ranks.pt.
    """
    tensors = trainable_tensors(model)
    broken = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise TrainingFailed(
            f"The trained weights became NaN/inf at step {loop.step} (for example {broken[0]}), so this state was "
            f"not saved; the last good checkpoint, if any, is kept in {root}. Lower optimizer.lr, keep "
            f"trainer.max_grad_norm set, or use trainer.precision=fp32/bf16 instead of fp16."
        )
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop.step:06d}"
    tmp = root / f".tmp-step-{loop.step:06d}"
    for stale in root.glob(".tmp-step-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "trainable.safetensors"))
    torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(scaler.state_dict() if scaler is not None else {}, tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    torch.save(method.state_dict(), tmp / "method.pt")
    if best:
        save_file(best, str(tmp / BEST_FILE))
    if strategy is not None:
        torch.save(strategy.state_dict(), tmp / STRATEGY_FILE)
    if rank_rng:
        torch.save(rank_rng, tmp / RANKS_RNG_FILE)
    files = (*FILES, *([BEST_FILE] if best else []), *([STRATEGY_FILE] if strategy is not None else []),
             *([RANKS_RNG_FILE] if rank_rng else []))
    sizes = {name: (tmp / name).stat().st_size for name in files}
    (tmp / "state.json").write_text(json.dumps({"loop": asdict(loop), "identity": identity, "sizes": sizes}, indent=1))
    for name in (*sizes, "state.json"):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save)
        old = root / f".old-step-{loop.step:06d}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(root)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A checkpoint read into memory and checked, ready to be applied."""

    path: Path
    loop: LoopState
    tensors: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict
    method: dict
    rng: dict
    identity: dict
    best: dict[str, torch.Tensor] | None = None  # best.safetensors (trainer.keep_best)
    strategy: dict = dataclasses.field(default_factory=dict)
    rank_rng: list = dataclasses.field(default_factory=list)  # rng-ranks.pt (several processes)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read every file of the checkpoint at ``path``; CheckpointDamaged if any is missing or corrupt."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        for name, size in state.get("sizes", {}).items():
            actual = (path / name).stat().st_size
            if actual != size:
                raise ValueError(f"{name} has {actual} bytes, {size} were written")
        fields = {f.name for f in dataclasses.fields(LoopState)}
        loop = LoopState(**{k: v for k, v in state["loop"].items() if k in fields})
        files = {name: torch.load(path / name, weights_only=True) for name in FILES if name.endswith(".pt")}
        ckpt = Checkpoint(path, loop, load_file(str(path / "trainable.safetensors")), files["optimizer.pt"],
                          files["scheduler.pt"], files["scaler.pt"], files["method.pt"], files["rng.pt"],
                          dict(state["identity"]))
        if (path / BEST_FILE).exists():
            ckpt.best = load_file(str(path / BEST_FILE))
        if (path / STRATEGY_FILE).exists():
            ckpt.strategy = torch.load(path / STRATEGY_FILE, weights_only=True)
        if (path / RANKS_RNG_FILE).exists():
            ckpt.rank_rng = torch.load(path / RANKS_RNG_FILE, weights_only=True)
        return ckpt
    except Exception as e:  # a damaged file of any kind
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise CheckpointDamaged(
            f"Checkpoint '{path}' is damaged or incomplete ({reason}); it was not used."
        ) from None


def check_compatible(ckpt: Checkpoint, model, optimizer, identity: dict[str, Any]) -> None:
    """CheckpointMismatch if ``ckpt`` was written by a run of another model, method or task."""
    saved = ckpt.identity
    labels = {"model": "model", "method": "method", "task": "task", "trainable": "trainable parameters",
              "strategy": "strategy (None: strategy=none)",
              "packing": "tokens per packed row (trainer.packing, trainer.pack_tokens; None: padded batches)"}
    mismatched = [f"{labels.get(k, k)}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
                  for k, v in identity.items() if saved.get(k) != v]
    if not mismatched:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(ckpt.tensors))
        unknown = sorted(set(ckpt.tensors) - set(params))
        if missing or unknown:
            mismatched.append(f"trainable tensors differ (e.g. {(missing or unknown)[0]})")
        else:
            shapes = [n for n, t in ckpt.tensors.items() if tuple(t.shape) != tuple(params[n].shape)]
            if shapes:
                mismatched.append(f"tensor {shapes[0]} has shape {tuple(ckpt.tensors[shapes[0]].shape)} in the "
                                  f"checkpoint, {tuple(params[shapes[0]].shape)} in this run")
    if not mismatched:
        groups = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
        saved_groups = [len(g["params"]) for g in ckpt.optimizer.get("param_groups", [])]
        if groups != saved_groups:
            mismatched.append(f"optimizer parameter groups: checkpoint has {saved_groups}, this run has {groups}")
    if mismatched:
        raise CheckpointMismatch(
            f"Checkpoint '{ckpt.path}' belongs to a different run ({'; '.join(mismatched)}), so it was not used. "
            f"Resume with the same model, method, method settings, strategy settings and packing as the run that "
            f"wrote it, or start a new "
            f"output_dir (or pass overwrite=true without resume to start over)."
        )


def _base_lrs(groups: list[dict]) -> list[float]:
    return [float(g.get("initial_lr", g.get("lr", 0.0))) for g in groups]


def apply_checkpoint(ckpt: Checkpoint, model, optimizer, scheduler, scaler,
                     say: Callable[[str], None] = print, best: Any = None) -> LoopState:
    """Put the weights, optimizer, scheduler, scaler and RNG states of ``ckpt`` in place (the method's
    state is restored before the compatibility check, by ``resume_from``).

    ``best`` (an ``ftune.early_stopping.BestEvaluation``) takes the checkpoint's best weights, if any.

    The learning rates come back with the optimizer and scheduler states: a run resumed with another
    optimizer.lr keeps the checkpoint's schedule, and ``say`` warns about it.
    """
    asked, saved = _base_lrs(optimizer.param_groups), _base_lrs(ckpt.optimizer.get("param_groups", []))
    if len(asked) == len(saved) and not all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(asked, saved)):
        def fmt(lrs: list[float]) -> str:
            return ", ".join(f"{x:g}" for x in dict.fromkeys(lrs))

        say(f"warning: this run asks for learning rate {fmt(asked)}, but checkpoint '{ckpt.path}' was trained with "
            f"{fmt(saved)}; resuming continues the checkpoint's schedule at {fmt(saved)}. To train with the new "
            f"rate, start a new output_dir instead of resuming.")
    from ftune.distributed import shard_like, shard_optimizer_state, world

    params = dict(model.named_parameters())
    with torch.no_grad():  # FSDP2: each rank takes its slice of the whole tensors (a no-op otherwise)
        for name, value in ckpt.tensors.items():
            params[name].copy_(shard_like(value, params[name]))
    optimizer.load_state_dict(shard_optimizer_state(ckpt.optimizer, optimizer))
    scheduler.load_state_dict(ckpt.scheduler)
    if scaler is not None and ckpt.scaler:
        scaler.load_state_dict(ckpt.scaler)
    _set_rng_state(ckpt.rng)
    if ckpt.rank_rng and len(ckpt.rank_rng) == world().world_size:  # the same processes: each its own stream
        _set_rng_state(ckpt.rank_rng[world().rank])
    if best is not None:
        best.load(ckpt)
    return ckpt.loop


IdentityOf = dict[str, Any] | Callable[[], dict[str, Any]]  # what a checkpoint must match, or how to compute it


def _use(ckpt: Checkpoint, model, optimizer, scheduler, scaler, method, identity: IdentityOf,
         say: Callable[[str], None], best: Any = None, strategy=None) -> LoopState:
    """Restore the method's state, check that ``ckpt`` fits this run, then apply it.

    The method's state comes first because it may change which parameters train (gradual unfreezing
    restores the blocks unfrozen so far), and the check compares those with the checkpoint's; a
    refused checkpoint leaves the method as it was.
    """
    def current() -> dict[str, Any]:
        return identity() if callable(identity) else identity

    before = method.state_dict()
    if ckpt.identity.get("method") == current().get("method"):  # another method's state would not fit (refused below)
        method.load_state_dict(ckpt.method)
    try:
        check_compatible(ckpt, model, optimizer, current())
    except CheckpointMismatch:
        method.load_state_dict(before)
        raise
    if strategy is not None:  # the identity check above made sure it is this strategy's state
        strategy.load_state_dict(ckpt.strategy)
    return apply_checkpoint(ckpt, model, optimizer, scheduler, scaler, say, best)


def resume_from(output_dir: Path, resume: str, model, optimizer, scheduler, scaler, method, identity: IdentityOf,
                say: Callable[[str], None] = print, best: Any = None, strategy=None) -> tuple[Path | None, LoopState]:
    """Load the checkpoint that ``resume`` names into the run; (None, fresh state) if there is none.

    ``resume=auto`` takes the newest checkpoint in ``output_dir/checkpoints`` that reads whole,
    saying which damaged ones it skipped; ``resume=<path>`` takes exactly that checkpoint. A
    checkpoint of another model or method is never used. ``identity`` may be a function: it is called
    after the method's state is restored.
    """
    root = Path(output_dir) / "checkpoints"
    if resume == "auto":
        candidates = list(reversed(checkpoint_dirs(root)))
        if not candidates:
            say(f"resume=auto: no checkpoint in {root}; starting from step 0.")
            return None, LoopState()
        damaged: list[str] = []
        for path in candidates:
            try:
                ckpt = read_checkpoint(path)
            except CheckpointDamaged as e:
                damaged.append(path.name)
                later = candidates[candidates.index(path) + 1:]
                say(f"warning: {e} " + (f"Falling back to {later[0].name}." if later else ""))
                continue
            return path, _use(ckpt, model, optimizer, scheduler, scaler, method, identity, say, best, strategy)
        raise CheckpointDamaged(
            f"Every checkpoint in {root} is damaged ({', '.join(damaged)}), so training cannot resume. Delete "
            f"{root} and start again with overwrite=true, or pass resume=<path> to a good checkpoint."
        )
    path = Path(resume).expanduser()
    if not (path / "state.json").exists():
        raise FtuneError(
            f"resume={resume} is not an ftune checkpoint directory (no state.json). Use resume=auto, or a "
            f"path such as {root}/step-000100."
        )
    try:
        ckpt = read_checkpoint(path)
    except CheckpointDamaged as e:
        raise CheckpointDamaged(
            f"{e} Pass resume=<path> to an earlier checkpoint (they are in {path.parent}), or resume=auto to "
            f"take the newest good one."
        ) from None
    return path, _use(ckpt, model, optimizer, scheduler, scaler, method, identity, say, best, strategy)
