"""`python -m torchtitan_ext.eval_gsm8k`: number extraction, scoring, batching = batch size 1, determinism, --limit,
and errors, on a random debug checkpoint with a byte-level tokenizer."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen35
from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan_ext import eval_gsm8k
from torchtitan_ext.data.sources import DataError
from torchtitan_ext.eval_gsm8k import extract_answer, gold_answer, same_number

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RECORDS = [  # prompt lengths differ, so batches of 3 are left-padded
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?",
     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A shop sells 1,000 pens a day. How many in 2 days?",
     "answer": "1000*2=<<1000*2=2000>>2000\n#### 2,000"},
    {"question": "What is 5 minus 8?", "answer": "5-8=-3\n#### -3"},
    {"question": "Half of 7?", "answer": "7/2=3.5\n#### 3.5"},
    {"question": "A very long question about a farmer who has 12 cows, sells 5 of them and then buys 10 more at the "
                 "market on Sunday. How many cows does the farmer have?", "answer": "12-5+10=17\n#### 17"},
]
SUMMARY = re.compile(r"^gsm8k: (\d+)/(\d+) correct = (\d+\.\d\d)% \(max_new_tokens (\d+), ")


# ---------------------------------------------------------------- extraction (pure functions)

@pytest.mark.parametrize("reply, expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The shop sells 1,234,567 pens.", "1234567"),
    ("It costs $18.00 in total.", "18"),
    ("So she pays $1,250.50.", "1250.5"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("The answer is 72.", "72"),
    ("Each gets 0.50 of a pie", "0.5"),
    ("a .5 share", "0.5"),
    ("0.0 left and -0 owed", "0"),
    ("First 12, then 30 apples. #### 42 apples in all. Check: 6 * 7", "42"),   # the number after ####
    ("#### 4\nwait, no\n#### 5", "5"),                                         # the last ####
    ("I think 8 apples.\n#### no idea", "8"),                                  # nothing after ####: last number
    ("pages 3-5", "5"),                                                        # a range is not a negative number
    ("<think>maybe 3 or 9</think>\n\nThe answer is 4.", "4"),                  # read after the thinking block
    ("<think>maybe 3 or 9</think>\n\nI do not know.", None),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_gold_answer_and_comparison():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "f:1") == "72"
    assert gold_answer("#### 1,234", "f:1") == "1234"
    assert gold_answer("#### -3.50", "f:1") == "-3.5"
    assert gold_answer("#### $5", "f:1") == "5"
    assert gold_answer(72, "f:1") == "72" and gold_answer("72", "f:1") == "72"  # a bare number is its own gold
    for bad in ("She has 5 apples.", "#### many", ""):
        with pytest.raises(DataError, match=r"^f:3: field 'answer' has no final number after '####'"):
            gold_answer(bad, "f:3")
    with pytest.raises(DataError, match="f:3: field 'answer' must be a string, got list"):
        gold_answer([1], "f:3")
    assert same_number("3.5", gold_answer("#### 3.50", "f")) and same_number("1234", "1234")
    assert not same_number(None, "0") and not same_number("-3", "3") and not same_number("3.5", "3")


# ---------------------------------------------------------------- end to end on a random checkpoint

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CPUs are shared: oversubscribed intra-op threads make these tiny forwards 50x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """scripts/make_debug_checkpoint.py OUT --seed 1, run in this process (saves a Python start-up)."""
    out = tmp_path_factory.mktemp("debug-ckpt")
    script = ROOT / "scripts/make_debug_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_debug_checkpoint", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.setattr(sys, "argv", [str(script), str(out), "--seed", "1"])
        module.main()
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(checkpoint, data, output, *extra):
    return eval_gsm8k.main(["--model", str(checkpoint), "--data", str(data), "--output", str(output),
                            "--max-new-tokens", "12", *extra])


def test_cli_runs_and_summary_matches_the_output_file(tmp_path, checkpoint):
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", RECORDS)
    output = tmp_path / "out" / "results.jsonl"
    result = subprocess.run([sys.executable, "-m", "torchtitan_ext.eval_gsm8k", "--model", str(checkpoint), "--data",
                             str(data), "--batch-size", "3", "--max-new-tokens", "10", "--output", str(output)],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    correct, total, percent, max_new = SUMMARY.match(line).groups()
    rows = _read_jsonl(output)
    assert int(total) == len(rows) == len(RECORDS) and int(max_new) == 10
    assert int(correct) == sum(r["correct"] for r in rows)
    assert percent == f"{100 * int(correct) / len(rows):.2f}"
    assert [r["question"] for r in rows] == [r["question"] for r in RECORDS]  # input order, not length order
    assert [r["gold"] for r in rows] == ["7", "2000", "-3", "3.5", "17"]
    for r in rows:
        assert set(r) == {"question", "gold", "reply", "predicted", "correct", "stopped"}
        assert r["predicted"] == extract_answer(r["reply"]) and r["correct"] == (r["predicted"] == r["gold"])
    assert "gsm8k: 3/5 done" in result.stderr and "gsm8k: 5/5 done" in result.stderr  # progress on stderr


def _checkpoint_with_eos(checkpoint, tmp_path, questions):
    """A copy of `checkpoint` whose config also stops on tokens the model emits midway through some replies, so
    rows of one batch finish at different steps (the random model never emits <|endoftext|> by itself)."""
    tokenizer = Qwen35Tokenizer.from_dir(checkpoint)
    model = qwen35.load_pretrained(checkpoint).eval()
    eos = {0, tokenizer.im_end_id}
    stops = set()
    for q in questions[1::2]:
        (ids, stopped), = eval_gsm8k.generate_replies(model, tokenizer, [q.prompt_ids], 12, eos, "cpu")
        assert not stopped and len(ids) == 12
        stops.add(ids[4])
    copy = tmp_path / "ckpt-eos"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["eos_token_id"] = [0] + sorted(stops)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_batches_equal_batch_size_one_and_runs_are_deterministic(tmp_path, checkpoint):
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", RECORDS)
    tokenizer = Qwen35Tokenizer.from_dir(checkpoint)
    questions = eval_gsm8k.read_questions(str(data), tokenizer, None, "test", {})
    assert len({len(q.prompt_ids) for q in questions}) == len(RECORDS)  # all lengths differ: real left padding
    ckpt = _checkpoint_with_eos(checkpoint, tmp_path, questions)
    outputs = {}
    for name, batch_size in [("b1", 1), ("b3", 3), ("b3-again", 3), ("b5", 5)]:
        outputs[name] = tmp_path / f"{name}.jsonl"
        _run(ckpt, data, outputs[name], "--batch-size", str(batch_size))
    rows = _read_jsonl(outputs["b1"])
    stopped = [r["stopped"] for r in rows]
    assert any(stopped) and not all(stopped)  # rows of a batch end at different steps
    assert outputs["b3"].read_bytes() == outputs["b3-again"].read_bytes()  # deterministic
    assert outputs["b1"].read_bytes() == outputs["b3"].read_bytes() == outputs["b5"].read_bytes()  # padding-exact


def test_limit_takes_the_first_questions(tmp_path, checkpoint):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]) + "{not json\n")
    full = tmp_path / "full.jsonl"
    _write_jsonl(tmp_path / "clean.jsonl", RECORDS)
    _run(checkpoint, tmp_path / "clean.jsonl", full, "--batch-size", "2")
    limited = tmp_path / "limited.jsonl"
    summary = _run(checkpoint, data, limited, "--limit", "2", "--batch-size", "2")  # stops before the bad line
    assert summary["total"] == 2
    assert _read_jsonl(limited) == _read_jsonl(full)[:2]


def test_parquet_like_the_official_copy_equals_jsonl(tmp_path, checkpoint, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    parquet = tmp_path / "main" / "test-00000-of-00001.parquet"  # GSM8K's layout on the Hub
    parquet.parent.mkdir()
    pq.write_table(pyarrow.Table.from_pylist(RECORDS), parquet, row_group_size=2)
    from_parquet, from_jsonl = tmp_path / "parquet.jsonl", tmp_path / "jsonl.jsonl"
    _run(checkpoint, parquet.parent, from_parquet, "--limit", "3")  # a directory of parquet files
    _run(checkpoint, _write_jsonl(tmp_path / "gsm8k.jsonl", RECORDS), from_jsonl, "--limit", "3")
    assert from_parquet.read_bytes() == from_jsonl.read_bytes() and len(_read_jsonl(from_parquet)) == 3
    no_answer = tmp_path / "no-answer.parquet"
    pq.write_table(pyarrow.Table.from_pylist([{"question": "How many?"}]), no_answer)
    assert f"{no_answer}: missing column 'answer'" in _error(capsys, ["--model", str(checkpoint), "--data",
                                                                      str(no_answer)])


def test_scoring_of_correct_wrong_and_cut_replies(tmp_path, checkpoint, monkeypatch, capsys):
    """Generation scripted per question (through the real prompt -> batch -> EOS cut -> decode -> score path)."""
    replies = {  # question -> (reply text, ends with <|im_end|>)
        RECORDS[0]["question"]: ("3 + 4 = 7 apples.\n#### 7", True),             # correct
        RECORDS[1]["question"]: ("1,000 * 2 = 2,000. He sells 2,000 pens.", True),  # correct, last number
        RECORDS[2]["question"]: ("5 - 8 = -3", True),                             # correct, negative
        RECORDS[3]["question"]: ("<think>3.5</think>\nIt is 4.", True),          # wrong: answer after thinking
        RECORDS[4]["question"]: ("12 - 5 + 10 = 17 cows, so the farmer ends up with 17", False),  # correct, cut
    }
    tokenizer = Qwen35Tokenizer.from_dir(checkpoint)
    calls = []

    def scripted_generate(model, input_ids, max_new_tokens, *, padding_mask=None, eos_token_id=None,
                          pad_token_id=None, compile=None, **kwargs):
        assert not kwargs and sorted(eos_token_id) == [0, tokenizer.im_end_id] and pad_token_id == 0
        assert compile is False  # 3 batches x 12 steps on the CPU: the compile would not pay
        mask = torch.ones_like(input_ids) if padding_mask is None else padding_mask
        rows, questions = [], []
        for ids, keep in zip(input_ids.tolist(), mask.tolist()):
            prompt = tokenizer.decode([t for t, k in zip(ids, keep) if k])
            question = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            text, ends = replies[question]
            questions.append(question)
            rows.append(tokenizer.encode(text) + [tokenizer.im_end_id] * ends)
        calls.append((input_ids.shape, None if padding_mask is None else padding_mask.sum(1).tolist()))
        width = max(len(r) for r in rows)  # an unfinished row is the longest: it runs to the end, unpadded
        assert all(len(r) == width for r, (_, ends) in zip(rows, map(replies.get, questions)) if not ends)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(qwen35, "generate", scripted_generate)
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", RECORDS)
    output = tmp_path / "results.jsonl"
    summary = _run(checkpoint, data, output, "--batch-size", "2")
    rows = _read_jsonl(output)
    assert [r["predicted"] for r in rows] == ["7", "2000", "-3", "4", "17"]
    assert [r["correct"] for r in rows] == [True, True, True, False, True]
    assert [r["stopped"] for r in rows] == [True, True, True, True, False]
    assert rows[0]["reply"] == "3 + 4 = 7 apples.\n#### 7"  # cut before <|im_end|>, pads dropped
    assert summary["correct"] == 4 and summary["total"] == 5
    assert capsys.readouterr().out.startswith("gsm8k: 4/5 correct = 80.00% (max_new_tokens 12, 1 cut")
    # longest prompts first, in batches of 2 (the last one alone, unpadded)
    lengths = sorted((len(q.prompt_ids) for q in eval_gsm8k.read_questions(str(data), tokenizer, None, "test", {})),
                     reverse=True)
    assert calls == [(torch.Size([2, lengths[0]]), lengths[0:2]), (torch.Size([2, lengths[2]]), lengths[2:4]),
                     (torch.Size([1, lengths[4]]), None)]


# ---------------------------------------------------------------- errors

def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        eval_gsm8k.main(argv)
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_errors_name_the_path_line_or_field(tmp_path, checkpoint, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", RECORDS[:2])
    model = ["--model", str(checkpoint)]

    assert f"--model {tmp_path / 'nope'}: no such directory" in _error(capsys, ["--model", str(tmp_path / "nope"),
                                                                                "--data", str(good)])
    empty_dir = tmp_path / "empty-model"
    empty_dir.mkdir()
    assert f"no tokenizer.json in {empty_dir}" in _error(capsys, ["--model", str(empty_dir), "--data", str(good)])
    no_template = tmp_path / "no-template"
    shutil.copytree(checkpoint, no_template)
    (no_template / "chat_template.jinja").unlink()
    assert "no chat template (expected chat_template.jinja" in _error(capsys, ["--model", str(no_template),
                                                                             "--data", str(good)])
    no_weights = tmp_path / "no-weights"
    shutil.copytree(checkpoint, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert f"{no_weights}: no model.safetensors" in _error(capsys, ["--model", str(no_weights), "--data", str(good)])

    missing = tmp_path / "missing.jsonl"
    assert f"source {missing}: no such file or directory" in _error(capsys, model + ["--data", str(missing)])
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(RECORDS[0]) + "\n\n{\"question\": \"x\", \n")
    assert f"{malformed}:3: malformed JSON line" in _error(capsys, model + ["--data", str(malformed)])
    no_field = _write_jsonl(tmp_path / "no-field.jsonl", [RECORDS[0], {"question": "How many?"}])
    assert f"{no_field}:2: missing field 'answer'" in _error(capsys, model + ["--data", str(no_field)])
    no_gold = _write_jsonl(tmp_path / "no-gold.jsonl", [{"question": "How many?", "answer": "five"}])
    assert f"{no_gold}:1: field 'answer' has no final number" in _error(capsys, model + ["--data", str(no_gold)])
    blank_question = _write_jsonl(tmp_path / "blank.jsonl", [{"question": " ", "answer": "#### 1"}])
    assert f"{blank_question}:1: field 'question' must be a non-empty string" in _error(
        capsys, model + ["--data", str(blank_question)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert f"source {empty}: no questions (empty dataset)" in _error(capsys, model + ["--data", str(empty)])

    assert "--chat-template-kwargs: must be a JSON object" in _error(
        capsys, model + ["--data", str(good), "--chat-template-kwargs", "[1]"])
    assert f"--output {tmp_path}: is a directory" in _error(capsys, model + ["--data", str(good), "--output",
                                                                       str(tmp_path)])
    assert "--limit: must be >= 1, got 0" in _error(capsys, model + ["--data", str(good), "--limit", "0"])
