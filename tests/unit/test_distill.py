"""strategy=distill: each loss term against a hand computation, the student cut from the teacher's
layers, accumulation, exact resume and the settings it refuses.

The hand computations are written from the definitions (softmax, KL, JS, cosine) with plain Python
floats or explicit per-position loops, not with ftune's helpers.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.checkpoint import checkpoint_dirs
from ftune.config import check_settings, validate_group
from ftune.errors import FtuneError
from ftune.evaluate import model_inputs
from ftune.methods.base import build_method
from ftune.models import build_model
from ftune.outputs import read_metrics
from ftune.strategies import build_strategy
from ftune.strategies.distill import cosine_sum, divergence, student_from_layers, target_rows
from ftune.train import setup, train

LLAMA = ["model=tiny_llama", "dataset=demo_instructions", "dataset.prompt_template=plain", "trainer.batch_size=2",
         "trainer.max_length=64", "dataset.eval_fraction=null", "dataset.max_samples=8"]
DISTILL = ["strategy=distill", "strategy.teacher=tiny_llama", "strategy.temperature=2.0", "strategy.alpha=0.7"]


def softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]]


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_each_divergence_equals_its_definition(direction):
    t = 2.0
    got = divergence(torch.tensor(STUDENT), torch.tensor(TEACHER), t, direction)
    for row, (s, te) in enumerate(zip(STUDENT, TEACHER, strict=True)):
        ps, pt = softmax(s, t), softmax(te, t)
        m = [(a + b) / 2 for a, b in zip(ps, pt, strict=True)]
        expected = {"forward": kl(pt, ps), "reverse": kl(ps, pt),
                    "symmetric": 0.5 * kl(pt, m) + 0.5 * kl(ps, m)}[direction]
        assert float(got[row]) == pytest.approx(expected, rel=1e-5)
    assert float(divergence(torch.tensor(STUDENT), torch.tensor(STUDENT), t, direction).abs().max()) < 1e-6


def test_cosine_loss_per_target_token_and_per_example():
    hs = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    ht = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]]])
    # causal LM: labels [-100, 7, 8]: positions 0 and 1 predict a target (label t+1), position 2 none
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, 7, 8]])}
    assert float(cosine_sum(hs, ht, batch, "causal_lm")) == pytest.approx((1 - 1) + (1 - 1 / math.sqrt(2)))
    # classification: the mean over the example's non-padding tokens (the third is padding)
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert float(cosine_sum(hs, ht, batch, "seq_cls")) == pytest.approx((0 + 1 - 1 / math.sqrt(2)) / 2)


def test_distill_loss_on_a_real_batch_equals_the_hand_computation(make_cfg):
    """Student (LoRA on tiny Llama, init_seed 1) and teacher (tiny_llama): KD with T^2 over the answer tokens only,
    both models' full logits taken by hand, the position predicting label t+1 at t."""
    run = setup(make_cfg(*LLAMA, *DISTILL, "model.init_seed=1", "strategy.kl=forward", "strategy.cache_teacher=false"))
    batch = {k: v.to(run.device) for k, v in run.collator(run.data.train[:2]).items()}
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()  # prompt tokens are masked
    n_window = 11  # any count of the accumulation window's targets
    outputs, loss_sum, n = run.target_logits.forward(run.model, batch, "causal_lm")
    got = run.strategy.loss(run.model, batch, outputs, loss_sum, n_window, 0)

    with torch.no_grad():
        run.target_logits.remove()  # full logits from here on
        student = run.model(**model_inputs(batch)).logits
        teacher = run.strategy.teacher(**model_inputs(batch)).logits
    t, alpha = 2.0, 0.7
    kd, ce, count = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for pos in range(labels.shape[1] - 1):
            target = int(labels[b, pos + 1])
            if target == -100:
                continue
            s_row, t_row = student[b, pos].tolist(), teacher[b, pos].tolist()
            kd += kl(softmax(t_row, t), softmax(s_row, t))
            ce -= math.log(softmax(s_row, 1.0)[target])
            count += 1
    assert count == n
    expected = ((1 - alpha) * ce + alpha * t * t * kd) / n_window
    assert float(got.detach()) == pytest.approx(expected, rel=1e-4)
    row = run.strategy.row_metrics(1)
    assert row["strategy/kd_loss"] == pytest.approx(kd / count, rel=1e-4)
    assert row["strategy/task_loss"] == pytest.approx(ce / count, rel=1e-4)


def test_target_rows_selects_the_scored_positions_of_full_logits():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 4, -100, -100]])
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    rows = target_rows(logits, labels)  # positions (0,1), (0,2), (1,0) predict labels 5, 6, 4
    assert torch.equal(rows, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))
    assert torch.equal(target_rows(rows.unsqueeze(0), labels), rows)  # already selected: unchanged


def tiny(name: str, task: str, layers: int, **extra):
    from omegaconf import OmegaConf

    from ftune.config import ModelConfig, config_dir

    raw = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
    raw.pop("defaults")
    raw.config.num_hidden_layers = layers
    for k, v in extra.items():
        raw.config[k] = v
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
    return build_model(cfg, task, num_labels=2 if task == "seq_cls" else None)


@pytest.mark.parametrize("name,task,prefix", [("tiny_llama", "causal_lm", "model.layers"),
                                               ("tiny_bert", "seq_cls", "bert.encoder.layer"),
                                               ("tiny_qwen", "causal_lm", "model.layers")])
def test_student_from_layers_is_the_teachers_weights_and_runs_like_a_hand_built_model(name, task, prefix):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    teacher = tiny(name, task, 4, **({"layer_types": ["full_attention"] * 3 + ["sliding_attention"],
                                      "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3}
                                     if name == "tiny_qwen" else {}))
    keep = [0, 2, 3]
    student = student_from_layers(teacher, keep)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4
    if name == "tiny_qwen":  # per-layer settings follow the kept blocks
        assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    mapped = {}
    for key in s_state:
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1:].split(".", 1)
            mapped[key] = f"{prefix}.{keep[int(index)]}.{rest}"
        else:
            mapped[key] = key
    assert set(mapped.values()) <= set(t_state)
    for key, source in mapped.items():
        assert torch.equal(s_state[key], t_state[source]), key
        assert s_state[key].data_ptr() != t_state[source].data_ptr()  # a copy: training it leaves the teacher
    # reference: a fresh 3-layer model of the same config with the same tensors loaded by hand
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": 3,
                                                 **({"layer_types": student.config.layer_types}
                                                    if name == "tiny_qwen" else {})})
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    reference = auto.from_config(config)
    reference.load_state_dict({k: t_state[v] for k, v in mapped.items()})
    ids = torch.randint(5, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    student.eval()
    reference.eval()
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if task == "causal_lm":  # the KV cache is indexed by the renumbered blocks
        out = student.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 12)


def test_student_layers_out_of_range_is_one_clear_paragraph():
    teacher = tiny("tiny_llama", "causal_lm", 4)
    for layers, words in (([0, 4], "[4] out of range"), ([1, 1], "listed twice"), ([], "none given")):
        with pytest.raises(FtuneError) as err:
            student_from_layers(teacher, layers)
        msg = str(err.value)
        assert words in msg and "4 blocks, numbered 0..3" in msg and "strategy.student_layers=[0,2]" in msg
        assert "\n" not in msg


def test_accumulation_gives_the_same_kd_loss_and_weights(make_cfg):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same examples: same KD and task loss, same weights."""
    common = [*LLAMA, *DISTILL, "model.init_seed=1", "method=full", "trainer.group_by_length=false",
              "trainer.max_grad_norm=null", "optimizer=sgd", "optimizer.momentum=0.0", "optimizer.lr=0.5",
              "scheduler=constant", "trainer.max_steps=1", "trainer.log_every=1"]
    results = []
    for out, bs, accum in (("a", 4, 1), ("b", 2, 2)):
        cfg = make_cfg(*common, f"trainer.batch_size={bs}", f"trainer.grad_accum={accum}", out=out)
        train(cfg)
        row = [r for r in read_metrics(Path(cfg.output_dir, "metrics.jsonl")) if "loss" in r][0]
        results.append((row, load_file(f"{cfg.output_dir}/adapter/weights.safetensors")))
    (ra, wa), (rb, wb) = results
    for key in ("loss", "strategy/kd_loss", "strategy/task_loss"):
        assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    assert ra["strategy/kd_loss"] > 0
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher", ["live", "cached"])
def test_resume_mid_run_reproduces_the_uninterrupted_run(make_cfg, teacher):
    """Killed after the step-2 checkpoint of a 5-step run (log every 2: a logging window open across the
    checkpoint), resumed: the same weights and the same rows, strategy/ metrics included. Live: the teacher
    runs at every step (the cosine loss needs it); cached: its logits are computed again on resume."""
    loss = ["strategy.cosine_weight=0.5"] if teacher == "live" else ["strategy.cache_teacher=true"]
    args = [*LLAMA, *DISTILL, "model.init_seed=1", *loss, "trainer.max_steps=5",
            "trainer.log_every=2", "trainer.save_every=3", "trainer.keep_checkpoints=5"]
    whole = make_cfg(*args, out="whole")
    metrics = train(whole)
    part = make_cfg(*args, "resume=auto", out="part")
    shutil.copytree(whole.output_dir, part.output_dir)
    for ckpt in checkpoint_dirs(f"{part.output_dir}/checkpoints")[1:]:
        shutil.rmtree(ckpt)  # as if killed between steps 3 and 5
    shutil.rmtree(f"{part.output_dir}/adapter")
    (Path(part.output_dir) / "metrics.json").unlink()
    resumed = train(part)
    a, b = (load_file(f"{cfg.output_dir}/adapter/adapter_model.safetensors") for cfg in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [[r for r in read_metrics(Path(cfg.output_dir, "metrics.jsonl")) if "loss" in r] for cfg in (whole, part)]
    strip = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and [r["step"] for r in rows[0]] == [2, 4, 5]
    assert all("strategy/kd_loss" in r and ("strategy/cosine_loss" in r) == (teacher == "live") for r in rows[0])
    assert ("strategy/teacher_cache_mb" in resumed) == (teacher == "cached")
    for key in ("strategy/kd_loss", "strategy/task_loss", *(["strategy/cosine_loss"] if teacher == "live" else [])):
        assert metrics[key] == resumed[key]


def test_resume_with_another_strategy_is_refused(make_cfg):
    args = [*LLAMA, "trainer.max_steps=2", "trainer.save_every=1"]
    plain = make_cfg(*args, out="plain")
    train(plain)
    again = make_cfg(*args, *DISTILL, "resume=auto", out="plain")
    with pytest.raises(FtuneError, match=r"strategy \(None: strategy=none\): checkpoint has None, this run has 'distill'"):
        train(again)


def test_resume_with_another_teacher_or_distill_setting_is_refused_and_the_same_resumes(make_cfg, tmp_path):
    """The teacher and the loss settings are part of the checkpoint's identity; where the teacher's logits come from
    (strategy.cache_teacher) is not: the loss is the same."""
    from transformers import AutoTokenizer

    other = tmp_path / "other_teacher"  # another tiny Llama, same tokenizer
    tiny("tiny_llama", "causal_lm", 1).save_pretrained(str(other))
    AutoTokenizer.from_pretrained(str(Path(__file__).parents[2] / "ftune/assets/tiny_tokenizer")).save_pretrained(
        str(other))
    args = [*LLAMA, *DISTILL, "trainer.save_every=1", "strategy.cache_teacher=false"]
    train(make_cfg(*args, "trainer.max_steps=2", out="kd"))
    for change, expected in ((f"strategy.teacher={other}", f"strategy.teacher: checkpoint has 'tiny_llama', this run "
                                                           f"has '{other.resolve()}'"),
                             ("strategy.temperature=3.0", "strategy.temperature: checkpoint has 2.0, this run has 3.0"),
                             ("strategy.kl=reverse", "strategy.kl: checkpoint has 'forward', this run has 'reverse'")):
        with pytest.raises(FtuneError) as err:
            train(make_cfg(*args, "trainer.max_steps=3", change, "resume=auto", out="kd"))
        msg = str(err.value)
        assert "belongs to a different run" in msg and expected in msg and "strategy settings" in msg, msg
        assert "\n" not in msg
    again = make_cfg(*[a for a in args if "cache_teacher" not in a], "strategy.cache_teacher=true",
                     "trainer.max_steps=4", "resume=auto", out="kd")
    metrics = train(again)
    assert metrics["train_steps"] == 4 and "strategy/teacher_cache_mb" in metrics


def test_cache_teacher_auto_caches_what_fits_and_true_refuses_what_does_not(make_cfg):
    """auto: cached when the logits fit in cache_max_mb and the run sees every example; else the teacher runs live
    and the header says why. true: refused with one paragraph where auto would run the teacher live."""
    from ftune.progress import console

    run = setup(make_cfg(*LLAMA, *DISTILL, "trainer.max_steps=4", out="fits"))  # 8 examples, batches of 2: one epoch
    assert run.strategy.cache is not None and run.strategy.teacher is None  # the teacher freed
    assert len(run.strategy.cache.rows) == 8 and "teacher logits cached" in run.strategy.header_lines()[0]
    for extra, why in ((["trainer.max_steps=3"], "less than an epoch"),
                       (["strategy.cache_max_mb=0.001"], "over strategy.cache_max_mb=0.001"),
                       (["strategy.cosine_weight=0.5"], "needs the teacher's hidden states")):
        run = setup(make_cfg(*LLAMA, *DISTILL, "trainer.max_steps=4", *extra, out="live"))
        assert run.strategy.cache is None and run.strategy.teacher is not None
        assert why in run.strategy.header_lines()[0], run.strategy.header_lines()
    with console.capture(), pytest.raises(FtuneError) as err:
        setup(make_cfg(*LLAMA, *DISTILL, "strategy.cache_teacher=true", "strategy.cache_max_mb=0.001", out="refused"))
    assert "strategy.cache_teacher=true cannot cache" in str(err.value) and "raise strategy.cache_max_mb" in str(err.value)
    msg = settings_error(make_cfg, *LLAMA, *DISTILL, "strategy.cache_teacher=true", "strategy.cosine_weight=0.5")
    assert "hidden states" in msg and "strategy.cache_teacher=auto or false" in msg
    msg = settings_error(make_cfg, *LLAMA, *DISTILL, "strategy.cache_teacher=sometimes")
    assert "strategy.cache_teacher must be true, false or auto (got 'sometimes')" in msg


def settings_error(make_cfg, *overrides: str) -> str:
    cfg = make_cfg(*overrides)
    with pytest.raises(FtuneError) as err:
        strategy = build_strategy(cfg.strategy)
        check_settings(cfg, validate_group(cfg, "trainer"), validate_group(cfg, "dataset"),
                       build_method(cfg.method).settings, strategy.settings)
        strategy.check()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_distill_settings_get_one_paragraph(make_cfg):
    msg = settings_error(make_cfg, *LLAMA, *DISTILL, "strategy.temperature=0", "strategy.alpha=1.5",
                         "strategy.student_layers=[0,-1]")
    assert "strategy.temperature must be positive" in msg and "strategy.alpha must be at least 0 and at most 1" in msg
    assert "strategy.student_layers[1] must be at least 0" in msg
    msg = settings_error(make_cfg, *LLAMA, *DISTILL, "strategy.kl=backward")
    assert "strategy.kl must be forward, reverse or symmetric (got 'backward')" in msg
    msg = settings_error(make_cfg, *LLAMA, "strategy=distill")
    assert "needs a teacher" in msg and "strategy.teacher=" in msg
    msg = settings_error(make_cfg, *LLAMA, "strategy=distill", "strategy.teacher=no_such_thing")
    assert "neither a run directory" in msg and "tiny_llama" in msg


def test_the_default_strategy_is_none_and_changes_nothing(make_cfg):
    cfg = make_cfg(*LLAMA)
    assert cfg.strategy.name == "none"
    run = setup(cfg)
    assert run.strategy.identity() == {} and run.strategy.param_groups(1.0) == []
    outputs, loss_sum, n = run.target_logits.forward(run.model, {k: v for k, v in run.collator(
        run.data.train[:2]).items()}, "causal_lm")
    assert torch.equal(run.strategy.loss(run.model, {}, outputs, loss_sum, n, 0), loss_sum / n)


def test_teacher_in_4bit_teaches_nearly_the_same_and_the_student_is_cut_in_full_precision(make_cfg):
    pytest.importorskip("bitsandbytes")
    args = [*LLAMA, *DISTILL, "model.config.num_hidden_layers=2", "strategy.student_layers=[1]", "trainer.max_steps=1"]
    runs = {bits: setup(make_cfg(*args, f"strategy.teacher_4bit={bits}", out=f"q{bits}")) for bits in (False, True)}
    assert any(type(m).__name__ == "Linear4bit" for m in runs[True].strategy.teacher.modules())
    assert not any(type(m).__name__ == "Linear4bit" for m in runs[False].strategy.teacher.modules())
    assert all(torch.equal(a, b) for a, b in zip(runs[False].model.state_dict().values(),
                                                 runs[True].model.state_dict().values(), strict=True))
    kd = {}
    for bits, run in runs.items():
        batch = {k: v for k, v in run.collator(run.data.train[:2]).items()}
        outputs, loss_sum, n = run.target_logits.forward(run.model, batch, "causal_lm")
        run.strategy.loss(run.model, batch, outputs, loss_sum, n, 0)
        kd[bits] = run.strategy.row_metrics(1)["strategy/kd_loss"]
    assert kd[True] == pytest.approx(kd[False], rel=0.2)  # NF4 rounding moves the teacher's logits a little
    run = runs[True]
    run.strategy.save(run.model, run.out)
    saved = load_file(str(run.out / "student" / "model.safetensors"))
    cut = student_from_layers(runs[False].strategy.teacher, [1]).state_dict()  # from the full-precision teacher
    assert saved.keys() <= cut.keys() and all(torch.equal(saved[k], cut[k]) for k in saved)


def test_a_teacher_padded_to_a_larger_vocabulary_is_compared_over_the_students_ids(make_cfg, tmp_path):
    """A teacher directory (model.path style) whose output layer has 1088 rows, the student's 1024 (as Qwen pads
    its vocabulary): the KL runs over the first 1024 logits of both, equal to the hand computation."""
    from transformers import AutoTokenizer

    teacher_dir = tmp_path / "teacher"
    padded = tiny("tiny_llama", "causal_lm", 2, vocab_size=1088)
    padded.save_pretrained(str(teacher_dir))
    AutoTokenizer.from_pretrained(str(Path(__file__).parents[2] / "ftune/assets/tiny_tokenizer")).save_pretrained(
        str(teacher_dir))
    run = setup(make_cfg(*LLAMA, "strategy=distill", f"strategy.teacher={teacher_dir}", "strategy.temperature=1.5",
                         "strategy.kl=symmetric", "strategy.cache_teacher=false"))
    assert run.strategy.teacher.get_output_embeddings().weight.shape[0] == 1088
    batch = run.collator(run.data.train[:2])
    outputs, loss_sum, n = run.target_logits.forward(run.model, batch, "causal_lm")
    run.strategy.loss(run.model, batch, outputs, loss_sum, n, 0)
    got = run.strategy.row_metrics(1)["strategy/kd_loss"]
    with torch.no_grad():
        student = target_rows(outputs.logits.detach(), batch["labels"])
        run.target_logits.remove()
        teacher = target_rows(run.strategy.teacher(**model_inputs(batch)).logits, batch["labels"])[:, :1024]
    js = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        ps, pt = softmax(s_row, 1.5), softmax(t_row, 1.5)
        m = [(a + b) / 2 for a, b in zip(ps, pt, strict=True)]
        js += 0.5 * kl(pt, m) + 0.5 * kl(ps, m)
    assert got == pytest.approx(js / student.shape[0], rel=1e-4)


def test_classifier_distilled_from_a_teacher_run_per_example(make_cfg):
    """tiny BERT: a 3-block teacher run (full fine-tuning), a 1-block student cut from it; KD per example."""
    bert = ["model=tiny_bert", "dataset=sentiment", "model.config.num_hidden_layers=3", "trainer.batch_size=4",
            "trainer.max_length=32", "dataset.max_samples=16", "dataset.max_eval_samples=8"]
    teacher = make_cfg(*bert, "method=full", "optimizer.lr=1e-3", out="teacher")
    train(teacher)
    student = [*bert, "strategy=distill", f"strategy.teacher={teacher.output_dir}", "strategy.student_layers=[2]",
               "strategy.temperature=3.0", "strategy.alpha=0.4", "method=lora", "trainer.max_steps=2"]
    run = setup(make_cfg(*student, out="student"))
    batch = run.collator(run.data.train[:4])
    outputs, loss_sum, n = run.target_logits.forward(run.model, batch, "seq_cls")
    got = run.strategy.loss(run.model, batch, outputs, loss_sum, 8, 0)
    with torch.no_grad():
        teacher_logits = run.strategy.teacher(**model_inputs(batch)).logits
    kd = sum(kl(softmax(t, 3.0), softmax(s, 3.0)) for s, t in zip(outputs.logits.tolist(), teacher_logits.tolist(),
                                                                    strict=True))
    ce = sum(-math.log(softmax(s, 1.0)[y]) for s, y in zip(outputs.logits.tolist(), batch["labels"].tolist(),
                                                          strict=True))
    assert float(got.detach()) == pytest.approx((0.6 * ce + 0.4 * 9.0 * kd) / 8, rel=1e-4)
    metrics = train(make_cfg(*student, out="trained"))
    assert 0 <= metrics["strategy/teacher_eval_accuracy"] <= 1
    assert metrics["strategy/accuracy_of_teacher"] == pytest.approx(
        metrics["eval/accuracy"] / metrics["strategy/teacher_eval_accuracy"])
    assert metrics["strategy/student_params"] < metrics["strategy/teacher_params"]
    first, second = run.data.label_names
    with pytest.raises(FtuneError, match=rf"predicts the classes \['{first}', '{second}'\], this run's data has"):
        setup(make_cfg(*student, f"dataset.label_names=[{second},{first}]", out="swapped"))


# --- strategy.cache_teacher: the teacher's logits computed once per example --------------------------------------
def loss_rows_and_weights(make_cfg, args: list[str], out: str) -> tuple[list[dict], dict, dict]:
    cfg = make_cfg(*args, out=out)
    metrics = train(cfg)
    rows = [r for r in read_metrics(Path(cfg.output_dir, "metrics.jsonl")) if "loss" in r]
    return rows, load_file(f"{cfg.output_dir}/adapter/adapter_model.safetensors"), metrics


def bert_teacher(make_cfg) -> tuple[list[str], str]:
    """A 3-block tiny BERT classifier run (2 steps of full fine-tuning): the classification tests' teacher."""
    bert = ["model=tiny_bert", "dataset=sentiment", "model.config.num_hidden_layers=3", "trainer.batch_size=4",
            "trainer.max_length=32", "dataset.max_samples=16", "dataset.max_eval_samples=8"]
    teacher = make_cfg(*bert, "method=full", "optimizer.lr=1e-3", "trainer.max_steps=2", out="teacher")
    train(teacher)
    return bert, teacher.output_dir


@pytest.mark.parametrize("case", ["causal", pytest.param("packed", marks=pytest.mark.slow), "classifier"])
def test_cached_teacher_logits_give_the_live_teachers_loss_and_weights(make_cfg, case):
    """Cached (strategy.cache_teacher=true) and live teacher: the same loss at every step and the same weights,
    over two epochs (the second reshuffles the batches; the cache is keyed by example, not batch position)."""
    if case == "classifier":
        bert, teacher = bert_teacher(make_cfg)
        args = [*bert, "strategy=distill", f"strategy.teacher={teacher}", "strategy.student_layers=[2]",
                "strategy.alpha=0.6", "method=lora", "trainer.max_steps=6"]
    else:
        args = [*LLAMA, *DISTILL, "model.init_seed=1", "trainer.max_steps=6", "optimizer.lr=1e-2",
                *(["trainer.packing=true", "trainer.pack_tokens=96"] if case == "packed" else [])]
    live_rows, live_w, live = loss_rows_and_weights(make_cfg, [*args, "strategy.cache_teacher=false"], "live")
    rows, weights, cached = loss_rows_and_weights(make_cfg, [*args, "strategy.cache_teacher=true"], "cached")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in live_rows]
    assert rows[-1]["epoch"] > 1  # the second epoch's batches: other examples together, in another order
    for a, b in zip(rows, live_rows, strict=True):
        for key in ("loss", "strategy/kd_loss", "strategy/task_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert weights.keys() == live_w.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], live_w[name], rtol=0, atol=1e-6)
    assert cached["strategy/teacher_cache_mb"] > 0 and "strategy/teacher_cache_mb" not in live
    for key in ("strategy/teacher_eval_loss", "strategy/teacher_eval_accuracy"):  # taken before the teacher is freed
        assert (key in cached) == (key in live) and cached.get(key) == pytest.approx(live.get(key), abs=1e-6)
    if case == "classifier":
        assert "strategy/teacher_eval_accuracy" in cached
        saved = [load_file(f"{make_cfg(out=o).output_dir}/student/model.safetensors") for o in ("live", "cached")]
        assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # the student's base, cut before training
