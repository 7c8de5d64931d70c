"""TOML front end: `--config file.toml [--section.key value ...]` -> a checked torchtitan `Trainer.Config`.

Sections mirror `Trainer.Config`, and every key is a field of the config dataclass that owns it, with its type
and default: torchtitan's own (training, parallelism, checkpoint, metrics, compile, lr_scheduler, comm, profiler,
validator; [job] is Trainer.Config's dump_folder + DebugConfig; [optimizer] is OptimizersContainer.Config + the
group of torchtitan's default_adamw), our components' ([data] is `Qwen35DataLoader.Config`, [model] the flavor +
`Qwen35Config` fields, [activation_checkpoint] and [float8] `ParallelizeSettings` fields). Every key is checked
against its field's type; unknown keys, wrong types and keys this trainer cannot honour (UNSUPPORTED, REFUSED)
raise `ConfigError` naming `[section] key` and the file. A file may extend a base file; command-line overrides are
parsed against the same types and win over the files.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import operator
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from torch.distributed.fsdp import MixedPrecisionPolicy

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer, default_adamw
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.components.validate import Validator
from torchtitan.config import TORCH_DTYPE_MAP, derive
from torchtitan.config.configs import CommConfig, CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.config.configurable import Configurable
from torchtitan.distributed.fsdp import get_fsdp_reshard_after_forward_policy
from torchtitan.tools.profiler import Profiler
from torchtitan.trainer import Trainer

from parallelism import ParallelizeSettings
from qwen35 import Qwen35Config

from . import compat
from .data import Qwen35DataLoader, SourceSpec, TitanTokenizer
from .loss import Qwen35Loss
from .metrics import Qwen35MetricsProcessor
from .model import Qwen35TitanModel
from .model_spec import model_registry
from .trainer import Qwen35Trainer


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- types
def _fields(cls: type) -> dict[str, Any]:
    """The TOML keys of a dataclass and their types: its fields, less those torchtitan keeps off its own CLI
    (`tyro.conf.Suppress`) and those holding a component's config (built here, e.g. the validator's loader)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if typing.get_origin(hint) is Annotated:
            if tyro.conf.Suppress in hint.__metadata__:
                continue
            hint = typing.get_args(hint)[0]
        if field.init and not field.name.startswith("_") and not _is_component_config(hint):
            fields[field.name] = hint
    return fields


def _is_component_config(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Configurable.Config)


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _matches(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(args)
                and all(_matches(v, arg) for v, arg in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _parse_cli_value(text: str, annotation):
    """A command-line string as a value of `annotation` (None if it cannot be one)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None) and (parsed := _parse_cli_value(text, arg)) is not None:
                return parsed
        return None
    if origin is dict or (origin is list and typing.get_origin(args[0]) is dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if _matches(value, annotation) else None
    if origin is list:
        items = [_parse_cli_value(t.strip(), args[0]) for t in text.split(",") if t.strip()]
        return None if any(i is None for i in items) else items
    if origin is tuple:
        texts = text.split(",")
        items = [_parse_cli_value(t.strip(), arg) for t, arg in zip(texts, args)]
        return None if len(texts) != len(args) or any(i is None for i in items) else tuple(items)
    if origin is Literal:
        return text if text in args else None
    if annotation is bool:
        return {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    for kind in (int, float):
        if annotation is kind:
            try:
                return kind(text)
            except ValueError:
                return None
    return text if annotation is str else None


def _unknown(label: str, key: str) -> str:
    reason = UNSUPPORTED.get((label.strip("[]"), key))
    return f"{label} {key} is not supported: {reason}" if reason else f"unknown key {label} {key}"


def _check_table(path: Path, label: str, table: dict[str, Any], known: dict[str, Any]) -> None:
    """Every key of a TOML table (`label`: "[training]", "[data] sources[0]") is a known field of the right type."""
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{path}: {_unknown(label, key)}; known keys: {', '.join(known)}")
        if not _matches(value, known[key]):
            raise ConfigError(f"{path}: {label} {key} = {value!r} has the wrong type, expected "
                              f"{_type_name(known[key])}")


# ---------------------------------------------------------------------------------------------- sections
# Keys of the configs below that this trainer cannot honour at any value: naming one is an error with the reason.
# (Keys it honours at some values only are in REFUSED.)
_OWN_AC = "parallelism/activation_checkpoint.py checkpoints whole blocks without torchtitan's AC policies"
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("job", "enable_structured_logging"): "torchtitan's Trainer starts no structured trace logger to switch",
    ("optimizer", "param_groups"): "[optimizer] configures one group for every parameter",
    ("optimizer", "optimizer_factory_kwargs_by_name"): "it takes Python objects, which a TOML file cannot hold",
    **{("activation_checkpoint", key): _OWN_AC for key in ("preserve_rng_state", "determinism_check", "debug",
                                                          "force_recompute_mm_shapes_by_fqns", "memory_budget")},
    ("float8", "recipe_name"): "parallelism/float8.py implements torchao's tensorwise recipe only",
    ("float8", "filter_fqns"): "parallelism/float8.py keeps a fixed set of layers in high precision",
    ("float8", "model_compile_enabled"): "it follows [compile]",
}


def _owned_fields(owner) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{key: (type, field with the default)} of a dataclass's TOML keys, or of a function's keyword parameters
    (their types without torch.Tensor, which no TOML value is)."""
    if dataclasses.is_dataclass(owner):
        fields = {field.name: field for field in dataclasses.fields(owner)}
        return {key: (hint, dataclasses.field(default=fields[key].default, default_factory=fields[key].default_factory))
                for key, hint in _fields(owner).items()}
    hints = typing.get_type_hints(owner)
    return {name: (_without_tensor(hints[name]), dataclasses.field(default=parameter.default))
            for name, parameter in inspect.signature(owner).parameters.items() if name in hints}


def _without_tensor(hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_without_tensor(arg) for arg in args if arg is not torch.Tensor])
    if origin is tuple:
        return tuple[tuple(_without_tensor(arg) for arg in args)]
    return hint


def _section(name: str, *parts: tuple, methods: dict[str, Any] | None = None) -> type:
    """The dataclass of TOML section `name`, its fields copied from the configs that own them. A part is (owner,
    keys, defaults): keys are owner's fields, {key: owner's field} or None for all its keys not in UNSUPPORTED;
    defaults replace the owner's ({key: value}; dataclasses.MISSING: required) or are "unset" (`type | None = None`:
    unset keeps the value the owner gets elsewhere, e.g. the flavor's). A field added to an owner is a key here with
    no second declaration."""
    specs = []
    for owner, keys, defaults in parts:
        owned = _owned_fields(owner)
        keys = keys or [key for key in owned if (name, key) not in UNSUPPORTED]
        for key, field_name in (keys if isinstance(keys, dict) else {key: key for key in keys}).items():
            hint, field = owned[field_name]
            if defaults == "unset":
                hint, field = hint | None, dataclasses.field(default=None)
            elif key in defaults:
                field = dataclasses.field(default=defaults[key])
            specs.append((key, hint, field))
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}Section", specs, namespace=methods,
                                      kw_only=True)


def _architecture(model) -> Qwen35Config:
    """The flavor's Qwen35Config with the [model] architecture keys that are set; a non-zero mtp_loss_weight builds
    the one-layer MTP head unless mtp_num_hidden_layers says otherwise."""
    overrides = {key: getattr(model, key) for key in ARCHITECTURE_KEYS if getattr(model, key) is not None}
    if model.mtp_loss_weight and model.mtp_num_hidden_layers is None:
        overrides["mtp_num_hidden_layers"] = 1
    return Qwen35Config.from_flavor(model.flavor, **overrides)


# Qwen35Config fields a run may set over its flavor's value: the published 0.8B-4B sizes tie lm_head to
# embed_tokens (the debug flavors do not); router_aux_loss_coef 0 trains MoE on cross entropy alone; mtp_* train
# the MTP head (`mtp.*`, loaded from and exported to HF).
ARCHITECTURE_KEYS = ("tie_word_embeddings", "router_aux_loss_coef", "mtp_num_hidden_layers", "mtp_loss_weight")
# torchtitan's default optimizer (default_adamw): one AdamW group for every parameter. [optimizer] names the
# optimizer and sets the group's keyword arguments (types torch.optim.AdamW's, defaults torchtitan's).
_DEFAULT_GROUP = default_adamw().param_groups[0]
# TOML key -> the ParallelizeSettings field it sets (parallelism/ implements activation checkpointing and float8
# itself; torchtitan's AC policies and Float8LinearConverter are not used: UNSUPPORTED lists their other keys)
SETTINGS_KEYS = {"activation_checkpoint": {"mode": "activation_checkpoint"},
                 "float8": {"enable": "float8", "emulate": "float8_emulate"}}

JobSection = _section("job", (Trainer.Config, ["dump_folder"], {}), (DebugConfig, None, {}))
ModelSection = _section("model", (Qwen35TitanModel.Config, ["flavor"], {}),
                        (Trainer.Config, ["hf_assets_path"], {"hf_assets_path": dataclasses.MISSING}),  # required
                        (Qwen35Config, ARCHITECTURE_KEYS, "unset"), methods={"architecture": _architecture})
OptimizerSection = _section(
    "optimizer", (OptimizersContainer.Config, None, {}),
    (ParamGroupConfig, ["optimizer_name"], {"optimizer_name": _DEFAULT_GROUP.optimizer_name}),
    (torch.optim.AdamW.__init__, list(_DEFAULT_GROUP.optimizer_kwargs), _DEFAULT_GROUP.optimizer_kwargs))
ActivationCheckpointSection, Float8Section = (
    _section(name, (ParallelizeSettings, keys, {})) for name, keys in SETTINGS_KEYS.items())


@dataclass(kw_only=True, slots=True)
class DataSection(Qwen35DataLoader.Config):
    """[data]: the fields of Qwen35DataLoader.Config (declare a new data key there), with the sources given as one
    dataset_path (+ format, text_field, split) or as [[data.sources]] tables with the keys path, format, weight,
    text_field, split (torchtitan_ext/data/sources.py); exactly one of the two."""

    dataset_path: str = ""  # (torchtitan's own dataset_path names HF datasets; here any one source)
    format: Literal["auto", "jsonl", "parquet", "text", "hf_dataset"] = "auto"
    text_field: str = "text"  # pretraining: the field holding a document
    split: str = "train"  # hf_dataset sources
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # "stdlib_docs": create dataset_path and the tokenizer in model.hf_assets_path when missing (debug runs).
    bootstrap: Literal["none", "stdlib_docs"] = "none"

    def source_specs(self, config_path: Path) -> list[SourceSpec]:
        """The sources as SourceSpecs; a missing or doubled source, an unknown key or a wrong type is an error."""
        if bool(self.dataset_path) == bool(self.sources):
            raise ConfigError(f"{config_path}: [data] needs exactly one of dataset_path (one source) and "
                              "[[data.sources]] (a mixture)")
        if self.dataset_path:
            return [SourceSpec(path=self.dataset_path, format=self.format, text_field=self.text_field,
                               split=self.split)]
        specs = []
        for i, table in enumerate(self.sources):
            _check_table(config_path, f"[data] sources[{i}]", table, _fields(SourceSpec))
            if "path" not in table:
                raise ConfigError(f"{config_path}: [data] sources[{i}] has no path")
            if table.get("weight", 1.0) <= 0:
                raise ConfigError(f"{config_path}: [data] sources[{i}] weight = {table['weight']} must be > 0")
            specs.append(SourceSpec(**table))
        if self.kind == "sft" and any(spec.weight != 1.0 for spec in specs):
            raise ConfigError(f"{config_path}: [data] sources weights mix pretraining sources; SFT uses every "
                              "sample of every source once per epoch (remove weight)")
        return specs


@dataclass(kw_only=True, slots=True)
class ValidatorSection(Validator.Config):
    """torchtitan's validator (enable, freq, steps) on a held-out data file read like [data]'s."""

    dataset_path: str = ""

    def source(self, data: DataSection) -> SourceSpec:
        return SourceSpec(path=self.dataset_path, format=data.format, text_field=data.text_field, split=data.split)


class HeldOutDataLoader(Qwen35DataLoader):
    """The validation data loader. torchtitan's Validator sets `infinite` = (validator.steps != -1); our loaders
    repeat their data, so steps = -1 is refused (read_sections) and this is always True."""

    @dataclass(kw_only=True, slots=True)
    class Config(Qwen35DataLoader.Config):
        infinite: bool = True


SECTIONS: dict[str, type] = {
    "job": JobSection,
    "model": ModelSection,
    "training": TrainingConfig,
    "optimizer": OptimizerSection,
    "lr_scheduler": LRSchedulersContainer.Config,
    "parallelism": ParallelismConfig,
    "checkpoint": CheckpointManager.Config,
    "metrics": Qwen35MetricsProcessor.Config,
    "compile": CompileConfig,
    "activation_checkpoint": ActivationCheckpointSection,
    "float8": Float8Section,
    "data": DataSection,
    "comm": CommConfig,
    "profiler": Profiler.Config,
    "validator": ValidatorSection,
}
# Keys this trainer cannot honour at every value: (is the value supported, why not).
REFUSED: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("parallelism", "enable_sequence_parallel"): (
        bool, "tensor parallelism here always runs the norms and residual stream on sequence shards "
              "(parallelism/tensor_parallel.py)"),
    ("parallelism", "enable_fsdp_symm_mem"): (
        operator.not_, "parallelism/fsdp.py does not put FSDP's collectives in symmetric memory"),
    ("compile", "enable_async_tensor_parallel"): (
        operator.not_, "parallelism/tensor_parallel.py issues its own collectives, not torchtitan's async-TP ones"),
    ("data", "dataset"): (
        "".__eq__, "it names torchtitan's built-in HF datasets; give dataset_path or [[data.sources]]"),
    ("data", "num_workers"): (
        (0).__eq__, "the data loaders are iterable datasets, which worker processes would each read in full"),
    ("data", "persistent_workers"): (operator.not_, "there are no worker processes (num_workers = 0)"),
    ("data", "prefetch_factor"): (lambda value: value is None, "there are no worker processes (num_workers = 0)"),
    ("comm", "mode"): (
        "default".__eq__, "the trainer runs on real process groups only (fake and local-tensor backends are "
                          "untested with parallelism/ and the CPU shims)"),
    ("job", "moe_force_load_balance"): (
        operator.not_, "it is read by torchtitan's own MoE layers; Qwen3.5's router always routes by its top-k"),
    ("job", "batch_invariant"): (operator.not_, "torchtitan's Trainer does not support it in pre-training"),
    ("checkpoint", "last_save_in_hf"): (
        operator.not_, "torchtitan's HF writer neither writes config.json nor the published layout (vision tower, "
        "MTP experts per expert). Save DCP checkpoints and export the last one with `python -m "
        "torchtitan_ext.export_hf --config ... --checkpoint <step dir> --output <dir> [--layout published --source "
        "<original HF dir>]`"),
}
# Paths are relative to the working directory; torchtitan insists on an absolute one for these.
ABSOLUTE_PATHS = (("checkpoint", "initial_load_path"),)


# ---------------------------------------------------------------------------------------------- loading
def read_sections(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The TOML file (over the files it extends) with the overrides applied, as one checked dataclass instance
    per section."""
    values = _read_values(path, ())
    values = {name: values.get(name, {}) for name in SECTIONS}
    for section, key, value in _split_overrides(path, overrides):
        values[section][key] = value

    for section, key in ABSOLUTE_PATHS:
        if values[section].get(key):
            values[section][key] = str(Path(values[section][key]).absolute())
    for (section, key), (supported, reason) in REFUSED.items():  # the defaults are all supported
        if key in values[section] and not supported(value := values[section][key]):
            raise ConfigError(f"{path}: [{section}] {key} = {_toml_value(value)} is not supported: {reason}")
    values["parallelism"].setdefault("spmd_backend", compat.default_spmd_backend())
    sections = {}
    for name, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            if field.name not in values[name] and field.default is field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: [{name}] {field.name} is required")
        hints = _fields(cls)
        table = {key: tuple(value) if typing.get_origin(hints[key]) is tuple else value
                 for key, value in values[name].items()}
        try:
            sections[name] = cls(**table)
        except ValueError as err:  # torchtitan's own checks in __post_init__
            raise ConfigError(f"{path}: [{name}] {err}") from None
    if sections["job"].spmd_typechecking and sections["parallelism"].spmd_backend != "spmd_types":
        raise ConfigError(f"{path}: [job] spmd_typechecking = true needs [parallelism] spmd_backend = \"spmd_types\" "
                          "(torchtitan type-checks only there)")
    if sections["validator"].enable:
        if not sections["validator"].dataset_path:
            raise ConfigError(f"{path}: [validator] enable = true needs [validator] dataset_path (held-out data)")
        if sections["validator"].steps == -1:
            raise ConfigError(f"{path}: [validator] steps = -1 (the whole file) is not supported: the data loaders "
                              "repeat their data, so a validation pass needs a number of steps")
    return sections


def _read_values(path: Path, extended_by: tuple[Path, ...]) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of a TOML file merged over the file its `extends` names (a path relative to it):
    a key stated here wins over the base's, a key not stated keeps the base's value. Each file's keys are checked
    (and named) in the file that states them."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        via = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConfigError(f"config file {path} not found{via}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None
    base = raw.pop("extends", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: extends = {base!r} has the wrong type, expected a path (str)")
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{section}' must be a [section] table, got {table!r}")
        _check_table(path, f"[{section}]", table, _fields(SECTIONS[section]))
    if base is None:
        return raw
    base_path = path.parent / base
    chain = (*extended_by, path)
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: extends = {base!r} makes a cycle: {' -> '.join(map(str, (*chain, base_path)))}")
    values = _read_values(base_path, chain)
    for section, table in raw.items():
        values.setdefault(section, {}).update(table)
    return values


def to_toml(sections: dict[str, Any]) -> str:
    """The resolved sections as a TOML file that `read_sections` reads back to equal sections (`--print-config`).
    A value of None has no TOML form: it is left out, as a comment, which reads back as the default (None)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        for key in _fields(cls):
            value = getattr(sections[name], key)
            if value is None:
                if defaults[key] is not None:
                    raise ConfigError(f"[{name}] {key} = None cannot be written as TOML (its default is not None)")
                lines.append(f"# {key}: unset")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{value!r} ({type(value).__name__}) has no TOML form")


def _is_bool(annotation) -> bool:
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _split_overrides(path: Path, overrides: list[str]):
    """`--section.key value` / `--section.key=value` pairs (`-` and `_` interchangeable in names). As in
    torchtitan's CLI, a boolean may be given bare (`--metrics.enable_tensorboard`: true) or negated
    (`--metrics.no_enable_tensorboard` / `--metrics.no-enable-tensorboard`: false)."""
    i = 0
    while i < len(overrides):
        flag = overrides[i]
        i += 1
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r}: overrides of {path} are --section.key value")
        name, has_value, text = flag[2:].partition("=")
        section, _, key = name.replace("-", "_").partition(".")
        known = _fields(SECTIONS[section]) if section in SECTIONS else {}
        negated = key not in known and key.startswith("no_") and _is_bool(known.get(key[3:]))
        if negated:
            key = key[3:]
            if has_value:
                raise ConfigError(f"--{name} takes no value: it sets [{section}] {key} to false (overriding {path})")
            yield section, key, False
            continue
        if key not in known:
            raise ConfigError(f"--{name}: {_unknown(f'[{section}]', key)} (overriding {path})")
        annotation = known[key]
        if not has_value:
            bare = i >= len(overrides) or overrides[i].startswith("--")
            if bare and _is_bool(annotation):
                yield section, key, True
                continue
            if bare:
                raise ConfigError(f"{flag}: missing value (overriding {path})")
            text = overrides[i]
            i += 1
        value = _parse_cli_value(text, annotation)
        if value is None and not (text.lower() in ("none", "null") and _matches(None, annotation)):
            raise ConfigError(f"--{name} {text!r}: wrong type for [{section}] {key} (overriding {path}), "
                              f"expected {_type_name(annotation)}")
        yield section, key, value


def parallelize_settings(sections: dict[str, Any]) -> ParallelizeSettings:
    """What parallelism.parallelize applies, decided once from the sections (torchtitan reads the same configs
    for its own parts: the loss compile, the CPU-offload init device, the sequence-length checks)."""
    training, parallelism, compile_config = sections["training"], sections["parallelism"], sections["compile"]
    return ParallelizeSettings(
        **{field: getattr(sections[section], key) for section, keys in SETTINGS_KEYS.items()
           for key, field in keys.items()},
        compile=compile_config.enable and "model" in compile_config.components, compile_backend=compile_config.backend,
        mp_policy=MixedPrecisionPolicy(param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
                                       reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce]),
        loss_parallel=parallelism.tensor_parallel_degree > 1,  # as torchtitan's models: its loss takes vocab shards
        fsdp_reshard_after_forward=get_fsdp_reshard_after_forward_policy(
            parallelism.fsdp_reshard_after_forward, pp_enabled=parallelism.pipeline_parallel_degree > 1),
        fsdp_cpu_offload=training.enable_cpu_offload)


# Sections that are torchtitan's Trainer.Config fields as they are
_TORCHTITAN_SECTIONS = ("lr_scheduler", "training", "parallelism", "checkpoint", "metrics", "compile", "comm",
                        "profiler")


def to_trainer_config(sections: dict[str, Any], config_path: Path) -> Trainer.Config:
    job, model, opt, data = sections["job"], sections["model"], sections["optimizer"], sections["data"]
    validator = sections["validator"]
    loader = derive(data, Qwen35DataLoader.Config, sources=data.source_specs(config_path), dataset_path=None)
    return Qwen35Trainer.Config(  # torchtitan's Trainer with the non-finite-loss and resume checks and
        # Qwen3.5's context-parallel batch sharding
        model_spec=model_registry(model.flavor, settings=parallelize_settings(sections),
                                  architecture=model.architecture()),
        hf_assets_path=model.hf_assets_path,
        dump_folder=job.dump_folder,
        loss=Qwen35Loss.Config(),  # cross entropy (+ the MoE load-balancing term)
        optimizer=derive(opt, OptimizersContainer.Config, param_groups=[derive(
            opt, ParamGroupConfig, pattern=_DEFAULT_GROUP.pattern,
            optimizer_kwargs={key: getattr(opt, key) for key in _DEFAULT_GROUP.optimizer_kwargs})]),
        **{name: sections[name] for name in _TORCHTITAN_SECTIONS},
        activation_checkpoint=None,  # parallelize_settings: the model's own activation checkpointing
        tokenizer=TitanTokenizer.Config(),
        dataloader=loader,
        validator=derive(validator, Validator.Config, dataloader=derive(loader, HeldOutDataLoader.Config,
                                                                             sources=[validator.source(data)])),
        debug=derive(job, DebugConfig),
    )
