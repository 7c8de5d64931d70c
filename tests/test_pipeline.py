"""Pipeline parallelism (parallelism/pipeline.py, torchtitan_ext/model_spec.py): the stages under every schedule
against the whole model (loss, gradients), DCP checkpoints across pipeline degrees, and the trainer on 2 and 4 CPU
processes (gloo, fp32) against one process.

Each pipeline stage initialises its own modules (torchtitan seeds the stages differently), so the trainer runs start
from a seed checkpoint made by one process (`[checkpoint] create_seed_checkpoint`), which the 1-process reference
loads too. The pipeline trainer fetches one data-loader batch per microbatch; the reference gets the same windows
in one packed row, or, where the MoE load-balancing loss is on (a statistic of each microbatch), through gradient
accumulation over the same microbatches.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed
from test_train_distributed import COMMON, STEPS, _losses, _torchrun, dealt_data  # noqa: F401 (a fixture)
from test_train_helpers import debug_args, scalars, train

TIED = ("--model.tie_word_embeddings", "true")
MOE = ("--model.flavor", "debug-moe")  # with its load-balancing loss (router_aux_loss_coef 0.001)
PP2 = ("--parallelism.pipeline_parallel_degree", "2")
MTP = ("--model.mtp_loss_weight", "0.3")
MTP_LOSS = "loss_metrics/mtp_loss"


# ---------------------------------------------------------------------------------------------- stage split
def plan_errors():
    from parallelism.pipeline import plan_stages

    layers = [f"layers.{i}" for i in range(4)]
    cases = {
        "out of order": [["tok_embeddings", layers[1]], [layers[0], *layers[2:], "norm", "lm_head"]],
        "embedding late": [[layers[0], layers[1]], ["tok_embeddings", *layers[2:], "norm", "lm_head"]],
        "missing layer": [["tok_embeddings", layers[0]], [layers[1], layers[2], "norm", "lm_head"]],
        "no lm_head": [["tok_embeddings", *layers[:2]], [*layers[2:], "norm"]],
    }
    errors = {}
    for name, split in cases.items():
        with pytest.raises(ValueError) as err:
            plan_stages(split, 4, "[parallelism] module_fqns_per_model_part")
        errors[name] = str(err.value)
    return errors


def test_stage_plans_follow_torchtitans_split_and_refuse_bad_ones():
    from parallelism.pipeline import StagePlan, plan_stages
    from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part

    # torchtitan's even split of 4 layers + embedding + head over 2 and 4 stages, in its own names
    assert plan_stages(_generate_llm_fqn_per_model_part(2, 4, 1, 1), 4, "split") == [
        StagePlan(0, 2, (0, 1)), StagePlan(1, 2, (2, 3))]
    assert [p.layers for p in plan_stages(_generate_llm_fqn_per_model_part(4, 4, 1, 1), 4, "split")] == [
        (0,), (1, 2), (3,), ()]
    # the model's own names work as module_fqns_per_model_part
    assert plan_stages([["model.embed_tokens", "model.layers.0"], ["model.layers.1", "model.norm", "lm_head"]], 2,
                       "key") == [StagePlan(0, 2, (0,)), StagePlan(1, 2, (1,))]
    errors = plan_errors()
    assert "stage 0 holds model.layers.1, expected model.layers.0" in errors["out of order"]
    assert "stage 1 of 2 holds 'model.embed_tokens'" in errors["embedding late"]
    assert "the stages hold layers 0..2, the model has 4" in errors["missing layer"]
    assert "no stage holds lm_head" in errors["no lm_head"]
    assert all(e.startswith("[parallelism] module_fqns_per_model_part") for e in errors.values())


# Every schedule torch ships (torchtitan's `pipeline_parallel_schedule` names) with the stages each of 2 ranks
# holds: single-stage ones 1 per rank, looped ones 2 (stage s on rank s % 2), V-shaped ones 2 folded (the first and
# last stage on rank 0, so the tied copies meet on one rank).
SINGLE, LOOPED, V_SHAPED = [[0], [1]], [[0, 2], [1, 3]], [[0, 3], [1, 2]]
SCHEDULES = {"GPipe": SINGLE, "1F1B": SINGLE, "Interleaved1F1B": LOOPED, "LoopedBFS": LOOPED,
             "InterleavedZeroBubble": LOOPED, "ZBVZeroBubble": V_SHAPED, "DualPipeV": V_SHAPED}


def _stage_gradients(flavor: str, tied: bool, schedules: tuple[str, ...]) -> dict:
    """On 2 ranks: the whole model's loss and gradients over 4 packed microbatches (reference, on every rank),
    then, per schedule, this rank's stages as the trainer builds them (torchtitan_ext's pipelining_fn) under that
    schedule on the same microbatches, the tied copies' gradients summed as the trainer does after the backward."""
    from torchtitan_ext import compat

    compat.apply()  # a spawned worker is an entry point (the stages' meshes use torchtitan's device type)
    from torchtitan.config.configs import ParallelismConfig
    from torchtitan.distributed.parallel_dims import ParallelDims

    from parallelism import ParallelizeSettings
    from qwen35 import Qwen35Config
    from torchtitan_ext.loss import Qwen35Loss
    from torchtitan_ext.model import Qwen35TitanModel
    from torchtitan_ext.model_spec import make_pipelining_fn

    torch.manual_seed(0)
    architecture = Qwen35Config.from_flavor(flavor, tie_word_embeddings=tied)
    model_config = Qwen35TitanModel.Config(flavor=flavor, architecture=architecture)
    model = Qwen35TitanModel(model_config).train()
    windows = torch.randint(0, architecture.vocab_size, (4, 1, 33))
    cu_seqlens = [torch.tensor([0, 5 + 7 * i, 32], dtype=torch.int32) for i in range(4)]
    valid = torch.tensor(4 * 32)
    loss_fn = Qwen35Loss(Qwen35Loss.Config())
    # The loss sums MoE router statistics over a group: the reference over this rank, the pipeline over the last
    # stage's ranks (one rank here).
    own_group = dist.new_group([dist.get_rank()])
    reference = 0.0
    for window, cu in zip(windows, cu_seqlens):
        out = model(window[:, :-1], cu_seqlens=cu)._replace(stats_group=own_group)
        loss, _ = loss_fn(out, window[:, 1:], valid)
        loss.backward()
        reference += loss.item()
    whole = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}
    model.zero_grad(set_to_none=True)  # the stages are copies of the model

    results = {}
    pipelining_fn = make_pipelining_fn(ParallelizeSettings())
    for name in schedules:
        schedule, parts, has_first, has_last = pipelining_fn(
            model, parallel_dims=ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=2, ep=1, world_size=2),
            training=types.SimpleNamespace(local_batch_size=4),
            parallelism=ParallelismConfig(pipeline_parallel_degree=2, pipeline_parallel_schedule=name),
            device=torch.device("cpu"), model_config=model_config, loss_fn=loss_fn)
        losses = [] if has_last else None
        schedule.step(arg_mbs=[(w[:, :-1],) for w in windows] if has_first else None,
                      kwarg_mbs=[{"cu_seqlens": cu} for cu in cu_seqlens],
                      target_mbs=[w[:, 1:] for w in windows] if has_last else None, losses=losses,
                      loss_kwargs={"global_valid_tokens": valid})
        if tied:
            parts[0].embedding_copies.sum_gradients()
        results[name] = {
            "stages": [part.pipeline_stage.index for part in parts],
            "loss": (sum(l.item() for l in losses), reference) if has_last else None,
            "grads": {n: (p.grad, whole[n]) for part in parts for n, p in part.named_parameters()}}
    return {"parameters": sorted(whole), "schedules": results}


def _gathered_stage_gradients(flavor: str, tied: bool, schedules: tuple[str, ...]) -> list[dict]:
    result = _stage_gradients(flavor, tied, schedules)
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    return gathered


def test_the_schedules_tested_are_every_schedule_torch_ships():
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.schedules import _PipelineSchedule, get_schedule_class

    shipped = {c for name, c in vars(schedules).items()
               if name.startswith("Schedule") and isinstance(c, type) and issubclass(c, _PipelineSchedule)}
    assert {get_schedule_class(name) for name in SCHEDULES} == shipped


@pytest.mark.parametrize("flavor, tied, schedules", [
    pytest.param("debug", True, tuple(SCHEDULES), id="debug-tied-every-schedule"),
    pytest.param("debug-moe", False, ("1F1B",), id="debug-moe-1f1b"),
])
def test_pipeline_schedules_give_the_whole_models_loss_and_gradients(flavor, tied, schedules):
    """Under every schedule (dense tied; MoE under 1F1B) the loss and every parameter's gradient (the MoE routers'
    through the router statistics the stages pass on) equal the whole model's; with tied embeddings the first
    stage's copy carries the weight's whole gradient after the trainer's sum and the last stage's copy none."""
    gathered = run_distributed(_gathered_stage_gradients, flavor, tied, schedules, world_size=2)
    ranks = [rank["schedules"] for rank in gathered]
    for name in schedules:
        assert [rank[name]["stages"] for rank in ranks] == SCHEDULES[name], name
        (pipeline, reference), = [rank[name]["loss"] for rank in ranks if rank[name]["loss"] is not None]
        assert pipeline == pytest.approx(reference, rel=1e-6), name
        grads = [rank[name]["grads"] for rank in ranks]
        assert not set(grads[0]) & set(grads[1]), name
        grads = {**grads[0], **grads[1]}
        assert sorted(grads) == gathered[0]["parameters"], name  # every parameter on one stage
        for parameter, (grad, whole_grad) in grads.items():
            if tied and parameter == "lm_head.weight":
                assert grad is None, name  # summed into the embedding's
                continue
            torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-7, msg=f"{name}: {parameter}")
    if flavor == "debug-moe":
        assert grads["model.layers.0.mlp.gate.weight"][0].abs().sum() > 0


def _stage_checkpoint(direction: str, path: str) -> None:
    """'save': each rank saves its stage of the seeded model; 'load': each rank loads its stage from a
    1-process checkpoint and checks it against the seeded whole model."""
    import torch.distributed.checkpoint as dcp

    from parallelism.pipeline import StagePlan, split_model
    from qwen35 import Qwen35Config, Qwen35ForCausalLM

    torch.manual_seed(1)
    model = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug", tie_word_embeddings=True))
    stage = split_model(model, [StagePlan(0, 2, (0, 1)), StagePlan(1, 2, (2, 3))][dist.get_rank()])
    if direction == "save":
        dcp.save(stage.state_dict(), checkpoint_id=path)
        return
    torch.manual_seed(2)
    stage.init_weights()  # different values, to be overwritten
    state = stage.state_dict()
    dcp.load(state, checkpoint_id=path)
    stage.load_state_dict(state)
    whole = model.state_dict()
    for name, value in stage.state_dict().items():
        assert torch.equal(value, whole[name]), name


def test_dcp_checkpoints_load_across_pipeline_degrees(tmp_path):
    import torch.distributed.checkpoint as dcp

    from qwen35 import Qwen35Config, Qwen35ForCausalLM

    run_distributed(_stage_checkpoint, "save", str(tmp_path / "pp2"), world_size=2)
    torch.manual_seed(1)
    expected = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug", tie_word_embeddings=True)).state_dict()
    torch.manual_seed(2)
    model = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug", tie_word_embeddings=True))
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "pp2"), no_dist=True)
    model.load_state_dict(state)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name

    dcp.save(expected, checkpoint_id=str(tmp_path / "one"), no_dist=True)
    run_distributed(_stage_checkpoint, "load", str(tmp_path / "one"), world_size=2)


# ---------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("overrides, message", [
    (("--parallelism.context_parallel_degree", "2"),
     r"\[parallelism\] context_parallel_degree = 2: must be 1 with pipeline_parallel_degree > 1"),
])
def test_unsupported_pipeline_combinations_are_refused_before_any_work(tmp_path, monkeypatch, overrides, message):
    from torchtitan_ext.toml_config import ConfigError
    from torchtitan_ext.train import load_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=message):
        load_config(debug_args(tmp_path, *PP2, *overrides))


_SEEDS: dict[tuple[str, ...], Path] = {}


def _seed_checkpoint(tmp_path_factory, model: tuple[str, ...]) -> tuple[str, ...]:
    """Overrides that start a run from the seed checkpoint of `model` (made once, by one process)."""
    if model not in _SEEDS:
        dump = tmp_path_factory.mktemp("seed")
        train(dump, *COMMON, *model, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
        _SEEDS[model] = dump / "checkpoint" / "step-0"
    return ("--checkpoint.enable", "--checkpoint.initial_load_path", str(_SEEDS[model]),
            "--checkpoint.initial_load_model_only", "--checkpoint.interval", "1000")


@pytest.mark.parametrize("nproc, model, batch, reference_batch, schedule, applied", [
    # dense tied: one packed row of 4 windows in the reference, 4 microbatches of 1 window here
    pytest.param(2, TIED, ("--training.local_batch_size", "4"), ("--training.local_batch_size", "4"), "1F1B",
                 ["applied to pipeline stage 0 (layers [0, 1]) pp=2",
                  "applied to pipeline stage 1 (layers [2, 3]) pp=2"], id="pp2-tied-1f1b"),
    # MoE: the load-balancing loss is a statistic of each microbatch: the reference accumulates the same 4
    pytest.param(2, MOE, ("--training.local_batch_size", "4"),
                 ("--training.local_batch_size", "1", "--training.global_batch_size", "4"), "Interleaved1F1B",
                 # torchtitan's even split of 4 layers + embedding + head over 4 stages, 2 per rank (looped)
                 ["applied to pipeline stage 0 (layers [0]) pp=2", "applied to pipeline stage 1 (layers [1, 2]) pp=2",
                  "applied to pipeline stage 2 (layers [3]) pp=2", "applied to pipeline stage 3 (layers []) pp=2"],
                 id="pp2-moe-interleaved1f1b"),
    # PP x FSDP (4 processes): each dp rank 2 microbatches of 1 window; tied copies FSDP-sharded; V-shaped schedule
    # (the first and last stage on one rank)
    # MTP loss (untied): the last stage's MTP head embeds with its copy of the first stage's embedding
    pytest.param(2, MTP, ("--training.local_batch_size", "4"), ("--training.local_batch_size", "4"), "1F1B",
                 ["applied to pipeline stage 1 (layers [2, 3]) pp=2"], id="pp2-mtp-1f1b"),
    pytest.param(4, TIED, ("--training.local_batch_size", "2", "--parallelism.data_parallel_shard_degree", "2"),
                 ("--training.local_batch_size", "4"), "ZBVZeroBubble",
                 ["applied to pipeline stage 0 (layers [0]) pp=2, dp_shard=2",
                  "applied to pipeline stage 3 (layers []) pp=2, dp_shard=2"], id="pp2-fsdp2-tied-zbv"),
    # PP x FSDP x EP, MoE: global microbatch i = window i of each dp rank; the reference accumulates 2 x 2
    pytest.param(4, MOE, ("--training.local_batch_size", "2", "--parallelism.data_parallel_shard_degree", "2",
                          "--parallelism.expert_parallel_degree", "2"),
                 ("--training.local_batch_size", "2", "--training.global_batch_size", "4"), "GPipe",
                 ["applied to pipeline stage 1 (layers [2, 3]) pp=2, dp_shard=2, ep=2"], id="pp2-fsdp2-ep2-moe-gpipe"),
    # PP x TP (4 processes): tensor-parallel hidden states (DTensors) between stages, tied copies vocab-sharded
    pytest.param(4, TIED, ("--training.local_batch_size", "4", "--parallelism.data_parallel_shard_degree", "1",
                           "--parallelism.tensor_parallel_degree", "2"),
                 ("--training.local_batch_size", "4"), "LoopedBFS",
                 ["applied to pipeline stage 1 (layers [1, 2]) pp=2, tp=2, loss_parallel"], id="pp2-tp2-tied-loopedbfs"),
])
def test_pipeline_parallel_training_matches_one_process(tmp_path, tmp_path_factory, dealt_data, nproc, model, batch,
                                                        reference_batch, schedule, applied):
    data = dealt_data if nproc == 4 else ()
    seed = _seed_checkpoint(tmp_path_factory, (*data, *model))
    reference_dump = tmp_path_factory.mktemp("one_process")
    train(reference_dump, *COMMON, *data, *model, *reference_batch, *seed)
    log = _torchrun(tmp_path, *data, *model, *batch, *seed, *PP2, "--parallelism.pipeline_parallel_schedule",
                    schedule, nproc=nproc, timeout=600)
    for line in applied:
        assert f"qwen35: {line}" in log
    losses = _losses(tmp_path)
    torch.testing.assert_close(losses, _losses(reference_dump), rtol=1e-5, atol=0)
    assert len(set(losses)) == STEPS  # it trains: the comparison is not vacuous
    if model == MTP:
        mtp_loss, reference = scalars(tmp_path)[MTP_LOSS], scalars(reference_dump)[MTP_LOSS]
        assert sorted(mtp_loss) == list(range(1, STEPS + 1))
        torch.testing.assert_close(mtp_loss, reference, rtol=1e-5, atol=0)
