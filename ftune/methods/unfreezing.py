"""Gradual unfreezing with discriminative learning rates (ULMFiT, Howard & Ruder 2018).

``method.schedule=gradual`` on ``freeze`` (full fine-tuning of the blocks) and on the LoRA family
(the blocks' adapters): training starts with the task head, the final norm and the top block; one
more block joins every ``method.unfreeze_every`` optimizer steps (or epochs, with
``method.unfreeze_unit=epochs``), until every block trains. The top block and the head learn at the
base lr, each block below at the rate of the one above divided by ``method.lr_decay`` (2.6 in the
paper); parameters below the blocks (embeddings named by ``freeze``'s trainable_patterns, or LoRA
on them) join last, one more division down.

Every parameter the schedule will ever train has its depth: 0 for the top block and whatever sits
above the blocks (final norm, head), ``L - 1 - i`` for block ``i``, ``L`` below the blocks. Stage
``s`` trains depths ``0..s``. The optimizer gets one parameter group per (method group, depth) from
the start, at lr / lr_decay ** depth, so the lr schedule (LambdaLR keeps one base lr per group)
scales every group from step 0 and a checkpoint's optimizer state always fits the same groups. A
frozen parameter has no gradient, and optimizers skip parameters without one: no weight decay, no
state, until it is unfrozen; its AdamW moments and step count then start from zero. The stage is a
function of the steps done and is checkpointed; resuming restores it before the checkpoint's
trainable tensors are compared with the model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ftune.config import AT_LEAST_1, POSITIVE, ranged
from ftune.errors import FtuneError
from ftune.methods.base import Method, MethodContext, MethodSettings

SCHEDULES = ("none", "gradual")
UNITS = ("steps", "epochs")
SCHEDULE_KEYS = ("schedule", "unfreeze_every", "unfreeze_unit", "lr_decay")
NO_BLOCKS = "gradual unfreezing needs them; use method.schedule=none (every parameter trains from the start)"


@dataclass
class UnfreezeSettings(MethodSettings):
    """The settings of a method that can unfreeze its blocks gradually."""

    schedule: str = "none"  # none: everything trains from the start; gradual: block by block from the top
    unfreeze_every: int = ranged(100, AT_LEAST_1)  # one more block every this many steps (or epochs)
    unfreeze_unit: str = "steps"  # steps | epochs
    lr_decay: float = ranged(2.6, POSITIVE)  # lr of a block = lr of the block above / lr_decay


def check_unfreeze_settings(s: UnfreezeSettings) -> None:
    problems = []
    if s.schedule not in SCHEDULES:
        problems.append(f"method.schedule must be none or gradual (got '{s.schedule}')")
    if s.unfreeze_unit not in UNITS:
        problems.append(f"method.unfreeze_unit must be steps or epochs (got '{s.unfreeze_unit}')")
    if problems:
        raise FtuneError("Invalid settings: " + "; ".join(problems) + ". Fix them on the command line or in "
                         f"configs/method/{s.name}.yaml.")


def unsupported(method: str, key: str = "schedule") -> FtuneError:
    """The error for gradual-unfreezing settings given to a method that has no blocks to unfreeze."""
    from ftune.methods import METHODS

    able = sorted(n for n, cls in METHODS.items() if issubclass(cls.settings_cls, UnfreezeSettings))
    instead = ("use method=freeze method.schedule=gradual, which unfreezes every block in turn"
               if method == "full" else f"use one of them (e.g. method=freeze or method=lora) or drop method.{key}")
    return FtuneError(
        f"method.{key} belongs to gradual unfreezing (method.schedule=gradual), which trains a model block by "
        f"block from the top and so needs a method whose trained parameters sit in the transformer blocks: "
        f"{', '.join(able)}. Method '{method}' does not take it; {instead}."
    )


class GradualUnfreezing:
    """Which parameters train at each stage, and the learning-rate divisor of each."""

    def __init__(self, params: dict[str, nn.Parameter], depth: dict[str, int], n_blocks: int, every_steps: int,
                 lr_decay: float, report: dict[str, Any]):
        self.params, self.depth, self.n_blocks = params, depth, n_blocks
        self.every_steps, self.lr_decay, self.report = every_steps, lr_decay, report
        self.last_stage = max(depth.values(), default=0)
        self.stage = 0
        self.apply()
        report.update({"unfreezing/blocks": n_blocks, "unfreezing/every_steps": every_steps,
                       "unfreezing/lr_decay": lr_decay, "unfreezing/unfrozen_blocks": self.unfrozen_blocks()})

    @classmethod
    def plan(cls, model: nn.Module, s: UnfreezeSettings, ctx: MethodContext) -> GradualUnfreezing:
        """The schedule of ``model`` as the method prepared it (every parameter it trains requiring grad)."""
        from ftune.methods.selective import transformer_blocks

        prefix, blocks = transformer_blocks(model, instead=NO_BLOCKS)
        n = len(blocks)
        params, depth, below = {}, {}, True  # named_parameters follows module order: embeddings, blocks, head
        for name, p in model.named_parameters():
            if name.startswith(f"{prefix}."):
                below = False
                if p.requires_grad:
                    depth[name] = n - 1 - int(name[len(prefix) + 1:].split(".", 1)[0])
            elif p.requires_grad:
                depth[name] = n if below else 0
            if p.requires_grad:
                params[name] = p
        every = s.unfreeze_every * (max(1, ctx.steps_per_epoch) if s.unfreeze_unit == "epochs" else 1)
        return cls(params, depth, n, every, s.lr_decay, ctx.report)

    # --- which parameters train --------------------------------------------------------------
    def stage_at(self, steps_done: int) -> int:
        return min(self.last_stage, steps_done // self.every_steps)

    def unfrozen_blocks(self, stage: int | None = None) -> int:
        return min(self.n_blocks, (self.stage if stage is None else stage) + 1)

    def apply(self) -> None:
        """requires_grad on exactly the parameters of the current stage."""
        for name, p in self.params.items():
            p.requires_grad_(self.depth[name] <= self.stage)

    @contextlib.contextmanager
    def everything_trainable(self) -> Iterator[None]:
        """Every scheduled parameter requires grad inside (to group them), the stage's again after."""
        for p in self.params.values():
            p.requires_grad_(True)
        try:
            yield
        finally:
            self.apply()

    def after_step(self, step: int) -> None:
        stage = self.stage_at(step + 1)
        if stage != self.stage:
            self.stage = stage
            self.apply()
            self.report["unfreezing/unfrozen_blocks"] = self.unfrozen_blocks()

    # --- learning rates ----------------------------------------------------------------------
    def split(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The method's parameter groups split by depth, top first, each at its group's lr / lr_decay ** depth."""
        depth_of = {id(p): self.depth[n] for n, p in self.params.items()}
        unknown = [p for g in groups for p in g["params"] if id(p) not in depth_of]
        if unknown:  # a grouping that trains what the method did not prepare: a bug, not a user error
            raise RuntimeError(f"{len(unknown)} optimizer parameters are not in the unfreezing schedule")
        out = []
        for d in range(self.last_stage + 1):
            for i, g in enumerate(groups):
                params = [p for p in g["params"] if depth_of[id(p)] == d]
                if params:
                    name = f"{g.get('name', f'group{i}')}/" + ("embeddings" if d == self.n_blocks else
                                                               f"block{self.n_blocks - 1 - d}")
                    out.append({**g, "params": params, "lr": g["lr"] / self.lr_decay ** d, "name": name})
        return out

    # --- outputs -----------------------------------------------------------------------------
    def header(self, total_steps: int) -> str:
        n, every = self.n_blocks, self.every_steps
        line = (f"gradual unfreezing: {self.unfrozen_blocks()} of {n} blocks trainable, one more every {every} "
                f"steps, lr decay {self.lr_decay:g} (block 0 at lr / {self.lr_decay ** (n - 1):.4g})")
        if self.last_stage == n:
            line += ", the embeddings last"
        all_at = self.last_stage * every
        if all_at >= total_steps and self.last_stage:
            left = n - self.unfrozen_blocks(self.stage_at(total_steps - 1))
            line += (f"; the last joins after step {all_at}, but this run has {total_steps} steps: "
                     + (f"{left} block{'s stay' if left > 1 else ' stays'} frozen" if left > 0 else
                        "the embeddings stay frozen"))
        return line


class UnfreezesGradually(Method):
    """The hooks of a method that takes ``method.schedule=gradual``.

    Its ``prepare`` ends with ``self.start_unfreezing(model, ctx)``; a method that groups its
    parameters itself overrides ``base_param_groups``, which the schedule then splits by block.
    """

    unfreezing: GradualUnfreezing | None = None

    def __init__(self, settings: UnfreezeSettings):
        super().__init__(settings)
        check_unfreeze_settings(settings)

    def start_unfreezing(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        s = self.settings
        self.unfreezing = GradualUnfreezing.plan(model, s, ctx) if s.schedule == "gradual" else None
        return model

    def check_blocks(self, model: nn.Module) -> None:
        """MethodNotApplicable (before anything is prepared) if gradual unfreezing finds no blocks."""
        from ftune.methods.selective import transformer_blocks

        if self.settings.schedule == "gradual":
            transformer_blocks(model, instead=NO_BLOCKS)

    def base_param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return super().param_groups(model, lr)

    def param_groups(self, model, lr):
        if self.unfreezing is None:
            return self.base_param_groups(model, lr)
        with self.unfreezing.everything_trainable():
            return self.unfreezing.split(self.base_param_groups(model, lr))

    def after_step(self, model, step):
        super().after_step(model, step)
        if self.unfreezing is not None:
            self.unfreezing.after_step(step)

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        u = self.unfreezing
        # the blocks that trained in the step just done (the next one may train one more)
        return {} if u is None else {"unfrozen_blocks": u.unfrozen_blocks(u.stage_at(max(0, steps_done - 1)))}

    def header_lines(self, total_steps: int) -> list[str]:
        return [] if self.unfreezing is None else [self.unfreezing.header(total_steps)]

    def state_dict(self):
        state = super().state_dict()
        if self.unfreezing is not None:
            state["unfreezing_stage"] = self.unfreezing.stage
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.unfreezing is not None and "unfreezing_stage" in state:
            self.unfreezing.stage = int(state["unfreezing_stage"])
            self.unfreezing.apply()
            self.unfreezing.report["unfreezing/unfrozen_blocks"] = self.unfreezing.unfrozen_blocks()


__all__ = ["GradualUnfreezing", "UnfreezeSettings", "UnfreezesGradually", "unsupported"]
