"""`ftune train strategy=distill` from the real CLI: a teacher run directory (a short training run) with a
student cut from its layers, which `ftune eval` then loads back; and a teacher named by a model config.

The teacher trains in this process (the CLI's job function, without a second interpreter start) and the
two distillation runs are CLI subprocesses side by side."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ftune.train import train

from conftest import compose_train, run_cli

TINY = ["model=tiny_llama", "dataset=demo_instructions", "dataset.prompt_template=plain", "trainer.max_steps=2",
        "trainer.batch_size=2", "trainer.max_length=64", "trainer.progress=false", "dataset.max_samples=8",
        "dataset.max_eval_samples=4", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_cli")
    with ThreadPoolExecutor(max_workers=2) as pool:
        by_name = pool.submit(run_cli, "train", *TINY, "strategy=distill", "strategy.teacher=tiny_llama",
                              "strategy.kl=reverse", "model.init_seed=1", f"output_dir={root / 'by_name'}")
        train(compose_train([*TINY, "model.config.num_hidden_layers=4"], root / "teacher", small=False))
        student = run_cli("train", *TINY, "strategy=distill", f"strategy.teacher={root / 'teacher'}",
                          "strategy.student_layers=[0,3]", "method=full", f"output_dir={root / 'student'}")
        yield root, student, by_name.result()


def test_student_cut_from_a_teacher_run_trains_and_loads_back(runs):
    root, student, _ = runs
    out = root / "student"
    assert student.returncode == 0, student.stdout + student.stderr
    assert "distill: teacher" in student.stdout and "student: blocks [0, 3] of the teacher" in student.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy/kd_loss"] >= 0 and metrics["strategy/task_loss"] > 0
    assert metrics["strategy/student_params"] < metrics["strategy/teacher_params"]
    assert "strategy/teacher_eval_loss" in metrics
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "strategy/kd_loss" in r] == [1, 2]
    cfg = OmegaConf.load(out / "config.yaml")
    assert cfg.strategy.name == "distill" and list(cfg.strategy.student_layers) == [0, 3]
    assert Path(cfg.model.path) == (out / "student").resolve()
    assert json.loads((out / "student" / "config.json").read_text())["num_hidden_layers"] == 2
    # `ftune eval run=` rebuilds the student from student/ and its trained weights: the run's own eval loss
    from hydra import compose, initialize_config_dir

    from ftune.config import config_dir
    from ftune.evaluate import run_eval

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        report = run_eval(compose(config_name="eval", overrides=[f"run={out}"]))
    assert report["eval/loss"] == pytest.approx(metrics["eval/loss"], rel=1e-5)


def test_teacher_named_by_a_model_config(runs):
    root, _, by_name = runs
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    metrics = json.loads((root / "by_name" / "metrics.json").read_text())
    assert metrics["strategy/kd_loss"] > 0  # init_seed 1 against the teacher's 0: they disagree
    assert metrics["strategy/teacher_params"] == metrics["strategy/student_params"]
