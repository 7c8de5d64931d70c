"""train_configs/debug.toml end to end on CPU: loss falls, TensorBoard scalars, exact resume."""

import gc
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from test_train_helpers import debug_args, debug_assets, scalars, train
from torchtitan_ext.train import load_config, run

LOSS = "loss_metrics/global_avg_loss"


def test_short_debug_run_loss_falls_and_logs_tensorboard(tmp_path):
    train(tmp_path, "--training.steps", "20", "--lr_scheduler.warmup_steps", "5")
    logged = scalars(tmp_path)
    loss = logged[LOSS]
    assert sorted(loss) == list(range(1, 21))
    first, last = loss[1], sum(loss[s] for s in range(16, 21)) / 5
    assert first > 7.0  # about ln(2048) = 7.6 at initialisation
    assert last < first - 0.8, loss
    for tag in ("grad_norm", "throughput(tps)", "tflops", "mfu(%)", "memory/max_reserved(GiB)",
                "memory/max_active(GiB)", "lr/AdamW"):
        assert tag in logged, sorted(logged)
    assert logged["memory/max_reserved(GiB)"][20] > 0  # process peak RSS on CPU
    assert logged["throughput(tps)"][20] > 0


def test_comm_profiler_and_validator_sections_take_effect(tmp_path, monkeypatch):
    """[comm] timeouts reach the process group, [profiler] writes a trace every profile_freq steps and
    [validator] logs a validation loss every freq steps. Oracle for the validation loss: validated on the training
    file itself with lr 0, its first pass sees the batch and the weights of training step 1."""
    init_timeouts, train_timeouts = [], []
    init_process_group, set_timeout = torch.distributed.init_process_group, torch.distributed.set_timeout
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **kw: init_timeouts.append(kw["timeout"]) or init_process_group(*a, **kw))
    monkeypatch.setattr(torch.distributed, "set_timeout",
                        lambda timeout, *a: train_timeouts.append(timeout) or set_timeout(timeout, *a))
    train(tmp_path, "--training.steps", "4", "--training.seq_len", "64", "--optimizer.lr", "0",
          "--comm.init_timeout_seconds", "123", "--comm.train_timeout_seconds", "45",
          "--profiler.enable_profiling", "--profiler.profile_freq", "2", "--profiler.profiler_warmup", "0",
          "--validator.enable", "--validator.freq", "2", "--validator.steps", "1",
          "--validator.dataset_path", str(debug_assets() / "stdlib_docs.jsonl"))
    assert [t.total_seconds() for t in init_timeouts] == [123]
    assert {t.total_seconds() for t in train_timeouts} == {45}
    traces = tmp_path / "profiling" / "traces"  # Profiler.Config.save_traces_folder
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_2", "iteration_4"]
    assert all((traces / d / "rank0_trace.json.gz").stat().st_size > 0 for d in ("iteration_2", "iteration_4"))
    logged = scalars(tmp_path)
    validation = logged["validation_metrics/loss"]
    assert sorted(validation) == [1, 2, 4]
    assert validation[1] == pytest.approx(logged[LOSS][1], rel=1e-5)


class _Crash(Exception):
    pass


def _crashing_run(dump_folder, crash_at_step, *overrides):
    """A run that dies at the start of `crash_at_step`, as a killed job would."""
    config = load_config(debug_args(dump_folder, *overrides))
    original_build = type(config).build

    def build_with_crash(cfg):
        trainer = original_build(cfg)
        train_step = trainer.train_step

        def crash_or_step(data_iterator):
            if trainer.step == crash_at_step:
                raise _Crash()
            train_step(data_iterator)

        trainer.train_step = crash_or_step
        return trainer

    type(config).build = build_with_crash
    try:
        with pytest.raises(_Crash):
            run(config)
    finally:
        type(config).build = original_build
        gc.enable()


def _mixture(tmp_path):
    """A jsonl source and a parquet source (a different slice of the corpus), mixed 3:1, without packing."""
    texts = [json.loads(line)["text"] for line in (debug_assets() / "stdlib_docs.jsonl").open()]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:300]))
    pq.write_table(pa.table({"text": texts[300:600]}), tmp_path / "b.parquet", row_group_size=50)
    sources = [{"path": str(tmp_path / "a.jsonl"), "weight": 3, "text_field": "body"},
               {"path": str(tmp_path / "b.parquet"), "weight": 1}]
    return ("--data.bootstrap", "none", "--data.dataset_path=", "--data.sources", json.dumps(sources),
            "--data.packing", "false")


def _sft(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {n}."},
                                                     {"role": "assistant", "content": " ".join(map(str, range(n)))}]})
                            + "\n" for n in range(1, 80)))
    return ("--data.dataset_path", str(path), "--data.kind", "sft")


@pytest.mark.parametrize("data", [lambda tmp_path: (), _mixture, _sft], ids=["pretrain", "mixture-unpacked", "sft"])
def test_resume_from_checkpoint_reproduces_losses_exactly(tmp_path, data):
    common = ("--training.steps", "6", "--checkpoint.enable", "true", "--checkpoint.interval", "3",
              "--lr_scheduler.warmup_steps", "2", *data(tmp_path))
    train(tmp_path / "straight", *common)
    _crashing_run(tmp_path / "resumed", 4, *common)
    train(tmp_path / "resumed", *common, "--metrics.save_tb_folder", "tb_resumed")

    straight = scalars(tmp_path / "straight")[LOSS]
    before_crash = scalars(tmp_path / "resumed")[LOSS]
    after_resume = scalars(tmp_path / "resumed", "tb_resumed")[LOSS]
    assert sorted(before_crash) == [1, 2, 3] and sorted(after_resume) == [4, 5, 6]
    assert [straight[s] for s in (1, 2, 3)] == [before_crash[s] for s in (1, 2, 3)]
    assert [straight[s] for s in (4, 5, 6)] == [after_resume[s] for s in (4, 5, 6)]
    assert len(set(straight.values())) == 6  # the model does train: the comparison is not vacuous
    # Step 3 is a full checkpoint (model, optimizer, lr scheduler, dataloader, train state).
    state = torch.distributed.checkpoint.FileSystemReader(
        str(tmp_path / "straight" / "checkpoint" / "step-3")).read_metadata().state_dict_metadata
    assert any(k.startswith("dataloader") for k in state) and any(k.startswith("optimizer") for k in state)
