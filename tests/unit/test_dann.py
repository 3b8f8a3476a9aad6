"""strategy=dann: gradient reversal's sign and scale, the lambda schedule, the pooled features (what the
classification head reads), the loss on a real batch against a hand computation, the target feed,
the logged domain metrics, exact resume and the settings it refuses.

The hand computations are written from the definitions with plain Python floats."""

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
from ftune.strategies.dann import lambda_schedule, pooled_features, reverse_gradient
from ftune.train import setup, train

from conftest import write_target

BERT = ["model=tiny_bert", "dataset=sentiment", "trainer.batch_size=4", "trainer.max_length=32",
        "dataset.max_samples=12", "dataset.max_eval_samples=6"]


@pytest.fixture
def dann(tmp_path):
    return write_target(tmp_path / "target")


def test_lambda_follows_the_schedule():
    assert lambda_schedule(0.0) == 0.0
    for p, gamma in ((0.1, 10.0), (0.5, 10.0), (1.0, 10.0), (0.3, 2.5)):
        assert lambda_schedule(p, gamma) == pytest.approx(2 / (1 + math.exp(-gamma * p)) - 1, abs=1e-15)
    assert lambda_schedule(0.1) == pytest.approx(0.46211715726, abs=1e-10)  # 2 / (1 + e^-1) - 1
    assert lambda_schedule(1.0) == pytest.approx(0.99990920, abs=1e-8)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
def test_gradient_reversal_passes_minus_lambda_times_the_upstream_gradient(p):
    lam = lambda_schedule(p, 10.0)
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, -3.0], [0.5, -0.5, 4.0]])
    y = reverse_gradient(x, lam)
    assert torch.equal(y, x)  # identity forward
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -lam * upstream, rtol=0, atol=0)


def test_pooled_features_pick_the_token_the_head_scores():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    ids = torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]])  # pad id 0, right padding
    mask = (ids != 0).long()
    assert pooled_features(hidden, ids, 0, mask).tolist() == [hidden[0, 2].tolist(), hidden[1, 0].tolist()]
    prompted = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)  # 2 virtual tokens first
    assert pooled_features(prompted, ids, 0, mask).tolist() == [prompted[0, 4].tolist(), prompted[1, 2].tolist()]
    pooled = torch.ones(2, 2)
    assert pooled_features(pooled, ids, 0, mask) is pooled


@pytest.mark.parametrize("model,method", [("tiny_bert", "lora"), ("tiny_llama", "full"),
                                          ("tiny_llama", "prompt_tuning")])
def test_the_captured_features_are_what_the_classification_head_reads(make_cfg, dann, model, method):
    """The head applied to the pooled features gives the model's logits (BERT: pooled [CLS]; a decoder:
    its last real token, behind prompt tuning's virtual tokens too)."""
    from ftune.strategies.dann import classification_head

    run = setup(make_cfg(*BERT, f"model={model}", f"method={method}", *dann))
    batch = run.collate(run.epoch_batches([len(e["input_ids"]) for e in run.data.train], 0)[0])
    run.model.eval()
    with torch.no_grad():
        logits = run.model(**model_inputs(batch)).logits
        features = run.strategy._features(batch)
        again = classification_head(run.model)(features)
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-6)


def test_loss_on_a_real_batch_equals_the_hand_computation(make_cfg, dann):
    """Task cross-entropy of the source plus the domain cross-entropy of source (0) and target (1) examples,
    over n source examples of the window: (task_sum + w * domain_sum / 2) / n."""
    run = setup(make_cfg(*BERT, "method=full", *dann, "strategy.domain_weight=0.7", "trainer.max_steps=10"))
    feeds = run.epoch_batches([len(e["input_ids"]) for e in run.data.train], 0)[0]
    batch = run.collate(feeds)
    assert batch["feeds"]["target"]["input_ids"].shape[0] == len(feeds["target"]) == len(feeds["train"]) == 4
    model, classifier = run.model, run.strategy.classifier
    outputs, loss_sum, _ = run.target_logits.forward(model, batch, "seq_cls")
    got = run.strategy.loss(model, batch, outputs, loss_sum, 8, 3)

    with torch.no_grad():  # by hand: the pooled [CLS] output of each domain through the domain classifier
        pooled = [model.bert(**model_inputs(b)).pooler_output for b in (batch, batch["feeds"]["target"])]
        domain_logits = classifier(torch.cat(pooled)).tolist()

    def ce(row: list[float], y: int) -> float:
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    task = sum(ce(r, y) for r, y in zip(outputs.logits.tolist(), batch["labels"].tolist(), strict=True))
    domain = sum(ce(r, 0 if i < 4 else 1) for i, r in enumerate(domain_logits))
    assert float(got.detach()) == pytest.approx((task + 0.7 * domain / 2) / 8, rel=1e-5)
    assert run.strategy.lam == pytest.approx(lambda_schedule(3 / 10))

    # the gradient reaching the features is -lambda_p times the domain classifier's gradient
    features = torch.cat(pooled).requires_grad_(True)
    domains = torch.tensor([0] * 4 + [1] * 4)
    for lam in (run.strategy.lam, 1.0):
        plain = torch.autograd.grad(torch.nn.functional.cross_entropy(classifier(features), domains), features)[0]
        reversed_ = torch.autograd.grad(torch.nn.functional.cross_entropy(
            classifier(reverse_gradient(features, lam)), domains), features)[0]
        torch.testing.assert_close(reversed_, -lam * plain)


def test_target_batches_depend_on_seed_and_epoch_only_and_cover_the_target(make_cfg, dann):
    run = setup(make_cfg(*BERT, "method=lora", *dann))
    lengths = [len(e["input_ids"]) for e in run.data.train]
    e0, again, e1 = (run.epoch_batches(lengths, e) for e in (0, 0, 1))
    assert e0 == again and [f["target"] for f in e0] != [f["target"] for f in e1]
    assert [len(f["target"]) for f in e0] == [len(f["train"]) for f in e0] == [4, 4, 4]
    assert len({i for f in e0 for i in f["target"]}) == 10  # 12 source examples: every target example, 2 twice
    assert all(0 <= i < 10 for f in e0 for i in f["target"])


def test_training_logs_the_domain_metrics_and_scores_the_target(make_cfg, dann):
    cfg = make_cfg(*BERT, "method=lora", *dann, "trainer.max_steps=5", "trainer.log_every=2")
    metrics = train(cfg)
    rows = [r for r in read_metrics(Path(cfg.output_dir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 5]
    for r in rows:
        assert 0 <= r["strategy/domain_accuracy"] <= 1 and r["strategy/domain_loss"] > 0
        assert r["strategy/lambda"] == pytest.approx(lambda_schedule((r["step"] - 1) / 5))  # p of the row's last step
    for key in ("strategy/domain_accuracy", "strategy/domain_loss", "strategy/lambda"):
        assert metrics[key] == rows[-1][key]
    assert 0 <= metrics["strategy/domain_accuracy_mean"] <= 1
    assert 0 <= metrics["strategy/target_accuracy"] <= 1 and metrics["strategy/target_loss"] > 0
    assert "eval/accuracy" in metrics  # the source domain's eval split
    saved = load_file(f"{cfg.output_dir}/domain_classifier.safetensors")
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias"} and saved["0.weight"].shape == (256, 32)
    assert json.loads(Path(cfg.output_dir, "metrics.json").read_text())["strategy/target_accuracy"] == \
        metrics["strategy/target_accuracy"]


def test_resume_mid_run_reproduces_the_uninterrupted_run(make_cfg, dann):
    """Killed after the step-3 checkpoint of a 7-step run (3 batches an epoch: the target feed crosses epochs),
    resumed: the same weights, domain classifier and rows, strategy/ metrics included."""
    args = [*BERT, "method=lora", *dann, "trainer.max_steps=7", "trainer.log_every=2", "trainer.save_every=3",
            "trainer.keep_checkpoints=5"]
    whole = make_cfg(*args, out="whole")
    metrics = train(whole)
    part = make_cfg(*args, "resume=auto", out="part")
    shutil.copytree(whole.output_dir, part.output_dir)
    for ckpt in checkpoint_dirs(f"{part.output_dir}/checkpoints")[1:]:
        shutil.rmtree(ckpt)  # as if killed between steps 3 and 6
    for name in ("adapter", "domain_classifier.safetensors", "metrics.json"):
        path = Path(part.output_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train(part)
    for name in ("adapter/adapter_model.safetensors", "domain_classifier.safetensors"):
        a, b = (load_file(f"{cfg.output_dir}/{name}") for cfg in (whole, part))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [[r for r in read_metrics(Path(cfg.output_dir, "metrics.jsonl")) if "loss" in r] for cfg in (whole, part)]
    strip = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and [r["step"] for r in rows[0]] == [2, 4, 6, 7]
    assert all("strategy/domain_accuracy" in r for r in rows[0])
    for key in ("strategy/domain_accuracy", "strategy/domain_accuracy_mean", "strategy/target_accuracy"):
        assert metrics[key] == resumed[key]
    with pytest.raises(FtuneError, match=r"strategy\.gamma: checkpoint has 10\.0, this run has 5\.0"):
        train(make_cfg(*args, "resume=auto", "strategy.gamma=5.0", out="part"))  # another schedule: refused


def error_of(make_cfg, *overrides: str) -> str:
    with pytest.raises(FtuneError) as err:
        train(make_cfg(*overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_dann_inputs_get_one_paragraph(make_cfg, dann, tmp_path):
    assert "needs the target domain's text: set strategy.target_path" in error_of(make_cfg, *BERT, "strategy=dann")
    missing = error_of(make_cfg, *BERT, "strategy=dann", f"strategy.target_path={tmp_path / 'nope.jsonl'}")
    assert "nope.jsonl does not exist" in missing
    causal = error_of(make_cfg, "model=tiny_llama", "dataset=demo_instructions", *dann)
    assert "needs a classification dataset" in causal and "strategy=domain_adapt" in causal
    (tmp_path / "other.jsonl").write_text(json.dumps({"sentence": "a toaster"}) + "\n")
    columns = error_of(make_cfg, *BERT, "strategy=dann", f"strategy.target_path={tmp_path / 'other.jsonl'}")
    assert "no column 'text'" in columns
    assert "strategy.gamma" in error_of(make_cfg, *BERT, *dann, "strategy.gamma=-1")
    head_only = error_of(make_cfg, *BERT, "model=tiny_llama", "method=freeze", "method.trainable_layers=0",
                         "method.train_final_norm=false", *dann)
    assert "trains nothing below the classification head" in head_only
