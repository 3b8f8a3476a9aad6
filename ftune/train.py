"""The one training loop: setup -> train -> save, for every method, on CPU or one GPU.

Read it top to bottom. ``setup`` turns the composed config into objects (config -> model ->
method -> data -> optimizer); ``train_loop`` runs optimizer steps; ``finish`` writes the run
directory. Methods (what trains) and strategies (how: distillation's teacher and loss) plug in
through hooks (extra loss terms, after-step updates), never by forking this loop.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ftune import distributed
from ftune.checkpoint import LoopState, resume_from, rng_state, save_checkpoint
from ftune.config import (
    DatasetConfig,
    ModelConfig,
    TrainerConfig,
    check_settings,
    check_target,
    validate_group,
)
from ftune.data import DataBundle, build_data, task_of
from ftune.data.collate import Collator, MaskingCollator, epoch_batches
from ftune.early_stopping import BestEvaluation, check_best_settings
from ftune.errors import FtuneError, TrainingFailed, TrainingInterrupted
from ftune.evaluate import SCORERS, TargetLogits, evaluate_examples, has_eval_split, score_examples
from ftune.methods.base import Method, MethodContext, build_method, trainable_parameters
from ftune.models import build_model, head_names, load_tokenizer, model_label
from ftune.models_gguf import resolve_gguf
from ftune.moe import MAX_DIAGNOSTIC_EXAMPLES, Routing, compare_routing, plot_routing, routing_snapshot
from ftune.outputs import MetricsLog, plot_loss, prepare_run_dir, read_metrics, save_config, write_card
from ftune.packing import (
    PackingCollator,
    check_packing,
    check_packing_settings,
    is_flash_attention,
    pack_budget,
    packed_batches,
)
from ftune.progress import TrainProgress, console, print_header
from ftune.strategies import Strategy, StrategyContext, build_strategy
from ftune.trackers import Trackers, build_trackers


@dataclass
class Run:
    """Everything ``setup`` builds for one training run."""

    cfg: DictConfig
    trainer: TrainerConfig
    model_cfg: ModelConfig
    out: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: Any
    data: DataBundle
    method: Method
    strategy: Strategy
    model: torch.nn.Module
    ctx: MethodContext
    collator: Collator | PackingCollator | MaskingCollator  # the training batches' (eval batches are padded)
    eval_collator: Collator | MaskingCollator  # (masked LM: masked as for training)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    total_steps: int
    batches_per_epoch: int
    target_logits: TargetLogits  # causal LM: logits only at positions with a target
    trackers: Trackers  # the `logger` group's experiment trackers (none by default)
    world: distributed.World  # this process among the run's processes (rank 0 of 1 alone)
    # what the training steps call: the model, in DistributedDataParallel on several processes (fsdp: the
    # model itself, sharded in place)
    ddp: torch.nn.Module
    moe: Routing | None = None  # an MoE model: its router losses and routing diagnostics (ftune.moe)

    def epoch_batches(self, lengths: list[int], epoch: int) -> list[dict[str, list[int]]]:
        """The micro-batches of ``epoch``: packed rows or padded batches of the training split ("train"),
        with the strategy's own feeds beside them (DANN: "target")."""
        t = self.trainer
        if t.packing:
            own = packed_batches(lengths, pack_budget(t), self.cfg.seed, epoch)
        else:
            own = epoch_batches(lengths, t.batch_size, self.cfg.seed, epoch, t.group_by_length)
        return self.strategy.batches(own, epoch)

    def collate(self, feeds: dict[str, list[int]]) -> dict[str, Any]:
        """One micro-batch: the training examples collated, the strategy's feeds under batch["feeds"]."""
        batch = self.collator([self.data.train[i] for i in feeds["train"]])
        batch["example_ids"] = list(feeds["train"])  # which examples, in row order (distill's cached teacher logits)
        extra = {name: self.eval_collator([self.strategy.examples(name)[i] for i in idx])
                 for name, idx in feeds.items() if name != "train"}
        return {**batch, "feeds": extra} if extra else batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FtuneError(f"trainer.device={name} but no CUDA GPU is available; use trainer.device=cpu or auto.")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for mixed precision, or None for plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise FtuneError("trainer.precision=fp16 needs a CUDA GPU; on CPU use trainer.precision=fp32 (or bf16).")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FtuneError(
            "trainer.precision=bf16 but this GPU has no bfloat16 support (it is older than Ampere); "
            "use trainer.precision=fp16 or auto."
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def build_optimizer(cfg: DictConfig, method: Method, model: torch.nn.Module, device: torch.device,
                    strategy: Strategy | None = None):
    check_target(cfg.optimizer, "optimizer")
    lr = float(cfg.optimizer.lr)
    groups = method.param_groups(model, lr) + (strategy.param_groups(lr) if strategy is not None else [])
    if not any(len(g["params"]) for g in groups):
        raise FtuneError(f"Method '{method.name}' left no parameter to train on this model.")
    extra = {}
    if cfg.optimizer._target_ == "torch.optim.AdamW" and device.type in ("cuda", "cpu") and "fused" not in cfg.optimizer:
        extra["fused"] = True  # one kernel for all parameters instead of one per tensor (CUDA and CPU)
    return instantiate(cfg.optimizer, _partial_=True)(groups, **extra)


def compile_model(model: torch.nn.Module, device: torch.device) -> None:
    """trainer.compile: torch.compile the forward in place (module, state_dict keys and saving unchanged)."""
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        raise FtuneError("trainer.compile=true on CPU needs a C++ compiler (g++ or clang++, or one named by $CXX), "
                         "and none was found; install one or leave trainer.compile=false.")
    model.compile()


def with_defaults(cfg: DictConfig, **groups: Any) -> DictConfig:
    """The config with every group's schema defaults filled in: what config.yaml records."""
    full = OmegaConf.to_container(cfg, resolve=True)
    for name, typed in groups.items():
        full[name] = OmegaConf.to_container(OmegaConf.structured(typed))
    return OmegaConf.create(full)


def checked_settings(cfg: DictConfig) -> tuple[TrainerConfig, ModelConfig, DatasetConfig, Method, Strategy]:
    """Every group of the config validated, before anything loads (and before a strategy's earlier stages)."""
    trainer = validate_group(cfg, "trainer")
    model_cfg = validate_group(cfg, "model")
    method = build_method(cfg.method)  # validates method settings before any loading
    strategy = build_strategy(cfg.get("strategy"))  # likewise: strategy=none unless the config names one
    # multitask: the tasks' defaults, its missing path filled from the first task; continual: the last stage's
    data_cfg: DatasetConfig = validate_group(OmegaConf.create({"dataset": strategy.dataset_node(cfg.dataset)}),
                                             "dataset")
    check_settings(cfg, trainer, data_cfg, method.settings, strategy.settings)  # every numeric range, in one paragraph
    strategy.check()
    check_target(cfg.optimizer, "optimizer")
    check_target(cfg.scheduler, "scheduler")
    return trainer, model_cfg, data_cfg, method, strategy


MASKED_LM_METHODS = ("full", "freeze", "bitfit")  # the methods that train a masked-LM model (no peft task type)


def setup(cfg: DictConfig) -> Run:
    """Config -> model -> method -> data -> optimizer, with every input checked first."""
    trainer, model_cfg, data_cfg, method, strategy = checked_settings(cfg)
    model_cfg = strategy.model_config(model_cfg, Path(cfg.output_dir))  # distill: a student cut from the teacher
    cfg = with_defaults(cfg, model=model_cfg, dataset=data_cfg, trainer=trainer, method=method.settings,
                        strategy=strategy.settings)
    task = task_of(data_cfg)
    if task == "masked_lm" and method.name not in MASKED_LM_METHODS:
        raise FtuneError(
            f"dataset.format=masked_text (masked-LM pretraining) trains the model's own weights: method={method.name} "
            f"is not supported for it. Use method=full, freeze or bitfit (strategy=domain_adapt's first stage is full)."
        )
    check_scoring(trainer, task, has_eval_split(data_cfg))
    check_best_settings(trainer, task, has_eval_split(data_cfg))
    trackers = build_trackers(cfg)  # each chosen tracker's library imported now: a missing one is refused here
    if trainer.packing:
        check_packing_settings(task)
    device = distributed.device_for(resolve_device(trainer.device), distributed.from_env())
    autocast_dtype = resolve_precision(trainer.precision, device)
    check_distributed(trainer, method, strategy, distributed.from_env(), device, autocast_dtype)
    world = distributed.init(device)  # several processes: join the launcher's process group (nccl / gloo)
    if not world.main:  # rank 0 alone writes the run directory, logs, trackers and the console
        console.quiet = True
        trackers = Trackers([])
    resume = cfg.get("resume")
    out = Path(cfg.output_dir)
    if world.main:
        out = prepare_run_dir(out, bool(cfg.get("overwrite")), resume is not None)
    distributed.barrier()
    seed_everything(cfg.seed)

    with console.status(f"Loading tokenizer and data ({data_cfg.path})"):
        tokenizer = load_tokenizer(model_cfg)
        data = strategy.data(lambda c: build_data(c, tokenizer, trainer.max_length, cfg.seed, model_cfg.chat_template),
                             data_cfg, tokenizer)  # multitask: the union of the tasks' data
    with console.status(f"Loading model {model_label(model_cfg)}"):
        eval_batch_size = trainer.eval_batch_size or trainer.batch_size * 2
        strategy.load(StrategyContext(task, tokenizer, data.label_names, device, autocast_dtype, trainer.packing,
                                      dataset=data_cfg, max_length=trainer.max_length, seed=cfg.seed,
                                      train_examples=data.train, batch_size=eval_batch_size,
                                      max_new_tokens=trainer.eval_max_new_tokens, chat_template=model_cfg.chat_template,
                                      evaluate=other_model_evaluator(data, Collator(tokenizer.pad_token_id, task),
                                                                     device, eval_batch_size, autocast_dtype)))
        model = strategy.base_model(lambda: build_model(
            model_cfg, task, num_labels=len(data.label_names) or None, label_names=data.label_names,
            pad_token_id=tokenizer.pad_token_id,
        ))
    if trainer.packing:
        check_packing_settings(task, model.config.model_type)
    loaded_from = resolve_gguf(model_cfg)  # where tokenizer and weights came from (a GGUF file's converted folder)
    ctx = MethodContext(
        task=task, model_type=model.config.model_type, head_names=head_names(model, task),
        device=device, compute_dtype=autocast_dtype or torch.float32,
        activation_checkpointing=trainer.activation_checkpointing,
        tokenizer_path=loaded_from.tokenizer or loaded_from.path,
    )
    if trainer.packing:  # rows per epoch vary a little with the shuffle: epoch 0's count sets the schedule
        lengths = [len(e["input_ids"]) for e in data.train]
        batches_per_epoch = len(packed_batches(lengths, pack_budget(trainer), cfg.seed, 0))
    else:
        batches_per_epoch = math.ceil(len(data.train) / trainer.batch_size)
    # one optimizer step takes grad_accum micro-batches on each process: world_size x grad_accum of the epoch's
    steps_per_epoch = max(1, batches_per_epoch // (trainer.grad_accum * world.world_size))
    total_steps = trainer.max_steps or max(1, math.ceil(trainer.epochs * steps_per_epoch))
    ctx.total_steps, ctx.steps_per_epoch = total_steps, steps_per_epoch
    method.check(model, ctx)
    model = method.prepare(model, ctx).to(device)
    model.train()
    strategy.prepare(model, ctx)
    eval_collator = (MaskingCollator(tokenizer, data_cfg.mlm_probability) if task == "masked_lm"
                     else Collator(tokenizer.pad_token_id, task))
    moe = Routing.of(model, method.settings)  # router losses on exactly when a router trains
    if moe is not None:
        ctx.report.update(moe.settings_report())
        # the base model's routing, before any step (and before a resumed run loads its checkpoint)
        moe.before = moe_snapshot(model, data, eval_collator, device, trainer, autocast_dtype)
    if trainer.packing:  # refuses the run unless the examples of a packed row are kept apart
        check_packing(model, method.name, device, autocast_dtype, model.config.vocab_size)
    if trainer.compile:
        compile_model(model, device)
    ddp = model
    if world.enabled:  # gradients averaged over processes in backward; hooks and saving use the model itself
        # fsdp: sharded in place (each block, then the root), so the optimizer is built after this
        ddp = distributed.wrap(model, trainer.distributed, device, fsdp_units(model) if trainer.distributed == "fsdp"
                               else [], autocast_dtype, trainer.fsdp_cpu_offload)

    optimizer = build_optimizer(cfg, method, model, device, strategy)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    collator = PackingCollator(is_flash_attention(model)) if trainer.packing else eval_collator
    return Run(cfg, trainer, model_cfg, out, device, autocast_dtype, tokenizer, data, method, strategy, model, ctx,
               collator, eval_collator, optimizer, scheduler, scaler, total_steps, batches_per_epoch,
               TargetLogits(model, chunked=trainer.chunked_loss and not strategy.needs_logits), trackers, world, ddp,
               moe)


def moe_snapshot(model: torch.nn.Module, data: DataBundle, collator: Collator | MaskingCollator,
                 device: torch.device, trainer: TrainerConfig, autocast_dtype: torch.dtype | None):
    """The routing of an MoE model on the eval split (without one: the first training examples)."""
    examples = (data.eval or data.train)[:MAX_DIAGNOSTIC_EXAMPLES]
    return routing_snapshot(model, examples, collator, device, trainer.eval_batch_size or trainer.batch_size * 2,
                            autocast_dtype, data.task)


def identity(run: Run) -> dict[str, Any]:
    """What a checkpoint must match to be resumed into this run."""
    # packing: the tokens per packed row, None for padded batches (as in checkpoints that predate packing)
    # strategy: its name (None for strategy=none, as in checkpoints that predate strategies), then each
    # setting it says changes the run as "strategy.<key>" (none for strategy=none)
    return {"model": run.model_cfg.path or run.model_cfg.name, "method": run.method.name,
            "task": run.data.task, "trainable": trainable_parameters(run.model)[0],
            "packing": pack_budget(run.trainer) if run.trainer.packing else None,
            "strategy": None if run.strategy.name == "none" else run.strategy.name,
            **{f"strategy.{k}": v for k, v in run.strategy.identity().items()}}


def train_loop(run: Run) -> dict[str, Any]:
    """Optimizer steps until ``total_steps``; returns the final metrics."""
    t, cfg, model = run.trainer, run.cfg, run.model
    lengths = [len(e["input_ids"]) for e in run.data.train]
    best = BestEvaluation(t)  # trainer.metric_for_best, early_stopping_patience, keep_best
    ckpt, loop = None, LoopState()
    if cfg.get("resume"):  # checkpoint.resume_from explains what it used, skipped or refused
        # identity after the method's state is restored: it may unfreeze blocks (gradual unfreezing)
        ckpt, loop = resume_from(run.out, str(cfg.resume), model, run.optimizer, run.scheduler, run.scaler,
                                 run.method, lambda: identity(run),
                                 say=lambda m: console.print(m, markup=False, soft_wrap=True), best=best,
                                 strategy=run.strategy)
    if ckpt is not None:
        console.print(f"Resuming from {ckpt} (step {loop.step} of {run.total_steps}).", markup=False, soft_wrap=True)
    world = run.world
    if world.main:
        save_config(cfg, run.out)  # after the resume checks: a refused resume leaves the run's config.yaml alone
    run.trackers.start(cfg, run.out, resumed_at=loop.step if ckpt else None)
    log = (MetricsLog(run.out / "metrics.jsonl", keep_until_step=loop.step if ckpt else None, on_row=run.trackers.log)
           if world.main else NoLog(run.out / "metrics.jsonl"))
    distributed.barrier()  # metrics.jsonl cut back to the checkpoint before any rank reads it
    # (step, metrics) of the latest evaluation during training (a resumed run's from its metrics.jsonl)
    last_eval = next(((r["step"], r) for r in reversed(read_metrics(log.path)) if best.key in r), None) if ckpt else None
    batches = run.epoch_batches(lengths, loop.epoch)

    def next_batch() -> dict[str, list[int]]:
        nonlocal batches
        if loop.position >= len(batches):
            loop.epoch, loop.position = loop.epoch + 1, 0
            batches = run.epoch_batches(lengths, loop.epoch)
        feeds = batches[loop.position]
        loop.position += 1
        return feeds

    def checkpoint() -> Path:
        path = run.out / "checkpoints" / f"step-{loop.step:06d}"
        rank_rng = distributed.gather_objects(rng_state()) if world.enabled else None  # dropout differs by rank
        # DDP's weights and optimizer states are the same on every rank; FSDP's are gathered whole first
        optimizer_state = distributed.whole_optimizer_state(run.optimizer)
        with distributed.whole_parameters(model, trainable_only=True):
            if world.main:
                path = save_checkpoint(run.out / "checkpoints", loop, model, optimizer_state, run.scheduler,
                                       run.scaler, run.method, identity(run), t.keep_checkpoints, best.to_save(loop),
                                       run.strategy, rank_rng)
        distributed.barrier()
        return path

    stop_signal: list[int] = []
    agreed: list[int] = []  # several processes: the signal all of them saw by the last step's all_reduce
    previous = {s: signal.signal(s, lambda num, frame: stop_signal.append(num)) for s in (signal.SIGINT, signal.SIGTERM)}
    # tokens/s of a logging window counts training steps only, not evals or checkpoint saves between them
    window_tokens, window_start = 0, loop.train_seconds
    nan_in_a_row, saved_at = 0, None
    progress = TrainProgress(run.total_steps, enabled=t.progress and world.main)
    memory = MemoryMeter(run.device)
    if t.eval_before and ckpt is None:  # the model before any training step: the baseline of this run
        before = {k.replace("eval/", "eval_before/", 1): v for k, v in evaluate(run, score=True).items()}
        log.log({"step": 0, **before})
        console.print("[green]before training[/]: " + "  ".join(
            f"{k.split('/', 1)[1]} {v:.4f}" for k, v in before.items() if isinstance(v, float)))
    progress.start(loop.step)
    try:
        while loop.step < run.total_steps and not best.should_stop(loop):
            step_start = time.perf_counter()
            strategy_before = run.strategy.state_dict()  # a skipped (NaN) step must not count in its sums
            # the step's world_size x grad_accum micro-batches, the same on every process: rank r takes its share
            indices = [next_batch() for _ in range(t.grad_accum * world.world_size)]
            micro = [run.collate(feeds) for feeds in indices[world.rank * t.grad_accum:(world.rank + 1) * t.grad_accum]]
            n_targets = sum(task_loss_targets(b["labels"], run.data.task) for b in micro)
            if world.enabled:  # the targets of all processes; DDP averages gradients, so each rank's loss x world
                n_targets = distributed.all_sum([n_targets], run.device)[0] / world.world_size
            step_loss = torch.zeros((), device=run.device)
            step_tokens = 0
            for i, batch in enumerate(micro):
                batch = to_device(batch, run.device)
                # gradients are averaged over processes once per step, in the last micro-batch's backward
                with distributed.gradient_sync(run.ddp, i == len(micro) - 1):
                    with torch.autocast(run.device.type, dtype=run.autocast_dtype,
                                        enabled=run.autocast_dtype is not None):
                        outputs, loss_sum, _ = run.target_logits.forward(run.ddp, batch, run.data.task)
                        # loss_sum / n_targets, unless the strategy reweights it or adds its terms (distillation)
                        loss = run.strategy.loss(model, batch, outputs, loss_sum, n_targets, loop.step)
                        extra = run.method.extra_loss(model, batch, outputs, loop.step)
                        if extra is not None:
                            loss = loss + extra / t.grad_accum
                        router = run.moe.loss(outputs, batch) if run.moe is not None else None
                        if router is not None:  # load-balancing (and z-) loss, while a router trains
                            loss = loss + router / t.grad_accum
                    memory.sample()  # activations are alive here: the high-water mark of a step
                    del outputs  # the logits: backward does not need them
                    (run.scaler.scale(loss) if run.scaler else loss).backward()
                step_loss += loss.detach()
                step_tokens += real_tokens(batch)
            value = float(step_loss)
            if world.enabled:  # the step's loss and tokens over all processes, and whether any got a signal
                value, step_tokens, signalled = distributed.all_sum([value, step_tokens, len(stop_signal)], run.device)
                value, step_tokens = value / world.world_size, int(step_tokens)
                # every rank stops after this same step (a signal that lands later waits for the next step)
                agreed = [stop_signal[0] if stop_signal else int(signal.SIGTERM)] if signalled else []
            loop.tokens += step_tokens
            window_tokens += step_tokens
            bad = None if math.isfinite(value) else f"The loss became {value}"
            if bad is None:
                if run.scaler:
                    run.scaler.unscale_(run.optimizer)
                if t.max_grad_norm:
                    norm = float(torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], t.max_grad_norm))
                    if run.scaler is None and not math.isfinite(norm):  # (fp16's scaler skips such steps itself)
                        bad = f"The gradient norm became {norm}"
            if bad is not None:
                run.optimizer.zero_grad(set_to_none=True)
                if t.skip_nan_batches and nan_in_a_row < MAX_NAN_IN_A_ROW:
                    run.strategy.load_state_dict(strategy_before)
                    loop.skipped_nan, nan_in_a_row = loop.skipped_nan + 1, nan_in_a_row + 1
                    continue
                raise TrainingFailed(
                    f"{bad} at step {loop.step + 1}; training stopped and no weights were updated by that step "
                    f"(the last checkpoint, if any, is kept in {run.out}/checkpoints). "
                    + (f"The last {nan_in_a_row} batches were all skipped for the same reason, so the weights "
                       f"themselves have diverged: lower optimizer.lr and start again."
                       if t.skip_nan_batches else
                       "Lower optimizer.lr, use trainer.precision=fp32 or bf16 instead of fp16, or set "
                       "trainer.skip_nan_batches=true to skip such batches.")
                )
            nan_in_a_row = 0
            run.method.after_backward(model, loop.step)
            if run.scaler:
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                run.optimizer.step()
            run.scheduler.step()
            run.method.after_step(model, loop.step)
            run.strategy.after_step(model, loop.step)
            run.optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.train_seconds += time.perf_counter() - step_start
            loop.loss_sum, loop.loss_count = loop.loss_sum + value, loop.loss_count + 1

            if loop.step % t.log_every == 0 or loop.step == run.total_steps:
                elapsed = loop.train_seconds - window_start
                row = {"step": loop.step, "epoch": round(loop.epoch + loop.position / max(len(batches), 1), 3),
                       "loss": loop.loss_sum / loop.loss_count, "lr": run.scheduler.get_last_lr()[0],
                       "tokens_per_s": window_tokens / max(elapsed, 1e-9), **run.method.row_metrics(loop.step),
                       **run.strategy.row_metrics(loop.step), **(run.moe.row_metrics() if run.moe else {})}
                log.log(row)
                progress.update(loop.step, row)
                window_tokens, window_start, loop.loss_sum, loop.loss_count = 0, loop.train_seconds, 0.0, 0
            else:
                progress.update(loop.step, None)
            if t.eval_every and loop.step % t.eval_every == 0 and run.data.eval and loop.step < run.total_steps:
                metrics = evaluate(run, score=best.needs_scores)
                log.log({"step": loop.step, **metrics})
                progress.print_eval(loop.step, metrics)
                last_eval = (loop.step, metrics)
                if best.active:
                    best.update(loop, metrics, model)
                    if best.should_stop(loop):
                        console.print(f"[yellow]early stopping[/]: {best.key} has not improved for {best.patience} "
                                      f"evaluations (best {loop.best_value:.4f} at step {loop.best_step}); training "
                                      f"stops at step {loop.step} of {run.total_steps}.")
            if t.save_every and (loop.step % t.save_every == 0 or loop.step == run.total_steps or best.should_stop(loop)):
                # the last one too, before the final eval: a finished run can be extended with more steps
                saved_at = checkpoint()
            stopping = agreed if world.enabled else stop_signal
            if stopping:
                path = saved_at if saved_at is not None and saved_at.name == f"step-{loop.step:06d}" else checkpoint()
                raise TrainingInterrupted(
                    f"Interrupted by signal {stopping[0]} at step {loop.step}; a checkpoint was saved to {path}. "
                    f"Continue with the same command plus resume=auto."
                )
    finally:
        progress.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

    metrics: dict[str, Any] = {}
    if run.data.eval:
        metrics.update(final_evaluation(run, loop, best, log, last_eval))
    # the base model's scores (step 0), also when this run resumed from a checkpoint
    metrics.update({k: v for row in read_metrics(log.path) if row.get("step") == 0
                    for k, v in row.items() if k.startswith("eval_before/")})
    trainable, total = trainable_parameters(model)
    metrics.update({
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "train_steps": loop.step,
        "train_runtime_s": loop.train_seconds,
        "tokens_per_s": loop.tokens / max(loop.train_seconds, 1e-9),
        "peak_memory_mb": memory.peak_mb(),
    })
    metrics.update(run.ctx.report)  # what the method reports about the model (e.g. layers kept out of 4-bit)
    if run.moe is not None and run.moe.before is not None:  # routing of the saved weights against the base model's
        metrics.update(compare_routing(run.moe.before, moe_snapshot(model, run.data, run.eval_collator, run.device,
                                                                    t, run.autocast_dtype)))
    metrics.update(run.strategy.final_metrics(metrics, lambda other, target_logits: evaluate_other(run, other,
                                                                                                    target_logits)))
    if loop.skipped_nan:
        metrics["skipped_nan_batches"] = loop.skipped_nan
    metrics.update(best.report(loop, stopped_early=best.should_stop(loop)))
    metrics.update(run.data.report.metrics())  # data/skipped_rows with dataset.bad_rows=skip
    return metrics


def final_evaluation(run: Run, loop: LoopState, best: BestEvaluation, log: MetricsLog,
                     last_eval: tuple[int, dict] | None) -> dict[str, Any]:
    """The eval metrics of the weights the run saves: the last step's, or with keep_best the best evaluation's.

    A run stopped early was just evaluated at this step: that evaluation is reused (only the scores of
    trainer.eval_scorer, if evaluations during training had none, are computed and logged).
    """
    t = run.trainer
    evaluated = last_eval[1] if last_eval is not None and last_eval[0] == loop.step else None
    if evaluated is not None and (best.needs_scores or not t.eval_scorer):
        final = dict(evaluated)
    else:
        final = evaluate(run, score=True)
        log.log({"step": loop.step, **{k: v for k, v in final.items() if evaluated is None or k not in evaluated}})
        if best.active and evaluated is None:  # the last step's evaluation is a candidate too
            best.update(loop, final, run.model)
    final = {k: v for k, v in final.items() if k.startswith("eval/")}
    if best.keep and best.weights and best.weights_step != loop.step:
        best.restore(run.model)
        console.print(f"keep_best: the saved weights are those of step {best.weights_step}, the best evaluation "
                      f"({best.key} {loop.best_value:.4f}), not of the last step {loop.step}.")
        final = evaluate(run, score=True)  # metrics.json describes the weights that are saved
    return final


MAX_NAN_IN_A_ROW = 25  # with skip_nan_batches: this many bad steps in a row means the weights diverged


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``, those of a strategy's feeds (batch["feeds"]) too."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else
            to_device(v, device) if isinstance(v, dict) else v for k, v in batch.items()}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a batch that are not padding (a packed row has none)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def task_loss_targets(labels: torch.Tensor, task: str) -> int:
    """Number of targets in a batch: examples (classification) or predicted tokens (causal LM)."""
    if task == "seq_cls":
        return labels.numel()
    if task == "masked_lm":
        return int((labels != -100).sum())
    return int((labels[:, 1:] != -100).sum())


def evaluate(run: Run, score: bool = False) -> dict[str, float]:
    """Loss (and accuracy) on the eval split; with ``score``, also ``trainer.eval_scorer`` on greedy answers."""
    t = run.trainer
    batch_size = t.eval_batch_size or t.batch_size * 2
    w = run.world  # several processes: each scores its shard, the sums are added up over processes
    # fsdp: a forward is a collective (it gathers each block's weights), so every process runs as many
    lockstep = math.ceil(math.ceil(len(run.data.eval) / w.world_size) / batch_size) if t.distributed == "fsdp" else 0
    metrics = run.strategy.evaluate(run.model, run.data.eval, lambda examples: evaluate_examples(
        run.model, examples[w.rank::w.world_size], run.eval_collator, run.data.task, run.device, batch_size,
        run.autocast_dtype, run.target_logits, reduce=(lambda v: distributed.all_sum(v, run.device)) if w.enabled else None,
        batches=(lockstep, examples[0]) if w.enabled and lockstep else None))
    if score and t.eval_scorer:
        was_training = run.model.training
        scores, _ = score_examples(run.model, run.tokenizer, run.data.eval, t.eval_scorer, t.eval_max_new_tokens,
                                   batch_size, run.device, f"'{run.cfg.dataset.name}'")
        run.model.train(was_training)
        metrics.update({f"eval/{k}": v for k, v in scores.items()})
    return metrics


def other_model_evaluator(data: DataBundle, collator: Collator | MaskingCollator, device: torch.device,
                          batch_size: int, autocast_dtype: torch.dtype | None):
    """``evaluate(model, target_logits)``: loss (and accuracy) of another model (distillation's teacher) on the
    run's eval split; {} without one."""
    def evaluate_other(model: torch.nn.Module, target_logits: TargetLogits | None) -> dict[str, float]:
        if not data.eval:
            return {}
        return evaluate_examples(model, data.eval, collator, data.task, device, batch_size, autocast_dtype,
                                 target_logits)

    return evaluate_other


def evaluate_other(run: Run, model: torch.nn.Module, target_logits: TargetLogits | None) -> dict[str, float]:
    """Loss (and accuracy) of another model (distillation's teacher) on the run's eval split; {} without one."""
    return other_model_evaluator(run.data, run.eval_collator, run.device,
                                 run.trainer.eval_batch_size or run.trainer.batch_size * 2,
                                 run.autocast_dtype)(model, target_logits)


def check_scoring(t: TrainerConfig, task: str, has_eval: bool) -> None:
    """trainer.eval_scorer / eval_before need a causal LM and an eval split."""
    if t.eval_scorer is not None and t.eval_scorer not in SCORERS:
        raise FtuneError(f"Unknown trainer.eval_scorer '{t.eval_scorer}'; choose one of {', '.join(SCORERS)} "
                         f"(or null for loss and perplexity only).")
    if t.eval_scorer is not None and task != "causal_lm":
        raise FtuneError(f"trainer.eval_scorer={t.eval_scorer} scores generated answers, which needs an instruction "
                         f"or chat dataset; classification runs report eval/accuracy already. Drop trainer.eval_scorer.")
    if (t.eval_scorer or t.eval_before) and not has_eval:
        raise FtuneError("trainer.eval_scorer and trainer.eval_before evaluate on the eval split, and this dataset "
                         "has none: set dataset.eval_path=<file> or dataset.eval_fraction=0.05.")


class NoLog:
    """The metrics log of a process other than rank 0: rank 0 alone writes metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, row: dict[str, Any]) -> None:
        pass


def check_distributed(t: TrainerConfig, method: Method, strategy: Strategy, world: distributed.World,
                      device: torch.device | None = None, autocast_dtype: torch.dtype | None = None) -> None:
    """What several processes cannot train (yet), refused with the reason before any process group exists.

    ``device`` and ``autocast_dtype``, once resolved (in each process), check what trainer.device=auto and
    trainer.precision=auto turned out to be."""
    if t.distributed not in ("ddp", "fsdp"):
        raise FtuneError(f"Unknown trainer.distributed={t.distributed}; ftune trains several processes with "
                         f"trainer.distributed=ddp (DistributedDataParallel, the default) or trainer.distributed=fsdp "
                         f"(FSDP2: parameters, gradients and optimizer states sharded over the processes).")
    sharded = t.distributed == "fsdp" and (world.enabled or t.num_processes > 1)
    if t.fsdp_cpu_offload and not sharded:
        raise FtuneError(f"trainer.fsdp_cpu_offload=true keeps FSDP2's shards in CPU memory, and this run is not "
                         f"sharded ({'one process' if t.distributed == 'fsdp' else f'trainer.distributed={t.distributed}'}): "
                         f"use trainer.distributed=fsdp with trainer.num_processes>1, or drop trainer.fsdp_cpu_offload.")
    if not world.enabled and t.num_processes == 1:
        return
    if t.distributed == "fsdp":
        check_fsdp(t, method, device, autocast_dtype)
    if strategy.name != "none":
        raise FtuneError(f"strategy={strategy.name} runs on one process only for now: its own models, modules and loss sums "
                         f"are not shared between processes. Use trainer.num_processes=1.")
    if getattr(method.settings, "schedule", "none") == "gradual":
        raise FtuneError("method.schedule=gradual unfreezes blocks during training, and DistributedDataParallel "
                         "only synchronises the parameters that train from the start, so the processes' weights "
                         "would drift apart. Use trainer.num_processes=1 or method.schedule=none.")


def check_fsdp(t: TrainerConfig, method: Method, device: torch.device | None,
               autocast_dtype: torch.dtype | None) -> None:
    """What FSDP2 cannot shard (yet), each refused with the reason; DDP trains all of them."""
    def refuse(what: str, why: str, fix: str = "") -> FtuneError:
        return FtuneError(f"trainer.distributed=fsdp cannot train {what}: {why}. Use trainer.distributed=ddp, "
                          f"which keeps a whole copy of the model on each process{fix}.")

    reason = method.fsdp_refusal()
    if reason:
        raise refuse(f"method={method.name}", reason)
    if t.keep_best:
        raise refuse("with trainer.keep_best=true", "the best evaluation's trainable tensors are kept as whole "
                     "tensors on each process, and FSDP2 holds only each process's slice of them",
                     ", or drop trainer.keep_best (early stopping works without it)")
    if t.compile:
        raise refuse("with trainer.compile=true", "compiling the model around FSDP2's sharded blocks is not "
                     "supported by ftune yet", ", or drop trainer.compile")
    if t.precision == "fp16" or autocast_dtype == torch.float16:
        raise refuse("in fp16", "fp16 needs a gradient scaler that agrees over processes on skipped steps, and "
                     "ftune's does not do that for sharded gradients",
                     ", or trainer.precision=bf16 (on GPUs since Ampere) or fp32 with fsdp")
    on_cpu = t.device == "cpu" or (device is not None and device.type == "cpu")
    if t.fsdp_cpu_offload and on_cpu:
        raise FtuneError("trainer.fsdp_cpu_offload=true moves the shards of GPU processes into CPU memory, and these "
                         "processes train on the CPU already (trainer.device=cpu, or no GPU found): drop "
                         "trainer.fsdp_cpu_offload.")


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What FSDP2 shards one by one, below the root: each transformer block (gathered only while it computes)
    and, under a peft wrapper, the transformers model itself, which ``generate`` calls directly (so it
    gathers the embeddings and output layer it holds). Without blocks found, the model is one unit
    (correct, without the memory saving)."""
    from ftune.methods.selective import transformer_blocks

    try:
        units = list(transformer_blocks(model)[1])
    except FtuneError:
        units = []
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return units + ([inner] if inner is not model else [])


class MemoryMeter:
    """Peak memory of this run: CUDA's allocator peak, or on CPU the resident set size sampled
    while activations are alive (the process-wide ru_maxrss would carry over between the jobs of
    a multirun sweep, which share one process)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, current_rss_mb())

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.peak or current_rss_mb()


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def finish(run: Run, metrics: dict[str, Any]) -> None:
    """Write the trained weights, tokenizer, metrics, plot and model card to the run directory (and trackers)."""
    with distributed.whole_parameters(run.model):  # fsdp: every rank gathers, rank 0 saves whole tensors
        if run.world.main:
            write_outputs(run, metrics)
    distributed.barrier()


def write_outputs(run: Run, metrics: dict[str, Any]) -> None:
    run.method.save(run.model, run.out / "adapter")
    run.strategy.save(run.model, run.out)  # distill with student_layers: the student's base weights (student/)
    run.tokenizer.save_pretrained(str(run.out / "tokenizer"))
    if run.data.label_names:
        (run.out / "labels.json").write_text(json.dumps(run.data.label_names))
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_loss(read_metrics(run.out / "metrics.jsonl"), run.out / "loss.png",
              f"{run.method.name} · {run.model_cfg.name} · {run.cfg.dataset.name}")
    if "moe/load_before" in metrics:
        plot_routing(metrics, run.out / "moe.png", f"{run.method.name} · {run.model_cfg.name} · {run.cfg.dataset.name}")
    write_card(run.out, run.cfg, metrics, run.strategy.card_lines())
    run.trackers.log_final(metrics, step=metrics["train_steps"])
    for name in ("loss.png", "metrics.json"):
        run.trackers.artifact(run.out / name)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns the final metrics.

    A strategy's earlier stages (domain_adapt: continued pretraining) train first, each a run of this
    same loop in <output_dir>/stages/<name>; one that finished before (resume=auto) is not trained again.
    """
    for stage in checked_settings(cfg)[-1].stages(cfg):
        if stage.done():
            console.print(f"stage {stage.name}: finished before, kept ({stage.cfg.output_dir})", markup=False)
            continue
        console.print(f"stage {stage.name}: training in {stage.cfg.output_dir}", markup=False)
        train(stage.cfg)
        stage.finish()
    try:
        run = setup(cfg)
        print_header(run, trainable_parameters(run.model))
        try:
            metrics = train_loop(run)
            finish(run, metrics)
        except BaseException as e:  # the tracked run ends too, marked as it ended
            run.trackers.finish("killed" if isinstance(e, (KeyboardInterrupt, TrainingInterrupted)) else "failed")
            raise
        run.trackers.finish("success")
    finally:
        distributed.shutdown()  # several processes: leave the process group (also after an error)
    return metrics

