"""Several processes (DDP and FSDP2 on CPU, gloo): real `ftune train` runs with trainer.num_processes=2 and torchrun.

A 2-process run with trainer.batch_size=B must train on the same examples per optimizer step as a
1-process run with batch_size=B and grad_accum=2, so its loss curve, evaluations and final weights
match that run's (within 1e-5), with trainer.distributed=ddp and with fsdp (FSDP2, each rank holding
a slice of every tensor). Each 2-process run costs 10-20 s of CPU here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FTUNE, compose_train

TOL = 1e-5
BASE = ["train", "model=tiny_llama", "method=lora", "method.dropout=0", "dataset=demo_instructions",
        "dataset.prompt_template=plain", "dataset.max_samples=18", "dataset.eval_fraction=0.15",
        "trainer.batch_size=2", "trainer.max_length=64", "trainer.log_every=1", "trainer.progress=false",
        "trainer.max_steps=6", "trainer.eval_every=3", "seed=7"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def ftune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(FTUNE), *args], env=env(), capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ftune", *args], env=env(), capture_output=True, text=True, timeout=timeout)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted((out / "adapter").glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return tensors


def assert_same_run(a: Path, b: Path, after_step: int = 0) -> None:
    """Same logged losses, learning rates and eval losses (steps after ``after_step``), same final weights."""
    ra, rb = rows(a), rows(b)
    assert [(r["step"], sorted(r)) for r in ra] == [(r["step"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        if x["step"] > after_step:
            for key in ("loss", "lr", "eval/loss"):
                if key in x:
                    assert abs(x[key] - y[key]) < TOL, (key, x, y)
    wa, wb = weights(a), weights(b)
    assert wa and set(wa) == set(wb)
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert diff < TOL, diff
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert abs(ma["eval/loss"] - mb["eval/loss"]) < TOL


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference LoRA run: one process, batch 2 x grad_accum 2."""
    one = tmp_path_factory.mktemp("reference") / "one"
    started = time.monotonic()
    r1 = ftune(*BASE, "trainer.grad_accum=2", f"output_dir={one}")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    print(f"1 process x grad_accum 2: {time.monotonic() - started:.1f} s")
    return one


# DDP started by trainer.num_processes is the slow variant: the default suite's 2-process DDP equality test is
# test_accelerate_launch_stops_early_and_keeps_the_best_like_one_process
@pytest.mark.parametrize("kind", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_processes_train_like_one_with_accumulation(kind, one_process, tmp_path):
    """trainer.num_processes=2, batch 2 == one process, batch 2 x grad_accum 2: losses, evals, weights; the
    adapter is whole (fsdp: gathered from the ranks' slices) and loads with peft; rank 0 alone wrote the run
    directory."""
    two, one = tmp_path / "two", one_process
    started = time.monotonic()
    r2 = ftune(*BASE, "trainer.num_processes=2", f"trainer.distributed={kind}", f"output_dir={two}")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    print(f"2 processes ({kind}): {time.monotonic() - started:.1f} s")
    assert f"× 2 processes ({kind})" in r2.stdout
    assert r2.stdout.count("ftune train  model") == 1  # one header, one metrics table: rank 0 prints
    assert_same_run(two, one)
    steps = [r["step"] for r in rows(two) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once (not once per rank)
    assert any("eval/loss" in r and r["step"] == 3 for r in rows(two))  # the sharded evaluation during training
    assert_loads_whole(two, one)


def assert_loads_whole(two: Path, one: Path) -> None:
    """The adapter of ``two`` loads with PeftModel.from_pretrained: whole tensors, equal to those of ``one``."""
    from peft import PeftModel, get_peft_model_state_dict

    from ftune.config import validate_group
    from ftune.models import build_model

    base = build_model(validate_group(compose_train(["model=tiny_llama"]), "model"), "causal_lm")
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(two / "adapter")))
    saved = {k.split(":", 1)[1]: v for k, v in weights(one).items()}
    assert set(loaded) == set(saved) and saved
    for name, value in loaded.items():  # whole tensors, equal to the one-process run's
        assert value.shape == saved[name].shape
        assert float((value - saved[name]).abs().max()) < TOL


def test_accelerate_launch_stops_early_and_keeps_the_best_like_one_process(tmp_path):
    """Started by `accelerate launch` (2 processes, its multi-process launcher on CPU), with early stopping
    and keep_best: the processes stop at the same step as one process with grad_accum=2, keep the same best
    step, and end with the same losses and weights. (The eval loss falls at every evaluation here, so
    greater_is_better=true makes each one worse than the first: best step 2, stop at step 6 of 16.)"""
    args = [a for a in BASE if not a.startswith(("trainer.max_steps", "trainer.eval_every"))] + [
        "scheduler=constant", "optimizer.lr=0.3", "trainer.max_steps=16", "trainer.eval_every=2",
        "trainer.early_stopping_patience=2", "trainer.keep_best=true", "trainer.greater_is_better=true"]
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                        "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", "ftune", *args,
                        f"output_dir={two}"], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "× 2 processes (ddp)" in r.stdout
    r1 = ftune(*args, "trainer.grad_accum=2", f"output_dir={one}")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    assert_same_run(two, one)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert ma["stopped_early_at_step"] == mb["stopped_early_at_step"] == 6
    assert ma["best_step"] == mb["best_step"] == ma["weights_from_step"] == 2


@pytest.mark.slow  # 21 s; tests/e2e/test_bad_inputs.py's rows cover the message on one process
def test_bad_input_on_one_rank_ends_both_with_the_message(tmp_path):
    """Rank 1 reads a data file that does not exist: both processes end (no hang), exit 2, the paragraph last."""
    data = tmp_path / "data0.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "input": "", "output": f"{i}"}) + "\n"
                            for i in range(12)))
    out = tmp_path / "bad"
    r = ftune(*BASE, "trainer.num_processes=2", f"dataset.path={tmp_path}/data${{oc.env:RANK,0}}.jsonl",
              f"output_dir={out}", timeout=180)
    text = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, text
    last = text.splitlines()[-1]
    assert last.startswith("error: Data file") and "data1.jsonl" in last and "does not exist" in last, text
    assert "Traceback" not in text and "ChildFailedError" not in text
    assert not out.exists() or not any(p.name != ".hydra" for p in out.iterdir())


@pytest.mark.slow
def test_full_fine_tuning_under_torchrun_equals_one_process(tmp_path):
    """Started by torchrun (`-m ftune`), full fine-tuning: the same run as one process with grad_accum=2."""
    two, one = tmp_path / "two", tmp_path / "one"
    args = [a for a in BASE if not a.startswith("method")] + ["method=full", "optimizer.lr=1e-4"]
    r2 = torchrun(*args, f"output_dir={two}")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    r1 = ftune(*args, "trainer.grad_accum=2", f"output_dir={one}")
    assert r1.returncode == 0, r1.stdout + r1.stderr
    assert_same_run(two, one)


@pytest.mark.slow  # 45 s; the default suite's FSDP2 test checks the gathered save (2 processes vs 1)
def test_fsdp_full_fine_tuning_resumes_on_two_and_on_one_process(tmp_path):
    """FSDP2, full fine-tuning: SIGTERM mid-run saves a checkpoint gathered from the ranks' slices; resume=auto
    on 2 processes and (a copy) on 1 process with grad_accum=2 both end as the uninterrupted 1-process run:
    the same losses before and after the interruption, the same final weights (within 1e-5)."""
    args = [a for a in BASE if not a.startswith("method")] + [
        "method=full", "optimizer.lr=1e-4", "trainer.max_steps=8", "trainer.save_every=2", "trainer.distributed=fsdp"]
    ref = tmp_path / "ref"
    r = ftune(*args, "trainer.grad_accum=2", f"output_dir={ref}")  # one process: fsdp does not apply
    assert r.returncode == 0, r.stdout + r.stderr
    out, alone = tmp_path / "fsdp", tmp_path / "alone"
    code, text = interrupted(args, out, kill_rank=False)
    assert code != 0 and "Interrupted by signal 15" in text.strip().splitlines()[-1], text
    shutil.copytree(out, alone)
    for where, more in ((out, ["trainer.num_processes=2"]), (alone, ["trainer.grad_accum=2"])):
        r = ftune(*args, *more, f"output_dir={where}", "resume=auto")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Resuming from" in r.stdout
        assert_same_run(where, ref)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def interrupted(args: list[str], out: Path, kill_rank: bool) -> tuple[int, str]:
    """Start 2 processes; once a checkpoint exists and step 3 was logged, SIGKILL one rank (or SIGTERM the
    launcher). Returns (exit code, output)."""
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([str(FTUNE), *args, "trainer.num_processes=2", f"output_dir={out}"], env=env(),
                                stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = [r for r in rows(out) if "loss" in r] if (out / "metrics.jsonl").exists() else []
            if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")) and done \
                    and done[-1]["step"] >= 3:
                if kill_rank:
                    os.kill(children(proc.pid)[-1], signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
        proc.wait(timeout=120)
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_kill_and_resume_on_two_and_on_one_process(tmp_path):
    """SIGKILL a rank (or SIGTERM the launcher) mid-run; resume=auto on 2 processes, and on 1 process with
    grad_accum=2: the same losses and final weights as the uninterrupted run."""
    args = [*BASE, "trainer.max_steps=8", "trainer.save_every=2"]
    ref = tmp_path / "ref"
    assert ftune(*args, "trainer.grad_accum=2", f"output_dir={ref}").returncode == 0
    for name, kill_rank, resume_on in (("killed2", True, 2), ("killed1", True, 1), ("term2", False, 2)):
        out = tmp_path / name
        code, text = interrupted(args, out, kill_rank)
        assert code != 0, text
        last = text.strip().splitlines()[-1]
        if kill_rank:
            assert "killed by signal 9 (SIGKILL)" in last and "resume=auto" in last, text
        else:
            assert "Interrupted by signal 15" in last and "resume=auto" in last, text
        more = ["trainer.num_processes=2"] if resume_on == 2 else ["trainer.grad_accum=2"]
        r = ftune(*args, *more, f"output_dir={out}", "resume=auto")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Resuming from" in r.stdout
        assert_same_run(out, ref)
