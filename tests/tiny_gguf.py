"""Write a tiny Llama GGUF checkpoint (2 layers, 64 wide, Q8_0 weights) with the gguf package.

The vocabulary is ftune's bundled byte-level BPE tokenizer (ftune/assets/tiny_tokenizer), stored the way
llama.cpp stores a GPT-2-style tokenizer (`tokenizer.ggml.model = gpt2`: tokens, token types, merges,
special-token ids), plus a ChatML chat template, so transformers' GGUF loader rebuilds model and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ftune.config import package_path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def write_tiny_llama_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write the checkpoint to ``path`` (a .gguf file) and return it."""
    import gguf

    tok = json.loads((Path(package_path("ftune", "assets/tiny_tokenizer")) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a.get("special")}
    tokens.append("<|endoftext|>")  # transformers adds it to a byte-level GGUF vocabulary that lacks it
    special.add("<|endoftext|>")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    heads, kv_heads, ffn = 4, 2, 128
    head_dim = hidden // heads

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_pad_token_id(vocab["<pad>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], quantize: bool = True, scale: float = 0.08) -> None:
        data = (rng.standard_normal(shape) * scale).astype(np.float32) if quantize else np.ones(shape, np.float32)
        if quantize:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", (len(tokens), hidden), scale=0.5)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), quantize=False)
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (hidden,), quantize=False)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    add("output_norm.weight", (hidden,), quantize=False)
    add("output.weight", (len(tokens), hidden))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
