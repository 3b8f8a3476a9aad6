"""strategy=domain_adapt: masked-LM masking statistics on a fixed seed, stage 1 changing the encoder and
stage 2 starting from its weights (tensor by tensor), resume across the stage boundary, bad settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from ftune.checkpoint import checkpoint_dirs
from ftune.config import validate_group
from ftune.data.collate import MaskingCollator
from ftune.data.formats import IGNORE
from ftune.errors import FtuneError
from ftune.models import load_tokenizer
from ftune.outputs import read_metrics
from ftune.strategies import build_strategy
from ftune.train import setup, train

from conftest import compose_train

BERT = ["model=tiny_bert", "dataset=sentiment", "method=lora", "trainer.batch_size=4", "trainer.max_length=32",
        "dataset.max_samples=8", "dataset.max_eval_samples=4"]


def corpus(root: Path, n: int = 24) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "corpus.txt"
    path.write_text("".join(f"the blender number {i} felt sturdy while the kettle {i} stayed quiet\n" for i in range(n)))
    return ["strategy=domain_adapt", f"strategy.corpus_path={path}", "strategy.pretrain_steps=3",
            "strategy.pretrain_lr=1e-2"]


def test_masking_statistics_on_a_fixed_seed():
    tok = load_tokenizer(validate_group(compose_train(["model=tiny_bert"]), "model"))
    texts = [" ".join(f"word{(i * 7 + j) % 50} review" for j in range(8 + i % 5)) for i in range(300)]
    examples = [{"input_ids": ids} for ids in tok(texts, truncation=True, max_length=64)["input_ids"]]
    collate = MaskingCollator(tok, 0.15)
    torch.manual_seed(0)
    batch = collate(examples)
    torch.manual_seed(0)
    assert torch.equal(collate(examples)["input_ids"], batch["input_ids"])  # the seed decides
    original = collate.pad(examples)["input_ids"]
    special = torch.isin(original, torch.tensor(tok.all_special_ids)) | (batch["attention_mask"] == 0)
    target = batch["labels"] != IGNORE
    assert not (target & special).any()  # [CLS], [SEP] and padding are never targets
    assert torch.equal(batch["labels"][target], original[target])
    assert torch.equal(batch["input_ids"][~target], original[~target])  # only targets are changed
    share = target.sum() / (~special).sum()
    masked = (batch["input_ids"][target] == tok.mask_token_id).float().mean()
    kept = (batch["input_ids"][target] == original[target]).float().mean()
    n = int(target.sum())
    assert n > 1000 and abs(share - 0.15) < 0.015
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.025 and abs(1 - masked - kept - 0.1) < 0.025


def test_stage_one_changes_the_encoder_and_stage_two_starts_from_it(make_cfg, tmp_path):
    cfg = make_cfg(*BERT, *corpus(tmp_path / "data"), "trainer.max_steps=2", "method=full")
    (stage,) = build_strategy(cfg.strategy).stages(cfg)
    assert stage.cfg.dataset.format == "masked_text" and stage.cfg.method.name == "full"
    assert stage.cfg.trainer.max_steps == 3 and stage.cfg.optimizer.lr == 1e-2
    train(stage.cfg)
    stage.finish()
    out = Path(cfg.output_dir)
    mlm = load_file(str(out / "stages/pretrain/adapter/weights.safetensors"))  # stage 1's trained MaskedLM
    adapted = load_file(str(out / "stages/pretrain/model/model.safetensors"))
    with torch.random.fork_rng():
        torch.manual_seed(0)  # model.init_seed: the weights stage 1 started from
        init = AutoModel.from_config(AutoConfig.for_model(**dict(cfg.model.config))).state_dict()
    encoder = [k for k in adapted if k.startswith(("encoder.", "embeddings."))]
    assert encoder and all(torch.equal(adapted[k], mlm[f"bert.{k}"]) for k in encoder)
    changed = [k for k in encoder if not torch.equal(adapted[k], init[k])]
    assert len(changed) > len(encoder) // 2  # stage 1 trained the encoder
    assert all(torch.equal(adapted[k], init[k]) for k in adapted if k.startswith("pooler."))  # kept, not trained
    assert "cls.predictions.transform.dense.weight" in mlm  # the MLM head was there in stage 1

    run = setup(cfg)  # stage 2: the task model built from the adapted weights
    assert Path(run.model_cfg.path) == (out / "stages/pretrain/model").resolve()
    bert = run.model.bert.state_dict()
    assert all(torch.equal(bert[k], adapted[k]) for k in adapted)


def test_resume_after_a_kill_in_stage_two_does_not_redo_stage_one(make_cfg, tmp_path, capsys):
    args = [*BERT, *corpus(tmp_path / "data"), "trainer.max_steps=5", "trainer.save_every=2",
            "trainer.keep_checkpoints=5", "trainer.log_every=1"]
    whole = make_cfg(*args, out="whole")
    metrics = train(whole)
    assert metrics["strategy/pretrain_steps"] == 3 and metrics["strategy/pretrain_loss"] > 0
    train(make_cfg(*args, out="part"))  # (not a copy of "whole": the stage-2 model path is part of its identity)
    part = make_cfg(*args, "resume=auto", out="part")
    for ckpt in checkpoint_dirs(f"{part.output_dir}/checkpoints")[1:]:
        shutil.rmtree(ckpt)  # killed in stage 2 between steps 2 and 4
    shutil.rmtree(f"{part.output_dir}/adapter")
    (Path(part.output_dir) / "metrics.json").unlink()
    stage_files = {p: p.stat().st_mtime_ns for p in Path(part.output_dir, "stages").rglob("*") if p.is_file()}
    capsys.readouterr()
    resumed = train(part)
    assert "stage pretrain: finished before, kept" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in Path(part.output_dir, "stages").rglob("*") if p.is_file()} == stage_files
    a, b = (load_file(f"{c.output_dir}/adapter/adapter_model.safetensors") for c in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(Path(c.output_dir, "metrics.jsonl"))
             if "loss" in r] for c in (whole, part)]
    assert rows[0] == rows[1] and len(rows[0]) == 5
    assert resumed["eval/loss"] == metrics["eval/loss"]
    assert len([r for r in read_metrics(Path(part.output_dir, "stages/pretrain/metrics.jsonl")) if "loss" in r]) == 3
    with pytest.raises(FtuneError, match=r"strategy\.pretrain_lr: checkpoint has 0\.01, this run has 0\.001"):
        train(make_cfg(*args, "resume=auto", "strategy.pretrain_lr=1e-3", out="part"))  # stage 1 trained otherwise


def error_of(make_cfg, *overrides: str) -> str:
    with pytest.raises(FtuneError) as err:
        train(make_cfg(*overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_domain_adapt_inputs_get_one_paragraph(make_cfg, tmp_path):
    assert "needs the domain's raw text" in error_of(make_cfg, *BERT, "strategy=domain_adapt")
    missing = error_of(make_cfg, *BERT, "strategy=domain_adapt", f"strategy.corpus_path={tmp_path / 'nope.txt'}")
    assert "nope.txt does not exist" in missing
    assert "strategy.objective must be auto, masked or causal" in error_of(
        make_cfg, *BERT, *corpus(tmp_path / "d"), "strategy.objective=mlm")
    assert "strategy.pretrain_steps" in error_of(make_cfg, *BERT, *corpus(tmp_path / "d"), "strategy.pretrain_steps=0")
    decoder = error_of(make_cfg, *BERT, "model=tiny_llama", *corpus(tmp_path / "d"), "strategy.objective=masked")
    assert "is a decoder without one" in decoder and "strategy.objective=causal" in decoder
    (tmp_path / "d" / "c.txt").write_text("a line of text\n")
    lora = error_of(make_cfg, "model=tiny_bert", "dataset=text", "dataset.format=masked_text",
                    f"dataset.path={tmp_path / 'd' / 'c.txt'}", "method=lora")
    assert "method=lora is not supported" in lora and "method=full" in lora
    assert not (tmp_path / "run").exists()  # every refusal came before the run directory was made
