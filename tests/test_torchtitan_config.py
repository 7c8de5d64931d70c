"""TOML front end: errors name the key and the file; overrides win; every train_configs/*.toml validates."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from parallelism import ParallelizeSettings
from qwen35 import Qwen35Config
from test_train_helpers import debug_assets
from torchtitan_ext import compat
from torchtitan_ext.preflight import prepare_files
from torchtitan.components.optimizer import OptimizersContainer, default_adamw
from torchtitan.components.quantization.float8 import Float8LinearConverter
from torchtitan.config.configs import DebugConfig
from torchtitan.distributed.activation_checkpoint import FullAC, MemoryBudgetAC, SelectiveAC
from torchtitan_ext.toml_config import (REFUSED, UNSUPPORTED, ConfigError, parallelize_settings, read_sections, to_toml,
                                        to_trainer_config)
from torchtitan_ext.train import load_config, main

CONFIGS = Path(__file__).resolve().parent.parent / "train_configs"
PRETRAIN_CONFIGS = sorted(CONFIGS.glob("qwen35_*.toml"))
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.toml") if not p.stem.endswith("_base"))  # bases name no model
MINIMAL = """
[model]
flavor = "debug"
hf_assets_path = "{assets}"
[data]
dataset_path = "{corpus}"
"""


@pytest.fixture
def files(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    shutil.copyfile(debug_assets() / "tokenizer.json", assets / "tokenizer.json")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    return assets, corpus


def _toml(tmp_path, files, extra=""):
    assets, corpus = files
    path = tmp_path / "run.toml"
    path.write_text(MINIMAL.format(assets=assets, corpus=corpus) + extra)
    return path


def test_unknown_key_names_key_and_file(tmp_path, files):
    path = _toml(tmp_path, files, "[training]\nsteps = 3\nstepz = 4\n")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown key \[training\] stepz"):
        read_sections(path, [])


def test_unknown_section_names_section_and_file(tmp_path, files):
    with pytest.raises(ConfigError, match=r"run\.toml: unknown section \[trainig\]"):
        read_sections(_toml(tmp_path, files, "[trainig]\nsteps = 3\n"), [])


@pytest.mark.parametrize("extra, key", [
    ('[training]\nsteps = "many"\n', r"\[training\] steps = 'many'"),
    ("[optimizer]\nlr = true\n", r"\[optimizer\] lr = True"),
    ('[activation_checkpoint]\nmode = "sometimes"\n', r"\[activation_checkpoint\] mode"),
    ("[compile]\ncomponents = \"model\"\n", r"\[compile\] components"),
])
def test_wrong_type_names_key_and_file(tmp_path, files, extra, key):
    with pytest.raises(ConfigError, match=rf"run\.toml: {key}.* has the wrong type"):
        read_sections(_toml(tmp_path, files, extra), [])


def test_cli_overrides_win_and_are_type_checked(tmp_path, files):
    path = _toml(tmp_path, files, "[training]\nsteps = 3\nseq_len = 64\n")
    sections = read_sections(path, ["--training.steps", "7", "--optimizer.lr=0.01", "--compile.components",
                                    "model,loss", "--checkpoint.enable", "true", "--job.seed", "none"])
    assert sections["training"].steps == 7 and sections["training"].seq_len == 64
    assert sections["optimizer"].lr == 0.01 and sections["compile"].components == ["model", "loss"]
    assert sections["checkpoint"].enable is True and sections["job"].seed is None
    with pytest.raises(ConfigError, match=r"--training\.steps 'x': wrong type for \[training\] steps.*run\.toml"):
        read_sections(path, ["--training.steps", "x"])
    with pytest.raises(ConfigError, match=r"--training\.stepz: unknown key \[training\] stepz.*run\.toml"):
        read_sections(path, ["--training.stepz", "1"])


def test_boolean_flags_bare_negated_or_valued(tmp_path, files):
    """torchtitan's CLI convention: a bare boolean flag means true, --section.no_<flag> / no-<flag> false."""
    path = _toml(tmp_path, files, "[metrics]\nenable_tensorboard = false\n[checkpoint]\nenable = true\n")
    sections = read_sections(path, ["--metrics.enable_tensorboard", "--checkpoint.no-enable", "--job.deterministic"])
    assert sections["metrics"].enable_tensorboard is True and sections["checkpoint"].enable is False
    assert sections["job"].deterministic is True
    sections = read_sections(path, ["--checkpoint.no_enable", "--metrics.enable-tensorboard", "true",
                                    "--model.no_tie_word_embeddings"])
    assert sections["checkpoint"].enable is False and sections["metrics"].enable_tensorboard is True
    assert sections["model"].tie_word_embeddings is False
    assert read_sections(path, ["--checkpoint.enable", "false"])["checkpoint"].enable is False
    with pytest.raises(ConfigError, match=r"--checkpoint\.no_enable takes no value"):
        read_sections(path, ["--checkpoint.no_enable=true"])
    with pytest.raises(ConfigError, match=r"--training\.steps: missing value"):
        read_sections(path, ["--training.steps", "--checkpoint.enable"])
    with pytest.raises(ConfigError, match=r"--training\.no_steps: unknown key \[training\] no_steps"):
        read_sections(path, ["--training.no_steps"])


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_printed_config_reads_back_to_the_same_config(path, tmp_path):
    sections = read_sections(path, [])
    printed = tmp_path / "printed.toml"
    printed.write_text(to_toml(sections))
    assert read_sections(printed, []) == sections


def test_print_config_cli_prints_the_resolved_config(tmp_path, capsys):
    main(["--config", str(CONFIGS / "qwen35_27b.toml"), "--training.steps", "5", "--print-config"])
    printed = tmp_path / "printed.toml"
    # torchtitan's logger (set up by earlier tests in this process) also writes to stdout
    printed.write_text("".join(line for line in capsys.readouterr().out.splitlines(keepends=True)
                               if not line.startswith("[titan]")))
    sections = read_sections(printed, [])
    assert sections == read_sections(CONFIGS / "qwen35_27b.toml", ["--training.steps", "5"])
    assert sections["training"].steps == 5 and sections["model"].flavor == "27B"
    assert sections["optimizer"].weight_decay == 0.1  # from pretrain_base.toml


def test_every_base_is_extended_and_names_no_model():
    bases = sorted(CONFIGS.glob("*_base.toml"))
    assert bases and all(any(f'extends = "{base.name}"' in p.read_text() for p in RUN_CONFIGS) for base in bases)
    for base in bases:
        with pytest.raises(ConfigError, match=rf"{base.name}: \[model\] flavor is required"):
            read_sections(base, [])


def test_extends_merges_keys_over_a_base_relative_to_the_file(tmp_path, files):
    assets, corpus = files
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "base.toml").write_text(
        f'[model]\nflavor = "debug"\nhf_assets_path = "{assets}"\n[data]\ndataset_path = "{corpus}"\n'
        "[training]\nsteps = 3\nseq_len = 64\n")
    child = tmp_path / "child.toml"
    child.write_text('extends = "bases/base.toml"\n[training]\nsteps = 9\n[metrics]\nlog_freq = 2\n')
    sections = read_sections(child, ["--training.local_batch_size", "3"])
    training = sections["training"]
    assert (training.steps, training.seq_len, training.local_batch_size) == (9, 64, 3)
    assert sections["metrics"].log_freq == 2 and sections["model"].flavor == "debug"

    (tmp_path / "bases" / "base.toml").write_text("[training]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"base\.toml: unknown key \[training\] stepz"):
        read_sections(child, [])
    (tmp_path / "bases" / "base.toml").write_text('extends = "../child.toml"\n')
    with pytest.raises(ConfigError, match=r"base\.toml: extends = '../child.toml' makes a cycle"):
        read_sections(child, [])
    child.write_text('extends = "nope.toml"\n')
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml not found \(extended by .*child\.toml\)"):
        read_sections(child, [])
    child.write_text("extends = 3\n")
    with pytest.raises(ConfigError, match=r"child\.toml: extends = 3 has the wrong type"):
        read_sections(child, [])


REFUSED_CASES = [
    (["--parallelism.no_enable_sequence_parallel"],
     r"\[parallelism\] enable_sequence_parallel = false is not supported: tensor parallelism here always"),
    (["--parallelism.enable_fsdp_symm_mem"], r"\[parallelism\] enable_fsdp_symm_mem = true is not supported"),
    (["--compile.enable_async_tensor_parallel"], r"\[compile\] enable_async_tensor_parallel = true is not supported"),
    (["--comm.mode", "fake_backend"], r"\[comm\] mode = \"fake_backend\" is not supported: .*real process groups"),
    (["--validator.enable"], r"\[validator\] enable = true needs \[validator\] dataset_path"),
    (["--job.spmd_typechecking"], r"\[job\] spmd_typechecking = true needs \[parallelism\] spmd_backend"),
    (["--validator.enable", "--validator.dataset_path", "x.jsonl"], r"\[validator\] steps = -1 .* is not supported"),
    (["--profiler.trace_post_processor", "f"], r"unknown key \[profiler\] trace_post_processor"),  # tyro-suppressed
    (["--validator.dataloader", "x"], r"unknown key \[validator\] dataloader"),  # a component: built from [data]
    (["--data.num_workers", "2"], r"\[data\] num_workers = 2 is not supported: .*iterable datasets"),
    (["--data.dataset", "c4"], r"\[data\] dataset = \"c4\" is not supported"),
    (["--data.persistent_workers"], r"\[data\] persistent_workers = true is not supported: there are no worker"),
    (["--data.prefetch_factor", "2"], r"\[data\] prefetch_factor = 2 is not supported: there are no worker"),
    (["--job.moe_force_load_balance"], r"\[job\] moe_force_load_balance = true is not supported: .*own MoE layers"),
    (["--checkpoint.last_save_in_hf"], r"\[checkpoint\] last_save_in_hf = true is not supported: .*export_hf"),
    (["--job.batch_invariant"], r"\[job\] batch_invariant = true is not supported: .*pre-training"),
]


@pytest.mark.parametrize("overrides, message", REFUSED_CASES)
def test_keys_this_trainer_cannot_honour_are_refused_with_the_reason(tmp_path, files, overrides, message):
    with pytest.raises(ConfigError, match=rf"{message}.*run\.toml|run\.toml: {message}"):
        read_sections(_toml(tmp_path, files), overrides)


def test_every_refused_key_has_a_case():
    tested = {re.search(r"\\\[(\w+)\\\] (\w+)", message).groups() for _, message in REFUSED_CASES}
    assert set(REFUSED) <= tested


@pytest.mark.parametrize("section, key", sorted(UNSUPPORTED))
def test_torchtitan_keys_this_trainer_has_no_use_for_are_refused_with_the_reason(tmp_path, files, section, key):
    """Each is a field of torchtitan's config for the section, and naming it (file or command line) is an error
    that says why, not "unknown key"."""
    torchtitan_configs = {"job": [DebugConfig], "optimizer": [OptimizersContainer.Config],
                          "activation_checkpoint": [FullAC.Config, SelectiveAC.Config, MemoryBudgetAC.Config],
                          "float8": [Float8LinearConverter.Config]}[section]
    assert any(key in {f.name for f in dataclasses.fields(c)} for c in torchtitan_configs)
    message = rf"\[{section}\] {key} is not supported: {re.escape(UNSUPPORTED[section, key])}"
    with pytest.raises(ConfigError, match=rf"run\.toml: {message}"):
        read_sections(_toml(tmp_path, files, f"[{section}]\n{key} = 1\n"), [])
    with pytest.raises(ConfigError, match=rf"--{section}\.{key}: {message} \(overriding .*run\.toml\)"):
        read_sections(_toml(tmp_path, files), [f"--{section}.{key}", "1"])


def test_sections_take_their_keys_types_and_defaults_from_the_configs_that_own_them(tmp_path, files):
    """[job] = torchtitan's Trainer.Config dump_folder + DebugConfig; [model] = the flavor, hf_assets_path and
    Qwen35Config fields (unset: the flavor's); [optimizer] = OptimizersContainer.Config + one group of torchtitan's
    default_adamw; [activation_checkpoint] / [float8] = ParallelizeSettings fields."""
    from torchtitan_ext.toml_config import SECTIONS, _fields

    assert _fields(SECTIONS["job"]) == {"dump_folder": str, **{
        key: hint for key, hint in _fields(DebugConfig).items() if ("job", key) not in UNSUPPORTED}}
    model_keys = _fields(SECTIONS["model"])
    assert model_keys.pop("flavor") is str and model_keys.pop("hf_assets_path") is str
    assert model_keys == {key: _fields(Qwen35Config)[key] | None for key in model_keys}
    settings = _fields(ParallelizeSettings)
    assert _fields(SECTIONS["activation_checkpoint"]) == {"mode": settings["activation_checkpoint"]}
    assert _fields(SECTIONS["float8"]) == {"enable": settings["float8"], "emulate": settings["float8_emulate"]}

    path = _toml(tmp_path, files, "[optimizer]\nlr = 0.01\nimplementation = \"foreach\"\n[job]\nseed = 3\n"
                                  "dump_folder = \"out\"\ndetect_anomaly = true\n")
    config = to_trainer_config(read_sections(path, []), path)
    expected = default_adamw(lr=0.01)
    expected.implementation = "foreach"
    assert config.optimizer == expected
    assert config.debug == DebugConfig(seed=3, detect_anomaly=True) and config.dump_folder == "out"
    architecture = config.model_spec.model.architecture
    assert architecture == Qwen35Config.from_flavor("debug")
    tied = to_trainer_config(read_sections(path, ["--model.tie_word_embeddings"]), path)
    assert tied.model_spec.model.architecture == Qwen35Config.from_flavor("debug", tie_word_embeddings=True)


def test_validator_held_out_file_must_exist(tmp_path, files):
    path = _toml(tmp_path, files)
    sections = read_sections(path, ["--validator.enable", "--validator.steps", "2",
                                    "--validator.dataset_path", str(tmp_path / "held_out.jsonl")])
    with pytest.raises(ConfigError, match=r"run\.toml: \[validator\] dataset_path = .*held_out\.jsonl.*not found"):
        prepare_files(sections, path)


def test_parallelize_settings_are_decided_once_from_the_sections(tmp_path, files):
    """The settings the model spec's parallelize_fn applies (and logs) come from these keys."""
    path = _toml(tmp_path, files)
    default = parallelize_settings(read_sections(path, []))
    assert (default.fsdp_reshard_after_forward, default.fsdp_cpu_offload, default.compile, default.float8) == (
        True, False, False, False)
    settings = parallelize_settings(read_sections(path, [
        "--parallelism.fsdp_reshard_after_forward", "never", "--training.enable_cpu_offload",
        "--activation_checkpoint.mode", "full", "--compile.enable", "--compile.components", "loss",
        "--float8.enable", "--float8.emulate", "--training.mixed_precision_param", "float32",
        "--parallelism.tensor_parallel_degree", "2"]))
    assert settings == ParallelizeSettings(
        activation_checkpoint="full", compile=False, float8=True, float8_emulate=True,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32), loss_parallel=True,
        fsdp_reshard_after_forward=False, fsdp_cpu_offload=True)
    config = to_trainer_config(read_sections(path, ["--compile.enable"]), path)
    assert config.activation_checkpoint is None  # applied by the model's parallelize_fn, not torchtitan's


def test_data_keys_are_the_data_loader_config_fields(tmp_path, files):
    """[data] is derived from Qwen35DataLoader.Config: a field added there is a key, and reaches the loader."""
    from torchtitan_ext.data import Qwen35DataLoader
    from torchtitan_ext.toml_config import DataSection, _fields

    assert set(_fields(Qwen35DataLoader.Config)) <= set(_fields(DataSection))
    path = _toml(tmp_path, files)
    loader = to_trainer_config(read_sections(path, ["--data.pin_memory", "--data.too_long", "drop"]), path).dataloader
    assert type(loader) is Qwen35DataLoader.Config and loader.pin_memory and loader.too_long == "drop"
    assert loader.dataset_path is None  # torchtitan's (HF datasets); the file is in sources


def test_required_keys(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("[model]\nflavor = \"debug\"\n")
    with pytest.raises(ConfigError, match=r"empty\.toml: \[model\] hf_assets_path is required"):
        read_sections(path, [])


def test_missing_files_fail_before_training(tmp_path, files):
    assets, corpus = files
    path = _toml(tmp_path, files)
    corpus.unlink()
    with pytest.raises(ConfigError, match=r"run\.toml: \[data\] dataset_path = .*corpus\.jsonl.*not found"):
        load_config(["--config", str(path)])
    (assets / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"run\.toml: \[model\] hf_assets_path = .*no tokenizer\.json"):
        load_config(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml not found"):
        load_config(["--config", str(tmp_path / "nope.toml")])


def test_initial_load_path_must_exist_and_becomes_absolute(tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _toml(tmp_path, files, "[checkpoint]\ninitial_load_path = \"hf_dir\"\n")
    with pytest.raises(ConfigError, match=r"run\.toml: \[checkpoint\] initial_load_path = .*hf_dir.*not found"):
        prepare_files(read_sections(path, []), path)
    (tmp_path / "hf_dir").mkdir()
    sections = read_sections(path, [])
    prepare_files(sections, path)
    assert sections["checkpoint"].initial_load_path == str(tmp_path / "hf_dir")


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_pretraining_configs_validate(path):
    sections = read_sections(path, [])
    config = to_trainer_config(sections, path)
    flavor = sections["model"].flavor
    arch = Qwen35Config.from_flavor(flavor)
    p = sections["parallelism"]
    world = p.data_parallel_replicate_degree * p.data_parallel_shard_degree * p.tensor_parallel_degree
    assert world % 8 == 0, "whole 8xH100 nodes"
    assert f"{world // 8} node" in path.read_text(), "the header documents the node count"
    for heads in (arch.num_attention_heads, arch.num_key_value_heads, arch.linear_num_key_heads,
                  arch.linear_num_value_heads):
        assert heads % p.tensor_parallel_degree == 0
    if arch.is_moe:
        assert p.expert_parallel_degree > 1 and arch.num_experts % p.expert_parallel_degree == 0
        assert p.data_parallel_shard_degree % p.expert_parallel_degree == 0
    else:
        assert p.expert_parallel_degree == 1
    if flavor in ("27B", "35B-A3B", "122B-A10B", "397B-A17B"):
        assert world > 8, "multi-node"
    assert config.model_spec.flavor == flavor
    assert config.parallelism.spmd_backend == compat.default_spmd_backend()
    assert config.training.seq_len <= arch.max_position_embeddings


def test_every_flavor_has_a_pretraining_config():
    flavors = {read_sections(p, [])["model"].flavor for p in PRETRAIN_CONFIGS}
    assert flavors == {"0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B", "397B-A17B"}


def _data_toml(tmp_path, files, data):
    assets, _ = files
    path = tmp_path / "mix.toml"
    path.write_text(f'[model]\nflavor = "debug"\nhf_assets_path = "{assets}"\n{data}')
    return path


def test_data_sources_mixture_becomes_the_dataloader_sources(tmp_path, files):
    _, corpus = files
    path = _data_toml(tmp_path, files, f'[[data.sources]]\npath = "{corpus}"\nweight = 3\n'
                                       f'[[data.sources]]\npath = "{tmp_path}"\nformat = "jsonl"\ntext_field = "body"\n')
    sections = read_sections(path, [])
    prepare_files(sections, path)
    sources = to_trainer_config(sections, path).dataloader.sources
    assert [(s.path, s.format, s.weight, s.text_field) for s in sources] == [
        (str(corpus), "auto", 3, "text"), (str(tmp_path), "jsonl", 1.0, "body")]


@pytest.mark.parametrize("data, message", [
    ("", r"\[data\] needs exactly one of dataset_path .* and \[\[data.sources\]\]"),
    ('[data]\ndataset_path = "a.jsonl"\n[[data.sources]]\npath = "b.jsonl"\n', r"needs exactly one of dataset_path"),
    ('[[data.sources]]\npath = "a.jsonl"\nwieght = 2\n', r"unknown key \[data\] sources\[0\] wieght"),
    ('[[data.sources]]\npath = "a.jsonl"\nweight = "2"\n', r"\[data\] sources\[0\] weight = '2' has the wrong type"),
    ('[[data.sources]]\nweight = 2.0\n', r"\[data\] sources\[0\] has no path"),
    ('[[data.sources]]\npath = "a.jsonl"\nweight = 0\n', r"\[data\] sources\[0\] weight = 0 must be > 0"),
    ('[data]\nkind = "sft"\n[[data.sources]]\npath = "a.jsonl"\nweight = 2.0\n', r"SFT uses every sample"),
])
def test_bad_data_sources_name_the_key(tmp_path, files, data, message):
    path = _data_toml(tmp_path, files, data)
    with pytest.raises(ConfigError, match=rf"mix\.toml: .*{message}"):
        to_trainer_config(read_sections(path, []), path)


def test_sft_without_chat_template_and_unknown_format_fail_before_training(tmp_path, files):
    path = _toml(tmp_path, files, '[training]\nsteps = 1\n')
    with pytest.raises(ConfigError, match=r"\[data\] kind = \"sft\" needs a chat template"):
        prepare_files(read_sections(path, ["--data.kind", "sft"]), path)
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"\[data\] dataset_path = .*corpus\.csv.*cannot tell the format"):
        prepare_files(read_sections(path, ["--data.dataset_path", str(tmp_path / "corpus.csv")]), path)


def test_dict_options_take_json_on_the_command_line(tmp_path, files):
    path = _toml(tmp_path, files)
    sections = read_sections(path, ["--data.chat_template_kwargs", '{"enable_thinking": false}'])
    assert sections["data"].chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match=r"--data\.chat_template_kwargs 'x': wrong type"):
        read_sections(path, ["--data.chat_template_kwargs", "x"])
