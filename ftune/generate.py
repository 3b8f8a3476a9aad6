"""`ftune generate`: sample from a causal-LM run, with the prompt formatted the way training formatted it.

    ftune generate run=runs/x prompt="Add the two numbers." input="2 and 3"
    ftune generate run=runs/x prompt="..." temperature=0          # greedy
    ftune generate run=runs/x prompt="..." max_new_tokens=256 temperature=0.7 top_p=0.9

The run's dataset config decides the format: an instruction dataset wraps the prompt in its
``prompt_template`` (alpaca, plain), a chat dataset (or ``prompt_template: chat``) renders one user
turn with the chat template the run trained with (the tokenizer's, else ``model.chat_template``),
and a text dataset continues the prompt as is. :func:`generate_ids` (batched, left padding) is
shared with ``ftune eval eval.scorer=...``.
"""

from __future__ import annotations

from typing import Any

import torch

from ftune.errors import FtuneError

# Where an answer ends when the model runs on: end-of-turn markers of common chat templates, and
# the start of a next alpaca-style block.
STOP_STRINGS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>", "\n### ")


def stop_text(text: str, tokenizer=None) -> str:
    """``text`` cut at the first end-of-turn marker (and the tokenizer's eos), stripped."""
    stops = list(STOP_STRINGS)
    if tokenizer is not None and getattr(tokenizer, "eos_token", None):
        stops.append(tokenizer.eos_token)
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def prompt_ids(data_cfg, tokenizer, prompt: str, input_text: str | None = None, system: str | None = None,
               chat_template: str | None = None) -> list[int]:
    """Token ids of ``prompt`` formatted as the run's training data formatted prompts (answer left out)."""
    from ftune.data.formats import PROMPT_TEMPLATES, _bos_ids, chat_template_for

    bos = _bos_ids(tokenizer)
    if data_cfg.format == "chat" or (data_cfg.format == "instruction" and data_cfg.prompt_template == "chat"):
        user = f"{prompt}\n\n{input_text}" if input_text else prompt
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(msgs, chat_template=chat_template_for(tokenizer, chat_template),
                                             tokenize=False, add_generation_prompt=True)
    elif data_cfg.format == "instruction":
        if data_cfg.prompt_template not in PROMPT_TEMPLATES:
            raise FtuneError(f"The run's dataset.prompt_template '{data_cfg.prompt_template}' is unknown to this ftune.")
        with_input, without_input = PROMPT_TEMPLATES[data_cfg.prompt_template]
        text = (with_input if input_text else without_input).format(instruction=prompt, input=input_text or "")
    elif data_cfg.format == "text":
        text = prompt if not input_text else f"{prompt}\n{input_text}"
    else:
        raise FtuneError(
            f"`ftune generate` needs a causal-LM run; this run was trained on a {data_cfg.format} dataset "
            f"(a classification model predicts labels: use `ftune eval`)."
        )
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64, batch_size: int = 8,
                 device: torch.device | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int | None = None) -> list[list[int]]:
    """The new token ids after each prompt, batched with left padding; greedy when ``temperature == 0``.

    Prompts are grouped by length (less padding) and returned in their original order; each
    completion stops at the first eos token.
    """
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    sample = temperature is not None and temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample, "pad_token_id": pad}
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if sample:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=top_k or 0)
    else:  # unset the sampling knobs a model's generation_config may carry, so greedy is greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            p = prompts[i]
            input_ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[row, longest - len(p):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        for row, i in enumerate(idx):
            new = out[row, longest:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            results[i] = new
    model.train(was_training)
    return results


def run_generate(cfg) -> str:
    """The `ftune generate` command: load a causal-LM run, format the prompt, print the completion."""
    from ftune.config import validate_group
    from ftune.progress import console
    from ftune.runs import load_run, resolve_device

    if cfg.get("prompt") is None or str(cfg.prompt) == "???":
        raise FtuneError('Pass the prompt: `ftune generate run=runs/x prompt="..."`.')
    if float(cfg.temperature) < 0:
        raise FtuneError(f"temperature must be 0 (greedy) or positive (got {cfg.temperature}).")
    if not 0 < float(cfg.top_p) <= 1:
        raise FtuneError(f"top_p must be in (0, 1] (got {cfg.top_p}).")
    if int(cfg.max_new_tokens) < 1:
        raise FtuneError(f"max_new_tokens must be at least 1 (got {cfg.max_new_tokens}).")
    device = resolve_device(str(cfg.device))
    from ftune.runs import check_run_dir, run_config

    run_cfg = run_config(check_run_dir(cfg.run))
    data_cfg = validate_group(run_cfg, "dataset")
    if data_cfg.format == "classification":  # say so before loading any model
        raise FtuneError(
            f"Run '{cfg.run}' is a classification run: its model predicts one of its labels, it does not "
            f"generate text. Use `ftune eval run={cfg.run}` (or train on an instruction, chat or text dataset)."
        )
    model_cfg = validate_group(run_cfg, "model")
    with console.status(f"Loading run {cfg.run}"):
        model, tokenizer, method, _, _, _ = load_run(cfg.run, device)
    ids = prompt_ids(data_cfg, tokenizer, str(cfg.prompt), cfg.get("input"), cfg.get("system"), model_cfg.chat_template)
    torch.manual_seed(int(cfg.seed))
    temperature = float(cfg.temperature)
    n = int(cfg.get("num_samples", 1) or 1)
    outs = generate_ids(model, tokenizer, [ids] * n, max_new_tokens=int(cfg.max_new_tokens), batch_size=n,
                        device=device, temperature=temperature, top_p=float(cfg.top_p), top_k=cfg.get("top_k"))
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    texts = [stop_text(t, tokenizer) if cfg.get("stop_at_end_of_turn", True) else t.strip() for t in texts]
    if cfg.get("show_prompt"):
        console.print(f"[dim]{tokenizer.decode(ids)}[/]", soft_wrap=True)
    mode = "greedy" if temperature == 0 else f"temperature {temperature:g}, top_p {float(cfg.top_p):g}"
    console.print(f"[dim]ftune generate · {method.name} · {len(ids)} prompt tokens · {mode}[/]")
    for i, text in enumerate(texts):
        if n > 1:
            console.print(f"[bold]--- sample {i + 1}[/]")
        print(text, flush=True)  # plain stdout: the completion can be piped
    return texts[0]
