"""`ftune <command> [hydra overrides]`: one flat map of subcommands, each a Hydra app (but compare and report).

    ftune train [key=value ...]        fine-tune (Hydra multirun with -m; --cfg job shows the config)
    ftune eval run=runs/x              evaluate a run (or model=<config> dataset=<config>: a base model)
    ftune merge run=runs/x out=DIR     a standalone transformers model directory
    ftune generate run=runs/x prompt=  sample from a causal-LM run
    ftune export run=runs/x format=gguf|ollama|onnx out=DIR   files for llama.cpp, Ollama, ONNX Runtime
    ftune compare DIR [DIR ...]        table + plot across runs (plain paths, not a Hydra app)
    ftune report DIR [DIR ...]         one self-contained report.html for a run or a sweep (plain paths)
    ftune --help                       this list
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftune.errors import FtuneError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (config name under configs/, one-line help)
    "train": ("train", "fine-tune a model: ftune train method=lora model=llama dataset=alpaca"),
    "eval": ("eval", "evaluate a run: ftune eval run=runs/x [dataset=sst2] | a base model: model=minilm dataset=sentiment"),
    "merge": ("merge", "merge a run into a standalone model: ftune merge run=runs/x out=models/x-merged"),
    "generate": ("generate", 'complete a prompt with a causal-LM run: ftune generate run=runs/x prompt="..."'),
    "export": ("export", "export a run, checked by reloading: ftune export run=runs/x format=gguf|ollama|onnx quant=q8_0 out=DIR"),
    "compare": ("", "compare runs: ftune compare runs/sweep [runs/y ...] [out=DIR] [metric=eval/loss]"),
    "report": ("", "an HTML report of a run or a sweep: ftune report runs/x | runs/sweep [out=DIR|FILE.html]"),
}
PLAIN_COMMANDS = ("compare", "report")  # take plain paths (a sweep dir is positional), not Hydra overrides

HELP = """ftune: config-driven fine-tuning of language models.

usage: ftune <command> [key=value ...] [-m] [--cfg job] [--help]

commands:
{commands}

Each command but compare and report is a Hydra app: pick config groups (model=, dataset=, method=, strategy=,
optimizer=, scheduler=, trainer=, logger=) and override any key (trainer.max_steps=50 optimizer.lr=2e-4). `ftune train`
with no model, dataset or recipe chosen runs the quickstart recipe (SmolLM2 learning a small task).
`ftune <command> --help` lists the options of every group; `-m` sweeps comma-separated values
(`ftune train hparams_search=optuna` searches with Optuna, `hydra/launcher=slurm` runs on SLURM).
compare and report take plain paths: run directories or sweep directories holding runs, plus out=
and metric=KEY; compare writes comparison.md, comparison.csv and comparison.png, report one
self-contained report.html (sortable table, plots embedded; no server, no network).
"""


def _lost_peers(e: BaseException) -> FtuneError | None:
    """The error of a collective that failed because another process of a distributed run died (gloo / nccl)."""
    from ftune.distributed import from_env

    text = f"{type(e).__name__} {e}"
    if not from_env().enabled or not any(s in text for s in (
            "DistBackendError", "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
            "Broken pipe", "DistNetworkError")):
        return None
    err = FtuneError(f"Training process {from_env().rank} stopped because another process of the run stopped first "
                     f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}); that process's error "
                     f"says why.")
    err.lost_peers = True
    return err


def _verbose(argv: list[str]) -> bool:
    return any(a in ("verbose=true", "verbose=True", "+verbose=true") for a in argv) or bool(os.environ.get("FTUNE_VERBOSE"))


def report_error(err: BaseException, verbose: bool) -> None:
    """One paragraph naming the problem and the fix; the traceback only when asked for."""
    from rich.markup import escape

    from ftune.progress import console

    if verbose:
        traceback.print_exception(err)
    from ftune.distributed import write_error

    if write_error(str(err), secondary=bool(getattr(err, "lost_peers", False))):  # a process of trainer.num_processes=N: the launcher prints it, last
        return
    console.quiet = False  # (ranks other than 0 are quiet during training; their errors are shown)
    # escaped: a message's own brackets (`pip install 'ftune[wandb]'`, `logger=[a,b]`) are text, not rich markup
    console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)


def _train_job(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from ftune.distributed import from_env
    from ftune.progress import console, metrics_table
    from ftune.thirdparty import hide_bitsandbytes, needs_bitsandbytes, save_library_log

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    n = int(cfg.trainer.get("num_processes", 1) or 1)
    if n > 1:
        from ftune.distributed import launched

        if not launched():  # trainer.num_processes=N: start N processes of this job through torch.distributed.run
            return _launch_processes(cfg, n, multirun)
    if not multirun and not needs_bitsandbytes(cfg):  # (a sweep's later jobs may need it: not hidden there)
        hide_bitsandbytes()
    from ftune.train import train

    try:
        try:
            metrics = train(cfg)
        except Exception as e:  # several processes: one that died makes the others' collectives fail
            lost = _lost_peers(e) if not isinstance(e, FtuneError) else None
            if lost is None:
                raise
            raise lost from e
    except FtuneError as e:
        if Path(cfg.output_dir).is_dir() and any(Path(cfg.output_dir).iterdir()) and from_env().main:
            save_library_log(Path(cfg.output_dir))  # beside the failed run's checkpoints
        report_error(e, bool(cfg.get("verbose")))
        if multirun:  # one failing job (e.g. bitfit on Llama) must not stop the rest of a sweep
            try:
                os.makedirs(cfg.output_dir, exist_ok=True)
                with open(os.path.join(cfg.output_dir, "error.txt"), "w") as f:
                    f.write(str(e) + "\n")
            except OSError:
                pass
            return None
        _remove_if_created_empty(Path(cfg.output_dir))
        sys.exit(e.exit_code)
    if from_env().main:  # several processes: rank 0 writes the run directory
        save_library_log(Path(cfg.output_dir))
    console.print(metrics_table(metrics, f"ftune · {cfg.method.name} · {cfg.output_dir}"))
    key = next((k for k in ("eval/macro_accuracy", "eval/accuracy", "eval/exact_match", "eval/gsm8k", "eval/loss") if k in metrics), None)
    if key is None:  # no eval split: say so rather than print nan
        console.print(f"[bold green]done[/] (no eval split; set dataset.eval_fraction to get one)   run: {cfg.output_dir}")
        return None
    before = metrics.get(key.replace("eval/", "eval_before/", 1))
    console.print(f"[bold green]done[/] {key} = {metrics[key]:.4f}"
                  + (f" (before training {before:.4f})" if before is not None else "") + f"   run: {cfg.output_dir}")
    return metrics[key]


def _launch_processes(cfg, n: int, multirun: bool) -> float | None:
    """This job's overrides, run as N processes by torch.distributed.run; its score from metrics.json."""
    import json

    from hydra.core.hydra_config import HydraConfig

    from ftune.config import validate_group
    from ftune.distributed import World, launch
    from ftune.methods.base import build_method
    from ftune.strategies import build_strategy
    from ftune.train import check_distributed

    try:  # what several processes cannot train is refused before any is started
        check_distributed(validate_group(cfg, "trainer"), build_method(cfg.method), build_strategy(cfg.get("strategy")),
                          World(0, n))
    except FtuneError as e:
        report_error(e, bool(cfg.get("verbose")))
        if multirun:
            return None
        _remove_if_created_empty(Path(cfg.output_dir))
        sys.exit(e.exit_code)
    # as typed (interpolations such as ${oc.env:RANK} are resolved in each process); a sweep's job: its own values
    given = HydraConfig.get().overrides.task if multirun else _OVERRIDES
    overrides = [o for o in given if not o.startswith(("output_dir=", "hydra.", "-"))]
    try:
        code, message = launch(n, [*overrides, f"output_dir={cfg.output_dir}"], str(cfg.trainer.device))
    except FtuneError as e:
        code, message = e.exit_code, str(e)
    if code:
        _remove_if_created_empty(Path(cfg.output_dir))
        report_error(FtuneError(message or f"The {n} training processes stopped with exit code {code}; their "
                                "output above says why (verbose=true shows tracebacks)."), bool(cfg.get("verbose")))
        if multirun:
            return None
        sys.exit(code)
    metrics_file = Path(cfg.output_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    key = next((k for k in ("eval/macro_accuracy", "eval/accuracy", "eval/exact_match", "eval/gsm8k", "eval/loss") if k in metrics), None)
    return metrics[key] if key else None


_OVERRIDES: list[str] = []  # the overrides `ftune train` was given (after the quickstart recipe was added)

# output directories that existed before this command ran (an output_dir=... the user named): a failed
# run never removes those, even when they are empty
_EXISTED: set[Path] = set()


def _remove_if_created_empty(out: Path) -> None:
    """Take back the empty run directory Hydra made for a run that failed before writing anything.

    A directory the user named and that existed before is kept; so is anything with a file in it. The
    date folder of Hydra's default layout (outputs/<date>/<time>_<method>) goes too when it is left empty.
    """
    try:
        out = out.resolve()
        if out in _EXISTED or not out.is_dir() or any(out.iterdir()):
            return
        out.rmdir()
        parent = out.parent
        if parent.parent.name == "outputs" and not any(parent.iterdir()):
            parent.rmdir()
    except OSError:
        pass


def _job(run: Callable[[Any], Any]) -> Callable:
    """A Hydra task function that shows a FtuneError as one paragraph and exits with its code."""

    def job(cfg):
        try:
            if not _run_uses_bitsandbytes(cfg):
                from ftune.thirdparty import hide_bitsandbytes

                hide_bitsandbytes()
            return run(cfg)
        except FtuneError as e:
            report_error(e, bool(cfg.get("verbose")))
            sys.exit(e.exit_code)

    job.__name__ = job.__qualname__ = f"{run.__name__}_job"
    return job


def _run_uses_bitsandbytes(cfg) -> bool:
    """Whether the run that eval/merge/generate loads was trained with bitsandbytes (a 4-bit base)."""
    from omegaconf import OmegaConf

    from ftune.thirdparty import needs_bitsandbytes

    if not cfg.get("run"):
        return False  # a base model: nothing 4-bit to load
    saved = Path(str(cfg.run)).expanduser() / "config.yaml"
    try:
        return saved.is_file() and needs_bitsandbytes(OmegaConf.load(saved))
    except Exception:  # an unreadable config is reported by the command itself, with its own words
        return True


def _eval(cfg) -> float | None:
    from ftune.evaluate import run_eval

    report = run_eval(cfg)
    for key in ("eval/macro_accuracy", "eval/accuracy", "eval/exact_match", "eval/gsm8k", "eval/loss"):
        if key in report:
            return report[key]
    return None


def _merge(cfg) -> None:
    from ftune.merge import run_merge

    run_merge(cfg)


def _export(cfg) -> None:
    from ftune.export import run_export

    run_export(cfg)


def _generate(cfg) -> None:
    from ftune.generate import run_generate

    run_generate(cfg)


JOBS: dict[str, Callable] = {"train": _train_job, "eval": _job(_eval), "merge": _job(_merge),
                             "generate": _job(_generate), "export": _job(_export)}

# generate's free-text values are quoted for Hydra, so commas, colons and brackets stay text
FREE_TEXT_KEYS = {"generate": ("prompt", "input", "system"), "export": ("system",)}


def _quote_free_text(command: str, argv: list[str]) -> list[str]:
    keys = FREE_TEXT_KEYS.get(command, ())
    out = []
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key.lstrip("+~") in keys and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            # Hydra's quoted strings: a quote is escaped with a backslash, and backslashes only need
            # doubling right before a quote or at the end of the string
            value = "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"
            a = f"{key}={value}"
        out.append(a)
    return out


def _translate_output_dir(argv: list[str]) -> list[str]:
    """`output_dir=X` also names Hydra's run (or sweep) directory, so nothing is created elsewhere.

    Also takes `+hparams_search=X` (Hydra's form for adding a group) as `hparams_search=X`: train.yaml
    lists the group with a null default, and Hydra would refuse the `+` with "Multiple values".
    """
    argv = [a[1:] if a.startswith("+hparams_search=") else a for a in argv]
    multirun = "-m" in argv or "--multirun" in argv or any(
        a.startswith("hparams_search=") for a in argv)  # hparams_search sets hydra.mode MULTIRUN
    extra = []
    for a in argv:
        if a.startswith("output_dir="):
            value = a.split("=", 1)[1]
            extra.append(f"hydra.sweep.dir={value}" if multirun else f"hydra.run.dir={value}")
            if multirun:  # each job of a sweep gets its own sub-directory
                extra.append("output_dir=${hydra:runtime.output_dir}")
    if multirun:
        argv = [a for a in argv if not a.startswith("output_dir=")]
    return argv + extra


QUICKSTART = "dates_smollm2_lora"  # what `ftune train` runs when no model, dataset or recipe is chosen
CHOOSING_KEYS = ("model", "dataset", "recipes", "model.name", "model.path", "model.gguf_file", "dataset.name",
                 "dataset.path", "dataset.format")


def _quickstart(command: str, argv: list[str]) -> list[str]:
    """`ftune train` without a model, dataset or recipe: the quickstart recipe, other overrides on top.

    So `ftune train` alone, `ftune train method=dora` and `ftune train trainer.max_steps=10` are all
    the quickstart job (a real LLM learning something in minutes), and choosing a model, a dataset or
    a recipe leaves the recipe out entirely: its trainer settings never leak into other jobs.
    """
    def chooses_job(arg: str) -> bool:  # tweaks such as dataset.max_samples=100 keep the quickstart
        return arg.split("=", 1)[0].lstrip("+~") in CHOOSING_KEYS or arg.startswith(("--config-name", "-cn"))

    if command != "train" or any(chooses_job(a) for a in argv):
        return argv
    from ftune.progress import console

    if not any(a in ("--cfg", "-c", "--help", "-h", "--info", "-i") for a in argv):  # keep printed configs pure YAML
        console.print(f"No model, dataset or recipe chosen: running the quickstart recipe {QUICKSTART} "
                      f"(`ftune train recipes={QUICKSTART}`; choose model=..., dataset=... or recipes=... for "
                      f"another job).", markup=False, soft_wrap=True, highlight=False)
    return [*argv, f"recipes={QUICKSTART}"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(c) for c in COMMANDS)
        print(HELP.format(commands="\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())))
        return
    command, rest = argv[0], argv[1:]
    if command in PLAIN_COMMANDS:
        if command == "compare":
            from ftune.compare import main as plain_main
        else:
            from ftune.report import main as plain_main

        try:
            plain_main(rest)
        except FtuneError as e:
            report_error(e, _verbose(rest))
            sys.exit(e.exit_code)
        return
    if command not in COMMANDS:
        print(
            f"error: unknown command '{command}'. Commands: {', '.join(COMMANDS)} (see `ftune --help`).",
            file=sys.stderr,
        )
        sys.exit(2)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its errors; main() words them as one paragraph
    from ftune.thirdparty import capture_library_output

    # Libraries' loading reports, notices and warnings go to <run>/library.log, not the console: ftune
    # prints what matters itself, and its error paragraph stays the last line. verbose=true shows them.
    capture_library_output(_verbose(rest))
    import hydra

    from ftune.config import config_dir, recipes_dir
    from ftune.outputs import record_command

    record_command([command, *rest])
    config_name, _ = COMMANDS[command]
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(JOBS[command])
    # recipes/ sits beside configs/ (checkout) or inside the package (wheel): make it the
    # `recipes` config group, so `ftune train recipes=<name>` picks a recipe.
    searchpath = [] if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd")) for a in rest) else [
        f"--config-dir={recipes_dir().parent}"]
    for a in rest:
        named = Path(a.split("=", 1)[1]).expanduser() if a.startswith("output_dir=") else None
        if named is not None and named.exists():
            _EXISTED.add(named.resolve())
    overrides = _quickstart(command, _quote_free_text(command, rest))
    _OVERRIDES[:] = overrides
    sys.argv = [f"ftune {command}", *searchpath] + _translate_output_dir(overrides)
    try:
        app()
    except FtuneError as e:
        report_error(e, _verbose(rest))
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # before training started (the training loop saves and exits by itself)
        err = FtuneError(f"Interrupted before training started; nothing was trained. Run `ftune {command} ...` again.")
        err.__cause__ = e
        report_error(err, _verbose(rest))
        sys.exit(130)
    except Exception as e:
        from ftune.config import explain_config_error

        err = explain_config_error(e, rest, command)
        code = 2
        if err is None and ("OutOfMemoryError" in type(e).__name__ or isinstance(e, MemoryError)):
            err, code = FtuneError(
                f"Out of memory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). Lower "
                f"trainer.batch_size (raise trainer.grad_accum to keep the effective batch), lower "
                f"trainer.max_length, set trainer.activation_checkpointing=true, or use method=qlora / "
                f"optimizer=adamw_8bit. With trainer.save_every set, resume=auto continues from the last checkpoint."
            ), 1
        elif err is None and _lost_peers(e) is not None:
            err, code = _lost_peers(e), 1
        elif err is None:
            err, code = FtuneError(
                f"ftune stopped on an unexpected error ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:500]}). This is probably a bug rather than a problem "
                f"with your input: run the same command with verbose=true to see the traceback, and report it."
            ), 1
        err.__cause__ = e
        report_error(err, _verbose(rest))
        sys.exit(code)


if __name__ == "__main__":
    main()
