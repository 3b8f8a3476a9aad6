"""`ftune export` on real tiny runs: GGUF read back by transformers' own reader, the Ollama Modelfile, ONNX read
back by ONNX Runtime, and the refusals. Every check here is computed by the test itself from the merged model,
independently of the numbers the export reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ftune.config import config_dir
from ftune.errors import FtuneError
from ftune.export import ExportCheckFailed, export_run
from ftune.merge import logits_of, merge_in_memory
from ftune.train import train

from conftest import compose_train, run_cli

FAST = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=64", "trainer.log_every=1",
        "trainer.progress=false", "dataset.max_samples=16", "dataset.max_eval_samples=8", "optimizer.lr=1e-2"]


class Runs:
    """Tiny LoRA runs, trained on first use and shared by this module's tests."""

    JOBS = {"llama": ("tiny_llama", "demo_chat"), "qwen": ("tiny_qwen", "demo_chat"),
            "bert": ("tiny_bert", "sentiment"), "gpt2": ("tiny_gpt2", "demo_chat")}

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, name: str) -> Path:
        if name not in self.cache:
            model, dataset = self.JOBS[name]
            out = self.root / name
            train(compose_train([f"model={model}", f"dataset={dataset}", "method=lora", *FAST], out, small=False))
            self.cache[name] = out
        return self.cache[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("export_runs"))


def _reload(folder: Path, file: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=torch.float32).eval()


def _as_stored(model, quant: str):
    """The merged model with each weight rounded the way the GGUF stores it (the test's own rounding)."""
    import gguf

    T = gguf.GGMLQuantizationType
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 or quant == "f32":
                continue
            w = p.detach().numpy()
            if quant == "f16":
                p.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
            elif quant == "q8_0":
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, T.Q8_0), T.Q8_0).reshape(w.shape)))
    return model


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_llama_reloads_with_the_merged_logits(runs, tmp_path, quant):
    import gguf

    run = runs.get("llama")
    out = tmp_path / "gguf"
    result = export_run(run, out, format="gguf", quant=quant)
    file = out / f"llama-{quant}.gguf"
    assert file.is_file() and (out / "export.json").is_file()
    merged = merge_in_memory(run)
    full = logits_of(merged.model, merged.batch)
    got = logits_of(_reload(out, file.name), merged.batch)
    want = logits_of(_as_stored(merged.model, quant), merged.batch)
    assert float((got - want).abs().max()) <= 1e-5  # the file holds exactly the (rounded) merged model
    drift = float((got - full).abs().max())
    if quant == "f32":
        assert drift <= 1e-5
    else:  # rounding moves the logits a little, and the export measured the same amount
        assert 0 < drift < 0.05
        assert result["check"]["vs_merged_full_precision"]["max_abs_logit_diff"] == pytest.approx(drift, abs=1e-6)
        assert (got.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9

    reader = gguf.GGUFReader(str(file))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == merged.model.config.vocab_size
    assert len(fields["tokenizer.ggml.merges"].data) > 100
    assert fields["tokenizer.ggml.eos_token_id"].contents() == merged.tokenizer.eos_token_id
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()  # the run's ChatML template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[quant]
    assert "output.weight" in types  # tiny_llama's head is not tied


def test_gguf_qwen_tied_q4_0(runs, tmp_path):
    import gguf

    run = runs.get("qwen")
    out = tmp_path / "q4"
    result = export_run(run, out, format="gguf", quant="q4_0", name="tiny-qwen")
    file = out / "tiny-qwen-q4_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
    assert "output.weight" not in types  # tied: llama.cpp uses token_embd for the head
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["blk.0.attn_q.bias"] == "F32"  # qwen2's q/k/v biases
    reloaded = _reload(out, file.name)
    assert reloaded.config.model_type == "qwen2" and reloaded.config.tie_word_embeddings
    check = result["check"]
    assert check["vs_merged_as_stored"]["max_abs_logit_diff"] <= 1e-5
    assert 0 < check["vs_merged_full_precision"]["max_abs_logit_diff"] < 0.5  # q4_0's measured cost


def test_ollama_modelfile_from_the_cli(runs, tmp_path):
    run = runs.get("llama")
    out = tmp_path / "ollama"
    proc = run_cli("export", f"run={run}", "format=ollama", "quant=q8_0", f"out={out}", "name=tiny",
                   "system=You answer briefly, in English.")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded back with transformers' GGUF reader" in proc.stdout
    assert f"ollama create tiny -f {out}/Modelfile" in proc.stdout
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-q8_0.gguf\n") and (out / "tiny-q8_0.gguf").is_file()
    template = ('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
                '<|im_start|>assistant\n"""')
    assert template in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert 'SYSTEM """You answer briefly, in English."""' in modelfile
    card = (run / "README.md").read_text()
    assert "## Export" in card and f"ollama create tiny -f {out}/Modelfile" in card
    record = json.loads((out / "export.json").read_text())
    assert record["check"]["vs_merged_as_stored"]["max_abs_logit_diff"] <= 1e-5


def _tokenizer_with(template: str):
    from transformers import AutoTokenizer

    from ftune.config import package_path

    tok = AutoTokenizer.from_pretrained(str(package_path("ftune", "assets/tiny_tokenizer")))
    tok.chat_template = template
    return tok


def test_ollama_template_llama3_and_a_template_it_cannot_cut():
    from ftune.data.formats import FALLBACK_CHAT_TEMPLATES
    from ftune.export import _chat_pieces, ollama_template, stop_tokens

    tok = _tokenizer_with(FALLBACK_CHAT_TEMPLATES["llama3"])
    pieces = _chat_pieces(tok, add_bos=False)
    assert ollama_template(pieces).endswith(
        '{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
    assert stop_tokens(tok, pieces, None) == ["<|eot_id|>", "</s>"]
    # Llama-2: the system prompt is folded into the first user turn: turns are cut, the system part is not
    llama2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set sys = "
              "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set sys = false %}{% endif %}"
              "{% for m in loop_messages %}{% if loop.index0 == 0 and sys != false %}{% set c = '<<SYS>>\\n' + sys + "
              "'\\n<</SYS>>\\n\\n' + m['content'] %}{% else %}{% set c = m['content'] %}{% endif %}"
              "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + c.strip() + ' [/INST]' }}{% else %}"
              "{{ ' ' + c.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
    pieces = _chat_pieces(_tokenizer_with(llama2), add_bos=False)
    assert pieces["user"] == ("<s>[INST] ", " [/INST]") and pieces["assistant"] == (" ", " </s>")
    assert pieces["system"] is None and ".System" not in ollama_template(pieces)
    # turns numbered by the template: no fixed text around a turn, so no TEMPLATE at all
    numbered = "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert _chat_pieces(_tokenizer_with(numbered), add_bos=False) is None


def test_onnx_classifier_matches_in_onnxruntime(runs, tmp_path):
    import onnxruntime as ort

    run = runs.get("bert")
    out = tmp_path / "onnx"
    result = export_run(run, out, format="onnx")
    assert result["exporter"] == "dynamo"
    merged = merge_in_memory(run)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: merged.batch[i.name].numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(["logits"], feeds)[0])
    want = logits_of(merged.model, merged.batch)
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4
    assert json.loads((out / "labels.json").read_text()) == merged.label_names
    assert (out / "tokenizer.json").is_file() and "InferenceSession" in (run / "README.md").read_text()


@pytest.mark.slow
def test_onnx_causal_lm_without_cache(runs, tmp_path):
    import onnxruntime as ort

    run = runs.get("llama")
    out = tmp_path / "onnx"
    export_run(run, out, format="onnx")
    merged = merge_in_memory(run)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: merged.batch[i.name].numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(["logits"], feeds)[0])[merged.batch["attention_mask"].bool()]
    assert float((got - logits_of(merged.model, merged.batch)).abs().max()) <= 1e-4


def test_a_failed_check_writes_nothing(runs, tmp_path, monkeypatch):
    """Without llama.cpp's q/k permutation the file decodes to another model: the check catches it."""
    import ftune.export

    run = runs.get("llama")
    card = (run / "README.md").read_text()
    monkeypatch.setattr(ftune.export, "_permute", lambda w, n_head: w)
    out = tmp_path / "exports" / "x"
    with pytest.raises(ExportCheckFailed, match="does not hold the model. Nothing was written"):
        export_run(run, out, format="gguf", quant="f32")
    assert not (tmp_path / "exports").exists()
    # an earlier export in out survives a failed overwrite untouched
    out.mkdir(parents=True)
    (out / "old.gguf").write_text("old")
    with pytest.raises(ExportCheckFailed):
        export_run(run, out, format="gguf", quant="f32", overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["x"] and [p.name for p in out.iterdir()] == ["old.gguf"]
    assert (run / "README.md").read_text() == card


def test_refusals(runs, tmp_path):
    llama = runs.get("llama")
    out = tmp_path / "out"
    with pytest.raises(FtuneError, match="Unknown export format 'safetensors'"):
        export_run(llama, out, format="safetensors")
    with pytest.raises(FtuneError, match="Unknown GGUF quantization quant=q5_k"):
        export_run(llama, out, format="gguf", quant="q5_k")
    with pytest.raises(FtuneError, match="this run is a seq_cls model. Export it with format=onnx"):
        export_run(runs.get("bert"), out, format="ollama")
    with pytest.raises(FtuneError, match="maps the Llama, Mistral and Qwen2 families.*'gpt2'"):
        export_run(runs.get("gpt2"), out, format="gguf")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FtuneError, match="already exists and is not empty"):
        export_run(llama, out, format="gguf")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    not_mergeable = tmp_path / "prompt_run"
    (not_mergeable / "adapter").mkdir(parents=True)
    cfg = OmegaConf.load(llama / "config.yaml")
    cfg.method = OmegaConf.load(config_dir() / "method" / "prompt_tuning.yaml")
    (not_mergeable / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(FtuneError, match="'prompt_tuning' cannot be merged"):
        export_run(not_mergeable, tmp_path / "never", format="gguf")
    assert not (tmp_path / "never").exists()


def test_pre_tokenizer_names_for_llama_cpp():
    """tokenizer.ggml.pre tells llama.cpp how to split text before BPE: recognised from the split regex."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from ftune.config import ModelConfig
    from ftune.export import _pre_tokenizer_name

    def spec(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}

    cfg = ModelConfig(name="x")
    assert _pre_tokenizer_name(None, cfg, spec(PRETOKENIZE_REGEX)) == "qwen2"
    assert _pre_tokenizer_name(None, cfg, spec(_LLAMA3_SPLIT)) == "llama-bpe"
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}
    assert _pre_tokenizer_name(None, cfg, smollm) == "smollm"
    assert _pre_tokenizer_name(None, cfg, {"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"


def test_gguf_writer_maps_mistral(tmp_path):
    """The third family the writer maps, on a tiny Mistral built in memory (no run needed for the writer)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from ftune.config import ModelConfig, package_path
    from ftune.export import _load_gguf, write_gguf

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=None, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = MistralForCausalLM(config).eval()
    tok = AutoTokenizer.from_pretrained(str(package_path("ftune", "assets/tiny_tokenizer")))
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    file = tmp_path / "tiny-mistral-q8_0.gguf"
    write_gguf(model, tok, ModelConfig(name="tiny_mistral"), file, "q8_0", "tiny-mistral")
    reloaded, _ = _load_gguf(file)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-5  # `model` now holds the weights as stored (q8_0)
