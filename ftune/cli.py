"""`ftune <command> [hydra overrides]`: one flat map of subcommands, each a Hydra app.

    ftune train [key=value ...]        fine-tune (Hydra multirun with -m; --cfg job shows the config)
    ftune --help                       this list
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from ftune.errors import FtuneError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (config name under configs/, one-line help)
    "train": ("train", "fine-tune a model: ftune train method=lora model=llama dataset=alpaca"),
}

HELP = """ftune: config-driven fine-tuning of language models.

usage: ftune <command> [key=value ...] [-m] [--cfg job] [--help]

commands:
{commands}

Each command is a Hydra app: pick config groups (model=, dataset=, method=, optimizer=,
scheduler=, trainer=) and override any key (trainer.max_steps=50 optimizer.lr=2e-4).
`ftune <command> --help` lists the options of every group; `-m` sweeps comma-separated values.
"""


def _verbose(argv: list[str]) -> bool:
    return any(a in ("verbose=true", "verbose=True", "+verbose=true") for a in argv) or bool(os.environ.get("FTUNE_VERBOSE"))


def report_error(err: BaseException, verbose: bool) -> None:
    """One paragraph naming the problem and the fix; the traceback only when asked for."""
    from ftune.progress import console

    if verbose:
        traceback.print_exception(err)
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True)


def _train_job(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from ftune.progress import console, metrics_table
    from ftune.train import train

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        metrics = train(cfg)
    except FtuneError as e:
        report_error(e, bool(cfg.get("verbose")))
        if multirun:  # one failing job (e.g. bitfit on Llama) must not stop the rest of a sweep
            try:
                os.makedirs(cfg.output_dir, exist_ok=True)
                with open(os.path.join(cfg.output_dir, "error.txt"), "w") as f:
                    f.write(str(e) + "\n")
            except OSError:
                pass
            return None
        sys.exit(e.exit_code)
    console.print(metrics_table(metrics, f"ftune · {cfg.method.name} · {cfg.output_dir}"))
    key = "eval/accuracy" if "eval/accuracy" in metrics else "eval/loss"
    console.print(f"[bold green]done[/] {key} = {metrics.get(key, float('nan')):.4f}   run: {cfg.output_dir}")
    return metrics.get(key)


JOBS: dict[str, Callable] = {"train": _train_job}


def _translate_output_dir(argv: list[str]) -> list[str]:
    """`output_dir=X` also names Hydra's run (or sweep) directory, so nothing is created elsewhere."""
    multirun = "-m" in argv or "--multirun" in argv
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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(c) for c in COMMANDS)
        print(HELP.format(commands="\n".join(f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items())))
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"error: unknown command '{command}'. Commands: {', '.join(COMMANDS)} (see `ftune --help`).",
            file=sys.stderr,
        )
        sys.exit(2)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1" if _verbose(rest) else "0")
    import warnings

    import hydra
    import transformers

    from ftune.config import config_dir

    # Loading reports ("classifier.weight newly initialized") and deprecation notices are noise for
    # users of the CLI; ftune prints what matters itself. verbose=true shows them.
    if not _verbose(rest):
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")

    config_name, _ = COMMANDS[command]
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(JOBS[command])
    sys.argv = [f"ftune {command}"] + _translate_output_dir(rest)
    try:
        app()
    except FtuneError as e:
        report_error(e, _verbose(rest))
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
