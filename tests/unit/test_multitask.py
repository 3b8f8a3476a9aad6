"""strategy=multitask: task probabilities and their draws, the batch plan, each loss weighting against its
formula, the loss of a real micro-batch (its task's head only), per-task eval metrics, the saved heads,
causal LM tags, exact resume, and the inputs it refuses.

Hand computations are written from the definitions with plain Python floats."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.checkpoint import checkpoint_dirs
from ftune.errors import FtuneError
from ftune.evaluate import model_inputs
from ftune.outputs import read_metrics
from ftune.strategies.dann import HeadInput
from ftune.strategies.multitask import (
    DynamicWeightAveraging,
    UncertaintyWeighting,
    Weighting,
    load_task_heads,
    plan_epoch,
    task_probabilities,
)
from ftune.train import finish, setup, train, train_loop

from conftest import logits_of, tasks_override, write_tasks

BERT = ["model=tiny_bert", "dataset=classification", "strategy=multitask", "trainer.batch_size=4",
        "trainer.max_length=32"]


@pytest.fixture
def files(tmp_path):
    return write_tasks(tmp_path / "data")


# --- sampling ----------------------------------------------------------------------------------------------
def test_task_probabilities_follow_their_formulas():
    sizes = [100, 400, 25]
    assert task_probabilities(sizes, "proportional") == pytest.approx([100 / 525, 400 / 525, 25 / 525])
    assert task_probabilities(sizes, "uniform") == pytest.approx([1 / 3] * 3)
    roots = [10.0, 20.0, 5.0]  # n^(1/2)
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx([r / 35 for r in roots])
    assert task_probabilities(sizes, "temperature", 1.0) == pytest.approx(task_probabilities(sizes, "proportional"))


@pytest.mark.parametrize("sampling,temperature", [("proportional", 1.0), ("uniform", 1.0), ("temperature", 3.0)])
def test_drawn_tasks_match_the_configured_probabilities(sampling, temperature):
    sizes = [300, 60, 12]
    p = task_probabilities(sizes, sampling, temperature)
    draws = 20000
    counts = [0, 0, 0]
    for epoch in range(4):
        for task, idx in plan_epoch(sizes, p, draws // 4, 4, seed=7, epoch=epoch):
            counts[task] += 1
            assert len(idx) == 4 and all(0 <= i < sizes[task] for i in idx)
    for c, q in zip(counts, p, strict=True):  # within 4.5 standard deviations of the binomial
        assert abs(c / draws - q) < 4.5 * math.sqrt(q * (1 - q) / draws) + 1e-9


def test_the_plan_is_a_function_of_seed_and_epoch_and_uses_each_example_once_per_pass():
    sizes, p = [10, 7], [0.5, 0.5]
    a, again = plan_epoch(sizes, p, 30, 3, 1, 0), plan_epoch(sizes, p, 30, 3, 1, 0)
    assert a == again and a != plan_epoch(sizes, p, 30, 3, 1, 1) and a != plan_epoch(sizes, p, 30, 3, 2, 0)
    for task, n in enumerate(sizes):  # each pass over a task's examples is a permutation of them
        stream = [i for t, idx in a if t == task for i in idx]
        for start in range(0, len(stream) - n + 1, n):
            assert sorted(stream[start:start + n]) == list(range(n))


# --- weighting ---------------------------------------------------------------------------------------------
def test_fixed_weighting_is_the_weighted_sum():
    losses = [torch.tensor(0.7), torch.tensor(1.9), torch.tensor(0.2)]
    got = Weighting([1.0, 0.5, 3.0]).total(losses)
    assert float(got) == pytest.approx(0.7 + 0.5 * 1.9 + 3.0 * 0.2)


def test_uncertainty_weighting_is_kendalls_formula_and_learns_s():
    w = UncertaintyWeighting(3)
    s = [0.3, -0.8, 1.5]
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor(s))
    losses = [0.7, 1.9, 0.2]
    total = w.total([torch.tensor(x) for x in losses])
    assert float(total) == pytest.approx(sum(x / (2 * math.exp(si)) + si / 2 for x, si in zip(losses, s, strict=True)))
    total.backward()  # d/ds_i = -L_i / (2 exp(s_i)) + 1/2
    expected = [-x / (2 * math.exp(si)) + 0.5 for x, si in zip(losses, s, strict=True)]
    assert w.log_vars.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert w.weights() == pytest.approx([0.5 * math.exp(-si) for si in s])
    # a micro-batch with a share of its window's targets adds that share of s_i / 2
    assert float(w.term(1, torch.tensor(0.25), 0.25)) == pytest.approx(0.25 / (2 * math.exp(-0.8)) + 0.25 * -0.8 / 2)


def test_dwa_weights_follow_liu_et_al():
    w = DynamicWeightAveraging(3)
    assert w.weights() == [1.0, 1.0, 1.0]
    w.window_done({0: 1.0, 1: 2.0, 2: 0.5})
    assert w.weights() == [1.0, 1.0, 1.0]  # one window: no ratio yet
    w.window_done({0: 0.8, 1: 1.0})  # task 2 absent: keeps its last mean, still one window
    assert w.weights() == [1.0, 1.0, 1.0]
    w.window_done({2: 0.4})
    r = [0.8 / 1.0, 1.0 / 2.0, 0.4 / 0.5]
    e = [math.exp(x / 2.0) for x in r]
    assert w.weights() == pytest.approx([3 * x / sum(e) for x in e])
    losses = [0.3, 0.6, 0.9]
    assert float(w.total([torch.tensor(x) for x in losses])) == pytest.approx(
        sum(3 * x / sum(e) * loss for x, loss in zip(e, losses, strict=True)))
    again = DynamicWeightAveraging(3)
    again.load_state_dict(w.state_dict())
    again.window_done({0: 0.4, 1: 0.4, 2: 0.4})
    w.window_done({0: 0.4, 1: 0.4, 2: 0.4})
    assert again.weights() == w.weights()


# --- the run -----------------------------------------------------------------------------------------------
def test_a_micro_batch_is_one_task_scored_by_its_own_head(make_cfg, files):
    """The loss of a task-b micro-batch: b's weight x cross-entropy over b's three classes only (its head's
    block of the shared head), over the window's targets."""
    run = setup(make_cfg(*BERT, "method=full", tasks_override(files, weight_b=2.5)))
    assert run.data.label_names == ["a:neg", "a:pos", "b:HUM", "b:LOC", "b:NUM"]
    plan = run.epoch_batches([len(e["input_ids"]) for e in run.data.train], 0)
    assert len(plan) == math.ceil(42 / 4)
    tasks = [{run.strategy.task_of(i) for i in feeds["train"]} for feeds in plan]
    assert all(len(t) == 1 for t in tasks)
    feeds = next(f for f, t in zip(plan, tasks, strict=True) if t == {1})
    batch = run.collate(feeds)
    outputs, loss_sum, _ = run.target_logits.forward(run.model, batch, "seq_cls")
    got = run.strategy.loss(run.model, batch, outputs, loss_sum, 8, 0)

    def ce(row: list[float], y: int) -> float:
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    rows = [r[2:5] for r in outputs.logits.tolist()]  # b's classes
    by_hand = sum(ce(r, y - 2) for r, y in zip(rows, batch["labels"].tolist(), strict=True))
    assert float(got) == pytest.approx(2.5 * by_hand / 8, rel=1e-5)
    got.backward()  # a's rows of the head get no gradient from b's batch
    grad = run.strategy.head_layer.weight.grad
    assert torch.count_nonzero(grad[:2]) == 0 and torch.count_nonzero(grad[2:]) > 0


def test_per_task_metrics_heads_and_reload(make_cfg, files):
    """metrics.json has eval/<task>/{accuracy,loss} and their macro mean; each task's head file, applied to the
    pooled output, gives that task's block of the logits, and the reloaded run gives the trained model's logits."""
    from ftune.runs import load_run

    cfg = make_cfg(*BERT, "method=lora", tasks_override(files), "trainer.max_steps=6", "trainer.log_every=2",
                   "strategy.weighting=uncertainty", "strategy.weight_lr=0.1")
    run = setup(cfg)
    metrics = train_loop(run)
    finish(run, metrics)
    out = Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    for t, n in (("a", 8), ("b", 6)):
        assert 0 <= saved[f"eval/{t}/accuracy"] <= 1 and saved[f"eval/{t}/loss"] > 0 and saved[f"eval/{t}/examples"] == n
    assert saved["eval/macro_accuracy"] == pytest.approx((saved["eval/a/accuracy"] + saved["eval/b/accuracy"]) / 2)
    assert saved["eval/loss"] == pytest.approx((saved["eval/a/loss"] + saved["eval/b/loss"]) / 2)
    assert saved["strategy/weight/a"] != 0.5  # s_a learned (lr 0.1): no longer exp(0) / 2
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all("strategy/weight/b" in r for r in rows)

    # each task's eval metrics by hand: argmax over the task's own classes
    batch = run.eval_collator(run.data.eval)
    logits = logits_of(run.model, {k: v.to(run.device) for k, v in batch.items()})
    labels = batch["labels"].tolist()
    for name, (start, end), (lo, hi) in (("a", (0, 8), (0, 2)), ("b", (8, 14), (2, 5))):
        preds = [lo + max(range(hi - lo), key=lambda c, r=row: r[lo + c]) for row in logits[start:end].tolist()]
        accuracy = sum(p == y for p, y in zip(preds, labels[start:end], strict=True)) / (end - start)
        assert saved[f"eval/{name}/accuracy"] == pytest.approx(accuracy)

    loaded = load_run(out)
    again = logits_of(loaded.model, {k: v.to(run.device) for k, v in batch.items()})
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)
    heads = load_task_heads(out)
    assert set(heads) == {"a", "b"} and heads["b"].out_features == 3
    assert json.loads((out / "tasks.json").read_text())["tasks"][1]["labels"] == ["HUM", "LOC", "NUM"]
    from ftune.strategies.multitask import head_linear

    capture = HeadInput(head_linear(loaded.model, 5))
    with torch.no_grad():
        loaded.model(**model_inputs({k: v.to(run.device) for k, v in batch.items()}))
        pooled = capture.take()
        torch.testing.assert_close(heads["a"](pooled), again[:, :2], rtol=0, atol=1e-6)
        torch.testing.assert_close(heads["b"](pooled), again[:, 2:5], rtol=0, atol=1e-6)
    assert set(load_file(str(out / "heads" / "b.safetensors"))) == {"weight", "bias"}


def test_causal_lm_tasks_are_tagged_and_scored_per_task(make_cfg, tmp_path):
    for name, n in (("qa", 10), ("math", 8)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"instruction": f"{name} question {i}", "output": f"answer {i}"}) + "\n" for i in range(n)))
    tasks = (f"strategy.tasks=[{{name: qa, dataset: {{path: '{tmp_path}/qa.jsonl', eval_fraction: 0.3}}}}, "
             f"{{name: math, dataset: {{path: '{tmp_path}/math.jsonl', eval_fraction: 0.25}}}}]")
    cfg = make_cfg("model=tiny_gpt2", "dataset=instruction", "strategy=multitask", tasks, "method=lora",
                   "trainer.max_steps=3", "trainer.batch_size=2", "strategy.sampling=uniform", "strategy.weighting=dwa")
    run = setup(cfg)
    first = run.data.train[run.strategy.spans[1][0]]
    text = run.tokenizer.decode(first["input_ids"])
    tag = run.strategy.tag_ids["math"]
    assert text.startswith("[math] ") and first["labels"][:len(tag)] == [-100] * len(tag)
    metrics = train_loop(run)
    for t in ("qa", "math"):
        assert metrics[f"eval/{t}/loss"] > 0 and metrics[f"eval/{t}/perplexity"] > 1
    assert "eval/macro_accuracy" not in metrics


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa"])
def test_resume_mid_run_reproduces_the_uninterrupted_run(make_cfg, files, weighting):
    """Killed after the step-3 checkpoint of a 7-step run (two tasks in most steps): the same weights, heads, learned s_i or DWA history,
    and logged rows."""
    args = [*BERT, "method=lora", tasks_override(files), f"strategy.weighting={weighting}", "strategy.weight_lr=0.05",
            "strategy.sampling=uniform", "trainer.grad_accum=2",
            "trainer.max_steps=7", "trainer.log_every=1", "trainer.save_every=3", "trainer.keep_checkpoints=5",
            "trainer.batch_size=8"]
    whole = make_cfg(*args, out="whole")
    metrics = train(whole)
    part = make_cfg(*args, "resume=auto", out="part")
    shutil.copytree(whole.output_dir, part.output_dir)
    for ckpt in checkpoint_dirs(f"{part.output_dir}/checkpoints")[1:]:
        shutil.rmtree(ckpt)  # as if killed between steps 3 and 6
    for name in ("adapter", "heads", "metrics.json"):
        path = Path(part.output_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train(part)
    for name in ("adapter/adapter_model.safetensors", "heads/a.safetensors", "heads/b.safetensors"):
        a, b = (load_file(f"{cfg.output_dir}/{name}") for cfg in (whole, part))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(Path(c.output_dir, "metrics.jsonl"))
             if "loss" in r] for c in (whole, part)]
    assert rows[0] == rows[1] and len(rows[0]) == 7
    weights = {tuple(r[f"strategy/weight/{t}"] for t in "ab") for r in rows[0]}
    assert len(weights) > 1  # the weights moved during the run, so the restored state mattered
    assert {k: v for k, v in metrics.items() if k.startswith(("eval/", "strategy/"))} == \
        {k: v for k, v in resumed.items() if k.startswith(("eval/", "strategy/"))}


# --- configs and bad inputs ---------------------------------------------------------------------------------
def test_a_users_strategy_yaml_holds_the_tasks(files, tmp_path):
    """strategy=<own> from a config directory of the user's (what `ftune train --config-dir` searches)."""
    from hydra import compose, initialize_config_dir

    from ftune.config import config_dir
    from ftune.strategies import build_strategy

    own = tmp_path / "conf" / "strategy"
    own.mkdir(parents=True)
    (own / "two_tasks.yaml").write_text(
        f"name: multitask\nsampling: temperature\ntemperature: 3.0\ntasks:\n"
        f"  - name: a\n    dataset: {{path: {files['a_train']}}}\n"
        f"  - name: b\n    weight: 0.5\n    dataset: {{path: {files['b_train']}, text_column: question, "
        f"label_column: kind}}\n")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "strategy=two_tasks"])
    strategy = build_strategy(cfg.strategy)
    assert [(t.name, t.weight, t.dataset.get("text_column")) for t in strategy.tasks] == \
        [("a", 1.0, None), ("b", 0.5, "question")]
    assert (strategy.settings.sampling, strategy.settings.temperature, strategy.settings.weighting) == \
        ("temperature", 3.0, "fixed")


@pytest.mark.parametrize("override,message", [
    ("strategy.tasks=[]", "needs its tasks"),
    ("strategy.tasks=[{name: a, dataset: {path: x.csv}, wieght: 2}]", "unknown key wieght"),
    ("strategy.tasks=[{name: a, dataset: {path: x.csv}}, {name: a, dataset: {path: y.csv}}]", "task 'a' twice"),
    ("strategy.tasks=[{name: 'a/b', dataset: {path: x.csv}}]", "needs a name"),
    ("strategy.tasks=[{name: a, dataset: {path: x.csv}, weight: -1}]", "weight=-1"),
    ("strategy.sampling=random", "Unknown strategy.sampling 'random'"),
    ("strategy.weighting=gradnorm", "Unknown strategy.weighting 'gradnorm'"),
])
def test_bad_task_lists_and_choices_get_one_paragraph(make_cfg, files, override, message):
    args = [*BERT, tasks_override(files), override]
    with pytest.raises(FtuneError, match=message) as e:
        setup(make_cfg(*args))
    assert "\n" not in str(e.value)


def test_bad_task_data_names_the_task(make_cfg, files, tmp_path):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\nfine,pos\ngood,pos\n")
    cases = [
        (f"strategy.tasks=[{{name: a, dataset: {{path: '{files['a_train']}', colour: red}}}}]", "task 'a' has a bad dataset"),
        (f"strategy.tasks=[{{name: b, dataset: {{path: '{files['b_train']}'}}}}]", "task 'b'"),  # no text/label column
        (f"strategy.tasks=[{{name: c, dataset: {{path: '{one_class}'}}}}]", "at least two labels"),
        (f"strategy.tasks=[{{name: d, dataset: {{path: '{files['a_train']}'}}}}, {{name: e, dataset: {{format: "
         f"instruction, path: '{files['a_train']}'}}}}]", "all of one kind"),
    ]
    for override, message in cases:
        with pytest.raises(FtuneError, match=message) as e:
            setup(make_cfg(*BERT, override))
        assert "\n" not in str(e.value)
