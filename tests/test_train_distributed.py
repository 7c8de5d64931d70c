"""The torchtitan trainer on 2 and 4 CPU processes (torchrun, gloo): FSDP, TP/SP, EP (debug-moe), TP + compile
(inductor), FSDP with tied embeddings, and the 4-rank compositions FSDP + TP, HSDP (2 x 2) and EP + TP give the
1-process losses of the first 3 steps with the same global batch (fp32, deterministic data); float8 (torchao
emulation) converts the linears and trains close to the fp32 run.

Same global batch: TP ranks share their data, so TP-only runs use local batch 4 like the 1-process references.
Data-parallel ranks read different data. The pretraining loader deals *units* of documents (row groups, blocks,
files) to the ranks and each rank packs its own stream, so no 1-process run sees their global batch; data-parallel runs
therefore train on SFT windows, which are dealt whole (window j -> dp rank j % dp): dp ranks x local batch 4 / dp
see the 1-process batch of 4 windows. `mixed_precision_param = float32` because torchtitan's FSDP otherwise
computes in bf16 (its default), which a 1-process run never does.

This file is also the torchrun entry of the tied-embeddings run (`__main__` below): it trains through
`torchtitan_ext.train` and records, on each rank, whether lm_head.weight is embed_tokens.weight after
initialisation and after every step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOSS = "loss_metrics/global_avg_loss"
STEPS = 3
COMMON = ("--training.steps", str(STEPS), "--training.seq_len", "64", "--lr_scheduler.warmup_steps", "1",
          "--training.mixed_precision_param", "float32")
DP2 = ("--training.local_batch_size", "2")  # 2 data-parallel ranks x 2 = global batch 4
DP4 = ("--training.local_batch_size", "1")  # 4 data-parallel ranks x 1
TP2 = ("--training.local_batch_size", "4", "--parallelism.data_parallel_shard_degree", "1",
       "--parallelism.tensor_parallel_degree", "2")
ONE = ("--training.local_batch_size", "4")
# The MoE runs compare cross entropy alone (no load-balancing term); the aux term has its own tests.
MOE = ("--model.flavor", "debug-moe", "--model.router_aux_loss_coef", "0")
TIED = ("--model.tie_word_embeddings", "true")


def _train_recording_ties(argv: list[str], record: Path | None = None) -> list[dict]:
    """Run the trainer on `argv`, noting after the build (= initialisation) and after each step whether
    lm_head.weight is embed_tokens.weight. Written to `record`.<rank>.json when given."""
    import torch
    from test_train_helpers import run_instrumented

    from torchtitan_ext.train import load_config

    config = load_config(argv)
    checks: list[dict] = []

    def note(model, when):
        weight = model.model.embed_tokens.weight
        checks.append({"when": when, "tied": model.lm_head.weight is weight, "type": type(weight).__name__,
                       "placements": str(getattr(weight, "placements", None)),
                       "local_rows": (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]})

    def check_ties(trainer):
        model = trainer.model_parts[0]
        note(model, "init")
        train_step = trainer.train_step

        def train_step_and_check(data_iterator):
            train_step(data_iterator)
            note(model, f"step {trainer.step}")

        trainer.train_step = train_step_and_check

    run_instrumented(config, check_ties)
    if record is not None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])
        Path(f"{record}.{rank}.json").write_text(json.dumps(checks))
    return checks


if __name__ == "__main__":  # torchrun entry: test_train_distributed.py <record path> <trainer args...>
    from torchtitan.tools.logging import init_logger  # the shims: torchtitan_ext.train.run applies them

    init_logger()
    _train_recording_ties(sys.argv[2:], Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------- tests
import pytest  # noqa: E402
import torch  # noqa: E402

from test_train_helpers import debug_args, debug_assets, run_instrumented, scalars, train  # noqa: E402


def _losses(dump_folder: Path) -> list[float]:
    loss = scalars(dump_folder)[LOSS]
    assert sorted(loss) == list(range(1, STEPS + 1)), loss
    return [loss[s] for s in range(1, STEPS + 1)]


def _torchrun(dump_folder: Path, *overrides: str, entry: tuple[str, ...] = ("-m", "torchtitan_ext.train"),
              nproc: int = 2, timeout: int = 300) -> str:
    """`nproc` processes through torchrun; returns the combined log."""
    debug_assets()  # create the corpus and tokenizer once, not in racing ranks
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the processes share two cores
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
               "--rdzv_endpoint=localhost:0", *entry, *debug_args(dump_folder, *COMMON, *overrides)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = done.stdout + done.stderr
    assert done.returncode == 0, _without_warnings(log)[-6000:]
    return log


def _without_warnings(log: str) -> str:
    """The log without Python warnings (a `file:line: SomeWarning: ...` line and its echoed source line), which
    otherwise fill the tail shown for a failed run."""
    kept, after_warning = [], False
    for line in log.splitlines():
        if re.search(r":\d+: \w*Warning: ", line):
            after_warning = True
            continue
        if not (after_warning and line.startswith(" ")):
            kept.append(line)
        after_warning = False
    return "\n".join(kept)


_REFERENCES: dict[tuple[str, ...], Path] = {}


def _one_process_run(tmp_path_factory, *overrides: str) -> Path:
    """Dump folder of the 1-process run (in this process, one thread like each rank), run once per setting."""
    if overrides not in _REFERENCES:
        dump = tmp_path_factory.mktemp("one_process")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            checks = _train_recording_ties(debug_args(dump, *COMMON, *ONE, *overrides))
        finally:
            torch.set_num_threads(threads)
        if "--model.tie_word_embeddings" in overrides:
            assert all(c["tied"] for c in checks), checks
        _REFERENCES[overrides] = dump
    return _REFERENCES[overrides]


def _one_process(tmp_path_factory, *overrides: str) -> list[float]:
    """Losses of the 1-process run."""
    return _losses(_one_process_run(tmp_path_factory, *overrides))


@pytest.fixture(scope="module")
def dealt_data(tmp_path_factory) -> tuple[str, ...]:
    """Overrides that train on SFT windows dealt to the data-parallel ranks (see the module docstring)."""
    path = tmp_path_factory.mktemp("sft") / "arithmetic.jsonl"
    with path.open("w") as f:
        for i in range(64):
            a, b = 3 * i + 1, 7 * i + 2
            f.write(json.dumps({"question": f"What is {a} plus {b}?",
                                "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    return ("--data.bootstrap", "none", "--data.kind", "sft", "--data.sft_format", "gsm8k",
            "--data.dataset_path", str(path))


def _assert_matches_one_process(tmp_path, tmp_path_factory, log: str, applied: str, reference: tuple[str, ...]):
    assert f"qwen35: applied {applied}" in log
    losses = _losses(tmp_path)
    torch.testing.assert_close(losses, _one_process(tmp_path_factory, *reference), rtol=1e-5, atol=0)
    assert len(set(losses)) == STEPS  # it trains: the comparison is not vacuous


EP2 = ("--parallelism.expert_parallel_degree", "2")


@pytest.mark.parametrize("overrides, reference, applied, dealt", [
    pytest.param(DP2, (), "dp_shard=2", True, id="fsdp2"),
    pytest.param(TP2, (), "tp=2, loss_parallel", False, id="tp2"),
    pytest.param((*DP2, *MOE, *EP2), MOE, "dp_shard=2, ep=2", True, id="ep2-moe"),
    # The MoE recipes' setting: EP with full AC and compile (blocks compiled around the experts; loss compiled).
    pytest.param((*DP2, *MOE, *EP2, "--activation_checkpoint.mode", "full", "--compile.enable", "true"), MOE,
                 "dp_shard=2, ep=2, ac=full, compile(backend=inductor)", True, id="ep2-moe-full_ac-compile"),
    # inductor (the GPU default); the packed windows' cu_seqlens change length between steps, so the blocks are
    # recompiled with a dynamic document count at step 2 (parallelism/tensor_parallel.py).
    pytest.param((*TP2, "--compile.enable", "true", "--compile.backend", "inductor"), (),
                 "tp=2, compile(backend=inductor), loss_parallel", False, id="tp2-compile"),
])
def test_two_processes_match_one_process(tmp_path, tmp_path_factory, dealt_data, overrides, reference, applied,
                                         dealt):
    data = dealt_data if dealt else ()
    log = _torchrun(tmp_path, *data, *overrides)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, applied, (*data, *reference))


def test_one_process_mixed_precision_runs_under_autocast(tmp_path, tmp_path_factory):
    """Without FSDP, torchtitan 0.3.0 leaves `mixed_precision_param` unapplied; the Qwen3.5 parallelize runs the
    forward under autocast instead (parallelism/autocast.py): bf16 losses near, and not equal to, fp32's."""
    log = _torchrun(tmp_path, *ONE, "--training.mixed_precision_param", "bfloat16", nproc=1)
    assert "qwen35: applied autocast(bfloat16)" in log
    losses, fp32 = _losses(tmp_path), _one_process(tmp_path_factory)
    torch.testing.assert_close(losses, fp32, rtol=1e-2, atol=0)
    assert losses != fp32


# 4 processes on 2 cores: about a minute each. The 1-process references are those of the 2-process tests.
FSDP2_TP2 = (*DP2, "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2")
HSDP = (*DP4, "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2")


@pytest.mark.parametrize("overrides, reference, applied", [
    pytest.param(FSDP2_TP2, (), "dp_shard=2, tp=2, loss_parallel", id="fsdp2-tp2"),
    pytest.param(HSDP, (), "dp_replicate=2, dp_shard=2", id="hsdp2x2"),
    # Context parallelism: the CP ranks share their data (like TP), each holding half of every packed row; the
    # blocks compiled with the CP collectives inside (aot_eager: inductor's compile time is minutes on 2 cores).
    pytest.param((*DP2, "--parallelism.data_parallel_shard_degree", "2", "--parallelism.context_parallel_degree",
                  "2", "--activation_checkpoint.mode", "selective", "--compile.enable", "true", "--compile.backend",
                  "aot_eager"), (), "dp_shard=2, cp=2, ac=selective, compile(backend=aot_eager)",
                 id="fsdp2-cp2-selective_ac-compile"),
    pytest.param((*TP2, "--parallelism.context_parallel_degree", "2"), (), "cp=2, tp=2, loss_parallel", id="cp2-tp2"),
    # EP borrows the data-parallel ranks (dp_shard = 2 = ep); MoE blocks are not split by TP
    pytest.param((*FSDP2_TP2, *MOE, *EP2), MOE, "dp_shard=2, tp=2, ep=2, loss_parallel", id="ep2-tp2-moe"),
])
def test_four_processes_match_one_process(tmp_path, tmp_path_factory, dealt_data, overrides, reference, applied):
    log = _torchrun(tmp_path, *dealt_data, *overrides, nproc=4, timeout=600)
    _assert_matches_one_process(tmp_path, tmp_path_factory, log, applied, (*dealt_data, *reference))


def test_tied_embeddings_stay_tied_under_fsdp_and_match_one_process(tmp_path, tmp_path_factory, dealt_data):
    record = tmp_path / "ties"
    _torchrun(tmp_path, *dealt_data, *DP2, *TIED, entry=(str(Path(__file__).resolve()), str(record)))
    for rank in (0, 1):
        checks = json.loads(Path(f"{record}.{rank}.json").read_text())
        assert [c["when"] for c in checks] == ["init", "step 1", "step 2", "step 3"]
        for check in checks:
            # one parameter, FSDP-sharded by rows over the 2 ranks (debug vocab 2048)
            assert check["tied"] and check["type"] == "DTensor", check
            assert check["placements"] == "(Shard(dim=0),)" and check["local_rows"] == 1024, check
    torch.testing.assert_close(_losses(tmp_path), _one_process(tmp_path_factory, *dealt_data, *TIED), rtol=1e-5,
                               atol=0)


def test_float8_emulated_converts_linears_and_trains_near_fp32(tmp_path, tmp_path_factory):
    from torchao.float8.float8_linear import Float8Linear

    from torchtitan_ext.train import load_config

    config = load_config(debug_args(tmp_path, *COMMON, *ONE, "--float8.enable", "true", "--float8.emulate", "true"))
    converted: list[str] = []
    run_instrumented(config, lambda trainer: converted.extend(
        n for n, m in trainer.model_parts[0].named_modules() if isinstance(m, Float8Linear)))
    # debug: 3 GDN layers x (in_proj_qkv, in_proj_z, out_proj) + 1 attention layer x 4 + 4 MLPs x 3; lm_head and
    # the per-head in_proj_a / in_proj_b stay in high precision
    assert len(converted) == 3 * 3 + 4 + 4 * 3, converted
    assert not any(n.endswith(("lm_head", "in_proj_a", "in_proj_b")) for n in converted)
    losses = _losses(tmp_path)
    fp32 = _one_process(tmp_path_factory)
    torch.testing.assert_close(losses, fp32, rtol=0.05, atol=0)
    assert losses != fp32  # float8 numerics did run
    assert losses[-1] < losses[0]
