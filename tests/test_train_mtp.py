"""Training with the MTP loss through torchtitan (train_configs/debug.toml, packed documents): the step's loss is
the main loss plus mtp_loss_weight times the MTP loss, which TensorBoard shows separately."""

import math

from test_train_helpers import debug_assets, scalars, train

LOSS, MTP_LOSS = "loss_metrics/global_avg_loss", "loss_metrics/mtp_loss"


def test_mtp_loss_is_added_with_its_weight_and_logged(tmp_path):
    debug_assets()
    train(tmp_path / "plain", "--training.steps", "2")
    train(tmp_path / "mtp", "--training.steps", "2", "--model.mtp_loss_weight", "0.3")
    plain, mtp = scalars(tmp_path / "plain"), scalars(tmp_path / "mtp")
    assert MTP_LOSS not in plain and sorted(mtp[MTP_LOSS]) == [1, 2]
    # the main model's initial weights and the data are the same in both runs (the MTP head is initialised last)
    assert abs(mtp[LOSS][1] - plain[LOSS][1] - 0.3 * mtp[MTP_LOSS][1]) <= 1e-4
    assert abs(mtp[MTP_LOSS][1] - math.log(2048)) < 0.5  # about ln(vocab) at initialisation
