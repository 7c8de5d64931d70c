"""Training with the MTP loss through torchtitan (train_configs/debug.toml, packed documents): the step's loss is
the main loss plus mtp_loss_weight times the MTP loss, which TensorBoard shows separately; on 2 FSDP processes
with compiled blocks (the MTP layer included) the losses equal one eager process's; tensor parallelism is refused
before any work."""

import math

import pytest

from test_train_distributed import DP2, _assert_matches_one_process, _torchrun, dealt_data  # noqa: F401
from test_train_helpers import debug_args, debug_assets, scalars, train
from torchtitan_ext.toml_config import ConfigError
from torchtitan_ext.train import load_config

LOSS, MTP_LOSS = "loss_metrics/global_avg_loss", "loss_metrics/mtp_loss"
MTP = ("--model.mtp_loss_weight", "0.3")


def test_mtp_loss_is_added_with_its_weight_and_logged(tmp_path):
    debug_assets()
    train(tmp_path / "plain", "--training.steps", "2")
    train(tmp_path / "mtp", "--training.steps", "2", *MTP)
    plain, mtp = scalars(tmp_path / "plain"), scalars(tmp_path / "mtp")
    assert MTP_LOSS not in plain and sorted(mtp[MTP_LOSS]) == [1, 2]
    # the main model's initial weights and the data are the same in both runs (the MTP head is initialised last)
    assert abs(mtp[LOSS][1] - plain[LOSS][1] - 0.3 * mtp[MTP_LOSS][1]) <= 1e-4
    assert abs(mtp[MTP_LOSS][1] - math.log(2048)) < 0.5  # about ln(vocab) at initialisation


def test_mtp_loss_under_fsdp_and_compile_matches_one_eager_process(tmp_path, tmp_path_factory, dealt_data):
    log = _torchrun(tmp_path, *dealt_data, *DP2, *MTP, "--compile.enable", "true", "--compile.backend", "inductor")
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, "dp_shard=2, compile(backend=inductor)",
                                (*dealt_data, *MTP))
    assert sorted(scalars(tmp_path)[MTP_LOSS]) == [1, 2, 3]


def test_moe_mtp_router_rows_in_the_balancing_loss_under_fsdp_match_one_process(tmp_path, tmp_path_factory,
                                                                              dealt_data):
    """One process packs its 4 SFT windows into one row, each of 2 ranks its 2 windows: the MTP rows that join
    two documents differ between the two (one at the ranks' seam), so they must not count in the router balance."""
    moe_mtp = ("--model.flavor", "debug-moe", *MTP, "--model.router_aux_loss_coef", "0.5")
    log = _torchrun(tmp_path, *dealt_data, *DP2, *moe_mtp)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, "dp_shard=2", (*dealt_data, *moe_mtp))


def test_mtp_loss_with_tensor_parallelism_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"\[model\] mtp_loss_weight = 0.3: .*tensor_parallel_degree = 1"):
        load_config(debug_args(tmp_path, *MTP, "--parallelism.tensor_parallel_degree", "2",
                               "--parallelism.data_parallel_shard_degree", "1"))
