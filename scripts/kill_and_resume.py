"""Kill a real `ftune train` with SIGKILL after a checkpoint, resume it, and check nothing was lost.

    python scripts/kill_and_resume.py                      # lora qlora full adalora prefix_tuning
    python scripts/kill_and_resume.py --methods lora,full --steps 16 --seed 7 --keep /tmp/kr
    python scripts/kill_and_resume.py --methods lora --extra trainer.packing=true   # overrides for every run

For each method it runs, on the CPU with a tiny Llama (12 steps over 10 examples, so the data order
crosses epoch boundaries; a checkpoint every 2 steps, the last 2 kept):

1. an uninterrupted reference run (all methods in one `ftune train -m` sweep: one process);
2. the same command, killed with SIGKILL at a random step after the first checkpoint was written
   (the script polls ``checkpoints/`` and ``metrics.jsonl``); for the methods of ``--damage``
   (default: full) it then also truncates the newest checkpoint;
3. the same command plus ``resume=auto`` in the killed run's output_dir (which must say which
   checkpoint it resumed from, and that it skipped the damaged one);

and compares the resumed run with the reference: every trained tensor of ``adapter/`` (peft's
adapter files or ``weights.safetensors``) and every logged training loss of ``metrics.jsonl``
must agree within 1e-6. It prints one PASS/FAIL row per method and exits non-zero on any FAIL.
``tests/e2e/test_resume.py`` runs the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FTUNE = Path(sys.executable).parent / "ftune"
METHODS = ("lora", "qlora", "full", "adalora", "prefix_tuning")
TOLERANCE = 1e-6
SAVE_EVERY = 2
DAMAGE = ("full",)  # methods whose newest checkpoint is also damaged after the kill (resume=auto must fall back)

# A tiny Llama on 10 short examples: 5 batches an epoch, so a 12-step run crosses epoch boundaries.
BASE = ["model=tiny_llama", "dataset=demo_instructions", "dataset.prompt_template=plain", "dataset.eval_fraction=null",
        "dataset.max_samples=10", "trainer.batch_size=2", "trainer.max_length=64", "trainer.log_every=1",
        f"trainer.save_every={SAVE_EVERY}", "trainer.keep_checkpoints=2", "trainer.progress=false", "seed=1234"]


def env() -> dict[str, str]:
    """One thread per run: the same arithmetic in every run, and two runs fit on two cores."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def train_args(method: str, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return ["train", f"method={method}", *BASE, f"trainer.max_steps={steps}", *extra]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(FTUNE), *args], env=env(), capture_output=True, text=True, timeout=timeout)


def logged_steps(metrics: Path) -> list[dict]:
    """The training rows of metrics.jsonl (a line being written may be cut: ignore it)."""
    rows = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                rows.append(row)
    return rows


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


@dataclass
class Result:
    method: str
    ok: bool = False
    killed_at: int | None = None  # last step logged when the SIGKILL landed
    checkpoints_at_kill: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    weight_diff: float | None = None
    loss_diff: float | None = None
    steps_compared: int = 0
    problem: str = ""
    seconds: float = 0.0
    out: Path | None = None  # the killed and resumed run's output_dir
    seed: int | None = None
    note: str = ""

    def row(self) -> str:
        def num(x):
            return "-" if x is None else f"{x:.3g}"

        return (f"{self.method:<14} {num(self.killed_at):>9} {num(self.resumed_from):>12} {num(self.weight_diff):>11} "
                f"{num(self.loss_diff):>11} {self.steps_compared:>6}  {'PASS' if self.ok else 'FAIL'}  "
                f"{self.note}{'; ' if self.note and self.problem else ''}{self.problem}")


HEADER = (f"{'method':<14} {'killed at':>9} {'resumed from':>12} {'max |dw|':>11} {'max |dloss|':>11} "
          f"{'steps':>6}  result")


def kill_after_checkpoint(args: list[str], out: Path, target: int, timeout: float = 300) -> tuple[int, list[str], str]:
    """Start `ftune train`, SIGKILL it once a checkpoint exists and step ``target`` was logged.

    Returns (the last logged step, the checkpoints present at the kill, the output). Raises
    RuntimeError when the run ended before it could be killed.
    """
    log = out.parent / f"{out.name}.kill.log"
    with log.open("w") as f:
        proc = subprocess.Popen([str(FTUNE), *args, f"output_dir={out}"], env=env(), stdout=f,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                rows = logged_steps(out / "metrics.jsonl")
                if checkpoints(out) and rows and rows[-1]["step"] >= target:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait()
    text = log.read_text()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run ended (exit {proc.returncode}) before it could be killed:\n{text[-2000:]}")
    rows = logged_steps(out / "metrics.jsonl")
    return (rows[-1]["step"] if rows else 0), checkpoints(out), text


def trained_tensors(run_dir: Path) -> dict:
    """Every tensor of the run's adapter/ safetensors files, by file and name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted((run_dir / "adapter").glob("*.safetensors")):
        for name, t in load_file(str(file)).items():
            tensors[f"{file.name}:{name}"] = t
    return tensors


def compare(ref: Path, got: Path, resumed_from: int) -> tuple[float, float, int, str]:
    """(max abs weight diff, max abs loss diff after the resume point, steps compared, problem)."""
    a, b = trained_tensors(ref), trained_tensors(got)
    if not a:
        return float("nan"), float("nan"), 0, f"no adapter/*.safetensors in {ref}"
    if set(a) != set(b):
        return float("nan"), float("nan"), 0, f"different tensors: {sorted(set(a) ^ set(b))[:3]}"
    weight = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    ra, rb = logged_steps(ref / "metrics.jsonl"), logged_steps(got / "metrics.jsonl")
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        return weight, float("nan"), 0, (f"logged steps differ: reference {[r['step'] for r in ra]}, "
                                         f"resumed {[r['step'] for r in rb]}")
    after = [(x, y) for x, y in zip(ra, rb, strict=True) if x["step"] > resumed_from]
    loss = max((abs(x["loss"] - y["loss"]) for x, y in zip(ra, rb, strict=True)), default=0.0)
    lr = max((abs(x["lr"] - y["lr"]) for x, y in zip(ra, rb, strict=True)), default=0.0)
    problem = "" if lr <= TOLERANCE else f"learning rates differ by {lr:.3g}"
    return weight, loss, len(after), problem


def kill_and_resume(method: str, workdir: Path, steps: int, rng: random.Random, attempts: int = 3,
                    damage_latest: bool = False, extra: tuple[str, ...] = ()) -> Result:
    """Steps 2 and 3 for one method: kill after a checkpoint, then resume=auto.

    ``damage_latest``: kill after two checkpoints exist and truncate the newest before resuming;
    resume=auto must say so, fall back to the one before, and still end exactly as the reference.
    """
    res = Result(method)
    start = time.monotonic()
    args = train_args(method, steps, extra)
    try:
        for attempt in range(attempts):
            out = workdir / f"{method}-killed-{attempt}"
            target = rng.randint((2 if damage_latest else 1) * SAVE_EVERY + 1, steps - 1)
            try:
                res.killed_at, res.checkpoints_at_kill, _ = kill_after_checkpoint(args, out, target)
                break
            except RuntimeError as e:
                if attempt == attempts - 1:
                    raise
                print(f"[{method}] retrying: {str(e).splitlines()[0]}", file=sys.stderr)
        if damage_latest:
            newest = out / "checkpoints" / res.checkpoints_at_kill[-1] / "trainable.safetensors"
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        done = run([*args, f"output_dir={out}", "resume=auto"])
        text = done.stdout + done.stderr
        if done.returncode != 0:
            res.problem = f"resume=auto failed (exit {done.returncode}): {text.strip()[-1500:]}"
            return res
        m = re.search(r"Resuming from .*?\(step (\d+) of \d+\)", text, re.S)
        if not m:
            res.problem = f"the resumed run did not say which checkpoint it used:\n{text[-1500:]}"
            return res
        res.resumed_from, res.out = int(m.group(1)), out
        if damage_latest:
            res.note = f"{res.checkpoints_at_kill[-1]} damaged"
            fell_back = f"Falling back to {res.checkpoints_at_kill[-2]}" in text
            if not fell_back or res.resumed_from != int(res.checkpoints_at_kill[-2].split("-")[1]):
                res.problem = f"resume=auto did not fall back to {res.checkpoints_at_kill[-2]}:\n{text[-1500:]}"
            else:
                res.note += f", fell back to {res.checkpoints_at_kill[-2]}"
    except Exception as e:  # noqa: BLE001  (reported in the table)
        res.problem = f"{type(e).__name__}: {e}"
    finally:
        res.seconds = time.monotonic() - start
    return res


def reference_runs(methods: list[str], workdir: Path, steps: int,
                   extra: tuple[str, ...] = ()) -> dict[str, tuple[Path, str]]:
    """Uninterrupted runs: one `ftune train -m method=a,b,..` sweep (one process: imports paid once).

    A method whose sweep job left no adapter (the sweep stopped early) gets a run of its own.
    Returns {method: (run directory, problem or "")}.
    """
    sweep = workdir / "reference"
    done = run(["train", "-m", f"method={','.join(methods)}", *BASE, f"trainer.max_steps={steps}", *extra,
                f"output_dir={sweep}"], timeout=900)
    refs = {}
    for i, m in enumerate(methods):
        out = sweep / f"{i}_{m}"
        if (out / "adapter").is_dir():
            refs[m] = (out, "")
            continue
        out = workdir / f"{m}-reference"
        single = run([*train_args(m, steps, extra), f"output_dir={out}"])
        refs[m] = (out, "" if single.returncode == 0 else
                   f"reference run failed (exit {single.returncode}): {(single.stdout + single.stderr).strip()[-1500:]}")
    if done.returncode != 0:
        print(f"kill_and_resume: the reference sweep exited {done.returncode}; missing runs were redone one by one",
              file=sys.stderr)
    return refs


def finish(res: Result, ref: Path, ref_problem: str, steps: int) -> Result:
    """Compare a killed-and-resumed run with its reference; sets ``ok`` and ``problem``."""
    if not res.problem and ref_problem:
        res.problem = ref_problem
    if not res.problem:
        res.weight_diff, res.loss_diff, res.steps_compared, res.problem = compare(ref, res.out, res.resumed_from)
        if not res.problem:
            bad = [name for name, value in (("weights", res.weight_diff), ("losses", res.loss_diff))
                   if not value <= TOLERANCE]
            if res.steps_compared == 0:
                res.problem = "no logged step after the resume point"
            elif not 0 < res.resumed_from < steps:
                res.problem = f"resumed from step {res.resumed_from}, not from a checkpoint within the run"
            elif bad:
                res.problem = f"{' and '.join(bad)} differ from the uninterrupted run by more than {TOLERANCE}"
    res.ok = not res.problem
    return res


class Matrix:
    """Reference sweep plus kill-and-resume of every method, submitted to ``pool`` (run concurrently)."""

    def __init__(self, pool: Executor, methods: list[str], workdir: Path, steps: int = 12, seed: int | None = None,
                 damage: tuple[str, ...] = DAMAGE, extra: tuple[str, ...] = ()):
        self.methods, self.workdir, self.steps = list(methods), workdir, steps
        self.seed = random.randrange(10**6) if seed is None else seed
        workdir.mkdir(parents=True, exist_ok=True)
        self.refs = pool.submit(reference_runs, self.methods, workdir, steps, extra) if self.methods else None
        self.kills = {m: pool.submit(kill_and_resume, m, workdir, steps, random.Random(f"{self.seed}-{m}"),
                                     damage_latest=m in damage, extra=extra) for m in self.methods}
        self.done: dict[str, Result] = {}

    def reference(self, method: str) -> tuple[Path, str]:
        return self.refs.result()[method]

    def result(self, method: str) -> Result:
        """The finished Result of ``method`` (waits for its runs)."""
        if method not in self.done:
            res = self.kills[method].result()
            res.seed = self.seed
            self.done[method] = finish(res, *self.reference(method), self.steps)
        return self.done[method]


def run_matrix(methods: list[str], workdir: Path, steps: int = 12, seed: int | None = None,
               jobs: int = 2, damage: tuple[str, ...] = DAMAGE, extra: tuple[str, ...] = ()) -> list[Result]:
    """Reference, kill and resume for every method, ``jobs`` processes at a time; one Result each."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        matrix = Matrix(pool, methods, workdir, steps, seed, damage, extra)
        print(f"kill_and_resume: seed={matrix.seed} steps={steps} workdir={workdir}", file=sys.stderr)
        return [matrix.result(m) for m in methods]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of each run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random kill steps (default: random)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    p.add_argument("--damage", default=",".join(DAMAGE),
                   help="methods whose newest checkpoint is truncated after the kill (default: %(default)s)")
    p.add_argument("--extra", nargs="*", default=[], help="config overrides added to every run, e.g. trainer.packing=true")
    a = p.parse_args(argv)

    from ftune.methods import METHODS as REGISTERED

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    missing = [m for m in methods if m not in REGISTERED]
    methods = [m for m in methods if m in REGISTERED]
    workdir = a.keep or Path(tempfile.mkdtemp(prefix="ftune-kill-"))
    try:
        results = run_matrix(methods, workdir, a.steps, a.seed, a.jobs, tuple(a.damage.split(",")), tuple(a.extra))
    finally:
        if a.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(HEADER)
    for r in results:
        print(r.row())
    for m in missing:
        print(f"{m:<14} {'':>9} {'':>12} {'':>11} {'':>11} {'':>6}  SKIP  not a registered method")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed, {len(missing)} skipped "
          f"(a step is killed after checkpoint step-{SAVE_EVERY:06d} exists; tolerance {TOLERANCE})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
