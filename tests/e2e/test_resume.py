"""Crash safety of the real `ftune train` CLI: SIGKILL and resume, Ctrl-C / SIGTERM, NaN losses.

Every run is a real CPU subprocess on a tiny Llama. All runs of this file are started up front on a
pool of two workers (one torch thread each), so the file takes about as long as its CPU time / 2;
each test waits for its own runs. The kill-and-resume logic is ``scripts/kill_and_resume.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ftune.methods import METHODS

from conftest import write_target

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kill_and_resume", REPO / "scripts" / "kill_and_resume.py")
kr = sys.modules.setdefault("kill_and_resume", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(kr)

STEPS = 12
DISTILL = ("strategy=distill", "strategy.teacher=tiny_llama", "model.init_seed=1")  # teacher and student differ
AVAILABLE = [m for m in kr.METHODS if m in METHODS]


def interrupt(args: list[str], out: Path, sig: int, after_step: int) -> tuple[int, str, int]:
    """Run `ftune train`, send ``sig`` once a checkpoint exists and ``after_step`` was logged.

    Returns (exit code, output, last logged step when the signal was sent).
    """
    log = out.parent / f"{out.name}.{sig}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([str(kr.FTUNE), *args, f"output_dir={out}"], env=kr.env(), stdout=f,
                                stderr=subprocess.STDOUT)
        sent_at = -1
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            rows = kr.logged_steps(out / "metrics.jsonl")
            if kr.checkpoints(out) and rows and rows[-1]["step"] >= after_step:
                sent_at = rows[-1]["step"]
                proc.send_signal(sig)
                break
            time.sleep(0.002)
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, log.read_text(), sent_at


def stopped_at(text: str, sig: int) -> int:
    """The step in "Interrupted by signal N at step S; ..." (-1 if absent)."""
    m = re.search(rf"Interrupted by signal {sig} at step (\d+);", text)
    return int(m.group(1)) if m else -1


def signal_chain(workdir: Path) -> dict:
    """lora: Ctrl-C (SIGINT) at step >= 3, resume=auto, SIGTERM two steps later, resume=auto to the end."""
    args, out = kr.train_args("lora", STEPS), workdir / "signals"
    first = interrupt(args, out, signal.SIGINT, 3)
    ckpts_after_first = kr.checkpoints(out)
    # steps up to the first stop are already in metrics.jsonl: wait for two new ones
    second = interrupt([*args, "resume=auto"], out, signal.SIGTERM, stopped_at(first[1], signal.SIGINT) + 2)
    ckpts_after_second = kr.checkpoints(out)
    last = kr.run([*args, f"output_dir={out}", "resume=auto"])
    return {"out": out, "first": first, "second": second, "ckpts": (ckpts_after_first, ckpts_after_second),
            "last": (last.returncode, last.stdout + last.stderr)}


def nan_failure(workdir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Full fine-tuning, SGD at lr=1e30: step 1 is finite and checkpointed, the loss of step 2 is not.

    (With LoRA the same lr does not give NaN: RMSNorm squashes the huge activations to zero.)
    """
    out = workdir / "nan"
    res = kr.run([*kr.train_args("full", 6), "optimizer=sgd", "optimizer.lr=1e30", "trainer.save_every=1",
                  f"output_dir={out}"])
    return out, res


def poisoned_model(workdir: Path) -> tuple[Path, Path]:
    """A tiny Llama saved with +inf embeddings for the tokens of two 'poisoned' rows, and a dataset.

    Batches holding those rows have a NaN loss (a real one: inf through RMSNorm); the others train.
    """
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftune.config import config_dir
    from ftune.data.formats import PROMPT_TEMPLATES

    cfg = OmegaConf.load(config_dir() / "model" / "tiny_llama.yaml")
    tok_dir = REPO / "ftune" / "assets" / "tiny_tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    rows = [json.loads(line) for line in (REPO / "ftune/data/bundled/instructions.jsonl").read_text().splitlines()[:8]]
    poison = [{"instruction": "Say it.", "output": "zqzqzq vxvxvx"}, {"instruction": "Say it.", "output": "zqzqzq jkjkjk"}]
    with_input, without_input = PROMPT_TEMPLATES["plain"]
    clean_ids = {tok.bos_token_id, tok.eos_token_id}
    for r in rows + [{"instruction": p["instruction"], "output": ""} for p in poison]:
        prompt = (with_input if r.get("input") else without_input).format(instruction=r["instruction"],
                                                                           input=r.get("input"))
        for ids in tok([prompt, r["output"]], add_special_tokens=False)["input_ids"]:
            clean_ids |= set(ids)
    bad_ids = sorted({i for r in poison for i in tok(r["output"], add_special_tokens=False)["input_ids"]} - clean_ids)
    assert bad_ids, "the poisoned rows share every token with the clean ones"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**OmegaConf.to_container(cfg.config)))
    with torch.no_grad():
        model.get_input_embeddings().weight[bad_ids] = float("inf")
    model_dir = workdir / "poisoned_model"
    model.save_pretrained(str(model_dir))
    data = workdir / "poisoned.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:4] + poison[:1] + rows[4:] + poison[1:]))
    return model_dir, data


def nan_skip(workdir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    model_dir, data = poisoned_model(workdir)
    out = workdir / "nan_skip"
    res = kr.run([*kr.train_args("lora", 6), "model.config=null", f"model.path={model_dir}",
                  f"model.tokenizer={REPO / 'ftune/assets/tiny_tokenizer'}", f"dataset.path={data}",
                  "trainer.skip_nan_batches=true", f"output_dir={out}"])
    return out, res


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The subprocesses of the selected tests of this file, started at once on two workers."""
    items = [item for item in request.session.items if item.module is request.module]
    selected = {item.originalname for item in items}
    chosen = {item.callspec.params["method"] for item in items
              if item.originalname == "test_sigkill_then_resume_auto_matches_an_uninterrupted_run"}
    if "test_ctrl_c_and_sigterm_save_a_checkpoint_and_resume_exactly" in selected:
        chosen.add("lora")  # its signal chain starts from the lora run's directory
    workdir = tmp_path_factory.mktemp("resume")
    with ThreadPoolExecutor(max_workers=2) as pool:
        methods = [m for m in AVAILABLE if m in chosen]
        matrix = kr.Matrix(pool, methods, workdir, STEPS)
        packed = (kr.Matrix(pool, ["lora"], workdir / "packed", STEPS, damage=(), extra=("trainer.packing=true",))
                  if "test_sigkill_then_resume_auto_is_exact_with_packing" in selected else None)
        distill = (kr.Matrix(pool, ["lora"], workdir / "distill", STEPS, damage=(), extra=DISTILL)
                   if "test_sigkill_then_resume_auto_is_exact_with_distillation" in selected else None)
        dann = (kr.Matrix(pool, ["lora"], workdir / "dann", STEPS, damage=(),
                          extra=("model=tiny_bert", "dataset=sentiment", *write_target(workdir / "dann_data")))
                if "test_sigkill_then_resume_auto_is_exact_with_dann" in selected else None)
        jobs = {}
        for name, job in (("test_ctrl_c_and_sigterm_save_a_checkpoint_and_resume_exactly", signal_chain),
                          ("test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint", nan_failure),
                          ("test_skip_nan_batches_skips_and_counts_them", nan_skip)):
            if name in selected:
                jobs[job.__name__] = pool.submit(job, workdir)
        jobs["packed"] = packed
        jobs["distill"] = distill
        jobs["dann"] = dann
        yield matrix, jobs
        pool.shutdown(wait=True, cancel_futures=True)


# lora and full (whose newest checkpoint is also damaged) in the default suite; the other methods are slow
SLOW_RESUME = ("qlora", "adalora", "prefix_tuning")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_RESUME else m
                                    for m in kr.METHODS])
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(runs, method):
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered yet")
    matrix, _ = runs
    res = matrix.result(method)
    print(kr.HEADER)
    print(res.row())
    assert res.ok, f"{res.problem} (kill seed {res.seed}; kill at step {res.killed_at}, checkpoints {res.checkpoints_at_kill})"
    assert res.killed_at >= kr.SAVE_EVERY and res.checkpoints_at_kill
    assert res.weight_diff <= 1e-6 and res.loss_diff <= 1e-6 and res.steps_compared >= 1


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_exact_with_packing(runs):
    """trainer.packing=true: the packed rows of every epoch are rebuilt the same on resume."""
    _, jobs = runs
    res = jobs["packed"].result("lora")
    print(kr.HEADER)
    print(res.row())
    assert res.ok, f"{res.problem} (kill seed {res.seed}; kill at step {res.killed_at}, checkpoints {res.checkpoints_at_kill})"
    assert res.weight_diff <= 1e-6 and res.loss_diff <= 1e-6 and res.steps_compared >= 1
    rows = kr.logged_steps(res.out / "metrics.jsonl")
    assert rows[-1]["epoch"] > 1  # the run crossed an epoch boundary


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_exact_with_distillation(runs):
    """strategy=distill: the teacher is rebuilt and the strategy's loss sums come back with the checkpoint."""
    _, jobs = runs
    res = jobs["distill"].result("lora")
    print(kr.HEADER)
    print(res.row())
    assert res.ok, f"{res.problem} (kill seed {res.seed}; kill at step {res.killed_at}, checkpoints {res.checkpoints_at_kill})"
    assert res.weight_diff <= 1e-6 and res.loss_diff <= 1e-6 and res.steps_compared >= 1
    ref, _ = jobs["distill"].reference("lora")
    rows = [[{k: v for k, v in r.items() if k.startswith("strategy/")} for r in kr.logged_steps(d / "metrics.jsonl")]
            for d in (ref, res.out)]
    assert rows[0] == rows[1] and all(r for r in rows[0])


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_exact_with_dann(runs):
    """strategy=dann on tiny BERT: the target feed of every epoch, the domain classifier and its optimizer state,
    and the strategy's sums come back with the checkpoint: weights and every logged row as uninterrupted."""
    _, jobs = runs
    res = jobs["dann"].result("lora")
    print(kr.HEADER)
    print(res.row())
    assert res.ok, f"{res.problem} (kill seed {res.seed}; kill at step {res.killed_at}, checkpoints {res.checkpoints_at_kill})"
    assert res.weight_diff <= 1e-6 and res.loss_diff <= 1e-6 and res.steps_compared >= 1
    ref, _ = jobs["dann"].reference("lora")
    rows = [[{k: v for k, v in r.items() if k.startswith("strategy/")} for r in kr.logged_steps(d / "metrics.jsonl")]
            for d in (ref, res.out)]
    assert rows[0] == rows[1] and all("strategy/domain_accuracy" in r for r in rows[0])
    assert (ref / "domain_classifier.safetensors").read_bytes() == (res.out / "domain_classifier.safetensors").read_bytes()


def test_ctrl_c_and_sigterm_save_a_checkpoint_and_resume_exactly(runs):
    matrix, jobs = runs
    r = jobs["signal_chain"].result()
    (code1, text1, at1), (code2, text2, at2) = r["first"], r["second"]
    assert at1 >= 3 and code1 == 1, text1
    assert "Interrupted by signal 2" in text1 and "resume=auto" in text1 and "Traceback" not in text1, text1
    stopped1 = stopped_at(text1, signal.SIGINT)
    assert f"step-{stopped1:06d}" in r["ckpts"][0]  # the checkpoint of the step it stopped at
    assert f"(step {stopped1} of {STEPS})" in text2, text2
    assert at2 > stopped1 and code2 == 1 and "Interrupted by signal 15" in text2 and "Traceback" not in text2, text2
    stopped2 = stopped_at(text2, signal.SIGTERM)
    assert f"step-{stopped2:06d}" in r["ckpts"][1]
    code3, text3 = r["last"]
    assert code3 == 0 and f"(step {stopped2} of {STEPS})" in text3, text3
    ref, problem = matrix.reference("lora")
    assert not problem, problem
    weight, loss, _, problem = kr.compare(ref, r["out"], stopped2)
    assert not problem and weight <= 1e-6 and loss <= 1e-6, (problem, weight, loss)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(runs):
    out, res = runs[1]["nan_failure"].result()
    text = res.stdout + res.stderr
    assert res.returncode == 1, text
    assert "step 2" in text and ("nan" in text or "inf" in text) and "optimizer.lr" in text, text
    assert "skip_nan_batches" in text and "Traceback" not in text, text
    assert kr.checkpoints(out) == ["step-000001"]
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()


def test_skip_nan_batches_skips_and_counts_them(runs):
    out, res = runs[1]["nan_skip"].result()
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_nan_batches"] >= 1 and metrics["train_steps"] == 6
    losses = [r["loss"] for r in kr.logged_steps(out / "metrics.jsonl")]
    assert len(losses) == 6 and all(loss == loss and abs(loss) < 1e3 for loss in losses)
    tensors = kr.trained_tensors(out)
    assert tensors and all(bool(t.isfinite().all()) for t in tensors.values())
