"""GGUF checkpoints (llama.cpp's format) as ordinary model folders: converted once, cached, reused.

    ftune train model=smollm2 ...
    ftune train model=llama model.path=<folder> model.gguf_file=<name>.gguf ...

transformers dequantizes a GGUF file of the architectures it knows (llama, mistral, qwen2/3, gemma2/3,
phi3, ...) into a plain fp32 model, but that load is slow (tens of seconds for 135M parameters) and
the object refuses ``save_pretrained``. So the first run converts: it loads model and tokenizer from
the GGUF file, records reference logits, drops the GGUF quantizer bookkeeping from the (already plain,
dequantized) model, saves it with its tokenizer, chat template and generation config, reloads the
saved folder and checks it gives the same logits. Later runs, and ``eval``/``merge``/``generate`` of
runs trained on it, load that folder in seconds.

The folder lives in a per-user cache ($FTUNE_CACHE, else $XDG_CACHE_HOME/ftune, else ~/.cache/ftune),
under ``gguf/<stem>-<key>``; the key comes from the file's name, size, modification time and a sample
of its bytes (never a hash of the whole multi-GB file), so a changed file converts again. A conversion
is written to a temporary folder and renamed into place once checked, under a file lock: an
interrupted conversion leaves no entry, and concurrent runs convert once and never see a half folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from ftune.config import ModelConfig
from ftune.errors import FtuneError

CONVERSION_VERSION = 1  # bump when the conversion's output changes: old cache entries are then not reused
MARKER = "ftune_gguf.json"  # written last; an entry holding it is a complete, checked conversion
TOLERANCE = 1e-4  # fp32 on both sides from the same dequantized weights: exact equality is expected
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16

_resolved: dict[tuple, Path] = {}  # (file, key) -> converted folder, so a process looks (and prints) once


def cache_root() -> Path:
    """ftune's per-user cache: $FTUNE_CACHE, else $XDG_CACHE_HOME/ftune, else ~/.cache/ftune."""
    if os.environ.get("FTUNE_CACHE"):
        return Path(os.environ["FTUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ftune"


def file_key(file: Path) -> str:
    """A key that changes when the file does: name, size, mtime and sampled bytes (first and last MiB,
    and 16 slices spread over the file), plus the conversion and transformers versions."""
    import transformers

    stat = file.stat()
    h = hashlib.sha256(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}|"
                       f"{transformers.__version__}".encode())
    with file.open("rb") as f:
        h.update(f.read(1 << 20))
        for i in range(_SAMPLES):
            f.seek(stat.st_size * i // _SAMPLES)
            h.update(f.read(_SAMPLE_BYTES))
        f.seek(max(0, stat.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def is_gguf(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` names a GGUF checkpoint (``model.gguf_file``, or ``model.path`` a .gguf file)."""
    return bool(cfg.gguf_file) or bool(cfg.path and str(cfg.path).endswith(".gguf")
                                       and Path(cfg.path).expanduser().is_file())


def resolve_gguf(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with a GGUF checkpoint replaced by its converted folder (converted on first use); any other
    model config unchanged. The tokenizer comes from that folder unless ``model.tokenizer`` is set."""
    if not is_gguf(cfg):
        return cfg
    file = locate_gguf(cfg)
    folder = converted_folder(file)
    return replace(cfg, path=str(folder), gguf_file=None, tokenizer=cfg.tokenizer or str(folder))


def locate_gguf(cfg: ModelConfig) -> Path:
    """The local GGUF file ``cfg`` names (a hub repo's file is downloaded to the hub cache)."""
    if not cfg.gguf_file:  # model.path=<file>.gguf
        return Path(cfg.path).expanduser().resolve()
    if cfg.path is None:
        raise FtuneError(f"model.gguf_file={cfg.gguf_file} is set but model.path is not; set `model.path=` to the "
                         f"folder that holds {cfg.gguf_file}.")
    folder = Path(cfg.path).expanduser()
    if folder.is_dir():
        file = folder / cfg.gguf_file
        if file.is_file():
            return file.resolve()
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise FtuneError(
            f"There is no GGUF file '{cfg.gguf_file}' in '{cfg.path}'"
            + (f" (it holds {', '.join(found[:5])})" if found else " (it holds no .gguf file)")
            + ". Set `model.gguf_file=` to the name of a .gguf file inside `model.path`."
        )
    if folder.exists():
        raise FtuneError(f"model.path '{cfg.path}' is a file; with model.gguf_file set, model.path is the folder "
                         f"that holds {cfg.gguf_file} (or drop model.gguf_file and pass the .gguf file as model.path).")
    if str(cfg.path).startswith((".", "/", "~")) or str(cfg.path).count("/") != 1:
        raise FtuneError(f"Model path '{cfg.path}' does not exist. Set `model.path=` to the folder that holds "
                         f"{cfg.gguf_file}, or to a hub repository id.")
    try:  # a hub repository id
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(cfg.path), cfg.gguf_file, revision=cfg.revision))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or file: all mean the same to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FtuneError(
            f"Could not get '{cfg.gguf_file}' from the hub repository '{cfg.path}': {first}. Check the repository "
            f"id, the file name and your network, or download the file and set `model.path=` to its folder."
        ) from None


def converted_folder(file: Path) -> Path:
    """The cache folder holding ``file`` converted; converts it (once, under a lock) if it is not there."""
    key = file_key(file)
    if (file, key) in _resolved:
        return _resolved[(file, key)]
    from ftune.progress import console

    entry = cache_root() / "gguf" / f"{file.name.removesuffix('.gguf')}-{key}"
    if not (entry / MARKER).is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with _locked(entry.parent / f"{entry.name}.lock", file):
            if not (entry / MARKER).is_file():  # another process may have converted it while we waited
                _remove_leftovers(entry)
                report = convert_gguf(file, entry)
                console.print(
                    f"[bold green]converted[/] GGUF checkpoint {file.name} in {report['seconds']:.1f} s: "
                    f"{report['parameters']:,} parameters (fp32, {report['size_mb']:.0f} MB); cached model vs GGUF "
                    f"load: max |Δlogit| {report['max_abs_logit_diff']:.3g}\n  cached in {entry} (later runs load it "
                    f"in seconds; delete the folder to convert again)", soft_wrap=True)
    else:
        console.print(f"GGUF checkpoint {file.name}: using the converted model cached in {entry}", soft_wrap=True)
    _resolved[(file, key)] = entry
    return entry


@contextlib.contextmanager
def _locked(lock_file: Path, file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (POSIX; elsewhere the atomic rename alone protects the cache)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    from ftune.progress import console

    with lock_file.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with console.status(f"Waiting for another process that is converting {file.name}"):
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(entry: Path) -> None:
    """Temporary folders of interrupted conversions of ``entry`` (killed before they could clean up), and an
    entry without its marker. Only called under the entry's lock, so no conversion is running."""
    for old in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(old, ignore_errors=True)
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' own progress bars off: the conversion shows one rich status line instead."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = lambda *a, **k: original_tqdm(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if enabled:
            hf_logging.enable_progress_bar()


def _check_requirements() -> None:
    import importlib.util

    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise FtuneError(
            f"Reading a GGUF checkpoint needs the Python package{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(missing)}, which {'are' if len(missing) > 1 else 'is'} not installed. Install "
            f"{'them' if len(missing) > 1 else 'it'} with `pip install {' '.join(missing)}`, or point `model.path=` "
            f"at a safetensors model instead."
        )


def _probe_inputs(tokenizer, vocab_size: int) -> list[torch.Tensor]:
    """A few token sequences for the logit check: real text, a chat turn, and random ids."""
    texts = ["The capital of France is Paris. Fine-tuning adapts a pretrained model to a task."]
    if getattr(tokenizer, "chat_template", None):
        with contextlib.suppress(Exception):  # a template may need roles or keys this probe lacks
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": "What is the capital of France?"}],
                tokenize=False, add_generation_prompt=True))
    seqs = [torch.tensor([tokenizer(t, add_special_tokens=True)["input_ids"][:64]]) for t in texts]
    generator = torch.Generator().manual_seed(0)
    seqs.append(torch.randint(0, min(vocab_size, len(tokenizer)), (2, 24), generator=generator))
    return [s for s in seqs if s.numel()]


def _logits(model, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=s).logits.float() for s in seqs]


def _check_tokenizer(original, folder: Path) -> None:
    """The saved tokenizer must be the GGUF one: same template, special tokens and encodings."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(folder))
    probe = "Hello world! <|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    problems = [what for what, a, b in (
        ("chat template", original.chat_template, saved.chat_template),
        ("special tokens", [original.bos_token, original.eos_token, original.pad_token, original.unk_token],
         [saved.bos_token, saved.eos_token, saved.pad_token, saved.unk_token]),
        ("vocabulary size", len(original), len(saved)),
        ("encoding", original(probe)["input_ids"], saved(probe)["input_ids"]),
    ) if a != b]
    if problems:
        raise FtuneError(f"The tokenizer saved from the GGUF checkpoint differs from the GGUF one in its "
                         f"{', '.join(problems)}; this is a bug in ftune's conversion. Nothing was cached.")


def convert_gguf(file: Path, entry: Path) -> dict:
    """Convert ``file`` into the model folder ``entry`` (built in a temporary folder, renamed into place
    once checked); returns what it measured, also recorded in ``entry/ftune_gguf.json``."""
    _check_requirements()
    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}"
    try:
        with _quiet_loading():
            report = _convert_into(file, tmp)
        tmp.rename(entry)  # atomic on one filesystem: the entry appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _convert_into(file: Path, tmp: Path) -> dict:
    """Load ``file`` with transformers, save it as a plain model folder ``tmp``, check it, write the marker."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.progress import console

    started = time.perf_counter()
    with console.status(f"Converting GGUF checkpoint {file.name} (once; it is cached for later runs): "
                        f"reading and dequantizing"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                         dtype=torch.float32)
        except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            raise FtuneError(
                f"transformers cannot read the GGUF checkpoint '{file}': {first}. ftune fine-tunes GGUF files of "
                f"the architectures transformers can dequantize (llama, mistral, qwen2/3, gemma2/3, phi3, ...); "
                f"for another model use its original safetensors release (`model.path=<hub id or folder>`)."
            ) from None
    model.eval()
    seqs = _probe_inputs(tokenizer, model.config.vocab_size)
    with console.status(f"Converting GGUF checkpoint {file.name}: saving a plain safetensors model"):
        reference = _logits(model, seqs)
        # The weights are already dequantized into ordinary modules; only the GGUF quantizer's bookkeeping
        # makes save_pretrained refuse. Without it the model saves as the plain model it is.
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.config.dtype = torch.float32
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        parameters = sum(p.numel() for p in model.parameters())
        del model
    with console.status(f"Converting GGUF checkpoint {file.name}: checking the saved model"):
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, use_safetensors=True).eval()
        got = _logits(saved, seqs)
        diff = max(float((a - b).abs().max()) for a, b in zip(got, reference))
        del saved
        if not diff <= TOLERANCE:
            raise FtuneError(
                f"The model converted from '{file}' gives logits up to {diff:.3g} away from the GGUF load (more "
                f"than {TOLERANCE:g}); this is a bug in ftune's conversion. Nothing was cached."
            )
        _check_tokenizer(tokenizer, tmp)
    size_mb = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
    report = {
        "source": str(file), "gguf_file": file.name, "size_bytes": file.stat().st_size,
        "mtime_ns": file.stat().st_mtime_ns, "conversion_version": CONVERSION_VERSION,
        "transformers": transformers.__version__, "parameters": parameters, "dtype": "float32",
        "max_abs_logit_diff": diff, "check_sequences": len(seqs), "size_mb": size_mb,
        "seconds": time.perf_counter() - started, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    return report
