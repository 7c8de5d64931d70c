"""TOML front end: `--config file.toml [--section.key value ...]` -> a checked torchtitan `Trainer.Config`.

Sections mirror `Trainer.Config`, and their keys are derived from config dataclasses: torchtitan's own (training,
parallelism, checkpoint, metrics, compile, lr_scheduler, comm, profiler, validator) and our components' ([data] is
`Qwen35DataLoader.Config`), so their fields *are* the TOML keys with their types and defaults; the few sections
with no such dataclass (job, model, optimizer, activation_checkpoint, float8) are small dataclasses below. Every
key is checked against its field's type; unknown keys, wrong types and keys this trainer cannot honour (REFUSED)
raise `ConfigError` naming `[section] key` and the file. A file may extend a base file; command-line overrides are
parsed against the same types and win over the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro
from torch.distributed.fsdp import MixedPrecisionPolicy

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.components.validate import Validator
from torchtitan.config import TORCH_DTYPE_MAP, derive
from torchtitan.config.configs import CommConfig, CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.config.configurable import Configurable
from torchtitan.distributed.fsdp import get_fsdp_reshard_after_forward_policy
from torchtitan.tools.profiler import Profiler
from torchtitan.trainer import Trainer

from parallelism import ParallelizeSettings
from parallelism.activation_checkpoint import AC_MODES
from qwen35 import Qwen35Config

from . import compat
from .data import Qwen35DataLoader, SourceSpec, TitanTokenizer
from .loss import Qwen35Loss
from .metrics import Qwen35MetricsProcessor
from .model_spec import model_registry
from .trainer import Qwen35Trainer


class ConfigError(ValueError):
    pass


@dataclass
class JobSection:
    dump_folder: str = "./outputs"
    description: str = ""
    seed: int | None = None
    deterministic: bool = False  # torch.use_deterministic_algorithms (needed for bitwise resume on GPU)
    print_config: bool = False


@dataclass
class ModelSection:
    flavor: str = ""
    hf_assets_path: str = ""  # tokenizer files; also config.json + safetensors for initial weights / export
    # Architecture override: unset = the flavor's own value. The published 0.8B-4B sizes tie lm_head to
    # embed_tokens and the debug flavors do not; `true` gives e.g. a tied debug model for tests.
    tie_word_embeddings: bool | None = None
    # MoE load-balancing loss weight; unset = the flavor's (0.001). 0 trains on cross entropy alone.
    router_aux_loss_coef: float | None = None
    # Weight of the MTP head's next-next-token loss (Qwen35Config.mtp_loss_weight); 0 = off. Non-zero builds the
    # head (mtp_num_hidden_layers = 1) unless mtp_num_hidden_layers is set.
    mtp_loss_weight: float | None = None
    # 1 builds the published one-layer MTP head (`mtp.*`, loaded from and exported to HF); unset = the flavor's.
    mtp_num_hidden_layers: int | None = None

    def architecture(self) -> Qwen35Config:
        """The flavor's Qwen35Config with this section's overrides applied."""
        overrides = {key: getattr(self, key) for key in ("tie_word_embeddings", "router_aux_loss_coef",
                                                         "mtp_loss_weight", "mtp_num_hidden_layers")
                     if getattr(self, key) is not None}
        if self.mtp_loss_weight and self.mtp_num_hidden_layers is None:
            overrides["mtp_num_hidden_layers"] = 1
        return Qwen35Config.from_flavor(self.flavor, **overrides)


@dataclass
class OptimizerSection:
    name: str = "AdamW"
    lr: float = 8e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    implementation: Literal["for-loop", "foreach", "fused"] = "fused"


@dataclass
class ActivationCheckpointSection:
    mode: Literal[AC_MODES] = "none"


@dataclass
class Float8Section:
    enable: bool = False  # tensorwise-scaled float8 matmuls for the large nn.Linear layers (parallelism/float8.py)
    emulate: bool = False  # CPU / pre-SM89 GPUs: float8 numerics in high precision


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


def _spmd_parallelism() -> ParallelismConfig:
    return ParallelismConfig(spmd_backend=compat.default_spmd_backend())


# section -> (dataclass, factory of its defaults)
SECTIONS: dict[str, tuple[type, typing.Callable[[], Any]]] = {
    "job": (JobSection, JobSection),
    "model": (ModelSection, ModelSection),
    "training": (TrainingConfig, TrainingConfig),
    "optimizer": (OptimizerSection, OptimizerSection),
    "lr_scheduler": (LRSchedulersContainer.Config, LRSchedulersContainer.Config),
    "parallelism": (ParallelismConfig, _spmd_parallelism),
    "checkpoint": (CheckpointManager.Config, CheckpointManager.Config),
    "metrics": (Qwen35MetricsProcessor.Config, Qwen35MetricsProcessor.Config),
    "compile": (CompileConfig, CompileConfig),
    "activation_checkpoint": (ActivationCheckpointSection, ActivationCheckpointSection),
    "float8": (Float8Section, Float8Section),
    "data": (DataSection, DataSection),
    "comm": (CommConfig, CommConfig),
    "profiler": (Profiler.Config, Profiler.Config),
    "validator": (ValidatorSection, ValidatorSection),
}
# Keys torchtitan declares that this trainer cannot honour at every value: (is the value supported, why not).
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
}
REQUIRED = (("model", "flavor"), ("model", "hf_assets_path"))
# Paths are relative to the working directory; torchtitan insists on an absolute one for these.
ABSOLUTE_PATHS = (("checkpoint", "initial_load_path"),)


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


def _check_table(path: Path, label: str, table: dict[str, Any], known: dict[str, Any]) -> None:
    """Every key of a TOML table (`label`: "[training]", "[data] sources[0]") is a known field of the right type."""
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {label} {key}; known keys: {', '.join(known)}")
        if not _matches(value, known[key]):
            raise ConfigError(f"{path}: {label} {key} = {value!r} has the wrong type, expected "
                              f"{_type_name(known[key])}")


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
            raise ConfigError(f"{path}: [{section}] {key} = {value!r} is not supported: {reason}")
    sections = {}
    for name, (cls, defaults) in SECTIONS.items():
        try:
            sections[name] = dataclasses.replace(defaults(), **values[name])
        except ValueError as err:  # torchtitan's own checks in __post_init__
            raise ConfigError(f"{path}: [{name}] {err}") from None
    for section, key in REQUIRED:
        if not getattr(sections[section], key):
            raise ConfigError(f"{path}: [{section}] {key} is required")
    if sections["validator"].enable:
        if not sections["validator"].dataset_path:
            raise ConfigError(f"{path}: [validator] enable = true needs [validator] dataset_path (held-out data)")
        if sections["validator"].steps == -1:
            raise ConfigError(f"{path}: [validator] steps = -1 (the whole file) is not supported: the data loaders "
                              "repeat their data, so a validation pass needs a number of steps")
    if sections["checkpoint"].last_save_in_hf:
        raise ConfigError(
            f"{path}: [checkpoint] last_save_in_hf = true is not supported: torchtitan's HF writer neither writes "
            "config.json nor the published layout (vision tower, MTP experts per expert). Save DCP checkpoints and "
            "export the last one with `python -m torchtitan_ext.export_hf --config ... --checkpoint <step dir> "
            "--output <dir> [--layout published --source <original HF dir>]`")
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
        _check_table(path, f"[{section}]", table, _fields(SECTIONS[section][0]))
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
    for name, (cls, defaults) in SECTIONS.items():
        lines.append(f"[{name}]")
        default = defaults()
        for key in _fields(cls):
            value = getattr(sections[name], key)
            if value is None:
                if getattr(default, key) is not None:
                    raise ConfigError(f"[{name}] {key} = None cannot be written as TOML (its default is "
                                      f"{getattr(default, key)!r})")
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
        known = _fields(SECTIONS[section][0]) if section in SECTIONS else {}
        negated = key not in known and key.startswith("no_") and _is_bool(known.get(key[3:]))
        if negated:
            key = key[3:]
            if has_value:
                raise ConfigError(f"--{name} takes no value: it sets [{section}] {key} to false (overriding {path})")
            yield section, key, False
            continue
        if key not in known:
            raise ConfigError(f"--{name}: unknown key [{section}] {key} (overriding {path})")
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
        activation_checkpoint=sections["activation_checkpoint"].mode,
        compile=compile_config.enable and "model" in compile_config.components, compile_backend=compile_config.backend,
        float8=sections["float8"].enable, float8_emulate=sections["float8"].emulate,
        mp_policy=MixedPrecisionPolicy(param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
                                       reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce]),
        loss_parallel=parallelism.tensor_parallel_degree > 1,  # as torchtitan's models: its loss takes vocab shards
        fsdp_reshard_after_forward=get_fsdp_reshard_after_forward_policy(
            parallelism.fsdp_reshard_after_forward, pp_enabled=parallelism.pipeline_parallel_degree > 1),
        fsdp_cpu_offload=training.enable_cpu_offload)


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
        optimizer=OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=opt.name, optimizer_kwargs={
                "lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps, "weight_decay": opt.weight_decay})],
            implementation=opt.implementation),
        lr_scheduler=sections["lr_scheduler"],
        training=sections["training"],
        parallelism=sections["parallelism"],
        checkpoint=sections["checkpoint"],
        metrics=sections["metrics"],
        compile=sections["compile"],
        activation_checkpoint=None,  # parallelize_settings: the model's own activation checkpointing
        tokenizer=TitanTokenizer.Config(),
        dataloader=loader,
        comm=sections["comm"],
        profiler=sections["profiler"],
        validator=derive(validator, Validator.Config, dataloader=derive(loader, HeldOutDataLoader.Config,
                                                                             sources=[validator.source(data)])),
        debug=DebugConfig(seed=job.seed, deterministic=job.deterministic, print_config=job.print_config),
    )
