"""Knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019): ``strategy=distill``.

    ftune train strategy=distill strategy.teacher=runs/minilm_sst2 strategy.student_layers=[0,2,4] \\
        dataset=sst2 method=full

The student (the run's model, or one cut from the teacher's own layers) learns from the teacher's
softened output distribution as well as from the labels. Per micro-batch::

    loss = (1 - alpha) * task_sum / n  +  alpha * T^2 * kd_sum / n  +  cosine_weight * cos_sum / n

``n`` is the number of targets of the accumulation window, as for the task loss (so ``grad_accum``
changes nothing): answer tokens for a causal LM, examples for a classifier. ``kd_sum`` sums, over
the micro-batch's targets, the divergence between the teacher's and the student's distributions at
temperature T: ``forward`` KL(p_teacher || p_student) (Hinton's), ``reverse`` KL(p_student ||
p_teacher) (mode seeking, MiniLLM), or ``symmetric``: the Jensen-Shannon divergence. For a causal LM
both models score exactly the positions that have a target (ftune computes logits only there, see
``ftune.evaluate.TargetLogits``); prompt tokens and padding never count. ``cos_sum`` (DistilBERT's
cosine loss, ``strategy.cosine_weight`` > 0, equal widths only) sums 1 - cos(h_student, h_teacher) of
the final hidden states (after the final norm where the model has one): over the target positions
for a causal LM, and for a classifier each example's mean over its non-padding tokens.

Teacher (``strategy.teacher``): a finished ftune run directory (its trained weights applied; merged
into the base when the method allows, which also makes it faster), a model config name
(``configs/model/<name>.yaml``) or a model path / hub id. It runs in eval mode without gradients,
under the student's autocast; ``strategy.teacher_4bit=true`` holds its linear layers in NF4 (as
QLoRA's base; the output layer and a classifier head stay in full precision). Its tokenizer must be the student's (same token ids); a teacher whose
output layer is padded larger than the student's (or smaller) is compared over the common ids.

Cached teacher (``strategy.cache_teacher``: auto, true or false): the teacher's logits at every training
example's targets (its answer tokens' vocabulary rows for a causal LM, its label row for a classifier)
are computed once before training, in padded eval batches under the run's autocast, kept in CPU memory
by the example's index in the training split (``batch["example_ids"]``: batches are reshuffled each
epoch and packed rows join any examples), and the teacher is freed after its eval metrics are taken.
The loss is the live teacher's (exact logits, no top-k). ``auto`` caches when they fit in
``strategy.cache_max_mb``, the run sees every example at least once (else caching costs more teacher
forwards than it saves), and ``cosine_weight`` is 0: the cosine loss compares hidden states at every
position, which are not cached, so the teacher then runs live. ``true`` refuses those cases. Nothing
is written to disk: a resumed run computes the cache again (the same logits), and the settings that
define the loss, the teacher included, are part of the checkpoint's identity (``identity``).

Student from the teacher (``strategy.student_layers=[0,2,4]``): the teacher's embeddings, the listed
blocks in that order, its final norm and head, copied (DistilBERT's initialisation); the method then
applies to it. The run's model config becomes that student (``model.path=<run>/student``, written
when the run finishes), so ``ftune eval/merge/generate run=`` load it like any run.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ftune.config import FRACTION, NOT_NEGATIVE, POSITIVE, ModelConfig, config_dir, ranged
from ftune.data.formats import IGNORE
from ftune.errors import FtuneError, MethodNotApplicable
from ftune.strategies.base import Strategy, StrategyContext, StrategySettings, file_identity, register_strategy

KL_CHOICES = ("forward", "reverse", "symmetric")
CACHE_CHOICES = ("auto", "true", "false")
STUDENT_DIR = "student"


@dataclass
class DistillSettings(StrategySettings):
    name: str = "distill"
    teacher: Optional[str] = None  # a run directory, a model config name or a model path / hub id
    student_layers: Optional[List[int]] = ranged(None, NOT_NEGATIVE, "for the run's model as the student")
    temperature: float = ranged(2.0, POSITIVE)
    alpha: float = ranged(0.5, FRACTION)  # weight of the distillation term; 1 - alpha weighs the task loss
    kl: str = "forward"  # forward | reverse | symmetric
    cosine_weight: float = ranged(0.0, NOT_NEGATIVE)  # DistilBERT's hidden-state cosine loss; 0 = off
    teacher_4bit: bool = False  # hold the teacher in NF4 4-bit (bitsandbytes): a quarter of the memory
    cache_teacher: str = "auto"  # true | false | auto: the teacher's logits computed once per example, then freed
    cache_max_mb: float = ranged(1024.0, NOT_NEGATIVE)  # auto caches when the logits fit in this much memory


# --- the loss terms (pure functions, tested against hand computations) -------------------------------
def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               kl: str = "forward") -> torch.Tensor:
    """Per row, the divergence between softmax(teacher / T) and softmax(student / T), in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)

    def kl_div(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # KL(p || q), 0 * log 0 = 0
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)

    if kl == "forward":
        return kl_div(t, s)
    if kl == "reverse":
        return kl_div(s, t)
    m = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2.0)  # log of the mixture (p_s + p_t) / 2
    return 0.5 * (kl_div(t, m) + kl_div(s, m))


def target_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits at the positions that have a target, ``targets x vocab`` in order.

    Logits from ftune's loop already are those rows (``1 x targets x vocab``); full logits (a model
    whose output layer is not a module call) are selected here the same way."""
    n = int((labels[:, 1:] != IGNORE).sum())
    if logits.dim() == 3 and logits.shape[0] == 1 and logits.shape[1] == n:
        return logits[0]  # (full logits are longer: the last position never has a target)
    virtual = logits.shape[1] - labels.shape[1]  # prompt-learning methods prepend virtual tokens
    targets = F.pad(labels[:, 1:], (virtual, 1), value=IGNORE)
    return logits[targets != IGNORE]


def cosine_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, batch: dict[str, torch.Tensor],
               task: str) -> torch.Tensor:
    """Summed 1 - cos of the final hidden states: per target position (causal LM), or per example the
    mean over its non-padding tokens (classification)."""
    length = batch["input_ids"].shape[1]
    hs = student_hidden[:, student_hidden.shape[1] - length:].float()  # without prepended virtual tokens
    ht = teacher_hidden[:, teacher_hidden.shape[1] - length:].float()
    distance = 1 - F.cosine_similarity(hs, ht, dim=-1)  # (batch, length)
    if task == "causal_lm":
        keep = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE) != IGNORE  # position t predicts label t+1
        return distance[keep].sum()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(distance) if mask is None else mask.to(distance.dtype)
    return ((distance * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()


# --- the teacher's logits, computed once per example ---------------------------------------------------
def answer_targets(example: dict) -> int:
    """The targets of one causal-LM example: the positions t whose label t+1 is not IGNORE."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE)


class TeacherCache:
    """The teacher's logits at the targets of every training example, by example index, in CPU memory:
    ``targets x vocab`` per causal-LM example, the ``labels`` row per classified one. Keyed by the
    example's index in the training split (``batch["example_ids"]``), never by batch position, since
    batches are reshuffled every epoch and packed rows join examples in any order."""

    def __init__(self, rows: list[torch.Tensor], task: str, seconds: float):
        self.rows, self.task, self.seconds = rows, task, seconds
        self.mb = sum(r.numel() * r.element_size() for r in rows) / 2**20

    def take(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The rows of the batch's examples in the batch's target order (example by example, as the live
        teacher's ``target_rows``), on ``device``."""
        ids = batch.get("example_ids")
        if ids is None:
            raise FtuneError("strategy=distill holds the teacher's logits cached by example, but this batch does not "
                             "say which examples it holds (batch['example_ids']); collate it with ftune.train's "
                             "Run.collate, or set strategy.cache_teacher=false.")
        rows = [self.rows[int(i)] for i in ids]
        return (torch.cat(rows) if self.task == "causal_lm" else torch.stack(rows)).to(device, non_blocking=True)


@torch.no_grad()
def compute_teacher_cache(teacher: nn.Module, target_logits: Any, examples: list[dict], task: str, pad_token_id: int,
                          device: torch.device, autocast_dtype: torch.dtype | None, batch_size: int) -> TeacherCache:
    """Run ``teacher`` once over ``examples`` (padded batches, shortest first) and keep, for each, what
    :meth:`Distill.loss` takes from a live teacher: its logits at the example's targets, under the run's
    autocast, in the dtype the live teacher gives them."""
    import time

    from ftune.data.collate import Collator
    from ftune.evaluate import model_inputs

    start = time.perf_counter()
    collate = Collator(pad_token_id, task)
    rows: list[torch.Tensor | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for first in range(0, len(order), batch_size):
        idx = order[first:first + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx]).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if task == "causal_lm":
                out, _, _ = target_logits.forward(teacher, batch, "causal_lm")
                parts = target_rows(out.logits, batch["labels"]).split(
                    (batch["labels"][:, 1:] != IGNORE).sum(1).tolist())
            else:
                parts = teacher(**model_inputs(batch)).logits.unbind(0)
        for i, part in zip(idx, parts, strict=True):
            rows[i] = part.to("cpu", copy=True)
    return TeacherCache(rows, task, time.perf_counter() - start)


# --- the student cut from the teacher -----------------------------------------------------------------
def student_from_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the blocks ``layers`` (in that order): embeddings, those
    blocks, final norm and head are the teacher's weights; config.num_hidden_layers (and per-layer
    lists such as layer_types) and each block's layer index follow."""
    from ftune.methods.selective import transformer_blocks

    try:
        prefix, blocks = transformer_blocks(teacher, instead="distill it into a student given by model=... instead "
                                                              "(drop strategy.student_layers)")
    except MethodNotApplicable as e:
        raise FtuneError(f"strategy.student_layers: {e}") from None
    n = len(blocks)
    bad = [i for i in layers if not 0 <= i < n]
    if not layers or bad or len(set(layers)) != len(layers):
        why = (f"{bad} out of range" if bad else "none given" if not layers else "a layer listed twice")
        raise FtuneError(
            f"strategy.student_layers={list(layers)}: {why}. The teacher has {n} blocks, numbered 0..{n - 1}; list "
            f"distinct block indices, e.g. strategy.student_layers=[{','.join(str(i) for i in range(0, n, 2))}] "
            f"(every second block, DistilBERT's choice)."
        )
    parent_name, _, attr = prefix.rpartition(".")
    parent = teacher.get_submodule(parent_name) if parent_name else teacher
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in layers]))
    try:
        student = copy.deepcopy(teacher)  # only the kept blocks are copied
    finally:
        setattr(parent, attr, blocks)
    config = student.config
    for key, value in list(vars(config).items()):  # per-layer settings (transformers 5: layer_types)
        if "layer" in key and isinstance(value, list) and len(value) == n:
            setattr(config, key, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    _, kept = transformer_blocks(student)
    for index, block in enumerate(kept):  # the KV cache is indexed by each attention's layer_idx
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    return student


def final_hidden_module(model: nn.Module) -> nn.Module:
    """The module whose output is the final hidden state: the norm after the blocks, else the last block."""
    from ftune.methods.selective import transformer_blocks

    prefix, blocks = transformer_blocks(model, instead="set strategy.cosine_weight=0")
    parent = prefix.rpartition(".")[0]
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        try:
            return model.get_submodule(f"{parent}.{name}" if parent else name)
        except AttributeError:
            continue
    return blocks[-1]


class HiddenCapture:
    """Keeps the output of one module from the latest forward."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output


# --- the teacher --------------------------------------------------------------------------------------
@dataclass
class TeacherSource:
    kind: str  # run | config | path
    spec: str
    model_cfg: ModelConfig
    run_dir: Path | None = None


def resolve_teacher(spec: str | None) -> TeacherSource:
    """What ``strategy.teacher`` names: a run directory, a model config name or a model path / hub id."""
    from ftune.config import group_options

    if spec is None or str(spec) in ("", "???"):
        raise FtuneError(
            "strategy=distill needs a teacher: set strategy.teacher=<the output_dir of a finished `ftune train` run> "
            "(e.g. runs/teacher), a model config name (e.g. smollm2) or a model directory."
        )
    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "config.yaml").exists():
        from ftune.config import validate_group
        from ftune.runs import check_run_dir, run_config

        run_dir = check_run_dir(path)
        return TeacherSource("run", str(spec), validate_group(run_config(run_dir), "model"), run_dir.resolve())
    yaml = config_dir() / "model" / f"{spec}.yaml"
    if "/" not in str(spec) and yaml.is_file():
        raw = OmegaConf.load(yaml)
        raw.pop("defaults", None)
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
        return TeacherSource("config", str(spec), OmegaConf.to_object(node))
    if path.exists() or "/" in str(spec):  # a model directory (checked when loaded) or a hub id
        return TeacherSource("path", str(spec), ModelConfig(name=path.name or str(spec), path=str(spec)))
    raise FtuneError(
        f"strategy.teacher={spec} is neither a run directory, a model config ({', '.join(group_options('model'))}) "
        f"nor a model directory. Pass the output_dir of a finished `ftune train` run, a model config name or a path."
    )


def teacher_tokenizer_source(source: TeacherSource) -> str:
    """Where the teacher's tokenizer is (the student cut from it uses the same)."""
    from ftune.models_gguf import resolve_gguf

    if source.kind == "run" and (source.run_dir / "tokenizer").is_dir():
        return str(source.run_dir / "tokenizer")
    cfg = resolve_gguf(source.model_cfg)
    found = cfg.tokenizer or cfg.path
    return str(Path(found).expanduser().resolve()) if Path(found).expanduser().exists() else found


def check_same_vocabulary(teacher_tok: Any, student_tok: Any, teacher: str) -> None:
    """Both tokenizers map every token to the same id, or a FtuneError saying why that is needed."""
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t == s:
        return
    differ = sorted(tok for tok in set(t) | set(s) if t.get(tok) != s.get(tok))
    example = differ[0]
    raise FtuneError(
        f"The teacher '{teacher}' has another vocabulary than the student ({len(t)} and {len(s)} tokens; "
        f"{len(differ)} tokens differ, e.g. {example!r} is id {t.get(example)} for the teacher and "
        f"{s.get(example)} for the student). Distillation compares the two models' probabilities token id by token "
        f"id, so both must use the same tokenizer: pick a teacher of the student's model family (or a student of "
        f"the teacher's), or cut the student from the teacher with strategy.student_layers=[...]."
    )


def merged_teacher(method: Any, model: nn.Module) -> nn.Module:
    """A run's model with its trained weights merged into the base (a 4-bit run's onto full precision)."""
    from ftune.merge import clean_config
    from ftune.methods.lora import PeftMethod
    from ftune.runs import is_quantized

    plain = PeftMethod.merge(method, model) if is_quantized(method) else method.merge(model)
    clean_config(plain)
    return plain


def output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0])


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_strategy("distill")
class Distill(Strategy):
    settings_cls = DistillSettings
    needs_logits = True

    def __init__(self, settings: DistillSettings):
        super().__init__(settings)
        self.teacher: nn.Module | None = None
        self.teacher_logits = None  # ftune.evaluate.TargetLogits on the teacher (causal LM)
        self.captures: tuple[HiddenCapture, HiddenCapture] | None = None
        self.task = "causal_lm"
        self.report: dict[str, Any] = {}
        self.unused_model: str | None = None
        self.student_base: nn.Module | None = None  # the student as cut, kept when the teacher goes 4-bit
        self.window = self._zeros()  # sums of the logging window not yet logged
        self.cache: TeacherCache | None = None  # strategy.cache_teacher: the teacher's logits by example
        self.cache_candidate = False  # the cache fits the budget and the loss allows it (decided in load)
        self.cache_reason = ""  # why the teacher runs live, when strategy.cache_teacher=auto chose so
        self.teacher_eval: dict[str, float] | None = None  # the teacher's eval metrics, taken before it is freed
        self.sctx: StrategyContext | None = None
        self.total = self._zeros()  # sums over the run

    @staticmethod
    def _zeros() -> dict[str, float]:
        return {"kd": 0.0, "task": 0.0, "cosine": 0.0, "targets": 0}

    def check(self) -> None:
        s = self.settings
        if s.kl not in KL_CHOICES:
            raise FtuneError(
                f"strategy.kl must be forward, reverse or symmetric (got '{s.kl}'): forward is KL(teacher || student) "
                f"(Hinton's distillation), reverse is KL(student || teacher), symmetric is the Jensen-Shannon "
                f"divergence. Fix it on the command line or in configs/strategy/distill.yaml."
            )
        mode = self.cache_mode
        if mode not in CACHE_CHOICES:
            raise FtuneError(
                f"strategy.cache_teacher must be true, false or auto (got '{s.cache_teacher}'): true computes the "
                f"teacher's logits once per training example before training and frees the teacher, false runs the "
                f"teacher at every step, auto caches when the logits fit in strategy.cache_max_mb."
            )
        if mode == "true" and s.cosine_weight > 0:
            raise FtuneError(
                f"strategy.cache_teacher=true keeps only the teacher's logits, but strategy.cosine_weight="
                f"{s.cosine_weight} also compares its hidden states at every step, so the teacher must run live. "
                f"Set strategy.cache_teacher=auto or false (or strategy.cosine_weight=0)."
            )
        self.source = resolve_teacher(s.teacher)

    @property
    def cache_mode(self) -> str:
        """strategy.cache_teacher as one of CACHE_CHOICES (a YAML or command-line bool arrives as 'True')."""
        return str(self.settings.cache_teacher).strip().lower()

    def identity(self) -> dict[str, Any]:
        """The teacher (where it was found) and every setting of the loss: resuming with another is refused.
        strategy.cache_teacher and cache_max_mb are not in it: cached or live, the loss is the same."""
        s, src = self.settings, self.source
        teacher = str(src.run_dir) if src.kind == "run" else file_identity(src.spec) if src.kind == "path" else src.spec
        return {"teacher": teacher, "student_layers": None if s.student_layers is None else list(s.student_layers),
                "temperature": s.temperature, "alpha": s.alpha, "kl": s.kl, "cosine_weight": s.cosine_weight,
                "teacher_4bit": s.teacher_4bit}

    def model_config(self, model_cfg: ModelConfig, run_dir: Path) -> ModelConfig:
        if self.settings.student_layers is None:
            return model_cfg
        teacher = self.source.model_cfg
        if (model_cfg.path or model_cfg.name) != (teacher.path or teacher.name):
            self.unused_model = model_cfg.name
        layers = ",".join(str(i) for i in self.settings.student_layers)
        return replace(teacher, name=f"{teacher.name}_layers_{layers.replace(',', '_')}", config=None, gguf_file=None,
                       path=str((Path(run_dir) / STUDENT_DIR).resolve()),
                       tokenizer=teacher_tokenizer_source(self.source))

    # --- building ------------------------------------------------------------------------------------
    def load(self, sctx: StrategyContext) -> None:
        from ftune.models import build_model, load_tokenizer
        from ftune.runs import load_run

        src, self.task, s = self.source, sctx.task, self.settings
        if src.kind == "run":
            loaded = load_run(src.run_dir, "cpu", quantized=False)
            if loaded.task != sctx.task:
                kinds = {"causal_lm": "a causal LM (instruction, chat or text data)", "seq_cls": "a classifier"}
                raise FtuneError(
                    f"The teacher run '{src.spec}' trained {kinds[loaded.task]}, but this run trains "
                    f"{kinds[sctx.task]}; a teacher must solve the student's task. Pass a teacher run of this task."
                )
            if sctx.task == "seq_cls" and loaded.label_names != sctx.label_names:
                raise FtuneError(
                    f"The teacher run '{src.spec}' predicts the classes {loaded.label_names}, this run's data has "
                    f"{sctx.label_names}; the teacher's probabilities must be over the same classes in the same order. "
                    f"Set dataset.label_names={loaded.label_names} or pass a teacher trained on these classes."
                )
            teacher, tokenizer = loaded.model, loaded.tokenizer
            if loaded.method.mergeable:
                teacher = merged_teacher(loaded.method, teacher)
            elif s.student_layers is not None:
                raise FtuneError(
                    f"strategy.student_layers copies the teacher's own weights, but the teacher run '{src.spec}' was "
                    f"trained with method {loaded.method.name}, whose trained parts are extra modules that cannot be "
                    f"merged into its blocks. Use a teacher run of a mergeable method (lora, full, freeze, ...), or "
                    f"drop strategy.student_layers and choose the student with model=..."
                )
        else:
            if sctx.task == "seq_cls":
                self._check_classifier_head(src, sctx.label_names)
            tokenizer = load_tokenizer(src.model_cfg)
            check_same_vocabulary(tokenizer, sctx.tokenizer, src.spec)  # before loading the weights
            teacher = build_model(src.model_cfg, sctx.task, num_labels=len(sctx.label_names) or None,
                                  label_names=sctx.label_names, pad_token_id=tokenizer.pad_token_id)
        check_same_vocabulary(tokenizer, sctx.tokenizer, src.spec)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher, self.tokens = teacher, len(sctx.tokenizer)
        self.packing, self.autocast_dtype = sctx.packing, sctx.autocast_dtype
        self.report["strategy/teacher_params"] = params(teacher)
        self.sctx = sctx
        self._plan_cache(teacher, sctx)

    def _plan_cache(self, teacher: nn.Module, sctx: StrategyContext) -> None:
        """Whether the teacher's logits can be cached (strategy.cache_teacher, cache_max_mb); true refuses what auto
        declines. The last word (auto: only for runs that see every example at least once) is prepare's."""
        s, mode = self.settings, self.cache_mode
        if mode == "false":
            return
        if sctx.task not in ("causal_lm", "seq_cls"):
            reason = "masked-LM batches are masked anew every epoch, so there is no fixed target to cache"
        elif s.cosine_weight > 0:
            reason = f"strategy.cosine_weight={s.cosine_weight} needs the teacher's hidden states at every step"
        else:
            # the live teacher's logits: in the autocast dtype, else in its weights'
            if sctx.task == "causal_lm":
                has_head = isinstance(teacher.get_output_embeddings(), nn.Module)
                width = output_rows(teacher) if has_head else int(teacher.config.vocab_size)
            else:
                width = int(teacher.config.num_labels)
            dtype = sctx.autocast_dtype or next(teacher.parameters()).dtype
            rows = (sum(answer_targets(e) for e in sctx.train_examples) if sctx.task == "causal_lm"
                    else len(sctx.train_examples))
            mb = rows * width * torch.empty((), dtype=dtype).element_size() / 2**20
            if mb <= s.cache_max_mb:
                self.cache_candidate = True
                return
            reason = (f"the logits of its {len(sctx.train_examples)} training examples ({rows} rows of {width}) "
                      f"take {mb:,.0f} MB, over strategy.cache_max_mb={s.cache_max_mb:g}")
        if mode == "true":
            raise FtuneError(
                f"strategy.cache_teacher=true cannot cache the teacher's logits: {reason}. Set "
                f"strategy.cache_teacher=auto (the teacher then runs live at every step) or false"
                + (", or raise strategy.cache_max_mb." if "cache_max_mb" in reason else ".")
            )
        self.cache_reason = reason

    @staticmethod
    def _check_classifier_head(src: TeacherSource, label_names: list[str]) -> None:
        """A classification teacher that is not a run must be a saved classifier of these classes."""
        config = Path(str(src.model_cfg.path or "")).expanduser() / "config.json"
        names = None
        if config.is_file():
            id2label = json.loads(config.read_text()).get("id2label") or {}
            names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        if names != [str(n) for n in label_names]:
            raise FtuneError(
                f"The teacher '{src.spec}' is not a classifier of this run's classes {label_names} (a model config or a "
                f"pretrained model has an untrained classification head, which would teach noise). Pass the "
                f"output_dir of a finished classification run as strategy.teacher (or a model merged from one)."
            )

    def base_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        layers = self.settings.student_layers
        student = build() if layers is None else student_from_layers(self.teacher, list(layers))
        self.report["strategy/student_params"] = params(student)  # before the method adds any
        if layers is not None and (self.settings.teacher_4bit or self.cache_candidate):
            # save() cannot cut it again from a 4-bit teacher, nor from one freed after caching its logits
            self.student_base = copy.deepcopy(student)
        return student

    def prepare(self, model: nn.Module, ctx: Any) -> None:
        from ftune.evaluate import TargetLogits

        s = self.settings
        if s.teacher_4bit:
            self.teacher = self._quantized(self.teacher, ctx)
        teacher = self.teacher.to(ctx.device)
        if self.task == "causal_lm":
            common = min(output_rows(model), output_rows(teacher))
            if common < self.tokens:
                raise FtuneError(
                    f"The teacher's output layer has {output_rows(teacher)} rows and the student's {output_rows(model)}, "
                    f"fewer than the tokenizer's {self.tokens} tokens, so some tokens have no probability to compare. "
                    f"Use a teacher and a student built for this tokenizer."
                )
            self.teacher_logits = TargetLogits(teacher)
            if self.packing and not self._will_cache(ctx):  # the teacher must keep the examples of a packed row apart too
                from ftune.packing import check_packing

                check_packing(teacher, f"strategy=distill's teacher ({self.source.spec})", ctx.device,
                              self.autocast_dtype, common)
        if s.cosine_weight > 0:
            widths = (model.config.hidden_size, teacher.config.hidden_size)
            if widths[0] != widths[1]:
                raise FtuneError(
                    f"strategy.cosine_weight={s.cosine_weight} compares the hidden states of student and teacher, but "
                    f"they differ in width (student {widths[0]}, teacher {widths[1]}). Set strategy.cosine_weight=0, or "
                    f"cut the student from the teacher (strategy.student_layers=[...]), which keeps the width."
                )
            self.captures = (HiddenCapture(final_hidden_module(model)), HiddenCapture(final_hidden_module(teacher)))
        self.teacher = teacher
        if self._will_cache(ctx):
            self._cache_and_free(ctx)
        elif self.cache_candidate:  # auto, and the run is shorter than an epoch
            self.cache_reason = (f"the run trains {ctx.total_steps} steps, less than an epoch ({ctx.steps_per_epoch}), "
                                 f"so caching would run the teacher on more examples than training does")
            self.cache_candidate = False
            if not self.settings.teacher_4bit:
                self.student_base = None

    def _will_cache(self, ctx: Any) -> bool:
        return self.cache_candidate and (self.cache_mode == "true" or ctx.total_steps >= ctx.steps_per_epoch)

    def _cache_and_free(self, ctx: Any) -> None:
        """The teacher's logits for every training example, then the teacher's eval metrics (final_metrics reports
        them), then the teacher is freed: training needs only the cache."""
        import gc

        sctx = self.sctx
        self.cache = compute_teacher_cache(self.teacher, self.teacher_logits, sctx.train_examples, self.task,
                                           sctx.tokenizer.pad_token_id, ctx.device, self.autocast_dtype,
                                           sctx.batch_size)
        self.teacher_eval = sctx.evaluate(self.teacher, self.teacher_logits) if sctx.evaluate else {}
        if self.teacher_logits is not None:
            self.teacher_logits.remove()
        self.teacher = self.teacher_logits = None
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        self.report["strategy/teacher_cache_mb"] = self.cache.mb
        self.report["strategy/teacher_cache_s"] = self.cache.seconds

    def _quantized(self, teacher: nn.Module, ctx: Any) -> nn.Module:
        from ftune.models import TASK_HEADS, quantizable_4bit, quantize_4bit

        widths = [m.in_features for m in teacher.modules() if isinstance(m, nn.Linear)]
        if not any(quantizable_4bit(w) is None for w in widths):
            raise FtuneError(
                f"strategy.teacher_4bit=true, but no linear layer of the teacher '{self.source.spec}' can be held in "
                f"4-bit (NF4 needs input widths that are multiples of 64). Set strategy.teacher_4bit=false; a teacher "
                f"this small fits in memory anyway."
            )
        report: dict[str, Any] = {}
        teacher = quantize_4bit(teacher, ctx.compute_dtype, ctx.device, skip=list(TASK_HEADS), report=report)
        self.report["strategy/teacher_layers_4bit"] = report.get("quantization/layers_4bit", 0)
        return teacher

    def header_lines(self) -> list[str]:
        s = self.settings
        student = (f"student: blocks {list(s.student_layers)} of the teacher"
                   + (f" (model={self.unused_model} is not used)" if self.unused_model else "")
                   if s.student_layers is not None else "student: the run's model")
        return [f"distill: teacher {self.source.spec} ({self.report['strategy/teacher_params']:,} parameters); "
                f"{student} ({self.report['strategy/student_params']:,} parameters); T={s.temperature} "
                f"alpha={s.alpha} kl={s.kl}" + (f" cosine_weight={s.cosine_weight}" if s.cosine_weight else "")
                + (f"; teacher in 4-bit ({self.report['strategy/teacher_layers_4bit']} linear layers)"
                   if s.teacher_4bit else "")
                + (f"; teacher logits cached ({self.cache.mb:,.1f} MB for {len(self.cache.rows)} examples, computed in "
                   f"{self.cache.seconds:.1f} s), the teacher freed" if self.cache is not None else "")
                + (f"; the teacher runs live at every step (strategy.cache_teacher=auto: {self.cache_reason})"
                   if self.cache is None and self.cache_reason else "")]

    # --- training ------------------------------------------------------------------------------------
    def loss(self, model, batch, outputs, task_loss_sum, n_targets, step):
        from ftune.evaluate import model_inputs

        s = self.settings
        with torch.no_grad():
            if self.cache is not None:  # exactly the rows the live teacher gives below
                teacher = self.cache.take(batch, outputs.logits.device)
            elif self.task == "causal_lm":
                teacher_out, _, _ = self.teacher_logits.forward(self.teacher, batch, "causal_lm")
                teacher = target_rows(teacher_out.logits, batch["labels"])
            else:
                teacher = self.teacher(**model_inputs(batch)).logits
        student = target_rows(outputs.logits, batch["labels"]) if self.task == "causal_lm" else outputs.logits
        vocab = min(student.shape[-1], teacher.shape[-1])  # a teacher padded larger (Qwen) is cropped
        kd_sum = divergence(student[..., :vocab], teacher[..., :vocab], s.temperature, s.kl).sum()
        loss = ((1 - s.alpha) * task_loss_sum + s.alpha * s.temperature ** 2 * kd_sum) / n_targets
        terms = {"kd": kd_sum, "task": task_loss_sum, "targets": student.shape[0]}
        if self.captures is not None:
            student_hidden, teacher_hidden = (c.value for c in self.captures)
            cos_sum = cosine_sum(student_hidden, teacher_hidden, batch, self.task)
            loss = loss + s.cosine_weight * cos_sum / n_targets
            terms["cosine"] = cos_sum
        for sums in (self.window, self.total):
            for key, value in terms.items():
                sums[key] += float(value.detach()) if isinstance(value, torch.Tensor) else value
        return loss

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        row = self._means(self.window)
        self.window = self._zeros()
        return row

    def _means(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums["targets"]
        if not n:
            return {}
        row = {"strategy/kd_loss": sums["kd"] / n, "strategy/task_loss": sums["task"] / n}
        if self.settings.cosine_weight > 0:
            row["strategy/cosine_loss"] = sums["cosine"] / n
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"window": dict(self.window), "total": dict(self.total)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = {**self._zeros(), **state.get("window", {})}
        self.total = {**self._zeros(), **state.get("total", {})}

    # --- outputs -------------------------------------------------------------------------------------
    def final_metrics(self, metrics: dict[str, Any], evaluate: Callable) -> dict[str, Any]:
        out = {**self.report, **self._means(self.total)}
        teacher = self.teacher_eval if self.teacher is None else evaluate(self.teacher, self.teacher_logits)
        for key in ("eval/loss", "eval/accuracy", "eval/perplexity"):
            if key in teacher:
                out[f"strategy/teacher_{key.replace('/', '_')}"] = teacher[key]
        if teacher.get("eval/accuracy") and "eval/accuracy" in metrics:
            out["strategy/accuracy_of_teacher"] = metrics["eval/accuracy"] / teacher["eval/accuracy"]
        return out

    def save(self, model: nn.Module, run_dir: Path) -> None:
        if self.settings.student_layers is None:
            return
        if self.student_base is not None:  # a 4-bit teacher, or one freed after caching its logits
            self.student_base.save_pretrained(str(Path(run_dir) / STUDENT_DIR))
            return
        for hook in ([self.teacher_logits] if self.teacher_logits else []):
            hook.remove()
        for capture in self.captures or ():
            capture.handle.remove()
        student = student_from_layers(self.teacher, list(self.settings.student_layers))
        student.save_pretrained(str(Path(run_dir) / STUDENT_DIR))
