"""Training with the MTP loss through torchtitan (train_configs/debug.toml, packed documents): the step's loss is
the main loss plus mtp_loss_weight times the MTP loss, which TensorBoard shows separately; on 2 FSDP processes
with compiled blocks (the MTP layer included), and on 2 tensor-parallel processes, the losses equal one eager
process's; after a resume the logged MTP loss is the uninterrupted run's."""

import math
import shutil

import torch
from test_train_distributed import (DP2, EP2, STEPS, TP2, _assert_matches_one_process, _one_process_run,  # noqa: F401
                                    _torchrun, dealt_data)
from test_train_helpers import debug_assets, scalars, train

LOSS, MTP_LOSS = "loss_metrics/global_avg_loss", "loss_metrics/mtp_loss"
MTP = ("--model.mtp_loss_weight", "0.3")
MOE_MTP = ("--model.flavor", "debug-moe", *MTP, "--model.router_aux_loss_coef", "0.5")


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
    log = _torchrun(tmp_path, *dealt_data, *DP2, *MOE_MTP)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, "dp_shard=2", (*dealt_data, *MOE_MTP))


def test_moe_mtp_under_expert_parallelism_matches_one_process(tmp_path, tmp_path_factory, dealt_data):
    """The MTP head's MoE layer is expert-parallel like the blocks' (tests/test_parallelism.py checks the split)."""
    log = _torchrun(tmp_path, *dealt_data, *DP2, *EP2, *MOE_MTP)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, "dp_shard=2, ep=2", (*dealt_data, *MOE_MTP))
    assert sorted(scalars(tmp_path)[MTP_LOSS]) == [1, 2, 3]


def test_mtp_loss_under_tensor_parallelism_matches_one_process(tmp_path, tmp_path_factory):
    log = _torchrun(tmp_path, *TP2, *MTP)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, "tp=2, loss_parallel", MTP)
    mtp_loss, reference = scalars(tmp_path)[MTP_LOSS], scalars(_one_process_run(tmp_path_factory, *MTP))[MTP_LOSS]
    steps = list(range(1, STEPS + 1))
    assert sorted(mtp_loss) == steps
    torch.testing.assert_close([mtp_loss[s] for s in steps], [reference[s] for s in steps], rtol=1e-5, atol=0)


def test_mtp_loss_logged_after_a_resume_is_the_uninterrupted_runs(tmp_path):
    debug_assets()
    common = ("--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "2", *MTP)
    train(tmp_path / "straight", *common)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    train(resumed, *common)  # resumes from step 2; logs step 3 (one step since the resume, not three)
    assert scalars(resumed)[MTP_LOSS] == {3: scalars(tmp_path / "straight")[MTP_LOSS][3]}
