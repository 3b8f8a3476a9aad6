"""Eval numbers checked against hand computations: classification metrics, perplexity, answer scoring,
and batched greedy decoding (left padding) against one prompt at a time."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ftune.config import validate_group
from ftune.data import build_data
from ftune.data.collate import Collator
from ftune.data.formats import IGNORE
from ftune.evaluate import (
    classification_metrics,
    evaluate_examples,
    extract_answer,
    predict_classes,
    prompt_and_reference,
    score_answers,
)
from ftune.generate import generate_ids, stop_text
from ftune.models import build_model, load_tokenizer

from conftest import compose_train

CPU = torch.device("cpu")


def test_classification_metrics_by_hand():
    # true:  0 0 0 1 1 2 2 2 2 0      pred: 0 1 0 1 2 2 2 0 2 0
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    preds = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
    m = classification_metrics(preds, labels, ["a", "b", "c", "d"])
    # rows: true class, columns: predicted; class d has neither support nor predictions
    assert m["confusion"]["matrix"] == [[3, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    assert m["confusion"]["labels"] == ["a", "b", "c", "d"]
    assert m["eval/accuracy"] == pytest.approx(7 / 10)
    # a: P = 3/4, R = 3/4 -> F1 .75;  b: P = 1/2, R = 1/2 -> .5;  c: P = 3/4, R = 3/4 -> .75;  d: 0
    assert m["per_class"]["a"] == {"support": 4, "predicted": 4, "correct": 3, "precision": 0.75, "recall": 0.75,
                                   "f1": 0.75}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["d"] == {"support": 0, "predicted": 0, "correct": 0, "precision": 0.0, "recall": 0.0,
                                   "f1": 0.0}
    assert m["eval/macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75 + 0.0) / 4)


def test_classification_metrics_unbalanced_f1():
    # every example predicted as class 0: P0 = 2/5, R0 = 1 -> F1 = 2*.4*1/1.4; class 1: F1 = 0
    m = classification_metrics([0] * 5, [0, 0, 1, 1, 1], ["neg", "pos"])
    assert m["eval/accuracy"] == pytest.approx(0.4)
    assert m["eval/macro_f1"] == pytest.approx((2 * 0.4 / 1.4) / 2)
    assert m["confusion"]["matrix"] == [[2, 0], [3, 0]]


@pytest.fixture(scope="module")
def bert_data():
    cfg = compose_train(["model=tiny_bert", "dataset=sentiment"])
    model_cfg = validate_group(cfg, "model")
    tok = load_tokenizer(model_cfg)
    data = build_data(replace(validate_group(cfg, "dataset"), max_samples=8, max_eval_samples=11), tok, 64)
    model = build_model(model_cfg, "seq_cls", num_labels=2, label_names=data.label_names,
                        pad_token_id=tok.pad_token_id).eval()
    return model, tok, data


def test_predict_classes_matches_one_by_one(bert_data):
    model, tok, data = bert_data
    examples = data.eval
    preds, labels, loss = predict_classes(model, examples, Collator(tok.pad_token_id, "seq_cls"), CPU, batch_size=4)
    # independently: one example at a time, no padding
    logits = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logits.append(model(input_ids=ids, token_type_ids=torch.tensor([ex["token_type_ids"]])).logits[0])
    logits = torch.stack(logits)
    gold = torch.tensor([ex["labels"] for ex in examples])
    assert labels == gold.tolist()
    assert preds == logits.argmax(-1).tolist()
    assert loss == pytest.approx(float(F.cross_entropy(logits, gold)), abs=1e-5)
    m = evaluate_examples(model, examples, Collator(tok.pad_token_id, "seq_cls"), "seq_cls", CPU, 4)
    assert m["eval/accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels))


@pytest.fixture(scope="module")
def llama():
    cfg = compose_train(["model=tiny_llama", "dataset=demo_instructions"])
    model_cfg = validate_group(cfg, "model")
    tok = load_tokenizer(model_cfg)
    data = build_data(replace(validate_group(cfg, "dataset"), max_samples=4, max_eval_samples=6), tok, 128)
    model = build_model(model_cfg, "causal_lm", pad_token_id=tok.pad_token_id).eval()
    return model, tok, data


def test_perplexity_is_exp_of_mean_target_token_loss(llama):
    model, tok, data = llama
    examples = data.eval
    m = evaluate_examples(model, examples, Collator(tok.pad_token_id, "causal_lm"), "causal_lm", CPU, batch_size=4)
    # independently: each example alone, -log p(token | prefix) summed over the answer tokens only
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double(), -1).tolist()
            for t in range(1, len(ex["input_ids"])):
                if ex["labels"][t] != IGNORE:  # the prompt is masked, as in training
                    nll -= logp[t - 1][ex["input_ids"][t]]
                    count += 1
    assert count == sum(sum(lab != IGNORE for lab in ex["labels"][1:]) for ex in examples)
    assert m["eval/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert m["eval/perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert m["eval/examples"] == len(examples)


def test_prompt_and_reference_split_at_first_answer():
    ex = {"input_ids": [2, 10, 11, 12, 20, 21, 3, 13, 30], "labels": [IGNORE] * 4 + [20, 21, 3] + [IGNORE, 30]}
    assert prompt_and_reference(ex) == ([2, 10, 11, 12], [20, 21, 3])
    assert prompt_and_reference({"input_ids": [1, 2], "labels": [1, 2]}) is None  # no prompt: nothing to answer


@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### $1,234.00", "1234"),
    ("So the answer is 18.", "18"),
    ("She has -3 apples, then 5.5 more", "5.5"),
    ("no number here", ""),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_answer(text, "gsm8k") == expected


def test_exact_match_scoring():
    preds = ["  Forest, garden,  green.", "REVIR", "12 ", "13", "#### 72"]
    refs = ["forest, garden, green", "revir", "12", "12", "The total is 72"]
    assert score_answers(preds, refs, "exact_match") == [True, True, True, False, False]
    assert score_answers(preds[-1:], refs[-1:], "gsm8k") == [True]


def test_stop_text_cuts_at_end_of_turn():
    assert stop_text("12<|im_end|>\n<|im_start|>user") == "12"
    assert stop_text("revir\n### Instruction:\nmore") == "revir"
    assert stop_text(" plain ") == "plain"


def test_batched_greedy_with_left_padding_equals_one_at_a_time(llama):
    model, tok, data = llama
    prompts = [prompt_and_reference(ex)[0] for ex in data.eval[:2]] + [[tok.bos_token_id, 40, 41]]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded on the left
    batched = generate_ids(model, tok, prompts, max_new_tokens=4, batch_size=4, temperature=0.0)
    for p, out in zip(prompts, batched, strict=True):
        alone = generate_ids(model, tok, [p], max_new_tokens=4, batch_size=1, temperature=0.0)[0]
        assert out == alone
        # and greedy means the argmax at every step
        ids = list(p)
        with torch.no_grad():
            for _ in range(len(out)):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(p):] == out
