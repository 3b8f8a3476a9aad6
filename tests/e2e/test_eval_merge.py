"""eval / merge / generate on real tiny runs.

Every mergeable method of the registry is trained for a few steps, merged, and the merged directory is
loaded with plain transformers in a subprocess that imports neither peft nor ftune; its logits must
equal base+adapter's (1e-4, fp32). Then the CLI end to end in subprocesses, and the refusals.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ftune import cli
from ftune.config import config_dir, validate_group
from ftune.data import build_data
from ftune.data.collate import Collator
from ftune.errors import FtuneError, MethodNotApplicable
from ftune.evaluate import model_inputs
from ftune.merge import MergeCheckFailed, merge_run
from ftune.methods import METHODS
from ftune.methods.base import build_method
from ftune.methods.selective import Full
from ftune.models import build_model
from ftune.runs import load_run
from ftune.train import train

from conftest import compose_train, run_cli


def _method(name: str):
    """The method as its shipped YAML configures it: mergeability can depend on settings (method=peft)."""
    yaml = config_dir() / "method" / f"{name}.yaml"
    return build_method(OmegaConf.load(yaml) if yaml.exists() else {"name": name})


MERGEABLE = sorted(n for n in METHODS if _method(n).mergeable)
NOT_MERGEABLE = sorted(n for n in METHODS if not _method(n).mergeable)
LLAMA = ("tiny_llama", "demo_instructions")
BERT = ("tiny_bert", "sentiment")
# methods for one kind of model: method=moe trains an MoE, here a tiny Llama upcycled into one (4 experts, top-2)
MODELS_FOR = {"moe": ((*LLAMA, "model.upcycle_experts=4"),)}
FAST = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=64", "trainer.log_every=1",
        "trainer.progress=false", "dataset.max_samples=16", "dataset.max_eval_samples=8", "optimizer.lr=1e-2"]
FORBIDDEN = ("ftune", "peft", "quantization_config", "_pre_quantization_dtype")


def train_run(out: Path, method: str, model: str, dataset: str, *extra: str) -> Path:
    cfg = compose_train([f"model={model}", f"dataset={dataset}", f"method={method}", *FAST, *extra], out, small=False)
    train(cfg)
    return out


class Runs:
    """Tiny runs trained on first use and shared by the tests of this module."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, Path] = {}

    def get(self, method: str) -> Path:
        """A run of ``method`` on the tiny Llama, else (bitfit: Llama has no biases) on the tiny BERT (method=moe:
        on the tiny Llama upcycled into an MoE)."""
        if method not in self.cache:
            candidates = MODELS_FOR.get(method, (LLAMA, BERT))
            for i, (model, dataset, *extra) in enumerate(candidates):
                try:
                    self.cache[method] = train_run(self.root / f"{method}_{model}", method, model, dataset, *extra)
                    break
                except MethodNotApplicable:
                    if i == len(candidates) - 1:
                        raise
        return self.cache[method]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"))


def check_batch(run: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Three examples of the run's eval data, collated as the training loop collates them."""
    from ftune.runs import load_run_tokenizer, run_label_names

    cfg = OmegaConf.load(run / "config.yaml")
    data_cfg = validate_group(cfg, "dataset")
    tok = load_run_tokenizer(run, validate_group(cfg, "model"))
    labels = run_label_names(run)
    if labels:
        from dataclasses import replace

        data_cfg = replace(data_cfg, label_names=labels)
    bundle = build_data(data_cfg, tok, 64, cfg.seed)
    task = bundle.task
    return model_inputs(Collator(tok.pad_token_id, task)(bundle.eval[:3])), task


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


SUBPROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    jobs = json.load(open(sys.argv[1]))
    result, tensors = {}, {}
    for name, job in jobs.items():
        auto = AutoModelForCausalLM if job["task"] == "causal_lm" else AutoModelForSequenceClassification
        model = auto.from_pretrained(job["dir"]).eval()
        with torch.no_grad():
            tensors[name] = model(**load_file(job["inputs"])).logits.float().contiguous()
        result[name] = {"dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                        "param_classes": sorted({type(p).__name__ for p in model.parameters()})}
    save_file(tensors, sys.argv[2])
    result["_modules"] = {m: m in sys.modules for m in ("peft", "ftune", "bitsandbytes")}
    json.dump(result, open(sys.argv[3], "w"))
""")


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    """Every mergeable method: trained, merged in-process, then loaded by plain transformers in one subprocess."""
    root = tmp_path_factory.mktemp("merged")
    results: dict[str, dict] = {}
    jobs = {}
    for name in MERGEABLE:
        res = results[name] = {}
        try:
            run = runs.get(name)
            batch, task = check_batch(run)
            model = load_run(run, "cpu", quantized=False)[0]  # base + adapter (full-precision base for 4-bit runs)
            res["reference"] = logits(model, batch)
            model_cfg = validate_group(OmegaConf.load(run / "config.yaml"), "model")
            labels = json.loads((run / "labels.json").read_text()) if (run / "labels.json").exists() else []
            base = build_model(model_cfg, task, num_labels=len(labels) or None, label_names=labels, pad_token_id=0)
            res["base"] = logits(base.eval(), batch)
            res["merge"] = merge_run(run, root / name)
            res["config"] = json.loads((root / name / "config.json").read_text())
            save_file({k: v.contiguous() for k, v in batch.items()}, str(root / f"{name}.inputs.safetensors"))
            jobs[name] = {"dir": str(root / name), "task": task, "inputs": str(root / f"{name}.inputs.safetensors")}
        except Exception:
            res["error"] = traceback.format_exc()
    (root / "jobs.json").write_text(json.dumps(jobs))
    # cwd outside the repository, so nothing of ftune can be imported by accident
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(root / "jobs.json"), str(root / "logits.safetensors"),
                           str(root / "loaded.json")], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads((root / "loaded.json").read_text())
    loaded_logits = load_file(str(root / "logits.safetensors"))
    for name in jobs:
        results[name]["loaded"] = loaded[name]
        results[name]["loaded_logits"] = loaded_logits[name]
    return results, loaded["_modules"]


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_round_trip(merged, method):
    results, modules = merged
    res = results[method]
    assert "error" not in res, res.get("error")
    # the adapter changes the model: the check below is not comparing a base with itself
    assert (res["reference"] - res["base"]).abs().max() > 1e-5
    # merged in-process vs base+adapter
    assert res["merge"]["max_abs_diff"] <= 1e-4
    # the saved directory, loaded by plain transformers without peft or ftune, gives the same logits
    assert modules == {"peft": False, "ftune": False, "bitsandbytes": False}
    assert torch.allclose(res["loaded_logits"], res["reference"], atol=1e-4, rtol=0)
    assert res["loaded"]["dtypes"] == ["torch.float32"]
    assert [k for k in res["config"] if k.startswith(FORBIDDEN)] == []


def test_qlora_merges_onto_full_precision_weights(runs, merged, tmp_path):
    pytest.importorskip("bitsandbytes")
    results, _ = merged
    res = results["qlora"]
    assert "error" not in res, res.get("error")
    assert res["merge"]["qlora_full_precision"] is True
    assert res["loaded"]["param_classes"] == ["Parameter"]  # no Params4bit
    assert res["loaded"]["dtypes"] == ["torch.float32"]
    assert "quantization_config" not in res["config"]
    # the trained model itself is 4-bit: merge did not merge into that one
    quantized = load_run(runs.get("qlora"), "cpu")[0]
    assert any(type(p).__name__ == "Params4bit" for p in quantized.parameters())
    # a fresh merge says what it did
    out = tmp_path / "q"
    proc_out = _cli_inprocess(["merge", f"run={runs.get('qlora')}", f"out={out}"])
    assert "full precision" in proc_out and "max abs diff" in proc_out


def test_merge_fails_loudly_beyond_tolerance(runs, tmp_path, monkeypatch):
    from ftune.methods.lora import PeftMethod

    def broken_merge(self, model):
        merged = model.merge_and_unload()
        with torch.no_grad():
            next(p for n, p in merged.named_parameters() if "layers.0" in n).add_(0.05)
        return merged

    monkeypatch.setattr(PeftMethod, "merge", broken_merge)
    out = tmp_path / "models" / "bad"
    with pytest.raises(MergeCheckFailed, match="nothing was written") as err:
        merge_run(runs.get("lora"), out)
    assert err.value.exit_code != 0
    assert not out.exists() and not out.parent.exists()  # the check runs before anything is written


def test_merge_refuses_a_non_empty_out_unless_overwrite(runs, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FtuneError, match="overwrite=true"):
        merge_run(runs.get("lora"), out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_run(runs.get("lora"), out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind


class _NoMerge(Full):
    """A registered method whose trained parts cannot be folded into the weights (for the test)."""

    mergeable = False
    not_mergeable_hint = "use `ftune eval` or `ftune generate`, which load it on the fly"


def _cli_inprocess(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        cli.main(argv)
    return buf.getvalue()


@pytest.mark.parametrize("method", NOT_MERGEABLE + ["test_nomerge"])
def test_non_mergeable_method_is_refused(runs, tmp_path, monkeypatch, method):
    from ftune.merge import not_mergeable_error

    monkeypatch.setitem(METHODS, "test_nomerge", _NoMerge)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    cfg = OmegaConf.load(runs.get("lora") / "config.yaml")
    yaml = config_dir() / "method" / f"{method}.yaml"
    cfg.method = OmegaConf.load(yaml) if yaml.exists() else {"name": method}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    out = tmp_path / "models" / "merged"
    with pytest.raises(SystemExit) as exit_info:
        _cli_inprocess(["merge", f"run={run}", f"out={out}"])
    assert exit_info.value.code not in (0, None)
    assert not out.exists() and not out.parent.exists()  # nothing written, not even the parent
    message = str(not_mergeable_error(build_method(cfg.method)))
    assert f"'{method}' cannot be merged" in message and "Nothing was written" in message
    assert "Instead," in message


def test_load_run_refuses_what_is_not_a_run(tmp_path, runs):
    with pytest.raises(FtuneError, match="not an ftune run directory"):
        load_run(tmp_path)
    (tmp_path / "0_lora").mkdir()
    (tmp_path / "0_lora" / "config.yaml").write_text("{}")
    with pytest.raises(FtuneError, match="compare"):  # a sweep dir: name its runs
        load_run(tmp_path)
    with pytest.raises(FtuneError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_adapter_of_another_model_is_refused(runs):
    gpt2 = validate_group(compose_train(["model=tiny_gpt2"]), "model")
    with pytest.raises(FtuneError, match="does not fit"):  # peft format: a Llama LoRA onto a GPT-2
        load_run(runs.get("lora"), model_cfg=gpt2)
    with pytest.raises(FtuneError, match="do not fit|does not fit"):  # ftune's format: BERT biases onto a GPT-2
        load_run(runs.get("bitfit"), model_cfg=gpt2)


# --- the commands end to end (the CLI in subprocesses for eval, merge and generate) -------------
def test_eval_classification_run(runs, tmp_path):
    run = runs.get("bitfit")
    stdout = _cli_inprocess(["eval", f"run={run}", f"out={tmp_path}"])
    report = json.loads((tmp_path / "eval.json").read_text())
    train_metrics = json.loads((run / "metrics.json").read_text())
    # the run's own eval split, as training evaluated it
    assert report["eval/examples"] == train_metrics["eval/examples"] == 8
    assert report["eval/loss"] == pytest.approx(train_metrics["eval/loss"], rel=1e-5)
    assert report["eval/accuracy"] == pytest.approx(train_metrics["eval/accuracy"])
    matrix = report["confusion"]["matrix"]
    assert report["confusion"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, matrix)) == 8
    assert report["eval/accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 8)
    assert 0 <= report["eval/macro_f1"] <= 1
    assert set(report["per_class"]) == {"negative", "positive"}
    from PIL import Image

    with Image.open(tmp_path / "confusion.png") as img:
        img.verify()
    assert "macro_f1" in stdout and "confusion" in stdout


def test_cli_eval_causal_lm_with_scorer_merge_and_generate(runs, tmp_path):
    run = runs.get("lora")
    proc = run_cli("eval", f"run={run}", f"out={tmp_path / 'ev'}", "eval.scorer=exact_match", "eval.max_new_tokens=4",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    train_metrics = json.loads((run / "metrics.json").read_text())
    assert report["eval/loss"] == pytest.approx(train_metrics["eval/loss"], rel=1e-5)
    assert report["eval/perplexity"] == pytest.approx(math.exp(report["eval/loss"]), rel=1e-9)
    assert 0.0 <= report["eval/exact_match"] <= 1.0 and report["eval/scored"] == report["eval/examples"]
    lines = (tmp_path / "ev" / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == report["eval/scored"] and "### Response:" in json.loads(lines[0])["prompt"]

    out = tmp_path / "models" / "x-merged"
    proc = run_cli("merge", f"run={run}", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max abs diff" in proc.stdout and (out / "model.safetensors").exists()
    assert (out / "tokenizer_config.json").exists()

    proc = run_cli("generate", f"run={run}", "prompt=Sort the words: pear, apple", "temperature=0",
                   "max_new_tokens=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "greedy" in proc.stdout


def test_generate_refuses_a_classification_run(runs):
    with pytest.raises(SystemExit) as exit_info:
        _cli_inprocess(["generate", f"run={runs.get('bitfit')}", "prompt=hi"])
    assert exit_info.value.code == 2


def test_generate_formats_prompts_like_training(runs):
    from omegaconf import OmegaConf

    from ftune.generate import prompt_ids
    from ftune.runs import load_run_tokenizer

    run = runs.get("lora")
    cfg = OmegaConf.load(run / "config.yaml")
    data_cfg, model_cfg = validate_group(cfg, "dataset"), validate_group(cfg, "model")
    tok = load_run_tokenizer(run, model_cfg)
    bundle = build_data(data_cfg, tok, 128, cfg.seed)
    rows = [json.loads(x) for x in Path(data_cfg.path).read_text().splitlines()]
    # the first training example's prompt part equals what generate builds from its instruction and input
    for ex in bundle.train[:3]:
        first = next(i for i, lab in enumerate(ex["labels"]) if lab != -100)
        prompt = tok.decode(ex["input_ids"][:first])
        row = next(r for r in rows if r["instruction"] in prompt and (r.get("input") or "") in prompt)
        assert prompt_ids(data_cfg, tok, row["instruction"], row.get("input") or None) == ex["input_ids"][:first]
    # chat datasets: the chat template with a generation prompt
    chat = validate_group(compose_train(["dataset=demo_chat"]), "dataset")
    ids = prompt_ids(chat, tok, "Add the two numbers.\n6 and 6", chat_template=model_cfg.chat_template)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("method", [m for m in ("prompt_tuning", "adapter_houlsby") if m in METHODS])
def test_eval_loads_non_mergeable_runs_on_the_fly(runs, tmp_path, method):
    run = runs.get(method)
    _cli_inprocess(["eval", f"run={run}", f"out={tmp_path}"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["method"] == method
    assert report["eval/loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["eval/loss"], rel=1e-5)


def test_eval_on_another_file_and_of_the_merged_model(runs, tmp_path):
    # a classification run on a local CSV that is not its training data: every row is evaluated
    rows = [json.loads(x) for x in Path(validate_group(compose_train(["dataset=sentiment"]), "dataset").eval_path)
            .read_text().splitlines()[:7]]
    csv_file = tmp_path / "test.csv"
    csv_file.write_text("sentence,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    _cli_inprocess(["eval", f"run={runs.get('bitfit')}", "dataset=classification", f"dataset.path={csv_file}",
                    "dataset.text_column=sentence", f"out={tmp_path / 'csv'}"])
    report = json.loads((tmp_path / "csv" / "eval.json").read_text())
    assert report["eval/examples"] == 7 and report["split"] == "all"
    assert sum(report["per_class"][c]["support"] for c in ("negative", "positive")) == 7

    # the merged model, evaluated as a plain base model (model.path=), scores what base+adapter scored
    run = runs.get("lora")
    merged_dir = tmp_path / "merged"
    merge_run(run, merged_dir)
    _cli_inprocess(["eval", "model=tiny_llama", f"model.path={merged_dir}", "dataset=demo_instructions",
                    "dataset.max_eval_samples=8", "eval.max_length=64", f"out={tmp_path / 'base'}"])
    report = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert report["method"] == "base" and report["model"] == str(merged_dir)
    assert report["eval/loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["eval/loss"], rel=1e-5)
    assert (tmp_path / "base" / "config.yaml").exists()  # `ftune compare` lists it as the baseline row
