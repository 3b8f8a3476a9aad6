"""`ftune eval harness.tasks=[...]`: real lm-evaluation-harness, offline, on a tiny run and its base model, with
ftune's shipped dates_mc task; results in eval.json, harness.json, the run card and `ftune compare`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ftune import cli
from ftune.compare import compare
from ftune.errors import FtuneError
from ftune.harness import SHIPPED_TASKS, metric_keys, task_specs
from ftune.runs import load_run
from ftune.train import train

from conftest import cli_inprocess, compose_train

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'ftune[harness]')")

FAST = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=64", "trainer.log_every=1",
        "trainer.progress=false", "dataset.max_samples=16", "dataset.max_eval_samples=8"]
LIMIT = 8


ftune = cli_inprocess


def ftune_exit(*argv: str) -> tuple[int, str]:
    """(exit code, output) of a command that is expected to stop with an error."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            cli.main(list(argv))
        except SystemExit as e:
            return int(e.code or 0), buf.getvalue()
    return 0, buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # the shipped task must not need the hub
    out = tmp_path_factory.mktemp("harness") / "lora"
    train(compose_train(["model=tiny_llama", "dataset=demo_instructions", "method=lora", *FAST], out, small=False))
    return out


def expected_accuracy(model, tokenizer, limit: int) -> float:
    """dates_mc's accuracy computed by hand: the choice whose tokens are most likely after the prompt.

    All choices share the prompt, so ranking by the log-probability of the whole sequence ranks the choices'
    own log-probabilities (lm-eval's loglikelihood)."""
    rows = [json.loads(line) for line in (SHIPPED_TASKS / "dates_mc.jsonl").read_text().splitlines()[:limit]]
    correct = 0
    for r in rows:
        prompt = f"{r['instruction']}\n\n{r['input']}\nAnswer:"
        scores = []
        for choice in r["choices"].split():
            ids = torch.tensor([tokenizer.encode(f"{prompt} {choice}")])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            scores.append(float(logp.gather(1, ids[0, 1:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    return correct / len(rows)


def test_harness_on_a_run_into_eval_json_and_card(run):
    ftune("eval", f"run={run}", "eval.max_samples=4")  # ftune's own eval first: its keys must survive
    own = json.loads((run / "eval.json").read_text())
    ftune("eval", f"run={run}", "harness.tasks=[dates_mc]", f"harness.limit={LIMIT}")
    report = json.loads((run / "eval.json").read_text())
    assert report["eval/loss"] == own["eval/loss"]  # kept
    acc = report["harness/dates_mc/acc"]
    loaded = load_run(run, "cpu")
    assert acc == pytest.approx(expected_accuracy(loaded.model, loaded.tokenizer, LIMIT))
    assert report["harness/dates_mc/acc_norm"] == pytest.approx(acc)  # the choices all have 10 characters
    assert report["harness"]["n-samples"]["dates_mc"] == {"original": 200, "effective": LIMIT}
    details = json.loads((run / "harness.json").read_text())
    assert details["results"]["dates_mc"]["acc,none"] == acc and details["n-shot"]["dates_mc"] == 0
    card = (run / "README.md").read_text()
    assert card.count("## lm-evaluation-harness") == 1 and f"| dates_mc | acc | {acc:.4f} |" in card
    from importlib.metadata import version

    assert f"(lm-eval {version('lm_eval')};" in card and report["harness"]["lm_eval_version"] == version("lm_eval")
    # again: the section and the keys are replaced, not added twice; then ftune's own eval keeps them
    ftune("eval", f"run={run}", "harness.tasks=[dates_mc]", f"harness.limit={LIMIT}")
    assert (run / "README.md").read_text().count("## lm-evaluation-harness") == 1
    ftune("eval", f"run={run}", "eval.max_samples=4")
    assert json.loads((run / "eval.json").read_text())["harness/dates_mc/acc"] == acc


def test_base_model_baseline_and_compare_columns(run, tmp_path):
    base = tmp_path / "base"
    ftune("eval", "model=tiny_llama", "harness.tasks=[dates_mc]", f"harness.limit={LIMIT}", f"out={base}")
    assert "method:\n  name: base" in (base / "config.yaml").read_text()
    # the run evaluated into another folder (with the chat template): a row of its own
    ftune("eval", f"run={run}", "harness.tasks=[dates_mc]", f"harness.limit={LIMIT}", "harness.apply_chat_template=true",
          f"out={tmp_path / 'lora_chat'}")
    result = compare([run, base, tmp_path / "lora_chat"], out=tmp_path / "cmp")
    header, rows = result["header"], result["rows"]
    assert "harness/dates_mc/acc" in header and "harness/dates_mc/acc_norm" in header
    assert "evaluated_run" not in header
    by_run = {r[0].rsplit("/", 1)[-1]: dict(zip(header, r, strict=True)) for r in rows}
    assert set(by_run) == {"lora", "base", "lora_chat"} and all(r["status"] == "ok" for r in by_run.values())
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["trainable_percent"] > 0  # (not the 0 of the frozen reload)
    assert by_run["lora"]["trainable %"] == pytest.approx(trained["trainable_percent"])
    assert by_run["lora_chat"]["trainable %"] == pytest.approx(trained["trainable_percent"])
    assert by_run["lora_chat"]["method"] == "lora" and by_run["base"]["trainable %"] == 0
    assert json.loads((tmp_path / "lora_chat" / "eval.json").read_text())["harness"]["apply_chat_template"] is True
    for name, folder in (("lora", run), ("base", base)):
        assert by_run[name]["harness/dates_mc/acc"] == json.loads((folder / "eval.json").read_text())["harness/dates_mc/acc"]
    assert "harness/dates_mc/acc" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_task_folder_with_relative_data_files(run, tmp_path, monkeypatch):
    """A user's task folder (include_path) whose data_files are relative, run from another directory."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in [(1, 2), (3, 4)]]
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: sums.jsonl\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ftune("eval", f"run={run}", "harness.tasks=[tiny_sums]", f"harness.include_path={folder}", f"out={out}")
    report = json.loads((out / "eval.json").read_text())
    assert report["harness/tiny_sums/acc"] in (0.0, 0.5, 1.0) and report["harness"]["n-samples"]["tiny_sums"]["effective"] == 2


def test_refusals(run, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[str(SHIPPED_TASKS)], include_defaults=False)  # (lm-eval's own take seconds)
    with pytest.raises(FtuneError, match=r"Unknown lm-evaluation-harness task\(s\) no_such_task_xyz.*dates_mc.*"
                                         r"harness.include_path"):
        task_specs(["no_such_task_xyz"], local)
    code, said = ftune_exit("eval", f"run={run}", "harness.tasks=[dates_mc]", "dataset=dates")
    assert code != 0 and "drop dataset=" in said
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    code, said = ftune_exit("eval", f"run={run}", "harness.tasks=[dates_mc]")
    assert code != 0 and "pip install 'ftune[harness]'" in said


def test_metric_keys_flatten_lm_eval_results():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1.0,
                     "sample_len": 4}}
    assert metric_keys(results) == {"harness/t/acc": 0.5, "harness/t/exact_match_strict-match": 1.0}
