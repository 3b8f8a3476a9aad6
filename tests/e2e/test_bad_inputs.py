"""Bad input to the real CLI: every case fails with one clear paragraph, and changes no file.

Each row runs `ftune train` (or eval / merge) in a subprocess and checks: a non-zero exit code; an
``error:`` paragraph (one line, the last thing printed) holding the row's key words, which name the
problem and the fix; no Python traceback; and no file under the case's directory (nor under the
shared run it uses) created, changed or removed. All rows are started at once on two workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FTUNE = Path(sys.executable).parent / "ftune"
TINY = ["model=tiny_llama", "dataset=demo_instructions", "dataset.prompt_template=plain", "trainer.max_steps=2",
        "trainer.batch_size=2", "trainer.max_length=64", "trainer.progress=false", "dataset.max_samples=8",
        "dataset.eval_fraction=null"]
TOKENIZER = REPO / "ftune" / "assets" / "tiny_tokenizer"


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "FTUNE_VERBOSE": "", **extra}


def cli(args: list[str], environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(FTUNE), *args], env=environ or env(), capture_output=True, text=True, timeout=600)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``, and every directory (a failed run leaves none behind)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "directory"
    return out


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


INSTRUCTIONS = [{"instruction": "Add the two numbers.", "input": f"{i} and {i}", "output": str(2 * i)} for i in range(8)]
REVIEWS = [{"text": f"review number {i} was {'great' if i % 2 else 'awful'}", "label": "pos" if i % 2 else "neg"}
           for i in range(8)]
CLS = ["dataset=classification", "model=tiny_bert", "method=lora"]


# --- cases ----------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    args: Callable[[Path, Path], list[str]] | list[str]  # (case dir, shared run dir) -> arguments after `ftune`
    expect: list[str]  # key words of the message (case-insensitive): the problem and the fix
    uses_run: bool = False  # needs the shared trained run (which must not change either)
    environ: Callable[[Path], dict[str, str]] | None = None
    code: int = 2
    verbose: bool = False  # a traceback is expected (verbose=true)
    trains: bool = False  # fails during training: its new output_dir (case dir/out) holds the failed run's files


def train(*args: str) -> list[str]:
    return ["train", *TINY, *args]


def data_case(id: str, make: Callable[[Path], list[str]], expect: list[str], code: int = 2) -> Case:
    return Case(id, lambda d, run: ["train", *TINY, *make(d), f"output_dir={d / 'out'}"], expect, code=code)


def file_case(id: str, name: str, text: str, expect: list[str], args: list[str] = CLS) -> Case:
    """A data case whose training file ``name`` holds ``text`` (classification on tiny_bert unless ``args``)."""

    def make(d: Path) -> list[str]:
        (d / name).write_text(text)
        return [*args, f"dataset.path={d / name}"]

    return data_case(id, make, expect)


def model_dir_without_weights(d: Path) -> Path:
    m = d / "model"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1024, "hidden_size": 64}))
    return m


def model_dir_pickled(d: Path) -> Path:
    m = model_dir_without_weights(d)
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return m


def damaged_checkpoint(d: Path, run: Path) -> Path:
    ckpt = d / "step-000002"
    shutil.copytree(run / "checkpoints" / "step-000002", ckpt)
    weights = ckpt / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ckpt


def run_of_another_model(d: Path, run: Path) -> Path:
    """A copy of the shared tiny_llama run whose config.yaml says it was trained on tiny_gpt2."""
    from omegaconf import OmegaConf

    copy = d / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = OmegaConf.load(copy / "config.yaml")
    model = OmegaConf.load(REPO / "configs" / "model" / "tiny_gpt2.yaml")
    cfg.model = {k: v for k, v in model.items() if k != "defaults"}
    cfg.model.tokenizer = str(TOKENIZER)
    (copy / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return copy


def without(package: str) -> Callable[[Path], dict[str, str]]:
    """An environment in which importing ``package`` fails as if it were not installed."""

    def make(d: Path) -> dict[str, str]:
        pkg = d / f"fake-{package}" / package
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('{package} is not installed (simulated)')\n")
        return env(PYTHONPATH=os.pathsep.join(p for p in (str(pkg.parent), os.environ.get("PYTHONPATH")) if p))

    return make


def a_file(d: Path) -> Path:
    f = d / "notes.txt"
    f.write_text("mine")
    return f


def non_empty_dir(d: Path) -> Path:
    out = d / "existing"
    out.mkdir()
    (out / "results.txt").write_text("keep me")
    return out


CASES = [
    # Hydra's own errors, worded by ftune
    Case("unknown-model", train("model=nope"), ["unknown model 'nope'", "tiny_llama", "model.path"]),
    Case("unknown-method", train("method=lorra"), ["unknown method 'lorra'", "lora"]),
    Case("unknown-dataset", train("dataset=alpacca"), ["unknown dataset 'alpacca'", "alpaca", "dataset.path"]),
    Case("unknown-optimizer", train("optimizer=adam"), ["unknown optimizer 'adam'", "adamw", "sgd"]),
    Case("unknown-key-typo", train("trainer.max_stepz=5"), ["trainer.max_stepz", "did you mean 'trainer.max_steps'"]),
    Case("unknown-group-typo", train("modle=tiny_llama"), ["'modle'", "did you mean 'model'"]),
    Case("wrong-type", train("trainer.batch_size=abc"), ["trainer.batch_size", "abc", "an integer"]),
    Case("bad-override-syntax", train("trainer.max_steps=[1,"), ["override", "key=value"]),
    # values that type-check but cannot train
    Case("lr-zero", lambda d, r: train("optimizer.lr=0", f"output_dir={d / 'out'}"), ["optimizer.lr must be positive"]),
    Case("batch-size-zero", lambda d, r: train("trainer.batch_size=0", f"output_dir={d / 'out'}"),
         ["trainer.batch_size must be at least 1"]),
    Case("max-steps-zero", lambda d, r: train("trainer.max_steps=0", f"output_dir={d / 'out'}"),
         ["trainer.max_steps must be at least 1", "null"]),
    Case("unknown-format", lambda d, r: train("dataset.format=tabular", f"output_dir={d / 'out'}"),
         ["dataset.format 'tabular'", "instruction", "classification"]),
    Case("target-outside-allowed", lambda d, r: train("optimizer._target_=os.system", f"output_dir={d / 'out'}"),
         ["os.system", "will not import", "torch.optim."]),
    Case("scheduler-target-outside-allowed", lambda d, r: train("scheduler._target_=builtins.eval",
                                                                f"output_dir={d / 'out'}"),
         ["builtins.eval", "will not import", "scheduler"]),
    Case("fp16-on-cpu", lambda d, r: train("trainer.precision=fp16", "trainer.device=cpu", f"output_dir={d / 'out'}"),
         ["fp16", "cuda", "trainer.precision=fp32"]),
    Case("cuda-without-gpu", lambda d, r: train("trainer.device=cuda", f"output_dir={d / 'out'}"),
         ["no cuda", "trainer.device=cpu"]),
    Case("method-not-applicable", lambda d, r: train("method=bitfit", f"output_dir={d / 'out'}"),
         ["bitfit", "bias", "lora"]),
    Case("qlora-without-bitsandbytes", lambda d, r: train("method=qlora", f"output_dir={d / 'out'}"),
         ["bitsandbytes", "pip install bitsandbytes", "method=lora"], environ=without("bitsandbytes")),
    Case("qlora-with-nothing-to-quantize", lambda d, r: [
        "train", *[a for a in TINY if not a.startswith("model=")], "model=tiny_bert", "dataset=sentiment",
        "model.config.intermediate_size=48", "method=qlora", f"output_dir={d / 'out'}"],
        ["no linear layer it can quantize", "narrower than the 64-wide", "method=lora"]),
    Case("gradual-unfreezing-without-blocks", lambda d, r: train("method=full", "method.schedule=gradual",
                                                                 f"output_dir={d / 'out'}"),
         ["gradual unfreezing", "'full' does not take it", "method=freeze method.schedule=gradual"]),
    Case("early-stopping-without-eval-every", lambda d, r: train(
        "trainer.early_stopping_patience=3", f"output_dir={d / 'out'}"),
        ["trainer.early_stopping_patience", "eval_every is null", "trainer.eval_every=50"]),
    Case("unknown-metric-for-best", lambda d, r: train(
        "trainer.keep_best=true", "trainer.eval_every=1", "trainer.metric_for_best=eval/acc", f"output_dir={d / 'out'}"),
        ["unknown trainer.metric_for_best 'eval/acc'", "eval/loss, eval/perplexity"]),
    Case("logger-setting-typo", train("logger=[tensorboard,mlflow]", "logger.mlflow.trackinguri=x"),
         ["logger.mlflow.trackinguri", "did you mean 'logger.mlflow.tracking_uri'"]),
    Case("logger-library-missing", lambda d, r: train("logger=wandb", f"output_dir={d / 'out'}"),
         ["logger=wandb", "pip install 'ftune[wandb]'"], environ=without("wandb")),
    Case("nan-skipping-cannot-save-diverged-weights", lambda d, r: train(
        "method=full", "optimizer=sgd", "optimizer.lr=1e30", "trainer.skip_nan_batches=true", "trainer.max_steps=40",
        f"output_dir={d / 'out'}"), ["step 2", "25 batches", "diverged", "lower optimizer.lr"], code=1, trains=True),
    # strategies
    Case("gradual-unfreezing-on-two-processes", lambda d, r: train(
        "method=lora", "method.schedule=gradual", "trainer.num_processes=2", f"output_dir={d / 'out'}"),
         ["method.schedule=gradual", "DistributedDataParallel", "trainer.num_processes=1", "method.schedule=none"]),
    Case("unknown-distributed-strategy", lambda d, r: train("trainer.distributed=dpp", "trainer.num_processes=2",
                                                            f"output_dir={d / 'out'}"),
         ["unknown trainer.distributed=dpp", "trainer.distributed=ddp"]),
    Case("unknown-strategy", train("strategy=distil"), ["unknown strategy 'distil'", "distill", "none"]),
    Case("distill-teacher-with-another-vocabulary", lambda d, r: train(
        "strategy=distill", "strategy.teacher=tiny_bert", f"output_dir={d / 'out'}"),
        ["another vocabulary", "token id by token id", "same tokenizer", "strategy.student_layers"]),
    Case("distill-student-layers-out-of-range", lambda d, r: train(
        "strategy=distill", "strategy.teacher=tiny_llama", "strategy.student_layers=[0,2]", f"output_dir={d / 'out'}"),
        ["strategy.student_layers=[0, 2]", "[2] out of range", "2 blocks, numbered 0..1"]),
    Case("distill-unknown-kl", lambda d, r: train(
        "strategy=distill", "strategy.teacher=tiny_llama", "strategy.kl=kullback", f"output_dir={d / 'out'}"),
        ["strategy.kl must be forward, reverse or symmetric", "'kullback'"]),
    Case("dann-without-a-target-dataset", lambda d, r: train(
        *CLS, f"dataset.path={jsonl(d / 'src.jsonl', REVIEWS)}", "strategy=dann", f"output_dir={d / 'out'}"),
        ["strategy=dann needs the target domain's text", "strategy.target_path=", "strategy.target_eval_path="]),
    Case("dann-target-file-missing", lambda d, r: train(
        *CLS, f"dataset.path={jsonl(d / 'src.jsonl', REVIEWS)}", "strategy=dann",
        f"strategy.target_path={d / 'target.jsonl'}", f"output_dir={d / 'out'}"),
        ["target.jsonl does not exist", "target domain's unlabelled text"]),
    Case("dann-on-a-causal-dataset", lambda d, r: train(
        "strategy=dann", f"strategy.target_path={jsonl(d / 'target.jsonl', [{'text': 'a toaster'}])}",
        f"output_dir={d / 'out'}"),
        ["needs a classification dataset", "dataset.format=classification", "causal lm", "strategy=domain_adapt"]),
    Case("domain-adapt-corpus-missing", lambda d, r: train(
        "strategy=domain_adapt", f"strategy.corpus_path={d / 'corpus.txt'}", f"output_dir={d / 'out'}"),
        ["corpus.txt does not exist", "raw text", "a passage per line"]),
    # data
    data_case("missing-data-file", lambda d: ["dataset=instruction", f"dataset.path={d / 'nope.jsonl'}"],
              ["does not exist", "dataset.path"]),
    data_case("bad-json-line", lambda d: ["dataset=instruction", f"dataset.path={_bad_json(d)}"],
              ["line 3", "fix or remove line 3"]),
    data_case("latin1-without-encoding", lambda d: ["dataset=instruction", f"dataset.path={_write(d / 'data.jsonl', LATIN1)}"],
              ["not utf-8", "line 2", "re-save it as utf-8", "dataset.encoding=latin-1"]),
    data_case("corrupt-parquet", lambda d: ["dataset=instruction", f"dataset.path={_write(d / 'data.parquet', b'PAR1junk')}"],
              ["could not read data file", "corrupt"]),
    data_case("empty-dataset", lambda d: ["dataset=instruction", f"dataset.path={_write(d / 'empty.jsonl', b'')}"],
              ["is empty", "nothing to train on"]),
    data_case("missing-columns", lambda d: ["dataset=instruction", f"dataset.path={jsonl(d / 'qa.jsonl', [{'question': 'q', 'answer': 'a'}] * 4)}"],
              ["no column 'instruction'", "question", "answer", "dataset.instruction_column"]),
    data_case("missing-label-column", lambda d: [*CLS, f"dataset.path={jsonl(d / 'cls.jsonl', [{'text': 'a', 'stars': 1}] * 4)}"],
              ["no column 'label'", "stars", "dataset.label_column"]),
    data_case("new-label-in-eval-file", lambda d: [*CLS, f"dataset.path={jsonl(d / 'train.jsonl', REVIEWS)}",
                                                   f"dataset.eval_path={jsonl(d / 'eval.jsonl', REVIEWS[:3] + [{'text': 'meh', 'label': 'neutral'}])}"],
              ["eval.jsonl", "line 4", "'neutral'", "not one of the classes", "dataset.label_names"]),
    data_case("negative-labels", lambda d: [*CLS, f"dataset.path={jsonl(d / 'neg.jsonl', [{'text': 'x y', 'label': i - 1} for i in range(4)])}"],
              ["negative labels", "0..n-1"]),
    data_case("nothing-left-after-truncation", lambda d: [
        "dataset=instruction", "trainer.max_length=16",
        f"dataset.path={jsonl(d / 'long.jsonl', [{'instruction': 'word ' * 50, 'output': 'yes'}] * 4)}"],
        ["no training example is left", "trainer.max_length"]),
    data_case("eval-split-on-local-file", lambda d: ["dataset=instruction", "dataset.eval_split=validation",
                                                     f"dataset.path={jsonl(d / 'i.jsonl', INSTRUCTIONS)}"],
              ["eval_split", "local file", "dataset.eval_path"]),
    # flawed files as spreadsheets, other tools and hand edits leave them (more in tests/unit/test_data.py)
    file_case("empty-label", "d.csv", "text,label\ngood,pos\nbad,\n",
              ["line 3", "the label is empty", "fix or remove line 3", "dataset.bad_rows=skip"]),
    file_case("unclosed-quote-merges-rows", "d.csv", 'text,label\ngood,pos\n"bad,neg\nfine,pos\nok,neg\n',
              ["lines 3-5", "never closed", '""', "dataset.bad_rows=skip"]),
    file_case("ragged-csv-row", "d.csv", "text,label\ngood,pos\nbad, sad,neg\n",
              ["line 3", "3 fields where the header has 2", "not quoted"]),
    file_case("jsonl-trailing-comma", "d.jsonl", json.dumps(INSTRUCTIONS[0]) + "\n" + json.dumps(INSTRUCTIONS[1]) + ",\n",
              ["line 2", "comma after the object", "fix or remove line 2"], ["dataset=instruction"]),
    file_case("json-array-with-a-non-object", "d.json",
              "[\n" + json.dumps(REVIEWS[0]) + ',\n"a stray string",\n' + json.dumps(REVIEWS[1]) + "\n]\n",
              ["line 3", "a json string, not an object"]),
    file_case("semicolon-csv", "d.csv", "text;label\ngood;pos\n", ["one column 'text;label'", "dataset.delimiter=';'"]),
    file_case("header-only-csv", "d.csv", "text,label\n", ["header (text, label) but no rows", "nothing to train on"]),
    file_case("duplicate-column-names", "d.csv", "text,label,text\na,pos,b\n", ["'text' more than once", "rename"]),
    data_case("parquet-null-label", lambda d: [*CLS, f"dataset.path={_parquet_null_label(d)}"],
              ["row 2", "the label is missing", "dataset.bad_rows=skip"]),
    # settings out of range, all named at once, before anything loads
    Case("negative-epochs-with-max-steps", lambda d, r: train("trainer.epochs=-1", "trainer.max_steps=5",
                                                              f"output_dir={d / 'out'}"),
         ["trainer.epochs must be positive (got -1.0)"]),
    Case("impossible-numbers", lambda d, r: train("dataset.eval_fraction=1.5", "trainer.log_every=0", "optimizer.lr=nan",
                                                  "method.dropout=1.0", f"output_dir={d / 'out'}"),
         ["dataset.eval_fraction must be above 0 and below 1", "trainer.log_every must be at least 1",
          "optimizer.lr must be positive (got nan)", "method.dropout must be at least 0 and below 1"]),
    data_case("unsupported-extension", lambda d: ["dataset=instruction", f"dataset.path={_write(d / 'data.xlsx', b'PK')}"],
              ["unsupported extension", ".xlsx", ".jsonl"]),
    # models
    Case("model-path-missing", lambda d, r: train("model.config=null", f"model.path={d / 'no_model'}",
                                                  f"model.tokenizer={TOKENIZER}", f"output_dir={d / 'out'}"),
         ["does not exist", "model.path"]),
    Case("model-path-without-weights", lambda d, r: train("model.config=null", f"model.path={model_dir_without_weights(d)}",
                                                          f"model.tokenizer={TOKENIZER}", f"output_dir={d / 'out'}"),
         ["no *.safetensors"]),
    Case("model-path-pickled-only", lambda d, r: train("model.config=null", f"model.path={model_dir_pickled(d)}",
                                                       f"model.tokenizer={TOKENIZER}", f"output_dir={d / 'out'}"),
         ["pytorch_model.bin", "pickled", "convert them to safetensors"]),
    # output directory
    Case("output-dir-not-empty", lambda d, r: train(f"output_dir={non_empty_dir(d)}"),
         ["already exists", "resume=auto", "overwrite=true"]),
    Case("output-dir-unwritable", lambda d, r: train(f"output_dir={a_file(d)}/sub"),
         ["output_dir", "notes.txt", "writable output_dir"]),
    Case("output-dir-is-a-file", lambda d, r: train(f"output_dir={a_file(d)}"), ["is a file", "output_dir"]),
    # checkpoints and runs of another model
    Case("resume-checkpoint-of-another-model", lambda d, r: [
        "train", *TINY, "model=tiny_gpt2", f"resume={r / 'checkpoints' / 'step-000002'}", f"output_dir={d / 'out'}"],
        ["belongs to a different run", "tiny_llama", "tiny_gpt2", "same model"], uses_run=True),
    Case("resume-damaged-checkpoint", lambda d, r: train(f"resume={damaged_checkpoint(d, r)}", f"output_dir={d / 'out'}"),
         ["damaged", "trainable.safetensors", "resume=auto"], uses_run=True),
    Case("resume-not-a-checkpoint", lambda d, r: train(f"resume={d}", f"output_dir={d / 'out'}"),
         ["not an ftune checkpoint", "resume=auto"]),
    Case("eval-run-with-another-model", lambda d, r: ["eval", f"run={r}", "model=tiny_gpt2", f"out={d / 'eval'}"],
         ["tiny_gpt2"], uses_run=True),
    Case("merge-run-of-another-model", lambda d, r: ["merge", f"run={run_of_another_model(d, r)}", f"out={d / 'merged'}"],
         ["does not fit the base model", "the model it was trained on"], uses_run=True),
    Case("eval-not-a-run", lambda d, r: ["eval", f"run={d}"], ["not an ftune run directory", "run="]),
    # the control: verbose=true does show the traceback
    Case("verbose-shows-traceback", lambda d, r: train("model.config=null", f"model.path={d / 'no_model'}",
                                                       f"model.tokenizer={TOKENIZER}", f"output_dir={d / 'out'}",
                                                       "verbose=true"),
         ["does not exist"], verbose=True),
]


LATIN1 = ('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Translate caf\u00e9.", "output": "coffee"}\n'
          .encode("latin-1"))


def _parquet_null_label(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", "bad", "fine"], "label": ["pos", None, "pos"]}), d / "d.parquet")
    return d / "d.parquet"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bad_json(d: Path) -> Path:
    lines = [json.dumps(r) for r in INSTRUCTIONS[:2]] + ['{"instruction": "x", "output": }'] + [json.dumps(INSTRUCTIONS[3])]
    return _write(d / "bad.jsonl", "\n".join(lines).encode() + b"\n")


# --- running them -----------------------------------------------------------------------------
def shared_run(root: Path) -> Path:
    """A finished tiny_llama LoRA run with checkpoints at steps 1 and 2."""
    out = root / "shared_run"
    res = cli(["train", *TINY, "trainer.save_every=1", f"output_dir={out}"])
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def run_case(case: Case, root: Path, shared: Future | None) -> dict:
    d = root / case.id
    d.mkdir()
    run = shared.result() if case.uses_run else root / "no_shared_run"
    args = case.args(d, run) if callable(case.args) else list(case.args)
    environ = case.environ(d) if case.environ else env()
    before = snapshot(d, run)
    res = cli(args, environ)
    after = snapshot(d, run)
    if case.trains:
        after = {k: v for k, v in after.items() if not Path(k).is_relative_to(d / "out")}
    return {"args": args, "code": res.returncode, "out": res.stdout + res.stderr, "before": before, "after": after}


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    cases = [c for c in CASES if c.id in selected]
    root = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        shared = pool.submit(shared_run, root) if any(c.uses_run for c in cases) else None
        futures = {c.id: pool.submit(run_case, c, root, shared) for c in cases}
        yield futures


# rows whose check has a sibling row in the default suite (the same kind of refusal on the same path); each
# subprocess spends ~5 s importing torch and transformers, so these run with -m slow
SLOW = {"batch-size-zero", "max-steps-zero", "scheduler-target-outside-allowed", "cuda-without-gpu", "unknown-group-typo",
        "unknown-optimizer", "gradual-unfreezing-without-blocks", "unknown-metric-for-best", "logger-setting-typo",
        "gradual-unfreezing-on-two-processes", "unknown-distributed-strategy", "distill-student-layers-out-of-range",
        "distill-unknown-kl", "dann-on-a-causal-dataset", "negative-epochs-with-max-steps", "model-path-without-weights",
        "output-dir-is-a-file", "resume-damaged-checkpoint", "eval-not-a-run", "header-only-csv"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW else c for c in CASES],
                         ids=[c.id for c in CASES])
def test_bad_input_is_reported_clearly_and_changes_nothing(results, case):
    r = results[case.id].result()
    out = r["out"]
    shown = f"ftune {' '.join(r['args'])}\n--- exit {r['code']} ---\n{out}"
    print(shown)
    assert r["code"] == case.code, shown
    assert "error:" in out, shown
    message = out[out.index("error:"):].strip()
    if case.verbose:  # the traceback (stderr) comes after the paragraph (stdout)
        message = message.split("\n", 1)[0]
    assert "\n" not in message, f"the error is not one paragraph at the end:\n{shown}"
    missing = [w for w in case.expect if w.lower() not in message.lower()]
    assert not missing, f"{missing} not in the message:\n{shown}"
    assert ("Traceback" in out) == case.verbose, shown
    assert "HYDRA_FULL_ERROR" not in out, shown
    assert r["after"] == r["before"], f"files changed: {set(r['after'].items()) ^ set(r['before'].items())}\n{shown}"


def test_flawed_spreadsheet_file_trains_leniently_and_says_what_it_left_out(tmp_path):
    """A CSV as Excel saves it (byte-order mark, CRLF) with one row missing its label, under dataset.bad_rows=skip."""
    rows = "text,label\r\n" + "".join(f"{r['text']},{r['label']}\r\n" for r in REVIEWS) + "no label here,\r\n"
    data = _write(tmp_path / "reviews.csv", b"\xef\xbb\xbf" + rows.encode())
    out = tmp_path / "out"
    res = cli(["train", *TINY, *CLS, f"dataset.path={data}", "dataset.bad_rows=skip", f"output_dir={out}"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    assert json.loads((out / "metrics.json").read_text())["data/skipped_rows"] == 1
    assert f"skipped 1 bad row of {data} (dataset.bad_rows=skip): line 10 (the label is empty)" in res.stdout


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert SLOW <= {c.id for c in CASES} and len(CASES) - len(SLOW) >= 25
