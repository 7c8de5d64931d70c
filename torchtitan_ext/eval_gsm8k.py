"""Evaluate an HF checkpoint on GSM8K: greedy chat generation, final-number exact match.

    python -m torchtitan_ext.eval_gsm8k --model <hf dir> --data <jsonl | parquet | datasets dir> [--limit N]
        [--batch-size B] [--max-new-tokens N] [--dtype float32|bfloat16] [--device cpu|cuda]
        [--output results.jsonl] [--chat-template-kwargs '{"enable_thinking": false}'] [--compile | --no-compile]

Each record needs `question` and `answer`; the gold number is the one after the answer's last `####` (GSM8K's
format, e.g. "... #### 1,234"). The question alone is the user turn of the model's chat template; the reply is
generated greedily until EOS (config.json's eos_token_id or <|im_end|>) or --max-new-tokens. The prediction is
the number after the reply's last `####`, else the reply's last number; a reply with a closing </think> is read
after it. Numbers are compared as decimals after dropping thousands commas, `$` and trailing zeros.

Prompts are sorted by length and generated in left-padded batches (greedy outputs equal batch size 1); results
are reported in input order. stdout gets one summary line, stderr the progress; --output gets one JSON line per
question (question, gold, reply, predicted, correct), written once all are done. Decode steps run compiled
(`qwen35.decoding.compiled_decode_step`) where the compile pays for all the batches' steps
(`qwen35.decoding.compile_pays`: always on CUDA, on CPU from CPU_COMPILE_MIN_STEPS); --compile / --no-compile
decide instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

import qwen35
from qwen35.decoding import CPU_COMPILE_MIN_STEPS, compile_pays, eos_set
from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan_ext.data.sources import DataError, SourceSpec, open_reader

FIELDS = ("question", "answer")

# A number: optional minus (not glued to a preceding word/digit, so "3-5" reads 3 and 5), optional $, digits with
# well-formed thousands commas or plain digits, optional decimal part; or a bare ".5".
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_MARK = "####"
_THINK_END = "</think>"


def normalize_number(text: str) -> str | None:
    """The canonical decimal string of a number as written ($1,234.50 -> 1234.5, 72. -> 72, -3.0 -> -3, -0 -> 0);
    None if `text` is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not cleaned or not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [n for n in (normalize_number(m.group()) for m in _NUMBER.finditer(text)) if n is not None]


def _marked_number(text: str) -> str | None:
    """The first number after the last `####` of `text` (None without a mark or a number after it)."""
    if _ANSWER_MARK not in text:
        return None
    numbers = _numbers(text.rsplit(_ANSWER_MARK, 1)[1])
    return numbers[0] if numbers else None


def extract_answer(text: str) -> str | None:
    """The normalised final number of `text`: the first number after its last `####`, else its last number;
    None if it has none. A text with a closing </think> (a thinking model's reply) is read after the last one."""
    if _THINK_END in text:
        text = text.rsplit(_THINK_END, 1)[1]
    if (marked := _marked_number(text)) is not None:
        return marked
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gold_answer(answer: Any, where: str) -> str:
    """The gold number of a GSM8K answer ("<reasoning> #### 72", or a bare number); DataError naming `where`."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(f"{where}: field 'answer' must be a string, got {type(answer).__name__}")
    if _ANSWER_MARK in answer:
        if (marked := _marked_number(answer)) is not None:
            return marked
    elif (bare := normalize_number(answer)) is not None:
        return bare
    raise DataError(f"{where}: field 'answer' has no final number after '{_ANSWER_MARK}' (GSM8K answers end "
                    f"with a line like '#### 72'): {answer[-80:]!r}")


def same_number(predicted: str | None, gold: str) -> bool:
    return predicted is not None and Decimal(predicted) == Decimal(gold)


@dataclass
class Question:
    index: int  # input order
    where: str
    question: str
    gold: str
    prompt_ids: list[int]


def read_questions(data: str, tokenizer: Qwen35Tokenizer, limit: int | None, split: str,
                   template_kwargs: dict[str, Any]) -> list[Question]:
    """The first `limit` records of `data` as tokenized chat prompts with their gold numbers."""
    import jinja2

    reader = open_reader(SourceSpec(data, split=split), fields=FIELDS)
    questions = []
    for record, where in reader.read():
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r}")
        gold = gold_answer(record["answer"], where)
        try:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, **template_kwargs)
        except jinja2.TemplateError as err:  # raise_exception in the template, an undefined variable, ...
            raise ValueError(f"{tokenizer.source}: the chat template failed on {where} "
                             f"({type(err).__name__}: {err})") from None
        ids = tokenizer.encode(prompt)
        if not ids:
            raise DataError(f"{where}: the prompt encodes to zero tokens")
        questions.append(Question(len(questions), where, question, gold, ids))
        if len(questions) == limit:
            break
    if not questions:
        raise DataError(f"source {data}: no questions (empty dataset)")
    return questions


def generate_replies(model, tokenizer: Qwen35Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     eos: set[int], device, compile: bool = False) -> list[tuple[list[int], bool]]:
    """Greedy continuations of a batch of prompts (left-padded into one tensor): per prompt, its generated ids up
    to (not including) the first EOS, and whether it stopped on EOS (False: cut at max_new_tokens)."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.end_of_text_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    padding_mask = None
    if any(len(p) < width for p in prompts):
        padding_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = qwen35.generate(model, input_ids, max_new_tokens, padding_mask=padding_mask, eos_token_id=sorted(eos),
                          pad_token_id=pad, compile=compile)
    replies = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        replies.append((row if stop is None else row[:stop], stop is not None))
    return replies


def evaluate(model, tokenizer: Qwen35Tokenizer, questions: list[Question], batch_size: int, max_new_tokens: int,
             device, log=None, compile: bool | None = None) -> list[dict[str, Any]]:
    """One result per question, in input order: question, gold, reply, predicted, correct, stopped (on EOS).
    compile: compiled decode steps (None: if `compile_pays` for every batch's max_new_tokens steps)."""
    eos = eos_set(model.config.eos_token_id) | {tokenizer.im_end_id}
    order = sorted(questions, key=lambda q: len(q.prompt_ids), reverse=True)  # longest first: OOM shows early
    results: list[dict[str, Any] | None] = [None] * len(questions)
    done = correct = 0
    if compile is None:
        compile = compile_pays(model, device, -(-len(order) // batch_size) * max_new_tokens)
    started = time.monotonic()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        replies = generate_replies(model, tokenizer, [q.prompt_ids for q in batch], max_new_tokens, eos, device,
                                   compile)
        for q, (ids, stopped) in zip(batch, replies):
            reply = tokenizer.decode(ids)  # special tokens kept: </think> may be one
            predicted = extract_answer(reply)
            ok = same_number(predicted, q.gold)
            results[q.index] = {"question": q.question, "gold": q.gold, "reply": reply, "predicted": predicted,
                                "correct": ok, "stopped": stopped}
            correct += ok
        done += len(batch)
        if log is not None:
            elapsed = time.monotonic() - started
            log(f"gsm8k: {done}/{len(questions)} done, {correct} correct ({100 * correct / done:.2f}%), "
                f"{elapsed:.1f} s ({elapsed / done:.2f} s/question)")
    return results


def write_results(path: Path, results: list[dict[str, Any]]) -> None:
    """JSON lines, written under a temporary name and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _template_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_ext.eval_gsm8k",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="HF directory: config.json, safetensors, "
                        "tokenizer.json and a chat template (chat_template.jinja or tokenizer_config.json)")
    parser.add_argument("--data", required=True, help="GSM8K records with 'question' and 'answer': .jsonl, "
                        ".parquet (e.g. main/test-00000-of-00001.parquet), a directory or glob of them, or a "
                        "datasets directory")
    parser.add_argument("--split", default="test", help="split of a datasets directory (default: test)")
    parser.add_argument("--limit", type=_positive, default=None, help="evaluate the first N questions only")
    parser.add_argument("--batch-size", type=_positive, default=8, help="prompts per left-padded batch (default: 8)")
    parser.add_argument("--max-new-tokens", type=_positive, default=512, help="reply length limit (default: 512)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--output", type=Path, default=None, help="JSON lines, one per question in input order")
    parser.add_argument("--chat-template-kwargs", type=_template_kwargs, default={},
                        help='JSON object passed to the chat template, e.g. \'{"enable_thinking": false}\'')
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled decode steps (default: where the compile pays: always on CUDA, on CPU from "
                        f"{CPU_COMPILE_MIN_STEPS} decode steps in all)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such directory")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.output is not None:  # fail before the evaluation, not after it
            if args.output.is_dir():
                raise ValueError(f"--output {args.output}: is a directory, expected a file name")
            args.output.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = Qwen35Tokenizer.from_dir(args.model)
        questions = read_questions(args.data, tokenizer, args.limit, args.split, args.chat_template_kwargs)
        lengths = [len(q.prompt_ids) for q in questions]
        log(f"gsm8k: {len(questions)} questions from {args.data}, prompts of {min(lengths)}-{max(lengths)} tokens")
        model = qwen35.load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
        tokenizer.check_fits(model.config.vocab_size)
    except (OSError, ValueError) as err:  # DataError is a ValueError
        parser.error(str(err))

    started = time.monotonic()
    results = evaluate(model, tokenizer, questions, args.batch_size, args.max_new_tokens, args.device, log,
                       args.compile)
    elapsed = time.monotonic() - started
    correct = sum(r["correct"] for r in results)
    cut = sum(not r["stopped"] for r in results)
    no_number = sum(r["predicted"] is None for r in results)
    if args.output is not None:
        write_results(args.output, results)
    summary = {"correct": correct, "total": len(results), "accuracy": correct / len(results),
               "cut_at_max_new_tokens": cut, "no_number": no_number, "seconds": elapsed}
    print(f"gsm8k: {correct}/{len(results)} correct = {100 * summary['accuracy']:.2f}% (max_new_tokens "
          f"{args.max_new_tokens}, {cut} cut at max_new_tokens, {no_number} without a number; model {args.model}, "
          f"data {args.data}, {args.dtype} on {args.device}, batch size {args.batch_size}, {elapsed:.1f} s)",
          flush=True)
    return summary


if __name__ == "__main__":
    main()
