"""`logger=[tensorboard,mlflow,wandb]` on a real two-job sweep, read back with each library's own reader.

No network: TensorBoard writes event files, MLflow a local SQLite store, W&B runs offline (and its
login, cache and config folders point into the test's directory).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from ftune.errors import FtuneError
from ftune.trackers import Trackers, build_trackers

from conftest import compose_train, run_cli

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

TINY = ["model=tiny_llama", "dataset=demo_instructions", "trainer=smoke", "trainer.max_steps=4", "trainer.log_every=1",
        "trainer.eval_every=2", "dataset.max_samples=32", "dataset.max_eval_samples=8", "trainer.progress=false"]
NO_NETWORK = {"WANDB_MODE": "offline", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
              "WANDB_API_KEY": "", "MLFLOW_TRACKING_URI": "", "WANDB_PROJECT": ""}


def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: a LevelDB-style log (7-byte header, 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("tracked")
    home = root / "home"  # W&B's settings, cache and data folders: nothing outside the test's directory
    env = {**NO_NETWORK, "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        res = run_cli("train", "-m", "logger=[tensorboard,mlflow,wandb]", "optimizer.lr=1e-3,2e-3", *TINY,
                      f"output_dir={root / 'sweep'}")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert res.returncode == 0, res.stdout + res.stderr
    return root / "sweep", res.stdout + res.stderr


def rows_of(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


def test_console_and_run_directories(sweep):
    root, output = sweep
    # one MLflow store for the sweep beside its jobs' run directories
    assert {"0_lora", "1_lora", "mlartifacts", "mlflow.db"} <= {p.name for p in root.iterdir()}
    # what the libraries print goes to each job's library.log; ftune says where each run is tracked
    assert not [line for line in output.splitlines() if line.lower().startswith(("wandb", "info", "warning", "20"))]
    assert output.count("tracking  mlflow: sqlite:///") == 2 and f"group {root.name}" in output
    rows = rows_of(root / "0_lora")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]


def test_tensorboard_gets_every_row_the_config_final_metrics_and_the_plot(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = sweep
    for job in ("0_lora", "1_lora"):  # one folder per job: `tensorboard --logdir <sweep>` shows both
        events = EventAccumulator(str(root / job / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
        events.Reload()
        rows = rows_of(root / job)
        for key in ("loss", "lr", "eval/loss", "eval/perplexity"):
            logged = [(r["step"], r[key]) for r in rows if key in r]
            assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == logged, key
        final = json.loads((root / job / "metrics.json").read_text())
        assert events.Scalars("final/eval/loss")[0].value == pytest.approx(final["eval/loss"], rel=1e-6)
        assert events.Scalars("final/train_steps")[0].step == 4
        tags = events.Tags()
        assert "loss" in tags["images"]
        config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert "max_steps: 4" in config and "optimizer:" in config


def use_store(monkeypatch, uri: str) -> None:
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which later runs of this process would obey."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test
    mlflow.set_tracking_uri(uri)


def test_mlflow_has_one_experiment_with_a_run_per_job(sweep, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    root, _ = sweep
    uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"  # the sweep's jobs share one store
    use_store(monkeypatch, uri)
    runs = mlflow.search_runs(experiment_names=["ftune"], order_by=["attributes.run_name"])
    assert list(runs["tags.mlflow.runName"]) == ["0_lora", "1_lora"]
    assert set(runs["status"]) == {"FINISHED"}
    assert list(runs["params.optimizer.lr"]) == ["0.001", "0.002"]
    assert set(runs["params.trainer.max_steps"]) == {"4"} and set(runs["tags.ftune.sweep"]) == {str(root.resolve())}
    client = MlflowClient(uri)
    for _, run in runs.iterrows():
        job = root / run["tags.mlflow.runName"]
        rows = rows_of(job)
        for key in ("loss", "tokens_per_s", "eval/loss"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run["run_id"], key))
            assert history == [(r["step"], pytest.approx(r[key])) for r in rows if key in r], key
        final = json.loads((job / "metrics.json").read_text())
        assert run["metrics.final/eval/loss"] == pytest.approx(final["eval/loss"])
        assert run["metrics.final/trainable_params"] == final["trainable_params"]
        assert {a.path for a in client.list_artifacts(run["run_id"])} == {"loss.png", "metrics.json"}


def test_wandb_offline_run_folder_per_job_in_one_group(sweep):
    root, _ = sweep
    for job in ("0_lora", "1_lora"):
        folders = list((root / job / "wandb").glob("offline-run-*"))
        assert len(folders) == 1
        records = wandb_records(next(folders[0].glob("run-*.wandb")))
        kinds = [r.WhichOneof("record_type") for r in records]
        run = records[kinds.index("run")].run
        assert (run.display_name, run.run_group, run.project) == (job, root.name, "ftune")
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["trainer"]["max_steps"] == 4 and config["optimizer"]["lr"] in (1e-3, 2e-3)
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        rows = rows_of(root / job)
        assert [h["_step"] for h in history] == sorted({r["step"] for r in rows})
        assert [h["loss"] for h in history if "loss" in h] == pytest.approx([r["loss"] for r in rows if "loss" in r])
        assert [h["eval/loss"] for h in history if "eval/loss" in h] == pytest.approx(
            [r["eval/loss"] for r in rows if "eval/loss" in r])
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
        final = json.loads((root / job / "metrics.json").read_text())
        assert summary["eval/loss"] == pytest.approx(final["eval/loss"]) and summary["train_steps"] == 4
        assert (folders[0] / "files" / "loss.png").exists() and "exit" in kinds
        assert "loss.png" in {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}


@pytest.mark.parametrize("module,extra", [("wandb", "wandb"), ("mlflow", "mlflow"),
                                          ("torch.utils.tensorboard", "tensorboard")])
def test_a_missing_library_is_named_with_its_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(FtuneError) as err:
        build_trackers(compose_train([f"logger=[{extra}]"]))
    assert f"pip install 'ftune[{extra}]'" in str(err.value) and "\n" not in str(err.value)


class Flaky:
    """A tracker whose server goes away after the first row."""

    name = "flaky"

    def __init__(self):
        self.rows, self.finished = [], None

    def start(self, config, run):
        return "nowhere"

    def log(self, row, step):
        if self.rows:
            raise ConnectionError("server gone")
        self.rows.append((step, row))

    def finish(self, status):
        self.finished = status


def test_a_tracker_that_fails_during_training_is_dropped_with_a_warning(tmp_path, capsys):
    from omegaconf import OmegaConf

    flaky = Flaky()
    trackers = Trackers([flaky])
    trackers.start(OmegaConf.create({"seed": 1}), tmp_path)
    trackers.log({"step": 1, "loss": 2.0})
    trackers.log({"step": 2, "loss": 1.0})  # fails: dropped, training goes on
    trackers.log({"step": 3, "loss": 0.5})
    assert flaky.rows == [(1, {"step": 1, "loss": 2.0})]
    assert "logger=flaky stopped working (ConnectionError: server gone)" in capsys.readouterr().out
    trackers.finish("success")
    assert flaky.finished is None  # no longer among the trackers


def test_a_tracker_that_cannot_start_stops_the_run_before_training(tmp_path):
    trackers = build_trackers(compose_train(["logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=bogus://x"]))
    with pytest.raises(FtuneError) as err:
        trackers.start(compose_train([]), tmp_path)
    assert "logger=mlflow could not start" in str(err.value) and "logger.mlflow" in str(err.value)
    assert not trackers  # the TensorBoard writer that had started was closed


def test_a_resumed_run_continues_its_tracked_runs(tmp_path, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ftune.train import train

    for key, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(key, str(tmp_path / "home" / folder))
    out = tmp_path / "run"
    args = ["model=tiny_llama", "dataset=demo_instructions", "dataset.max_samples=32", "dataset.max_eval_samples=8",
            "trainer.save_every=2", "trainer.keep_checkpoints=5", "logger=[tensorboard,mlflow,wandb]"]
    train(compose_train(args, out))
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"mlflow", "wandb"}
    train(compose_train([*args, f"resume={out / 'checkpoints' / 'step-000002'}"], out))  # steps 3 and 4 again
    assert json.loads((out / "trackers.json").read_text()) == ids
    rows = {r["step"]: r for r in rows_of(out) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4]
    # MLflow: still one run, finished again; steps 3 and 4 were logged twice (the same values: resume is exact)
    use_store(monkeypatch, f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ftune"])
    assert list(runs["run_id"]) == [ids["mlflow"]] and list(runs["status"]) == ["FINISHED"]
    history = sorted((m.step, m.value) for m in mlflow.tracking.MlflowClient().get_metric_history(ids["mlflow"], "loss"))
    assert [s for s, _ in history] == [1, 2, 3, 3, 4, 4]
    assert all(v == pytest.approx(rows[s]["loss"]) for s, v in history)
    # W&B: a second offline folder of the same run, which `wandb sync` appends to it
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(ids["wandb"]) for f in folders)
    # TensorBoard: one curve, the resumed events replacing those logged after the checkpoint
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss")] == [
        (s, r["loss"]) for s, r in sorted(rows.items())]
