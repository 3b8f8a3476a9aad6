"""`ftune export`: a run as the files people deploy, each checked by loading it back before it is kept.

    ftune export run=runs/x format=gguf quant=q8_0 out=exports/x        # llama.cpp
    ftune export run=runs/x format=ollama quant=q8_0 out=exports/x      # the GGUF + a Modelfile
    ftune export run=runs/x format=onnx out=exports/x-onnx              # ONNX Runtime

The run is merged in memory (``ftune merge``'s merge and its check against base+adapter), then:

- **gguf**: the merged Llama/Mistral/Qwen2-family model is written with the ``gguf`` package's writer and
  its tensor-name map (llama.cpp's names; llama.cpp's row permutation of the llama-arch q/k projections),
  in f32/f16/bf16, or quantized to q8_0/q4_0 with ``gguf.quants`` (1-D tensors stay f32; in q4_0 the
  output head stays q8_0, as llama.cpp's quantizer keeps it at higher precision). The tokenizer
  (``tokenizer.ggml.*``) and the chat template go into the metadata. No llama.cpp checkout, no download.
  Check: transformers' own GGUF reader (``from_pretrained(dir, gguf_file=...)``, independent of the
  writer) loads the file; its logits on real examples of the run's data must equal those of the merged
  model whose weights were rounded exactly as written (``tolerance``, 1e-5). For f32 that is the merged
  model itself; for f16/bf16 its weights cast to that dtype; for q8_0/q4_0 quantized and dequantized.
  What the rounding itself costs (max |Δlogit| and top-1 agreement against the full-precision merged
  model) is measured and printed, and gated by ``quant_tolerance`` / ``min_top1`` when they are set.
- **ollama**: the GGUF, plus a ``Modelfile``: FROM, TEMPLATE (the chat template in Ollama's Go-template
  form, derived by rendering the Jinja template and checked to reproduce it), PARAMETER stop per stop
  token, SYSTEM when ``system=`` is given; the ``ollama create`` command is printed and put in the card.
- **onnx**: the merged classifier or causal LM (logits, no KV cache) through ``torch.onnx.export``
  (dynamo); check: ONNX Runtime's outputs equal the merged model's within ``tolerance`` (1e-4) on real
  examples, at two batch shapes (the axes are dynamic).

Everything is written to a temporary folder next to ``out`` and renamed into place once checked; a
failed check leaves nothing, exits non-zero and says why. The run's card (README.md) gets an Export
section saying how to use what was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ftune.errors import FtuneError

FORMATS = ("gguf", "ollama", "onnx")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
GGUF_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}  # transformers model_type -> gguf
PERMUTED_ARCHITECTURES = ("LLAMA",)  # llama.cpp permutes the rows of q/k for its rope layout
GGUF_TOLERANCE, ONNX_TOLERANCE = 1e-5, 1e-4


class ExportCheckFailed(FtuneError):
    """The exported file, loaded back, does not give the merged model's outputs; nothing was kept."""

    exit_code = 1


def _refuse_settings(fmt: str, quant: str) -> None:
    if fmt not in FORMATS:
        raise FtuneError(f"Unknown export format '{fmt}'; choose format=gguf (llama.cpp), format=ollama (GGUF + "
                         f"Modelfile) or format=onnx (ONNX Runtime). Nothing was written.")
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise FtuneError(f"format=onnx needs {', '.join(missing)} (torch's exporter and the ONNX Runtime check), "
                             f"which {'is' if len(missing) == 1 else 'are'} not installed: `pip install 'ftune[export]'`. "
                             f"Nothing was written.")
    if fmt != "onnx" and quant not in QUANTS:
        raise FtuneError(f"Unknown GGUF quantization quant={quant}; choose one of {', '.join(QUANTS)} (f16 keeps "
                         f"the weights nearly exact, q8_0 halves that size, q4_0 quarters it). Nothing was written.")


def _refuse_run(fmt: str, run_cfg) -> None:
    """What can be refused from the run's config alone, before any weight is loaded."""
    from ftune.config import validate_group
    from ftune.data import task_of

    task = task_of(validate_group(run_cfg, "dataset"))
    if fmt in ("gguf", "ollama") and task != "causal_lm":
        raise FtuneError(f"format={fmt} writes causal language models (llama.cpp/Ollama run text generators); this "
                         f"run is a {task} model. Export it with format=onnx instead. Nothing was written.")
    if fmt == "onnx" and task not in ("causal_lm", "seq_cls"):
        raise FtuneError(f"format=onnx exports classification and causal-LM runs; this run is a {task} model. "
                         f"Nothing was written.")
    built = (run_cfg.model.get("config") or {}).get("model_type")
    if fmt in ("gguf", "ollama") and built is not None:
        _refuse_architecture(str(built))


def _refuse_architecture(model_type: str) -> None:
    if model_type not in GGUF_ARCHITECTURES:
        raise FtuneError(
            f"ftune's GGUF writer maps the Llama, Mistral and Qwen2 families (model_type {', '.join(GGUF_ARCHITECTURES)}); "
            f"this run's model is '{model_type}'. Use `ftune merge` and llama.cpp's convert_hf_to_gguf.py on the "
            f"merged folder, or format=onnx. Nothing was written."
        )


# ----------------------------------------------------------------------------------------------------- GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (interleaved rope pairs -> halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type not in ("default", None):
        raise FtuneError(f"The model uses '{rope_type}' rope scaling, which ftune's GGUF writer does not write "
                         f"(llama.cpp's convert_hf_to_gguf.py does). Nothing was written.")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _tensor_type(name: str, data: np.ndarray, quant: str, tied: bool):
    """The GGML type a tensor is stored in."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or quant == "f32":
        return T.F32
    if quant in ("f16", "bf16"):
        return T.F16 if quant == "f16" else T.BF16
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    qtype = T.Q8_0 if quant == "q8_0" or head else T.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block == 0 else T.F16  # rows not a whole number of blocks: f16 as llama.cpp


def _encode(data: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(bytes to write, the float32 values they decode to)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return data, data
    if qtype == T.F16:
        half = data.astype(np.float16)
        return half, half.astype(np.float32)
    raw = gguf.quants.quantize(data, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(data.shape).astype(np.float32)


def _pre_tokenizer_name(tokenizer, model_cfg, spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (tokenizer.ggml.pre): the source GGUF's own, else by its regex."""
    from ftune.models_gguf import is_gguf, locate_gguf

    if is_gguf(model_cfg):
        import gguf

        try:
            field = gguf.GGUFReader(str(locate_gguf(model_cfg))).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
        except (OSError, ValueError, FtuneError):
            pass
    text = json.dumps(spec.get("pre_tokenizer"))
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}" in text:
        return "qwen2" if "\\\\p{N}|" in text else "llama-bpe"  # Qwen2 splits single digits, Llama-3 up to three
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    return "gpt-2" if '"ByteLevel"' in text and '"use_regex": true' in text else "default"


def _add_tokenizer(writer, tokenizer, model_cfg, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.*: model, pre, tokens, token types, scores, merges, special ids, add_bos/eos."""
    import gguf

    if not getattr(tokenizer, "backend_tokenizer", None):
        raise FtuneError("The run's tokenizer has no fast (tokenizers) form, which the GGUF writer reads. Nothing was written.")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE":
        raise FtuneError(f"The run's tokenizer is a {model.get('type')} tokenizer; ftune's GGUF writer writes BPE "
                         f"tokenizers (byte-level as GPT-2/Llama-3/Qwen2, or SentencePiece-style as Llama-2/Mistral). "
                         f"Nothing was written.")
    byte_level = '"ByteLevel"' in text
    if not byte_level and not model.get("byte_fallback"):
        raise FtuneError("The run's BPE tokenizer is neither byte-level nor SentencePiece-style (byte fallback); "
                         "ftune's GGUF writer cannot describe it to llama.cpp. Nothing was written.")
    T = gguf.TokenType
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: T.NORMAL for i in tokens}
    if not byte_level:
        for i, t in tokens.items():
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                types[i] = T.BYTE
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = T.CONTROL if added.get("special") else T.USER_DEFINED
    if tokenizer.unk_token_id is not None and not byte_level:
        types[tokenizer.unk_token_id] = T.UNKNOWN
    if max(tokens) >= vocab_size:
        raise FtuneError(f"The tokenizer has ids up to {max(tokens)} but the model's embedding has {vocab_size} rows; "
                         f"the run's tokenizer does not fit its model. Nothing was written.")
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # llama.cpp pads to the embedding size
    type_list = [int(types.get(i, T.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer, model_cfg, spec) if byte_level else "default")
    writer.add_token_list(token_list)
    writer.add_token_types(type_list)
    if not byte_level:
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
    if merges:
        writer.add_token_merges(merges)
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(probe) and probe[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and bool(probe) and probe[-1] == tokenizer.eos_token_id
    for what, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{what}_token_id")(int(tid))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if not byte_level:
        writer.add_add_space_prefix('"prepend_scheme": "always"' in text or '"add_prefix_space": true' in text)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    return {"tokenizer_model": "gpt2" if byte_level else "llama", "tokens": len(token_list), "merges": len(merges),
            "add_bos_token": add_bos}


def write_gguf(model: nn.Module, tokenizer, model_cfg, file: Path, quant: str, name: str) -> dict[str, Any]:
    """Write ``model`` to ``file``, and set each of its weights to the values the file decodes to (the
    reference the reload check compares with); returns what it wrote."""
    import gguf

    config = model.config
    _refuse_architecture(config.model_type)
    for flag in ("attention_bias", "mlp_bias"):
        if config.model_type != "qwen2" and getattr(config, flag, False):
            raise FtuneError(f"The model sets {flag}=true, which llama.cpp's llama architecture has no tensors for. "
                             f"Nothing was written.")
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[config.model_type])
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(arch, n_layers)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}

    writer = gguf.GGUFWriter(str(file), arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(n_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(int(head_dim))
    writer.add_file_type(file_types[quant])
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = _add_tokenizer(writer, tokenizer, model_cfg, int(config.vocab_size))

    counts: dict[str, int] = {}
    with torch.no_grad():
        for hf_name, param in model.named_parameters():
            stem, _, suffix = hf_name.rpartition(".")
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp (and transformers' reader) use token_embd for a tied head
            gguf_name = names.get_name(stem)
            if gguf_name is None:
                raise FtuneError(f"ftune's GGUF writer has no llama.cpp name for the weight '{hf_name}' of this "
                                 f"{config.model_type} model. Nothing was written.")
            gguf_name = f"{gguf_name}.{suffix}"
            data = param.detach().float().cpu().numpy()
            rows = n_head if stem.endswith("q_proj") else n_kv if stem.endswith("k_proj") else 0
            permuted = arch.name in PERMUTED_ARCHITECTURES and rows and suffix == "weight"
            if permuted:
                data = _permute(data, rows)
            qtype = _tensor_type(gguf_name, data, quant, tied)
            raw, decoded = _encode(data, qtype)
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                                gguf.GGMLQuantizationType.F16)
                              else None)
            if permuted:
                decoded = _unpermute(decoded, rows)
            param.copy_(torch.from_numpy(np.ascontiguousarray(decoded)))
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch_name, "tensor_types": counts, "tied_embeddings": tied, **tok}


def _load_gguf(file: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.models_gguf import _quiet_loading

    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        except Exception:  # noqa: BLE001 - the weights are what the check gates; a tokenizer note is enough
            tokenizer = None
    return model.eval(), tokenizer


def _tokenizer_agreement(original, reloaded, texts: list[str]) -> str:
    if reloaded is None:
        return "transformers could not rebuild the tokenizer from the file"
    same = sum(original(t, add_special_tokens=False)["input_ids"] == reloaded(t, add_special_tokens=False)["input_ids"]
               for t in texts)
    return f"{same}/{len(texts)} check texts encode to the same ids"


# ---------------------------------------------------------------------------------------------------- Ollama

_S, _U, _A, _U2 = "\x02SYSTEM\x03", "\x02USER\x03", "\x02ASSISTANT\x03", "\x02USER2\x03"


def _chat_pieces(tokenizer, add_bos: bool) -> dict[str, Any] | None:
    """The chat template cut into the text around each role's content, or None when it is not of that shape
    (the pieces are checked to rebuild the Jinja rendering of two conversations exactly)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None

    def render(msgs: list[tuple[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False,
                                             add_generation_prompt=gen)

    try:
        r_u = render([("user", _U)], False)
        gen = render([("user", _U)], True)[len(r_u):]
        r_ua = render([("user", _U), ("assistant", _A)], False)
        a_pre, _, a_suf = r_ua[len(r_u):].partition(_A)
        r_uau = render([("user", _U), ("assistant", _A), ("user", _U2)], False)
        u_pre, _, u_suf = r_uau[len(r_ua):].partition(_U2)
        head, _, tail = r_u.partition(_U)
        if not head.endswith(u_pre) or tail != u_suf:
            return None
        preamble = head[:len(head) - len(u_pre)]
        pieces = {"preamble": preamble, "user": (u_pre, u_suf), "assistant": (a_pre, a_suf), "generation": gen,
                  "system": None}
        try:
            r_s = render([("system", _S), ("user", _U)], False)
            block = r_s[:r_s.index(_U) - len(u_pre)]
            s_pre, _, s_suf = block.partition(_S)
            pieces["system"] = (s_pre, s_suf)
        except Exception:  # noqa: BLE001 - a template without system messages
            pass
        bos = tokenizer.bos_token or ""
        if add_bos and bos and preamble.startswith(bos):  # llama.cpp adds BOS itself: not twice
            pieces["preamble"] = preamble[len(bos):]
            if pieces["system"] and pieces["system"][0].startswith(bos):
                pieces["system"] = (pieces["system"][0][len(bos):], pieces["system"][1])
        # the check: the pieces rebuild the template's own rendering
        convo = [("user", "Hi there"), ("assistant", "Hello!"), ("user", "What is 2+2?"), ("assistant", "4"),
                 ("user", "And 3+3?")]

        def rebuild(start: str) -> str:
            roles = {"user": pieces["user"], "assistant": pieces["assistant"]}
            return start + "".join(roles[r][0] + c + roles[r][1] for r, c in convo) + gen

        strip = bos if add_bos and bos and preamble.startswith(bos) else ""
        if rebuild(pieces["preamble"]) != render(convo, True).removeprefix(strip):
            return None
        if pieces["system"]:
            s_pre, s_suf = pieces["system"]
            if rebuild(s_pre + "Be brief." + s_suf) != render([("system", "Be brief."), *convo], True).removeprefix(strip):
                pieces["system"] = None
    except Exception:  # noqa: BLE001 - any template we cannot cut: no TEMPLATE line, said so
        return None
    return pieces


def _go(text: str) -> str:
    """Literal text inside a Go template."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(pieces: dict[str, Any]) -> str:
    """The chat template in the Go-template form Ollama's TEMPLATE takes."""
    (u_pre, u_suf), (a_pre, a_suf) = pieces["user"], pieces["assistant"]
    start = _go(pieces["preamble"])
    if pieces["system"]:
        s_pre, s_suf = pieces["system"]
        default = f"{{{{ else }}}}{start}" if start else ""  # a system prompt the template adds by itself
        start = f"{{{{ if .System }}}}{_go(s_pre)}{{{{ .System }}}}{_go(s_suf)}{default}{{{{ end }}}}"
    return (f"{start}{{{{ range .Messages }}}}{{{{ if eq .Role \"user\" }}}}{_go(u_pre)}{{{{ .Content }}}}{_go(u_suf)}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{_go(a_pre)}{{{{ .Content }}}}{_go(a_suf)}{{{{ end }}}}"
            f"{{{{ end }}}}{_go(pieces['generation'])}")


def stop_tokens(tokenizer, pieces: dict[str, Any] | None, generation_config) -> list[str]:
    """The end of an assistant turn and the end-of-sequence tokens."""
    stops: list[str] = []
    if pieces and pieces["assistant"][1].strip():
        stops.append(pieces["assistant"][1].strip())
    eos_ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
    for tid in [tokenizer.eos_token_id, *eos_ids]:
        if tid is not None:
            stops.append(tokenizer.convert_ids_to_tokens(int(tid)))
    return list(dict.fromkeys(s for s in stops if s))


def write_modelfile(folder: Path, gguf_name: str, pieces, stops: list[str], system: str | None) -> str:
    """The Modelfile: FROM, TEMPLATE (when the chat template could be cut into turns), stops, SYSTEM."""
    lines = [f"FROM ./{gguf_name}"]
    if pieces is not None:
        lines.append(f'TEMPLATE """{ollama_template(pieces)}"""')
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    text = "\n".join(lines) + "\n"
    (folder / "Modelfile").write_text(text)
    return text


# ------------------------------------------------------------------------------------------------------ ONNX


class _Logits(nn.Module):
    """The model's logits as the one output (no cache, no loss): what the ONNX graph returns."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.causal:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def _onnx_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch and k in accepted}


def write_onnx(model: nn.Module, batch: dict[str, torch.Tensor], file: Path) -> dict[str, Any]:
    """torch.onnx.export (dynamo) of the logits, batch and sequence axes dynamic."""
    from ftune.progress import console

    inputs = _onnx_inputs(model, batch)
    names = list(inputs)
    wrapper = _Logits(model, causal=type(model).__name__.endswith("ForCausalLM")).eval()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9  # protobuf's 2 GB limit
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        torch.onnx.export(wrapper, (), str(file), kwargs=inputs, dynamo=True, input_names=names,
                          output_names=["logits"], external_data=big, verbose=False,
                          dynamic_shapes={n: {0: batch_dim, 1: seq_dim} for n in names})
        exporter = "dynamo"
    except Exception as e:  # noqa: BLE001 - the TorchScript exporter handles some graphs dynamo does not
        console.print(f"[yellow]note[/] torch's dynamo exporter failed ({type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[0][:200]}); using the TorchScript exporter.")
        for leftover in file.parent.glob(f"{file.name}*"):
            leftover.unlink()
        torch.onnx.export(wrapper, tuple(inputs.values()), str(file), dynamo=False, input_names=names,
                          output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
        exporter = "torchscript"
    return {"inputs": names, "exporter": exporter, "external_data": big}


def _ort_logits(file: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {k: v.cpu().numpy() for k, v in inputs.items()})[0]


# ------------------------------------------------------------------------------------------------ the command


def _sizes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def _masked(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits[batch["attention_mask"].bool()] if logits.dim() == 3 else logits


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    if got.shape != want.shape:
        return {"max_abs_logit_diff": float("inf"), "top1_agreement": 0.0}
    return {"max_abs_logit_diff": float((got - want).abs().max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def _update_card(run_dir: Path, out: Path, text: str) -> None:
    """The run card (README.md) gets an Export section; an earlier export to the same ``out`` is replaced."""
    card = run_dir / "README.md"
    if not card.is_file():
        return
    begin, end = f"<!-- ftune export: {out} -->", "<!-- /ftune export -->"
    old = card.read_text()
    block = f"{begin}\n{text.strip()}\n{end}\n"
    if begin in old:
        head, _, rest = old.partition(begin)
        old = head + rest.partition(end)[2].lstrip("\n")
    if "## Export" not in old:
        old = old.rstrip("\n") + "\n\n## Export\n\n"
    with contextlib.suppress(OSError):  # a read-only run directory: the export itself is done
        card.write_text(old.rstrip("\n") + "\n\n" + block)


def export_run(run: str | Path, out: str | Path, *, format: str = "gguf", quant: str = "f16",
               overwrite: bool = False, device: str = "cpu", tolerance: float | None = None,
               quant_tolerance: float | None = None, min_top1: float | None = None, check_examples: int = 4,
               check_max_length: int = 128, name: str | None = None, system: str | None = None) -> dict[str, Any]:
    """Export run ``run`` to ``out`` in ``format``; returns the check's numbers, sizes and times."""
    from ftune.config import validate_group
    from ftune.merge import _install, check_out_dir, keep_training_chat_template, merge_in_memory
    from ftune.progress import console
    from ftune.runs import check_run_dir

    started = time.perf_counter()
    fmt, quant = str(format), str(quant)
    _refuse_settings(fmt, quant)
    if out is None or str(out) in ("", "???"):
        raise FtuneError(f"Pass the directory to write: `ftune export run=runs/x format={fmt} out=exports/x`.")
    run_dir = check_run_dir(run)
    out = Path(str(out)).expanduser()

    def refuse(run_cfg, method) -> None:
        check_out_dir(out, run_dir, overwrite)
        _refuse_run(fmt, run_cfg)

    merged, tokenizer, method, run_cfg, task, label_names, batch, merge_diff, _, _ = merge_in_memory(
        run, device=device, check_examples=check_examples, check_max_length=check_max_length, before_loading=refuse)
    merged_at = time.perf_counter()
    model_cfg = validate_group(run_cfg, "model")
    keep_training_chat_template(tokenizer, run_cfg, task)
    data_cfg = validate_group(run_cfg, "dataset")
    if fmt == "ollama" and data_cfg.format == "instruction" and data_cfg.prompt_template != "chat":
        console.print(f"[yellow]note[/] the run was trained on the '{data_cfg.prompt_template}' prompt format, not on "
                      f"a chat template; Ollama's chat renders the TEMPLATE. For answers like training's, send prompts "
                      f"in the training format (Ollama's raw mode), or train with dataset.prompt_template=chat.")
    name = str(name) if name else re.sub(r"[^a-z0-9._-]+", "-", run_dir.resolve().name.lower()).strip("-") or "model"
    result: dict[str, Any] = {"run": str(run), "out": str(out), "format": fmt, "method": method.name, "task": task,
                              "merge_max_abs_diff": merge_diff, "check_examples": int(batch["input_ids"].shape[0])}
    made = [d for d in [out.parent, *out.parent.parents] if not d.exists()]  # taken back if the export fails
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.ftune-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if fmt == "onnx":
            card = _export_onnx(merged, tokenizer, task, label_names, batch, tmp, out, result,
                                ONNX_TOLERANCE if tolerance is None else float(tolerance))
        else:
            card = _export_gguf(merged, tokenizer, model_cfg, batch, tmp, out, result, fmt, quant, name, system,
                                GGUF_TOLERANCE if tolerance is None else float(tolerance), quant_tolerance, min_top1)
        result["sizes"] = _sizes(tmp)
        result["seconds"] = {"merge": merged_at - started, "export_and_check": time.perf_counter() - merged_at}
        (tmp / "export.json").write_text(json.dumps(result, indent=2) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    result["seconds"]["total"] = time.perf_counter() - started
    _update_card(run_dir, out, card)
    size = sum(result["sizes"].values()) / 2**20
    console.print(f"[bold green]exported[/] {method.name} run {run} -> {out} ({fmt}"
                  + (f" {quant}" if fmt != "onnx" else "") + f", {size:.1f} MB, {result['seconds']['total']:.0f} s)",
                  soft_wrap=True)
    console.print(card.strip(), soft_wrap=True, markup=False, highlight=False)
    return result


def _export_gguf(merged, tokenizer, model_cfg, batch, tmp: Path, out: Path, result: dict, fmt: str, quant: str,
                 name: str, system: str | None, tolerance: float, quant_tolerance: float | None,
                 min_top1: float | None) -> str:
    from ftune.merge import logits_of
    from ftune.progress import console

    _refuse_architecture(merged.config.model_type)
    full = logits_of(merged, batch)  # the full-precision merged model, before the weights are rounded
    file = tmp / f"{name}-{quant}.gguf"
    with console.status(f"Writing {file.name}"):
        written = write_gguf(merged, tokenizer, model_cfg, file, quant, name)
    reference = logits_of(merged, batch)  # the merged model with its weights as the file stores them
    generation_config = getattr(merged, "generation_config", None)
    del merged
    with console.status(f"Loading {file.name} back with transformers' GGUF reader"):
        reloaded, reloaded_tok = _load_gguf(file)
    got = logits_of(reloaded, batch)
    del reloaded
    exact = _compare(got, reference)
    rounding = _compare(got, full)
    texts = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=False)
             for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    result.update({"quant": quant, "file": file.name, **written,
                   "check": {"vs_merged_as_stored": exact, "vs_merged_full_precision": rounding,
                             "tolerance": tolerance, "positions": int(got.shape[0]),
                             "tokenizer": _tokenizer_agreement(tokenizer, reloaded_tok, texts)}})
    console.print(
        f"check: {file.name} loaded back with transformers' GGUF reader vs the merged model with its weights as "
        f"stored ({quant}), {got.shape[0]} token positions of {result['check_examples']} real examples: max "
        f"|Δlogit| {exact['max_abs_logit_diff']:.3g} (tolerance {tolerance:g}); vs the full-precision merged "
        f"model: max |Δlogit| {rounding['max_abs_logit_diff']:.3g}, top-1 agreement {rounding['top1_agreement']:.4f}; "
        f"tokenizer: {result['check']['tokenizer']}", soft_wrap=True, markup=False)
    if not exact["max_abs_logit_diff"] <= tolerance:
        raise ExportCheckFailed(
            f"The GGUF file, loaded back with transformers' reader, gives logits that differ from the merged model's "
            f"(with its weights rounded as stored, {quant}) by {exact['max_abs_logit_diff']:.3g}, more than "
            f"{tolerance:g}: the file does not hold the model. Nothing was written to {out}. Report this with the "
            f"run's config.yaml; `ftune merge` writes a safetensors model meanwhile."
        )
    if quant_tolerance is not None and not rounding["max_abs_logit_diff"] <= float(quant_tolerance):
        raise ExportCheckFailed(
            f"{quant} rounding moves the logits by up to {rounding['max_abs_logit_diff']:.3g}, more than "
            f"quant_tolerance={quant_tolerance}. Nothing was written to {out}; choose a finer quant (q8_0, f16) or "
            f"raise quant_tolerance.")
    if min_top1 is not None and not rounding["top1_agreement"] >= float(min_top1):
        raise ExportCheckFailed(
            f"With {quant} the top-1 token agrees with the full-precision model at only "
            f"{rounding['top1_agreement']:.4f} of positions (min_top1={min_top1}). Nothing was written to {out}; "
            f"choose a finer quant (q8_0, f16) or lower min_top1.")
    check = (f"transformers' GGUF reader vs the merged model as stored: max |Δlogit| "
             f"{exact['max_abs_logit_diff']:.3g} (≤ {tolerance:g}); vs full precision: max |Δlogit| "
             f"{rounding['max_abs_logit_diff']:.3g}, top-1 agreement {rounding['top1_agreement']:.4f}")
    if fmt == "gguf":
        return (f"### GGUF ({quant}): `{out}/{file.name}`\n\n- check: {check}\n- llama.cpp: "
                f"`llama-cli -m {out}/{file.name} -cnv`\n- transformers: "
                f"`AutoModelForCausalLM.from_pretrained('{out}', gguf_file='{file.name}')`\n")
    pieces = _chat_pieces(tokenizer, bool(written.get("add_bos_token")))
    stops = stop_tokens(tokenizer, pieces, generation_config)
    modelfile = write_modelfile(tmp, file.name, pieces, stops, system)
    command = f"ollama create {name} -f {out}/Modelfile && ollama run {name}"
    result["ollama"] = {"command": command, "template": pieces is not None, "stops": stops, "modelfile": modelfile}
    if system and pieces is not None and not pieces["system"]:
        console.print("[yellow]note[/] the model's chat template has no place for a system message that ftune can "
                      "express in Ollama's TEMPLATE; the Modelfile's SYSTEM line has no effect with this TEMPLATE.")
    if pieces is None:
        console.print("[yellow]note[/] the chat template could not be cut into Ollama's TEMPLATE form (or the model "
                      "has none); the Modelfile has no TEMPLATE line, and Ollama falls back to the template it "
                      "recognises in the GGUF's metadata.")
    return (f"### Ollama ({quant}): `{out}/Modelfile` + `{file.name}`\n\n- check: {check}\n- create and run: "
            f"`{command}`\n- stop tokens: {', '.join(stops) or 'none'}; TEMPLATE: "
            f"{'from the chat template' if pieces else 'none (Ollama reads the GGUF metadata)'}\n")


def _export_onnx(merged, tokenizer, task: str, label_names: list[str], batch, tmp: Path, out: Path, result: dict,
                 tolerance: float) -> str:
    from ftune.merge import logits_of
    from ftune.progress import console

    merged = merged.float().cpu().eval()  # exported and checked on the CPU, as ONNX Runtime runs it here
    file = tmp / "model.onnx"
    with console.status("Exporting to ONNX with torch.onnx.export (dynamo)"):
        written = write_onnx(merged, batch, file)
    inputs = _onnx_inputs(merged, batch)
    n = inputs["input_ids"].shape[0]
    # a second shape: fewer rows, shorter: the dynamic axes must hold
    half = {k: v[: max(1, n // 2), : max(2, int(batch["attention_mask"][: max(1, n // 2)].sum(-1).max()))]
            for k, v in inputs.items()}
    half_batch = {**half, "attention_mask": half["attention_mask"]}
    checks = {}
    for label, inp, ref_batch in (("check batch", inputs, batch), ("smaller batch", half, half_batch)):
        want = logits_of(merged, ref_batch)
        got = _masked(torch.from_numpy(_ort_logits(file, inp)).float(), ref_batch)
        checks[label] = {**_compare(got, want), "shape": list(inp["input_ids"].shape)}
    worst = max(c["max_abs_logit_diff"] for c in checks.values())
    result.update({"file": file.name, **written, "check": {**checks, "tolerance": tolerance}})
    console.print("check: ONNX Runtime vs the merged model on real examples of the run's data: "
                  + "; ".join(f"{k} {v['shape']}: max |Δlogit| {v['max_abs_logit_diff']:.3g}, top-1 agreement "
                              f"{v['top1_agreement']:.4f}" for k, v in checks.items()) + f" (tolerance {tolerance:g})",
                  soft_wrap=True, markup=False)
    if not worst <= tolerance:
        raise ExportCheckFailed(
            f"ONNX Runtime's outputs differ from the merged model's by {worst:.3g}, more than {tolerance:g}; the "
            f"exported graph does not compute the model. Nothing was written to {out}. Report this with the run's "
            f"config.yaml; `ftune merge` writes a safetensors model meanwhile.")
    tokenizer.save_pretrained(str(tmp))
    if label_names:
        (tmp / "labels.json").write_text(json.dumps(label_names) + "\n")
    feeds = ", ".join(f"'{k}': enc['{k}']" for k in written["inputs"])
    return (f"### ONNX: `{out}/model.onnx`\n\n- check: ONNX Runtime vs the merged model, max |Δlogit| {worst:.3g} "
            f"(≤ {tolerance:g})\n- load it:\n\n```python\nimport onnxruntime as ort\nfrom transformers import "
            f"AutoTokenizer\ntok = AutoTokenizer.from_pretrained('{out}')\nsession = ort.InferenceSession("
            f"'{out}/model.onnx')\nenc = tok(['some text'], return_tensors='np')\nlogits = session.run(['logits'], "
            f"{{{feeds}}})[0]\n```\n" + (f"\nClass names in id order: `{out}/labels.json`.\n" if label_names else ""))


def run_export(cfg) -> dict[str, Any]:
    """The `ftune export` command."""
    return export_run(
        cfg.get("run"), cfg.get("out"), format=str(cfg.format), quant=str(cfg.quant), overwrite=bool(cfg.overwrite),
        device=str(cfg.device), tolerance=cfg.get("tolerance"), quant_tolerance=cfg.get("quant_tolerance"),
        min_top1=cfg.get("min_top1"), check_examples=int(cfg.check_examples),
        check_max_length=int(cfg.check_max_length), name=cfg.get("name"), system=cfg.get("system"),
    )
