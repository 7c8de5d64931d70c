"""TOML front end: `--config file.toml [--section.key value ...]` -> a checked torchtitan `Trainer.Config`.

Sections mirror `Trainer.Config`. Where torchtitan has a plain dataclass for a section (training, parallelism,
checkpoint, metrics, compile, lr_scheduler) its fields *are* the TOML keys and its defaults apply; the other
sections are small dataclasses below. Every key is checked against its field's type; unknown keys and wrong
types raise `ConfigError` naming `[section] key` and the file. Command-line overrides are parsed against the
same types and win over the file.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.config.configs import CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.trainer import Trainer

from qwen35 import Qwen35Config

from . import compat
from .data import Qwen35DataLoader, SourceSpec, TitanTokenizer
from .loss import Qwen35Loss
from .metrics import Qwen35MetricsProcessor
from .model_spec import Float8Settings, model_registry


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
    mode: Literal["none", "selective", "full"] = "none"


@dataclass
class Float8Section:
    enable: bool = False  # tensorwise-scaled float8 matmuls for the large nn.Linear layers (parallelism/float8.py)
    emulate: bool = False  # CPU / pre-SM89 GPUs: float8 numerics in high precision


@dataclass
class DataSection:
    kind: Literal["pretrain", "sft"] = "pretrain"
    # One source: dataset_path (+ format, text_field, split). Several: [[data.sources]] tables with the keys
    # path, format, weight, text_field, split (see torchtitan_ext/data/sources.py). Exactly one of the two.
    dataset_path: str = ""
    format: Literal["auto", "jsonl", "parquet", "text", "hf_dataset"] = "auto"
    text_field: str = "text"  # pretraining: the field holding a document
    split: str = "train"  # hf_dataset sources
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    packing: bool = True  # several documents / SFT samples per window (with boundaries)
    # SFT
    sft_format: Literal["auto", "chat", "gsm8k"] = "auto"  # auto: by the first record's fields
    too_long: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_len + 1 tokens
    shuffle_seed: int = 0  # order of SFT samples, reshuffled every epoch
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {enable_thinking = false}
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
}
REQUIRED = (("model", "flavor"), ("model", "hf_assets_path"))
# Paths are relative to the working directory; torchtitan insists on an absolute one for these.
ABSOLUTE_PATHS = (("checkpoint", "initial_load_path"),)


# ---------------------------------------------------------------------------------------------- types
def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


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
    """The TOML file with the overrides applied, as one checked dataclass instance per section."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{section}' must be a [section] table, got {table!r}")
        _check_table(path, f"[{section}]", table, _fields(SECTIONS[section][0]))
        values[section].update(table)

    for section, key, value in _split_overrides(path, overrides):
        values[section][key] = value

    for section, key in ABSOLUTE_PATHS:
        if values[section].get(key):
            values[section][key] = str(Path(values[section][key]).absolute())
    sections = {}
    for name, (cls, defaults) in SECTIONS.items():
        try:
            sections[name] = dataclasses.replace(defaults(), **values[name])
        except ValueError as err:  # torchtitan's own checks in __post_init__
            raise ConfigError(f"{path}: [{name}] {err}") from None
    for section, key in REQUIRED:
        if not getattr(sections[section], key):
            raise ConfigError(f"{path}: [{section}] {key} is required")
    if sections["checkpoint"].last_save_in_hf:
        raise ConfigError(
            f"{path}: [checkpoint] last_save_in_hf = true is not supported: torchtitan's HF writer neither writes "
            "config.json nor the published layout (vision tower, MTP experts per expert). Save DCP checkpoints and "
            "export the last one with `python -m torchtitan_ext.export_hf --config ... --checkpoint <step dir> "
            "--output <dir> [--layout published --source <original HF dir>]`")
    return sections


def _split_overrides(path: Path, overrides: list[str]):
    """`--section.key value` / `--section.key=value` pairs (`-` and `_` interchangeable in names)."""
    i = 0
    while i < len(overrides):
        flag = overrides[i]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r}: overrides of {path} are --section.key value")
        name, has_value, text = flag[2:].partition("=")
        if not has_value:
            if i + 1 >= len(overrides):
                raise ConfigError(f"{flag}: missing value (overriding {path})")
            text = overrides[i + 1]
            i += 1
        i += 1
        section, _, key = name.replace("-", "_").partition(".")
        if section not in SECTIONS or key not in _fields(SECTIONS[section][0]):
            raise ConfigError(f"--{name}: unknown key [{section}] {key} (overriding {path})")
        annotation = _fields(SECTIONS[section][0])[key]
        value = _parse_cli_value(text, annotation)
        if value is None and not (text.lower() in ("none", "null") and _matches(None, annotation)):
            raise ConfigError(f"--{name} {text!r}: wrong type for [{section}] {key} (overriding {path}), "
                              f"expected {_type_name(annotation)}")
        yield section, key, value


_ACTIVATION_CHECKPOINTING = {"none": lambda: None, "selective": SelectiveAC.Config, "full": FullAC.Config}


def to_trainer_config(sections: dict[str, Any], config_path: Path) -> Trainer.Config:
    job, model, opt, data = sections["job"], sections["model"], sections["optimizer"], sections["data"]
    float8 = sections["float8"]
    return Trainer.Config(
        model_spec=model_registry(
            model.flavor, float8=Float8Settings(emulate=float8.emulate) if float8.enable else None,
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
        activation_checkpoint=_ACTIVATION_CHECKPOINTING[sections["activation_checkpoint"].mode](),
        tokenizer=TitanTokenizer.Config(),
        dataloader=Qwen35DataLoader.Config(
            kind=data.kind, sources=data.source_specs(config_path), packing=data.packing, too_long=data.too_long,
            sft_format=data.sft_format, shuffle_seed=data.shuffle_seed, chat_template_kwargs=data.chat_template_kwargs),
        debug=DebugConfig(seed=job.seed, deterministic=job.deterministic, print_config=job.print_config),
    )
