"""Checkpoints that resume a run exactly, written so that a kill never corrupts the latest one.

    <output_dir>/checkpoints/step-000050/
      trainable.safetensors   every parameter that requires grad, by name
      optimizer.pt scheduler.pt scaler.pt rng.pt method.pt   (torch.load(weights_only=True))
      state.json              step, epoch, position in the epoch's batches, tokens seen, identity

A checkpoint is written to ``.tmp-step-N`` and renamed when complete; rename is atomic, so any
``step-N`` directory is whole. Only the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ftune.errors import FtuneError


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # batches of this epoch already consumed
    tokens: int = 0  # real (non-pad) tokens trained on
    train_seconds: float = 0.0


def _rng_state() -> dict[str, Any]:
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


def save_checkpoint(root: Path, loop: LoopState, model, optimizer, scheduler, scaler, method,
                    identity: dict[str, Any], keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop.step:06d}"
    tmp = root / f".tmp-step-{loop.step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(scaler.state_dict() if scaler is not None else {}, tmp / "scaler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    torch.save(method.state_dict(), tmp / "method.pt")
    (tmp / "state.json").write_text(json.dumps({"loop": asdict(loop), "identity": identity}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint that ``resume`` names: 'auto' = latest in output_dir (None if there is none)."""
    if resume == "auto":
        found = sorted((Path(output_dir) / "checkpoints").glob("step-*"))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FtuneError(
            f"resume={resume} is not an ftune checkpoint directory (no state.json). Use resume=auto, or a "
            f"path such as {output_dir}/checkpoints/step-000100."
        )
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, method, identity: dict[str, Any]) -> LoopState:
    """Restore everything saved in ``path``; refuse a checkpoint of another model or method."""
    try:
        state = json.loads((path / "state.json").read_text())
        saved = state["identity"]
        mismatched = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if mismatched:
            what = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
            raise FtuneError(
                f"Checkpoint '{path}' belongs to a different run ({what}), so it was not used. Resume with the "
                f"same model and method, or start a new output_dir."
            )
        tensors = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].data.copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if scaler is not None:
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        method.load_state_dict(torch.load(path / "method.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return LoopState(**state["loop"])
    except FtuneError:
        raise
    except Exception as e:  # a damaged file of any kind
        raise FtuneError(
            f"Checkpoint '{path}' is damaged or incomplete ({type(e).__name__}: {e}); it was not used. "
            f"Delete it to resume from the one before, or start a new output_dir."
        ) from None
