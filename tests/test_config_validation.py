"""Nonsense config values fail before any work with `[section] key`, the value and the rule (issue 14 items 1,
6, 8): torchtitan would otherwise train uphill, ignore a setting, or stop on a bare assertion mid-run."""

import pytest

from test_train_helpers import debug_args
from torchtitan_ext.toml_config import ConfigError
from torchtitan_ext.train import load_config


@pytest.mark.parametrize("overrides, message", [
    (["--training.steps", "0"], r"\[training\] steps = 0: must be a positive integer"),
    (["--training.steps", "-1"], r"\[training\] steps = -1: must be a positive integer"),
    (["--training.local_batch_size", "0"], r"\[training\] local_batch_size = 0: must be a positive integer"),
    (["--training.seq_len", "0"], r"\[training\] seq_len = 0: must be a positive integer"),
    (["--training.max_norm", "0"], r"\[training\] max_norm = 0.0: must be a positive number"),
    (["--training.global_batch_size", "6"], r"\[training\] global_batch_size = 6: must be a multiple of "
                                            r"local_batch_size x data-parallel degree = 4"),
    (["--optimizer.lr", "-0.001"], r"\[optimizer\] lr = -0.001: must be >= 0 \(a negative learning rate"),
    (["--optimizer.betas", "0.9,1.0"], r"\[optimizer\] betas = \(0.9, 1.0\): each must be in \[0, 1\)"),
    (["--optimizer.weight_decay", "-0.1"], r"\[optimizer\] weight_decay = -0.1: must be >= 0"),
    (["--lr_scheduler.warmup_steps", "-5"], r"\[lr_scheduler\] warmup_steps = -5: must be >= 0"),
    (["--lr_scheduler.min_lr_factor", "2"], r"\[lr_scheduler\] min_lr_factor = 2.0: must be in \[0, 1\]"),
    (["--metrics.log_freq", "0"], r"\[metrics\] log_freq = 0: must be a positive integer"),
    (["--parallelism.tensor_parallel_degree", "0"], r"\[parallelism\] tensor_parallel_degree = 0: must be a positive"),
])
def test_nonsense_values_name_key_value_and_rule(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(debug_args(tmp_path, *overrides))


def test_initial_load_path_without_checkpointing_is_refused(tmp_path):
    # torchtitan's checkpointer does nothing when disabled: the weights were silently not loaded.
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match=r"\[checkpoint\] initial_load_path = '.*hf': is only read when "
                                          r"\[checkpoint\] enable = true"):
        load_config(debug_args(tmp_path, "--checkpoint.initial_load_path", str(tmp_path / "hf")))


@pytest.mark.parametrize("world_size", [1, 2])
def test_tensor_parallel_degree_the_world_cannot_hold(tmp_path, monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ConfigError, match=rf"\[parallelism\] .*tensor_parallel_degree = 3 on {world_size} "
                                          rf"process.*world size {world_size} is not divisible by dp_replicate \* cp \* tp"):
        load_config(debug_args(tmp_path, "--parallelism.tensor_parallel_degree", "3"))


def test_tensor_parallel_degree_must_divide_the_heads(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree = 3 on 3 process.*must divide "
                                          r"Qwen35Config.num_attention_heads"):
        load_config(debug_args(tmp_path, "--parallelism.tensor_parallel_degree", "3"))


def test_the_debug_config_and_its_edge_values_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_config(debug_args(tmp_path, "--optimizer.lr", "0", "--lr_scheduler.warmup_steps", "0",
                                    "--parallelism.tensor_parallel_degree", "2"))
    assert config.parallelism.tensor_parallel_degree == 2
