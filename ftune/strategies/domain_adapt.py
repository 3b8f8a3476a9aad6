"""Domain-adaptive continued pretraining, then fine-tuning (ULMFiT; Gururangan et al. 2020, "Don't Stop
Pretraining"): ``strategy=domain_adapt``.

    ftune train model=minilm dataset=sst2 method=lora strategy=domain_adapt \\
        strategy.corpus_path=reviews.txt strategy.pretrain_steps=500

One command, one run directory, two stages of the one training loop:

1. ``<run>/stages/pretrain/``: continued pretraining on ``strategy.corpus_path`` (raw domain text: a txt
   file, one passage per line, or json/jsonl/csv/parquet with a ``strategy.text_column``), a run of its
   own (config.yaml, metrics.jsonl, loss.png, checkpoints). An encoder learns masked-LM with its own MLM
   head (``AutoModelForMaskedLM``; BERT's masking: ``strategy.mlm_probability`` = 15% of the tokens, of
   them 80% [MASK], 10% a random token, 10% kept), a decoder causal LM on packed blocks of
   ``trainer.max_length`` tokens (the ``text`` format with ``pack``). ``strategy.objective=auto`` picks
   masked for model types that have a masked-LM head in transformers and are not decoders.
   **What trains in stage 1: every weight (full fine-tuning)**, whatever ``method`` the run uses, as
   in the domain-adaptive pretraining papers: adapting the representations is the point of the stage,
   and a LoRA adapter trained here would have to be merged into the base anyway before stage 2 puts
   its own method on top. Steps ``strategy.pretrain_steps``, learning rate ``strategy.pretrain_lr``;
   the other trainer and optimizer settings are the run's. When it ends, the adapted weights are
   written to ``<run>/stages/pretrain/model/`` (with the tokenizer): for an encoder the base encoder
   (the MLM head dropped; a pooler the original model has is kept from it, as MLM does not train it).
2. The run itself: the task, fine-tuned with the run's method from those weights. The run's model
   config becomes ``model.path=<run>/stages/pretrain/model`` (recorded in config.yaml, so
   ``ftune eval/merge/generate run=`` load it like any run).

Resume: ``resume=auto`` continues stage 1 from its own checkpoints if it was killed there; once
``stages/pretrain/model/`` exists, stage 1 is finished and never redone, and the run resumes stage 2.
``overwrite=true`` (without resume) starts both stages afresh.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ftune.config import AT_LEAST_1, POSITIVE, ModelConfig, Range, ranged, validate_group
from ftune.errors import FtuneError
from ftune.strategies.base import Stage, Strategy, StrategySettings, file_identity, register_strategy

STAGE = "pretrain"
OBJECTIVES = ("auto", "masked", "causal")


@dataclass
class DomainAdaptSettings(StrategySettings):
    name: str = "domain_adapt"
    corpus_path: Optional[str] = None  # raw domain text: txt (a passage per line), json, jsonl, csv, parquet
    text_column: str = "text"  # the corpus column holding the text (not used for txt files)
    objective: str = "auto"  # auto | masked (encoders) | causal (decoders)
    pretrain_steps: int = ranged(1000, AT_LEAST_1)
    pretrain_lr: float = ranged(5e-5, POSITIVE)
    mlm_probability: float = ranged(0.15, Range(0, 1, True, True))


def stage_dir(run_dir: Path) -> Path:
    from ftune.outputs import STAGES_DIR

    return Path(run_dir) / STAGES_DIR / STAGE


def adapted_model_dir(run_dir: Path) -> Path:
    return stage_dir(run_dir) / "model"


def model_type_of(model_cfg: ModelConfig) -> str:
    if model_cfg.config is not None:
        return str(model_cfg.config["model_type"])
    from transformers import AutoConfig

    from ftune.models_gguf import resolve_gguf

    cfg = resolve_gguf(model_cfg)
    try:
        return AutoConfig.from_pretrained(cfg.path, revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code).model_type
    except OSError as e:
        raise FtuneError(f"Could not read the config of model '{model_cfg.name}' from '{cfg.path}': {e}. Check "
                         f"model.path, or set strategy.objective=masked|causal.") from None


def masked_objective(model_type: str) -> bool:
    """auto: masked-LM for model types with a masked-LM head that are not decoders (BERT, RoBERTa, MiniLM, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    encoders = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                "camembert", "modernbert", "mpnet", "xlm", "ernie", "megatron-bert"}
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and (
        model_type in encoders or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@register_strategy("domain_adapt")
class DomainAdapt(Strategy):
    settings_cls = DomainAdaptSettings

    def identity(self) -> dict[str, Any]:
        """The corpus and the settings of the pretraining stage whose weights this run starts from."""
        s = self.settings
        return {"corpus_path": file_identity(s.corpus_path), "text_column": s.text_column, "objective": s.objective,
                "pretrain_steps": s.pretrain_steps, "pretrain_lr": s.pretrain_lr, "mlm_probability": s.mlm_probability}

    def check(self) -> None:
        s = self.settings
        if s.corpus_path is None or str(s.corpus_path) in ("", "???"):
            raise FtuneError(
                "strategy=domain_adapt needs the domain's raw text for continued pretraining: set "
                "strategy.corpus_path=<a txt file with a passage per line, or a json/jsonl/csv/parquet file with a "
                "'text' column> (the run's dataset is the task it then fine-tunes on)."
            )
        from ftune.data.loading import looks_local

        if looks_local(str(s.corpus_path)) and not Path(str(s.corpus_path)).expanduser().exists():
            raise FtuneError(
                f"strategy.corpus_path={s.corpus_path} does not exist. Pass the path of the domain's raw text (a txt "
                f"file with a passage per line, or a json/jsonl/csv/parquet file with a '{s.text_column}' column)."
            )
        if s.objective not in OBJECTIVES:
            raise FtuneError(f"strategy.objective must be auto, masked or causal (got '{s.objective}'): masked-LM for "
                             f"encoders, causal LM for decoders; auto picks by the model type.")

    def objective(self, model_cfg: ModelConfig) -> str:
        model_type = model_type_of(model_cfg)
        if self.settings.objective == "masked" and not masked_objective(model_type):
            raise FtuneError(
                f"strategy.objective=masked trains a masked-LM head, and model '{model_cfg.name}' ({model_type}) is a "
                f"decoder without one. Set strategy.objective=causal (or auto) to continue its pretraining as a causal LM."
            )
        if self.settings.objective != "auto":
            return self.settings.objective
        return "masked" if masked_objective(model_type) else "causal"

    # --- the stages ----------------------------------------------------------------------------------
    def stages(self, cfg: Any) -> list[Stage]:
        from ftune.outputs import STAGES_DIR, prepare_run_dir

        out, s = Path(cfg.output_dir), self.settings
        resume, overwrite = cfg.get("resume"), bool(cfg.get("overwrite"))
        if (out / STAGES_DIR).exists() and not (resume or overwrite):
            raise FtuneError(
                f"output_dir '{out}' already holds the stages of another run ({out / STAGES_DIR}). Nothing was "
                f"changed. Choose a new output_dir, continue the run with resume=auto, or replace its results "
                f"with overwrite=true."
            )
        model_cfg = validate_group(cfg, "model")
        objective = self.objective(model_cfg)
        prepare_run_dir(out, overwrite, resume is not None)  # refuses a used output_dir, as any run
        if overwrite and not resume:
            shutil.rmtree(out / STAGES_DIR, ignore_errors=True)
        full = OmegaConf.to_container(cfg, resolve=True)
        full.update(
            output_dir=str(stage_dir(out)), overwrite=False, resume=resume,
            dataset={"name": "domain_corpus", "format": "masked_text" if objective == "masked" else "text",
                     "path": str(s.corpus_path), "text_column": s.text_column, "pack": objective == "causal",
                     "mlm_probability": s.mlm_probability},
            method={"name": "full", "lr": s.pretrain_lr},
            strategy={"name": "none"},
            optimizer={**full["optimizer"], "lr": s.pretrain_lr},
            trainer={**full["trainer"], "max_steps": s.pretrain_steps, "eval_every": None, "eval_before": False,
                     "eval_scorer": None, "early_stopping_patience": None, "keep_best": False,
                     "metric_for_best": "eval/loss", "packing": False},
        )
        target = adapted_model_dir(out)
        return [Stage(STAGE, OmegaConf.create(full), done=lambda: (target / "config.json").is_file(),
                      finish=lambda: export_adapted_model(stage_dir(out), target, model_cfg, objective))]

    def model_config(self, model_cfg: ModelConfig, run_dir: Path) -> ModelConfig:
        """The task starts from stage 1's weights (and tokenizer)."""
        self.run_dir = Path(run_dir)
        return replace(model_cfg, name=f"{model_cfg.name}_domain_adapted",
                       path=str(adapted_model_dir(run_dir).resolve()), config=None, tokenizer=None, revision=None,
                       gguf_file=None)

    def final_metrics(self, metrics: dict[str, Any], evaluate: Any) -> dict[str, Any]:
        """Stage 1's steps and its last logged training loss (masked-LM or causal LM loss per target token)."""
        from ftune.outputs import read_metrics

        rows = [r for r in read_metrics(stage_dir(self.run_dir) / "metrics.jsonl") if "loss" in r]
        return {"strategy/pretrain_steps": rows[-1]["step"], "strategy/pretrain_loss": rows[-1]["loss"]} if rows else {}

    def header_lines(self) -> list[str]:
        s = self.settings
        return [f"domain_adapt: continued pretraining on {s.corpus_path} ({s.pretrain_steps} steps, lr "
                f"{s.pretrain_lr}, every weight) done; fine-tuning from its weights"]


def export_adapted_model(stage: Path, target: Path, model_cfg: ModelConfig, objective: str) -> None:
    """Write stage 1's trained model as a plain model folder (with the tokenizer) the task can load.

    An encoder's MLM model is reduced to the base encoder; the original model's pooler (which MLM neither
    has nor trains) is kept, so the task head reads a pretrained pooler as it would without stage 1."""
    import torch

    from ftune.runs import load_run

    loaded = load_run(stage, "cpu")
    model = loaded.model
    if objective == "masked":
        from transformers import AutoConfig, AutoModel

        from ftune.models_gguf import resolve_gguf

        if model_cfg.config is not None:
            with torch.random.fork_rng():
                torch.manual_seed(model_cfg.init_seed)
                base = AutoModel.from_config(AutoConfig.for_model(**dict(model_cfg.config)))
        else:
            cfg = resolve_gguf(model_cfg)
            base = AutoModel.from_pretrained(cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                             use_safetensors=True)
        missing, unexpected = base.load_state_dict(model.base_model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("pooler.") for k in missing):
            raise FtuneError(f"The masked-LM model of stage {STAGE} does not fit the base encoder of '{model_cfg.name}' "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); set strategy.objective=causal?")
        model = base
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    tmp.rename(target)  # config.json appears with the whole folder: the stage counts as done only then
    shutil.rmtree(stage / "checkpoints", ignore_errors=True)  # a finished stage is never resumed
