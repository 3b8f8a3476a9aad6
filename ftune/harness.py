"""`ftune eval ... harness.tasks=[...]`: lm-evaluation-harness tasks on a run, a base or a merged model.

    ftune eval run=runs/x harness.tasks=[dates_mc]                      the run (base + adapter)
    ftune eval model=smollm2 harness.tasks=[dates_mc] out=runs/base      the base model: the baseline row
    ftune eval run=runs/x harness.tasks=[my_task] harness.include_path=tasks/ harness.limit=100
    ftune compare runs/base runs/x                                       base vs fine-tuned, one column per metric

The model is loaded the way every ftune command loads it (:func:`ftune.runs.load_run`: base + adapter,
every method) and handed to lm-eval as an object (``HFLM(pretrained=model, tokenizer=...)``), so nothing
is merged or written to disk first. Results go to ``eval.json`` as ``harness/<task>/<metric>`` (next to
``ftune eval``'s own ``eval/*`` keys, which are kept), the full lm-eval results to ``harness.json``, and a
table to the run card (``README.md``).

Tasks are lm-eval names (its own tasks need their data from the hub, so network or a filled HF cache),
ftune's shipped offline tasks (``ftune/assets/harness``: ``dates_mc``), or tasks of ``harness.include_path``.
``data_files`` of a local task YAML that are relative paths are read from the YAML's folder (lm-eval
itself reads them from the working directory), so a task folder works from anywhere.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any
from unittest import mock

from ftune.errors import FtuneError

SHIPPED_TASKS = Path(__file__).parent / "assets" / "harness"
CARD_START, CARD_END = "<!-- ftune:harness -->", "<!-- /ftune:harness -->"


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise FtuneError(
            f"harness.tasks needs lm-evaluation-harness, which is not installed ({e.name or e}). Install it with "
            f"`pip install 'ftune[harness]'` (or `pip install lm-eval`), then run the command again."
        ) from None
    return evaluator, HFLM, TaskManager


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def include_paths(extra: Any) -> list[Path]:
    """ftune's shipped task folder, then the user's (``harness.include_path``: a folder or a list of them)."""
    paths = [SHIPPED_TASKS]
    for p in _as_list(extra):
        path = Path(p).expanduser()
        if not path.is_dir():
            raise FtuneError(f"harness.include_path '{p}' is not a folder; point it at the folder that holds your "
                             f"task YAML files.")
        paths.append(path)
    return paths


def _local_files(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The task config with relative ``dataset_kwargs.data_files`` made absolute against the YAML's folder."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return cfg

    def fix(f: Any) -> Any:
        if isinstance(f, str) and "://" not in f and not Path(f).expanduser().is_absolute():
            return str(folder / f)
        return f

    if isinstance(files, dict):
        files = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    elif isinstance(files, list):
        files = [fix(x) for x in files]
    else:
        files = fix(files)
    kwargs["data_files"] = files
    return {**cfg, "dataset_kwargs": kwargs}


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def task_specs(tasks: list[str], manager) -> list[Any]:
    """What lm-eval loads for each task name: a local YAML task as its config (data files made absolute),
    anything else (lm-eval's own tasks, groups) by name. Unknown names raise a FtuneError."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    lm_eval_dir = Path(lm_eval.__file__).resolve().parent
    specs: list[Any] = []
    unknown = []
    for name in tasks:
        path = Path(name).expanduser()
        if name.endswith((".yaml", ".yml")) and path.is_file():
            specs.append(_local_files(load_yaml(path), path.resolve().parent))
            continue
        entry = manager.task_index.get(name)
        if entry is None:
            unknown.append(name)
            continue
        yaml_path = getattr(entry, "yaml_path", None)
        if yaml_path is not None and entry.kind.name == "TASK" and not _inside(Path(yaml_path), lm_eval_dir):
            specs.append(_local_files(load_yaml(yaml_path), Path(yaml_path).resolve().parent))
            continue
        specs.append(name)
    if unknown:
        shipped = sorted(p.stem for p in SHIPPED_TASKS.glob("*.yaml"))
        raise FtuneError(
            f"Unknown lm-evaluation-harness task(s) {', '.join(unknown)}. Use a task lm-eval knows (`lm-eval ls tasks`), "
            f"one of ftune's offline tasks ({', '.join(shipped)}), a task YAML file, or put your own task YAML in a "
            f"folder and pass harness.include_path=<folder>."
        )
    return specs


def metric_keys(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` ({task: {"acc,none": 0.5, "acc_stderr,none": ...}}) as flat ``harness/<task>/<metric>``
    keys; a filter other than ``none`` is kept in the name (``exact_match_strict-match``)."""
    flat: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len, "N/A" stderr
            metric, _, flt = key.partition(",")
            name = metric if flt in ("none", "") else f"{metric}_{flt}"
            if not (isinstance(value, float) and math.isnan(value)):
                flat[f"harness/{task}/{name}"] = float(value)
    return flat


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "?"


def _model_device(model) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"


def resolve_tasks(h) -> tuple[Any, list[Any]]:
    """(lm-eval TaskManager, what it loads for each of ``h.tasks``); unknown tasks raise before a model is loaded."""
    _, _, TaskManager = _import_lm_eval()
    tasks = _as_list(h.get("tasks"))
    folders = [str(p) for p in include_paths(h.get("include_path"))]
    manager = TaskManager(include_path=folders, include_defaults=False)  # lm-eval's 14k tasks take seconds to index
    if any(t not in manager.task_index and not t.endswith((".yaml", ".yml")) for t in tasks):
        manager = TaskManager(include_path=folders)
    return manager, task_specs(tasks, manager)


def evaluate_harness(model, tokenizer, h, seed: int = 1234, tasks: tuple[Any, list[Any]] | None = None
                     ) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the lm-eval tasks of ``h`` (the ``harness`` config node) on a loaded causal LM.

    ``tasks``: what :func:`resolve_tasks` returned (resolved now if None). Returns (flat
    ``harness/<task>/<metric>`` metrics, the details kept in harness.json).
    """
    evaluator, HFLM, _ = _import_lm_eval()
    manager, specs = tasks or resolve_tasks(h)
    tasks = _as_list(h.get("tasks"))
    limit = h.get("limit")
    if limit is not None:
        limit = float(limit) if float(limit) < 1 else int(limit)
    batch = h.get("batch_size") or 1
    lm_kwargs: dict[str, Any] = {"batch_size": batch if str(batch).startswith("auto") else int(batch)}
    if h.get("max_length"):
        lm_kwargs["max_length"] = int(h.max_length)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, **lm_kwargs)
    started = time.perf_counter()
    # lm-eval's environment report runs `git describe` in the working directory (printing git's error outside a
    # repository) and torch's collect_env (seconds of subprocesses); neither says anything about the model
    quiet = (mock.patch.object(evaluator, "get_git_commit_hash", lambda: None),
             mock.patch.object(evaluator, "add_env_info", lambda results: None))
    try:
        with quiet[0], quiet[1]:
            out = evaluator.simple_evaluate(
                lm, tasks=specs, task_manager=manager, limit=limit,
                num_fewshot=None if h.get("num_fewshot") is None else int(h.num_fewshot),
                apply_chat_template=bool(h.get("apply_chat_template")),
                bootstrap_iters=int(h.get("bootstrap_iters") or 0), log_samples=False, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except FtuneError:
        raise
    except Exception as e:  # a task whose data cannot be read offline, a bad template, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
        hint = (" Its data is not available offline: lm-eval's own tasks download from the Hugging Face hub, so run "
                "with network (or a filled HF cache), or write a local task YAML (dataset_path: json, data_files) and "
                "pass harness.include_path." if re.search(r"offline|connect|resolve|couldn't reach|not find", first, re.I)
                else " Check the task's YAML (verbose=true shows the traceback).")
        raise FtuneError(f"lm-evaluation-harness failed on {', '.join(tasks)}: {type(e).__name__}: {first}.{hint}") from e
    seconds = time.perf_counter() - started
    metrics = metric_keys(out.get("results", {}))
    if not metrics:
        raise FtuneError(f"lm-evaluation-harness returned no metric for {', '.join(tasks)}; check the task's metric_list.")
    details = {
        "tasks": tasks, "limit": limit, "num_fewshot": h.get("num_fewshot"),
        "apply_chat_template": bool(h.get("apply_chat_template")), "seconds": round(seconds, 2),
        "results": out.get("results"), "n-shot": out.get("n-shot"), "n-samples": out.get("n-samples"),
        "versions": out.get("versions"), "higher_is_better": out.get("higher_is_better"),
        "lm_eval_version": _lm_eval_version(), "device": _model_device(model),
    }
    return metrics, details


def update_eval_json(out: Path, metrics: dict[str, float], details: dict[str, Any], info: dict[str, Any]) -> Path:
    """Add the harness metrics to ``out/eval.json``, keeping what ``ftune eval`` wrote there before."""
    file = out / "eval.json"
    report: dict[str, Any] = {}
    if file.exists():
        try:
            report = json.loads(file.read_text())
        except ValueError:
            report = {}
    for task in details["tasks"]:  # a task evaluated again replaces its old numbers
        report = {k: v for k, v in report.items() if not k.startswith(f"harness/{task}/")}
    report.update(info)
    report.update(metrics)
    report["harness"] = {k: details[k] for k in ("tasks", "limit", "num_fewshot", "apply_chat_template",
                                                 "n-samples", "lm_eval_version")}
    file.write_text(json.dumps(report, indent=2, default=str))
    (out / "harness.json").write_text(json.dumps(details, indent=2, default=str))
    return file


def card_section(metrics: dict[str, float], details: dict[str, Any], command: str) -> str:
    rows = "\n".join(f"| {k.split('/', 2)[1]} | {k.split('/', 2)[2]} | {v:.4f} |" for k, v in sorted(metrics.items()))
    n = details.get("n-samples") or {}
    samples = ", ".join(f"{t}: {v.get('effective')} of {v.get('original')}" for t, v in n.items() if isinstance(v, dict))
    shots = details.get("n-shot") or {}
    return (f"{CARD_START}\n## lm-evaluation-harness\n\n"
            f"`{command}` (lm-eval {details.get('lm_eval_version')}; examples {samples or '?'}; "
            f"few-shot {', '.join(f'{t}: {s}' for t, s in shots.items()) or '0'})\n\n"
            f"| task | metric | value |\n|---|---|---|\n{rows}\n{CARD_END}\n")


def update_card(out: Path, section: str) -> Path | None:
    """Put the harness table into ``out/README.md`` (replacing an earlier one); nothing else there is changed."""
    card = out / "README.md"
    if not card.exists():
        return None
    text = card.read_text()
    if CARD_START in text and CARD_END in text:
        head, _, rest = text.partition(CARD_START)
        _, _, tail = rest.partition(CARD_END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text)
    return card


def _command() -> str:
    """The command as typed (recorded by the CLI), for the run card."""
    import shlex

    from ftune import outputs

    return shlex.join(["ftune", *outputs._COMMAND]) if outputs._COMMAND else "ftune eval ... harness.tasks=[...]"


def run_harness(cfg) -> dict[str, Any]:
    """`ftune eval` with ``harness.tasks``: lm-eval tasks on a run (run=) or a base / merged model (model=)."""
    from omegaconf import OmegaConf

    from ftune.config import validate_group
    from ftune.data import task_of
    from ftune.methods.base import trainable_parameters
    from ftune.models import build_model, load_tokenizer, model_label
    from ftune.progress import console, metrics_table
    from ftune.runs import base_model_config, check_run_dir, load_run, resolve_device, run_config

    h = cfg.harness
    device = resolve_device(str(cfg.device))
    model_override = validate_group(cfg, "model") if cfg.get("model") is not None else None
    if cfg.get("dataset") is not None:
        raise FtuneError("harness.tasks evaluates lm-evaluation-harness tasks, which bring their own data; drop "
                         "dataset=... (or drop harness.tasks to evaluate the run on a dataset with ftune's own eval).")
    resolved = resolve_tasks(h)  # a missing lm-eval or an unknown task: said before any model is loaded
    if cfg.get("run"):
        run_task = task_of(validate_group(run_config(check_run_dir(cfg.run)), "dataset"))
        if run_task != "causal_lm":
            raise FtuneError(
                f"Run '{cfg.run}' is a {run_task} run; lm-evaluation-harness scores language models (causal LM runs). "
                f"Evaluate this run with `ftune eval run={cfg.run}` (no harness.tasks).")
        with console.status(f"Loading run {cfg.run}"):
            loaded = load_run(cfg.run, device, model_cfg=model_override)
        model, tokenizer, run_cfg = loaded.model, loaded.tokenizer, loaded.cfg
        model_cfg = model_override or validate_group(run_cfg, "model")
        info = {"source": f"run {cfg.run}", "method": loaded.method.name, "model": model_label(model_cfg)}
        trained = Path(str(cfg.run)) / "metrics.json"  # what the run trained (the loaded adapter is frozen)
        if trained.exists():
            info.update({k: v for k, v in json.loads(trained.read_text()).items()
                         if k in ("trainable_params", "total_params", "trainable_percent")})
        out = Path(str(cfg.out)) if cfg.get("out") else Path(str(cfg.run))
        seed = int(run_cfg.get("seed", cfg.seed))
    elif model_override is not None:
        model_cfg = base_model_config(model_override)
        with console.status(f"Loading model {model_label(model_cfg)}"):
            tokenizer = load_tokenizer(model_cfg)
            model = build_model(model_cfg, "causal_lm", pad_token_id=tokenizer.pad_token_id)
            model.to(device).eval()
        run_cfg = None
        _, total = trainable_parameters(model)
        info = {"source": f"model {model_label(model_cfg)}", "method": "base", "model": model_label(model_cfg),
                "trainable_params": 0, "total_params": total, "trainable_percent": 0.0}
        out = Path(str(cfg.out)) if cfg.get("out") else None
        seed = int(cfg.seed)
    else:
        raise FtuneError("Nothing to evaluate: pass run=<a run directory> (`ftune eval run=runs/x harness.tasks=[dates_mc]`), "
                         "or model=<model config> (a base or merged model) with out=<dir> for the baseline row.")
    if h.get("apply_chat_template") and not getattr(tokenizer, "chat_template", None):
        from ftune.data.formats import chat_template_for

        tokenizer.chat_template = chat_template_for(tokenizer, model_cfg.chat_template)  # as ftune's chat training uses
    tasks = _as_list(h.get("tasks"))
    console.print(f"[bold]ftune eval[/] · lm-evaluation-harness · {info['source']} · tasks {', '.join(tasks)}"
                  + (f" · limit {h.limit}" if h.get("limit") is not None else ""), soft_wrap=True)
    with console.status(f"lm-evaluation-harness: {', '.join(tasks)}"):
        metrics, details = evaluate_harness(model, tokenizer, h, seed, resolved)
    console.print(metrics_table(metrics, f"lm-evaluation-harness · {info['source']}"))
    if out is None:
        console.print("[dim]not saved: pass out=<dir> to write eval.json (and list the model in `ftune compare`)[/]")
        return {**info, **metrics}
    out.mkdir(parents=True, exist_ok=True)
    file = update_eval_json(out, metrics, details, info)
    if not (out / "config.yaml").exists():  # so `ftune compare` lists the baseline (or the run evaluated elsewhere)
        if run_cfg is None:
            saved = {"model": OmegaConf.to_container(OmegaConf.structured(model_cfg)), "method": {"name": "base"},
                     "seed": seed}
        else:
            saved = {**OmegaConf.to_container(run_cfg), "evaluated_run": str(cfg.run)}
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    card = update_card(out, card_section(metrics, details, _command()))
    console.print(f"[bold green]wrote[/] {file}, {out / 'harness.json'}" + (f", {card}" if card else ""))
    return {**info, **metrics}
