"""strategy=multitask from the real CLI on tiny BERT with LoRA: the task list on the command line (Hydra's
`[{...}]` syntax), then `ftune eval run=` and `ftune compare`; and (slow) the list in a user's own strategy
YAML under `--config-dir`."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, tasks_override, write_tasks

TINY = ["model=tiny_bert", "dataset=classification", "method=lora", "trainer.batch_size=4", "trainer.max_length=32",
        "trainer.max_steps=4", "trainer.log_every=2", "trainer.progress=false"]


def test_tasks_from_the_command_line_train_evaluate_and_compare(tmp_path):
    files = write_tasks(tmp_path / "data")
    out = tmp_path / "cli"
    res = run_cli("train", *TINY, "strategy=multitask", tasks_override(files, weight_b=2.0),
                  "strategy.sampling=temperature", f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "multitask (a head each): a 24 examples" in res.stdout and "sampling=temperature" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval/a/accuracy", "eval/b/accuracy", "eval/a/loss", "eval/b/loss", "eval/macro_accuracy"} <= set(metrics)
    assert metrics["strategy/weight/b"] == 2.0
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]
    scored = run_cli("eval", f"run={out}")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    again = json.loads((out / "eval.json").read_text())
    for key in ("eval/a/accuracy", "eval/b/accuracy", "eval/macro_accuracy", "eval/a/loss"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)
    table = run_cli("compare", str(out), f"out={tmp_path / 'cmp'}")
    assert table.returncode == 0, table.stdout + table.stderr
    header = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("eval/macro_accuracy") + 1:][:2] == ["eval/a/accuracy", "eval/b/accuracy"]


@pytest.mark.slow
def test_tasks_from_a_users_config_dir(tmp_path):
    """(The same YAML composed in-process: tests/unit/test_multitask.py.)"""
    files = write_tasks(tmp_path / "data")
    own = tmp_path / "conf" / "strategy"
    own.mkdir(parents=True)
    (own / "my_tasks.yaml").write_text(
        "name: multitask\nweighting: dwa\nsampling: uniform\ntasks:\n"
        f"  - {{name: a, dataset: {{path: '{files['a_train']}', eval_path: '{files['a_dev']}'}}}}\n"
        f"  - {{name: b, dataset: {{path: '{files['b_train']}', eval_path: '{files['b_dev']}', text_column: question, "
        f"label_column: kind}}}}\n")
    out = tmp_path / "yaml"
    res = run_cli("train", f"--config-dir={tmp_path / 'conf'}", *TINY, "strategy=my_tasks", f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "weighting=dwa" in res.stdout and "sampling=uniform" in res.stdout
    assert "eval/b/accuracy" in json.loads((out / "metrics.json").read_text())
    refused = run_cli("eval", f"run={out}", "dataset=sentiment")
    assert refused.returncode != 0 and "multi-task run" in refused.stdout + refused.stderr
