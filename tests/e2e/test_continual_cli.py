"""strategy=continual from the real CLI on a tiny Llama with instruction data (one output space, scored by exact
match): the stages as a Hydra list on the command line (with replay), and from a user's own
strategy/<name>.yaml in a --config-dir (naive); then `ftune compare` puts them side by side."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from omegaconf import OmegaConf

from conftest import run_cli

TINY = ["model=tiny_llama", "dataset=instruction", "method=lora", "trainer.batch_size=4", "trainer.max_length=48",
        "trainer.max_steps=2", "trainer.log_every=1", "trainer.progress=false", "trainer.eval_max_new_tokens=3"]


def write_tasks(root):
    entries = []
    for name, word in (("upper", "shout"), ("lower", "whisper")):
        for split, n in (("train", 8), ("dev", 4)):
            (root / f"{name}_{split}.jsonl").write_text("".join(
                json.dumps({"instruction": f"{word} the word {i}", "input": "", "output": f"{word} {i}"}) + "\n"
                for i in range(n)))
        entries.append({"name": name, "dataset": {"path": str(root / f"{name}_train.jsonl"),
                                                  "eval_path": str(root / f"{name}_dev.jsonl")}})
    return entries


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual_cli")
    entries = write_tasks(root)
    listed = "strategy.stages=[" + ", ".join(
        f"{{name: {e['name']}, dataset: {{path: {e['dataset']['path']}, eval_path: {e['dataset']['eval_path']}}}}}"
        for e in entries) + "]"
    (root / "configs" / "strategy").mkdir(parents=True)
    (root / "configs" / "strategy" / "my_sequence.yaml").write_text(OmegaConf.to_yaml(
        {"name": "continual", "stages": entries}))
    with ThreadPoolExecutor(max_workers=2) as pool:
        replay = pool.submit(run_cli, "train", *TINY, "strategy=continual", listed, "strategy.replay_ratio=0.25",
                             "strategy.replay_size=4", f"output_dir={root / 'runs' / 'replay'}")
        naive = pool.submit(run_cli, "train", f"--config-dir={root / 'configs'}", *TINY, "strategy=my_sequence",
                            f"output_dir={root / 'runs' / 'naive'}")
        yield root, replay.result(), naive.result()


def test_stages_from_the_command_line_and_from_a_users_yaml(runs):
    root, *results = runs
    for name, res in zip(("replay", "naive"), results, strict=True):
        out = root / "runs" / name
        assert res.returncode == 0, res.stdout + res.stderr
        assert "stage upper: training in" in res.stdout and "continual: stage 2 of 2 (lower)" in res.stdout
        report = json.loads((out / "continual.json").read_text())
        assert report["tasks"] == ["upper", "lower"] and len(report["matrix"]) == 2
        assert report["matrix"][0][1] is None and all(0 <= v <= 1 for row in report["matrix"] for v in row if v is not None)
        assert report["forgetting"] == pytest.approx(report["matrix"][0][0] - report["matrix"][1][0])
        assert (out / "continual.png").is_file() and (out / "stages/upper/continual_state.pt").is_file()
        cfg = OmegaConf.load(out / "config.yaml")
        assert cfg.dataset.name == "lower" and cfg.dataset.path.endswith("lower_train.jsonl")
        assert "after stage" in res.stdout  # the matrix table
    rows = [json.loads(line) for line in (root / "runs/replay/metrics.jsonl").read_text().splitlines()]
    assert any("strategy/replay_loss" in r for r in rows)


def test_compare_puts_the_continual_runs_side_by_side(runs):
    root = runs[0]
    res = run_cli("compare", str(root / "runs"))
    assert res.returncode == 0, res.stdout + res.stderr
    table = (root / "runs" / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    for column in ("strategy.replay_ratio", "continual/average_accuracy", "continual/backward_transfer",
                   "continual/forgetting"):
        assert column in header
    names = {line.split("|")[1].strip(" *") for line in table.splitlines()[6:] if line.startswith("| ")}
    assert names == {"naive", "replay"}

