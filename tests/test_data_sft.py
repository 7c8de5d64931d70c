"""SFT data: chat and GSM8K records -> windows whose labels train the assistant replies only (counted by hand with a
one-token-per-byte tokenizer), masked positions get exactly zero gradient, packing / too-long policy / resume /
data-parallel split, and errors that name the file, line and field."""

import json

import pytest
import torch

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan_ext.data import DataError, SourceSpec, collate
from torchtitan_ext.data.sft import SFTSamples, SFTWindows
from torchtitan_ext.debug_assets import CHAT_TEMPLATE, byte_level_tokenizer

GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 6 x 7?", "answer": "6 x 7 = 42\n#### 42"},
    {"question": "Half of 10?", "answer": "10 / 2 = 5\n#### 5"},
]
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Goodbye."}]}


@pytest.fixture(scope="module")
def tokenizer():
    """One token per byte after <|endoftext|>, <|im_start|>, <|im_end|> (ids 0-2), with the ChatML template."""
    return Qwen35Tokenizer(byte_level_tokenizer(), chat_template=CHAT_TEMPLATE)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return SourceSpec(str(path))


def _chatml_length(messages):
    """Hand count of ChatML tokens with one token per byte: <|im_start|> role \\n content <|im_end|> \\n."""
    return sum(1 + len(m["role"].encode()) + 1 + len(m["content"].encode()) + 1 + 1 for m in messages)


def test_supervised_tokens_per_batch_match_a_hand_count(tmp_path, tokenizer):
    spec = _jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    samples = SFTSamples([spec], tokenizer, seq_len=128)
    for sample, record in zip(samples.inputs, GSM8K):  # in file order
        # the input is the conversation minus its last token (the newline after the final <|im_end|>)
        messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
        assert sample.numel() == _chatml_length(messages) - 1
    windows = iter(SFTWindows(samples, 128, dp_rank=0, dp_world_size=1, packing=False))
    batch, labels = collate([next(windows) for _ in range(3)])
    # answer bytes + the closing <|im_end|>, per conversation
    assert int((labels != IGNORE_INDEX).sum()) == sum(len(r["answer"].encode()) + 1 for r in GSM8K)
    # and they are exactly those tokens, in order
    trained = [t for t in labels[0].tolist() if t != IGNORE_INDEX]
    decoded = tokenizer.decode(trained)
    for record in GSM8K:
        assert record["answer"] + "<|im_end|>" in decoded
    assert batch["input"].shape == (1, 3 * 128)


def test_chat_record_trains_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    samples = SFTSamples([_jsonl(tmp_path / "chat.jsonl", [CHAT])], tokenizer, seq_len=256)
    inputs, labels = samples.inputs[0], samples.labels[0]
    assert inputs.numel() == _chatml_length(CHAT["messages"]) - 1
    trained_positions = (labels != IGNORE_INDEX).nonzero().flatten()
    assert tokenizer.decode(labels[trained_positions].tolist()) == "Hello!<|im_end|>Goodbye.<|im_end|>"
    # labels are the next input token wherever they are trained
    assert torch.equal(labels[trained_positions[:-1]], inputs[trained_positions[:-1] + 1])


def test_masked_positions_contribute_exactly_zero_gradient(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug", vocab_size=512))
    samples = SFTSamples([_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)], tokenizer, seq_len=96)
    batch, labels = collate([next(iter(SFTWindows(samples, 96, 0, 1)))])
    logits = model(batch["input"], cu_seqlens=batch["cu_seqlens"])
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum",
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    masked = labels[0] == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(logits.grad[0, masked]) == 0
    assert torch.all(logits.grad[0, ~masked].abs().sum(-1) > 0)


def test_packing_keeps_samples_whole_with_boundaries(tmp_path, tokenizer):
    samples = SFTSamples([_jsonl(tmp_path / "gsm8k.jsonl", GSM8K * 4)], tokenizer, seq_len=200)
    lengths = {i: x.numel() for i, x in enumerate(samples.inputs)}
    dataset = SFTWindows(samples, 200, 0, 1, seed=3)
    windows = dataset._epoch_windows()
    assert sorted(i for w in windows for i in w) == list(range(12))  # every sample once per epoch
    for w in windows[:-1]:
        assert sum(lengths[i] for i in w) <= 200
    stream = iter(dataset)
    for w in windows:
        inputs, labels, starts = next(stream)
        expected = torch.cumsum(torch.tensor([0] + [lengths[i] for i in w]), 0)
        assert starts.tolist() == (expected.tolist() if expected[-1] < 200 else expected[:-1].tolist())
        assert torch.equal(inputs[:expected[-1]], torch.cat([samples.inputs[i] for i in w]))
        assert torch.all(labels[expected[-1]:] == IGNORE_INDEX)
    assert dataset.epoch == 0
    next(stream)
    assert dataset.epoch == 1 and dataset._epoch_windows(1) != windows  # reshuffled


def test_data_parallel_ranks_split_windows_and_resume_exactly(tmp_path, tokenizer):
    records = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(15)]
    samples = SFTSamples([_jsonl(tmp_path / "sums.jsonl", records)], tokenizer, seq_len=64)
    epoch = []  # first epoch's windows (one sample each) of ranks 0 and 1
    for rank in range(2):
        stream = iter(SFTWindows(samples, 64, rank, 2, packing=False))
        epoch.append([tuple(next(stream)[0].tolist()) for _ in range(8 - rank)])
    assert len(set(epoch[0]) | set(epoch[1])) == 15  # 15 distinct samples, each on one rank
    ranks = [SFTWindows(samples, 64, rank, 2, packing=False) for rank in range(2)]
    streams = [iter(dataset) for dataset in ranks]
    for _ in range(9):  # into the second epoch
        for s in streams:
            next(s)
    state = SFTWindows.merge_rank_states([dataset.rank_state() for dataset in ranks])
    stream = streams[1]
    resumed = SFTWindows(samples, 64, 1, 2, packing=False)
    resumed.load_global_state(state)
    resumed_stream = iter(resumed)
    for _ in range(10):
        assert torch.equal(next(resumed_stream)[0], next(stream)[0])


def test_too_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long = {"question": "x" * 80, "answer": "y" * 40}
    spec = _jsonl(tmp_path / "mixed.jsonl", GSM8K + [long])
    truncated = SFTSamples([spec], tokenizer, seq_len=100, too_long="truncate")
    assert (truncated.truncated, truncated.dropped_too_long, len(truncated)) == (1, 0, 4)
    assert max(x.numel() for x in truncated.inputs) == 100
    dropped = SFTSamples([spec], tokenizer, seq_len=100, too_long="drop")
    assert (dropped.truncated, dropped.dropped_too_long, len(dropped)) == (0, 1, 3)
    # truncated before any answer token: nothing to train on, dropped and counted
    only_question = SFTSamples([_jsonl(tmp_path / "q.jsonl", [{"question": "z" * 200, "answer": "1"}] + GSM8K)],
                               tokenizer, seq_len=100)
    assert (only_question.truncated, only_question.dropped_untrained, len(only_question)) == (0, 1, 3)
    with pytest.raises(DataError, match=r"no SFT sample left .* 1 dropped as too long"):
        SFTSamples([_jsonl(tmp_path / "long.jsonl", [long])], tokenizer, seq_len=100, too_long="drop")


@pytest.mark.parametrize("record, message", [
    ({"question": "q"}, r"cannot tell the SFT format from the fields question"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"bad\.jsonl:2: messages\[0\] has role 'robot'"),
    ({"messages": [{"role": "assistant"}]}, r"bad\.jsonl:2: messages\[0\] needs the fields 'role' and 'content'"),
    ({"messages": [{"role": "assistant", "content": 5}]}, r"bad\.jsonl:2: messages\[0\]: field 'content' is int"),
    ({"prompt": "x"}, r"bad\.jsonl:2: missing field 'messages'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, tokenizer, record, message):
    first = {"messages": CHAT["messages"]} if "question" not in record else record
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        SFTSamples([SourceSpec(str(path))], tokenizer, seq_len=256)


def test_malformed_line_and_empty_file(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n{\"question\": \n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON line \(Expecting value at column 15\)"):
        SFTSamples([SourceSpec(str(path))], tokenizer, seq_len=256)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(empty dataset\)"):
        SFTSamples([SourceSpec(str(tmp_path / "empty.jsonl"))], tokenizer, seq_len=256)
