"""Experiment trackers (the ``logger`` config group): TensorBoard, MLflow, Weights & Biases.

    ftune train logger=tensorboard                  # or mlflow, wandb; several: logger=[tensorboard,mlflow]

Each chosen tracker gets what the run directory gets, when it is written: the resolved config at the
start, every metrics.jsonl row with its step (training and eval rows), the final metrics, and loss.png
(with metrics.json) at the end. Each library is imported only when chosen, from its optional extra
(``pip install 'ftune[tensorboard]'``). By default everything stays in the run directory and nothing
goes over the network:

    tensorboard  <run>/tensorboard                      tensorboard --logdir <run or sweep directory>
    mlflow       sqlite:///<run>/mlflow.db (+ <run>/mlartifacts); a sweep's jobs share <sweep>/mlflow.db
    wandb        offline, in <run>/wandb                wandb sync <run>/wandb/offline-run-*

A multirun sweep gives one tracked run per job, named after the job's directory and grouped: one
MLflow experiment and store, one W&B group (the sweep directory's name), one TensorBoard folder
per job under the sweep directory. Every call goes through :class:`Trackers`, which train.py calls
where it writes metrics.jsonl, metrics.json and loss.png; a tracker that fails during training is
reported once and dropped, never stopping the run (metrics.jsonl keeps every row).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Protocol

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftune.errors import FtuneError


@dataclass
class TrackedRun:
    """Where and under which name a run is tracked."""

    out: Path  # the run directory
    name: str  # the run's name in the tracker: its directory's name (a sweep job's sub-directory)
    sweep: Path | None = None  # the sweep directory of a multirun job
    resumed_at: int | None = None  # the checkpoint step a resumed run continues from
    run_ids: dict[str, str] = field(default_factory=dict)  # a resumed run's tracked-run ids (trackers.json)

    @property
    def group(self) -> str | None:
        return self.sweep.name if self.sweep is not None else None


class Tracker(Protocol):
    """One experiment tracker. ``status`` of finish: success, failed or killed."""

    def start(self, config: dict[str, Any], run: TrackedRun) -> str: ...  # says where the run is tracked
    def log(self, row: dict[str, Any], step: int) -> None: ...
    def log_final(self, metrics: dict[str, Any], step: int) -> None: ...
    def artifact(self, path: Path) -> None: ...
    def finish(self, status: str) -> None: ...


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a row (bools and strings left out), without its step."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"batch_size": 4}}`` -> ``{"trainer.batch_size": 4}`` (lists kept whole)."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def route_library_logging(*names: str) -> None:
    """Send these loggers' records to the root logger (ftune's library.log) instead of their own stderr handlers."""
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True


# --- TensorBoard ----------------------------------------------------------------------------------
@dataclass
class TensorBoardSettings:
    log_dir: Optional[str] = None  # null: <run>/tensorboard; set: <log_dir>/<run name>


class TensorBoardTracker:
    """Scalars per step, the config and final metrics as text, loss.png as an image (torch's SummaryWriter)."""

    name, package, module = "tensorboard", "tensorboard", "torch.utils.tensorboard"
    Settings: ClassVar[type] = TensorBoardSettings

    def __init__(self, settings: TensorBoardSettings):
        self.settings = settings
        self.writer = None

    def start(self, config: dict[str, Any], run: TrackedRun) -> str:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(self.settings.log_dir) / run.name if self.settings.log_dir else run.out / "tensorboard"
        # a resumed run: events after its checkpoint are dropped, as metrics.jsonl drops their rows
        purge = run.resumed_at + 1 if run.resumed_at is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        if purge is None:
            self.writer.add_text("config", "    " + OmegaConf.to_yaml(config).replace("\n", "\n    "), 0)
        return str(log_dir)

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in numbers(row).items():
            self.writer.add_scalar(k, v, step)

    def log_final(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in numbers(metrics).items():
            self.writer.add_scalar(f"final/{k}", v, step)
        self.writer.add_text("final_metrics", "    " + json.dumps(metrics, indent=1).replace("\n", "\n    "), step)

    def artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                self.writer.add_image(path.stem, np.asarray(image.convert("RGB")), dataformats="HWC")
        else:
            self.writer.add_text(path.name, "    " + path.read_text()[:100_000].replace("\n", "\n    "))

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


# --- MLflow ---------------------------------------------------------------------------------------
@dataclass
class MLflowSettings:
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<run or sweep dir>/mlflow.db
    experiment_name: Optional[str] = None  # null: $MLFLOW_EXPERIMENT_NAME, else ftune
    run_name: Optional[str] = None  # null: the run directory's name
    tags: Dict[str, str] = field(default_factory=dict)


class MLflowTracker:
    """Params (the flattened config), metrics per step, final/* metrics, artifacts; through MlflowClient."""

    name, package, module = "mlflow", "mlflow-skinny", "mlflow"
    Settings: ClassVar[type] = MLflowSettings
    MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value

    def __init__(self, settings: MLflowSettings):
        self.settings = settings
        self.client = self.run_id = None

    def start(self, config: dict[str, Any], run: TrackedRun) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        route_library_logging("mlflow", "alembic", "sqlalchemy.engine", "huey")
        s = self.settings
        home = run.sweep or run.out  # a sweep's jobs share one store and one experiment
        uri = s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.resolve() / 'mlflow.db'}"
        name = s.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ftune"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            local = uri.startswith("sqlite:///") and not (s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
            try:
                experiment_id = self.client.create_experiment(
                    name, artifact_location=(home.resolve() / "mlartifacts").as_uri() if local else None)
            except MlflowException:  # another job of the sweep created it first
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        where = f"{uri}, experiment {name}, run {s.run_name or run.name}"
        previous = run.run_ids.get(self.name)
        if previous and self._exists(previous, experiment_id):  # resume=auto: the same tracked run goes on
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return f"{where} (continued)"
        tags = {**s.tags, "ftune.run_dir": str(run.out.resolve())}
        if run.sweep is not None:
            tags["ftune.sweep"] = str(run.sweep.resolve())
        self.run_id = self.client.create_run(experiment_id, run_name=s.run_name or run.name, tags=tags).info.run_id
        params = [Param(k, str(v)[: self.MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return where

    def _exists(self, run_id: str, experiment_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.experiment_id == experiment_id
        except MlflowException:
            return False

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log(self, row: dict[str, Any], step: int) -> None:
        self._metrics(numbers(row), step)

    def log_final(self, metrics: dict[str, Any], step: int) -> None:
        self._metrics({f"final/{k}": v for k, v in numbers(metrics).items()}, step)

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, {"success": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))


# --- Weights & Biases -----------------------------------------------------------------------------
@dataclass
class WandbSettings:
    project: Optional[str] = None  # null: $WANDB_PROJECT, else ftune
    entity: Optional[str] = None
    name: Optional[str] = None  # null: the run directory's name
    group: Optional[str] = None  # null: a sweep's directory name (its jobs are one group)
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; null: $WANDB_MODE, else offline
    dir: Optional[str] = None  # null: the run directory (wandb writes <dir>/wandb/)


class WandbTracker:
    """wandb.init(config=...), wandb.log(row, step=...), final metrics in the run's summary, files saved."""

    name, package, module = "wandb", "wandb", "wandb"
    Settings: ClassVar[type] = WandbSettings
    MODES = ("online", "offline", "disabled")

    def __init__(self, settings: WandbSettings):
        self.settings, self.run, self.run_id = settings, None, None
        self.mode = settings.mode or os.environ.get("WANDB_MODE") or "offline"
        if self.mode not in self.MODES:
            raise FtuneError(f"logger.wandb.mode must be one of {', '.join(self.MODES)} (got '{self.mode}'"
                             + ("" if settings.mode else " from $WANDB_MODE") + ").")

    def start(self, config: dict[str, Any], run: TrackedRun) -> str:
        import wandb

        s = self.settings
        directory = Path(s.dir) if s.dir else run.out
        directory.mkdir(parents=True, exist_ok=True)
        # console=off: W&B leaves stdout alone (ftune's progress bar); silent: it prints nothing itself
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_save_requirements=False)
        previous = run.run_ids.get(self.name)  # resume=auto: the same W&B run goes on
        self.run = wandb.init(id=previous, resume="allow" if previous else None,
                              project=s.project or os.environ.get("WANDB_PROJECT") or "ftune", entity=s.entity,
                              name=s.name or run.name, group=s.group or run.group, tags=list(s.tags) or None,
                              config=config, dir=str(directory), mode=self.mode, settings=settings, reinit="create_new")
        self.run_id = self.run.id
        return f"{self.mode}, {Path(self.run.dir).parent}" + (f", group {self.run.group}" if self.run.group else "")

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def log_final(self, metrics: dict[str, Any], step: int) -> None:
        self.run.summary.update(metrics)

    def artifact(self, path: Path) -> None:
        saved = shutil.copy(path, self.run.dir)  # a copy inside the run's folder (a link would be synced late)
        self.run.save(saved, base_path=self.run.dir, policy="now")

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "success" else 1)


TRACKERS: dict[str, type] = {t.name: t for t in (TensorBoardTracker, MLflowTracker, WandbTracker)}


def _import(kind: type) -> None:
    try:
        importlib.import_module(kind.module)
    except ImportError as e:
        raise FtuneError(
            f"logger={kind.name} needs the {kind.package} package, which is not installed ({e}). Install it "
            f"with `pip install 'ftune[{kind.name}]'`, or train without it (leave {kind.name} out of logger=)."
        ) from None


def build_trackers(cfg: DictConfig) -> Trackers:
    """The trackers that ``cfg.logger`` chooses, settings checked and libraries imported (nothing started)."""
    node = cfg.get("logger") or {}
    unknown = [k for k in node if k not in TRACKERS]
    if unknown:
        raise FtuneError(f"Unknown logger '{unknown[0]}'; the loggers are {', '.join(TRACKERS)} (several at once: "
                         f"logger=[tensorboard,mlflow]), or none.")
    chosen = []
    for name, settings in node.items():
        kind = TRACKERS[name]
        try:
            typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind.Settings), settings or {}))
        except OmegaConfBaseException as e:
            what = (str(getattr(e, "msg", e)).strip().splitlines() or ["?"])[0]
            raise FtuneError(f"Invalid logger.{name} setting: {what}. The logger.{name} keys are "
                             f"{', '.join(kind.Settings.__dataclass_fields__)}; fix the override or "
                             f"configs/logger/{name}.yaml.") from None
        _import(kind)
        chosen.append(kind(typed))
    return Trackers(chosen)


RUN_IDS = "trackers.json"  # in the run directory: the tracked runs' ids, so that resume=auto continues them


def tracked_run(out: Path, resumed_at: int | None) -> TrackedRun:
    """The run's name, for a job of a Hydra multirun its sweep directory, and a resumed run's tracked-run ids."""
    sweep = None
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode.name == "MULTIRUN":
            sweep = Path(hydra_cfg.sweep.dir)
    except (ImportError, ValueError):  # not inside a Hydra app (train(cfg) from Python)
        pass
    ids_file = Path(out) / RUN_IDS
    ids = json.loads(ids_file.read_text()) if resumed_at is not None and ids_file.exists() else {}
    return TrackedRun(out=Path(out), name=Path(out).resolve().name, sweep=sweep, resumed_at=resumed_at, run_ids=ids)


class Trackers:
    """The run's trackers as one: each call goes to every tracker still working."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers
        self.started = False

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, config: DictConfig, out: Path, resumed_at: int | None = None) -> None:
        """Open a tracked run in each tracker; a tracker that cannot start stops the run before training."""
        from ftune.progress import console

        plain = OmegaConf.to_container(config, resolve=True)
        run = tracked_run(out, resumed_at)
        for tracker in self.trackers:
            try:
                where = tracker.start(plain, run)
                console.print(f"  tracking  {tracker.name}: {where}", markup=False, soft_wrap=True)
            except Exception as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
                self.finish("failed")
                raise FtuneError(
                    f"logger={tracker.name} could not start a tracked run ({type(e).__name__}: {reason}). Check the "
                    f"logger.{tracker.name} settings (configs/logger/{tracker.name}.yaml) and their environment "
                    f"variables, or train without it; nothing was trained."
                ) from None
        self.started = True
        ids = {t.name: t.run_id for t in self.trackers if getattr(t, "run_id", None)}
        if ids:
            (Path(out) / RUN_IDS).write_text(json.dumps(ids, indent=1) + "\n")

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as e:  # a tracking server that goes away must not end a long run
                from ftune.progress import console

                self.trackers.remove(tracker)
                console.print(f"warning: logger={tracker.name} stopped working ({type(e).__name__}: "
                              f"{str(e).strip()[:300]}); training goes on without it (metrics.jsonl has every row).",
                              markup=False, soft_wrap=True)

    def log(self, row: dict[str, Any]) -> None:
        if self.started:
            self._each("log", row, int(row["step"]))

    def log_final(self, metrics: dict[str, Any], step: int) -> None:
        if self.started:
            self._each("log_final", metrics, step)

    def artifact(self, path: Path) -> None:
        if self.started and Path(path).exists():
            self._each("artifact", Path(path))

    def finish(self, status: str) -> None:
        """Close every tracked run (success, failed or killed); safe to call more than once."""
        for tracker in self.trackers:
            try:
                tracker.finish(status)
            except Exception:  # closing must not hide the error that ended the run
                pass
        self.trackers, self.started = [], False
