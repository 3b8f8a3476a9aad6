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
from ftune.strategies.base import Strategy, StrategyContext, StrategySettings, register_strategy

KL_CHOICES = ("forward", "reverse", "symmetric")
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
        self.source = resolve_teacher(s.teacher)

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
        if layers is not None and self.settings.teacher_4bit:  # save() cannot cut it again from a 4-bit teacher
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
            if self.packing:  # the teacher must keep the examples of a packed row apart too
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
                   if s.teacher_4bit else "")]

    # --- training ------------------------------------------------------------------------------------
    def loss(self, model, batch, outputs, task_loss_sum, n_targets, step):
        from ftune.evaluate import model_inputs

        s = self.settings
        with torch.no_grad():
            if self.task == "causal_lm":
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
        teacher = evaluate(self.teacher, self.teacher_logits)
        for key in ("eval/loss", "eval/accuracy", "eval/perplexity"):
            if key in teacher:
                out[f"strategy/teacher_{key.replace('/', '_')}"] = teacher[key]
        if teacher.get("eval/accuracy") and "eval/accuracy" in metrics:
            out["strategy/accuracy_of_teacher"] = metrics["eval/accuracy"] / teacher["eval/accuracy"]
        return out

    def save(self, model: nn.Module, run_dir: Path) -> None:
        if self.settings.student_layers is None:
            return
        if self.settings.teacher_4bit:
            self.student_base.save_pretrained(str(Path(run_dir) / STUDENT_DIR))
            return
        for hook in ([self.teacher_logits] if self.teacher_logits else []):
            hook.remove()
        for capture in self.captures or ():
            capture.handle.remove()
        student = student_from_layers(self.teacher, list(self.settings.student_layers))
        student.save_pretrained(str(Path(run_dir) / STUDENT_DIR))
