"""CPU smoke runs of the recipes (train_configs/qwen35_0.8b_gsm8k_sft.toml, qwen35_0.8b_fineweb_edu_cpt.toml): the
recipe file as written, with the debug flavor, tiny local data and a random debug HF directory as the initial
weights. The first step's loss must equal the cross entropy of the loaded HF model on the first batch computed
outside the trainer, which checks at once that the initial weights were loaded and which tokens carry loss."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
import qwen35
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from test_train_helpers import REPO, debug_assets, run_instrumented, scalars
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan_ext.data import TitanTokenizer
from torchtitan_ext.train import load_config

LOSS = "loss_metrics/global_avg_loss"
SEQ_LEN, BATCH = 128, 2


def _gsm8k_jsonl(directory):
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"Ann has {a} pens and gets {b} more. How many now?",
                                        "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n"
                            for a in range(1, 6) for b in range(1, 5)))
    return path


def _fineweb_parquet(directory):
    """Two parquet shards of documents in a directory, FineWeb-Edu's layout (a `text` column among others)."""
    shards = directory / "sample" / "10BT"
    shards.mkdir(parents=True)
    texts = [json.loads(line)["text"] for line in (debug_assets() / "stdlib_docs.jsonl").open()][:60]
    for i in range(2):
        part = texts[i * 30:(i + 1) * 30]
        pq.write_table(pa.table({"text": part, "score": [3.5] * len(part)}), shards / f"00{i}_00000.parquet",
                       row_group_size=8)
    return shards


RECIPES = {"qwen35_0.8b_gsm8k_sft.toml": _gsm8k_jsonl, "qwen35_0.8b_fineweb_edu_cpt.toml": _fineweb_parquet}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_on_cpu_from_hf_weights(tmp_path, recipe):
    torch.manual_seed(7)
    hf_dir = tmp_path / "hf"
    qwen35.save_pretrained(Qwen35ForCausalLM(Qwen35Config.from_flavor("debug")), hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(debug_assets() / name, hf_dir / name)
    data = RECIPES[recipe](tmp_path)
    config = load_config([
        "--config", str(REPO / "train_configs" / recipe), "--job.dump_folder", str(tmp_path / "run"),
        "--model.flavor", "debug", "--model.hf_assets_path", str(hf_dir), "--data.dataset_path", str(data),
        "--checkpoint.initial_load_path", str(hf_dir), "--training.steps", "3", "--training.seq_len", str(SEQ_LEN),
        "--training.local_batch_size", str(BATCH), "--parallelism.data_parallel_shard_degree", "-1",
        "--compile.enable", "false", "--metrics.log_freq", "1"])
    run_instrumented(config)
    losses = scalars(tmp_path / "run")[LOSS]
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(list(losses.values()))))

    tokenizer = TitanTokenizer(TitanTokenizer.Config(), tokenizer_path=str(hf_dir))
    loader = config.dataloader.build(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=SEQ_LEN,
                                     local_batch_size=BATCH)
    batch, labels = next(iter(loader))
    model = qwen35.load_pretrained(hf_dir)
    # one process, so no FSDP: the recipe's bf16 mixed precision is autocast (parallelism/autocast.py)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch["input"], cu_seqlens=batch["cu_seqlens"])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX)
    assert losses[1] == pytest.approx(expected.item(), rel=1e-5)
    if "sft" in recipe:  # the loss is on the answers only
        assert 0 < int((labels != IGNORE_INDEX).sum()) < labels.numel() // 2
