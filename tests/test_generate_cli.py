"""`python -m qwen35.generate` end to end on a random debug checkpoint with a byte-level tokenizer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import qwen35
from qwen35.tokenizer import Qwen35Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("debug-ckpt")
    subprocess.run([sys.executable, str(ROOT / "scripts/make_debug_checkpoint.py"), str(out), "--seed", "1"],
                   check=True, capture_output=True)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def _expected_text(checkpoint, prompt_text, n, eos):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    model = qwen35.load_pretrained(checkpoint).eval()
    ids = torch.tensor([tokenizer.encode(prompt_text, add_special_tokens=False).ids])
    out = qwen35.generate(model, ids, n, eos_token_id=eos)[0, ids.shape[1]:].tolist()
    return tokenizer.decode([t for t in out if t not in eos])


@pytest.mark.parametrize("chat", [False, True])
def test_cli_streams_greedy_tokens_and_reports_speed(checkpoint, chat):
    prompt = "Hello, delta rule!"
    cmd = [sys.executable, "-m", "qwen35.generate", "--model", str(checkpoint), "--prompt", prompt,
           "--max-new-tokens", "12"] + (["--chat"] if chat else [])
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eos = [0]  # <|endoftext|> in the debug checkpoint
    if chat:
        text = Qwen35Tokenizer.from_dir(checkpoint).apply_chat_template([{"role": "user", "content": prompt}],
                                                                        add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        eos = sorted({0, tokenizer.token_to_id("<|im_end|>")})
        expected = _expected_text(checkpoint, text, 12, eos)
        assert result.stdout == expected + "\n"
    else:
        assert result.stdout == prompt + _expected_text(checkpoint, prompt, 12, eos) + "\n"
    assert "tokens/s" in result.stderr


def test_cli_errors_name_the_missing_file(tmp_path, checkpoint):
    result = subprocess.run([sys.executable, "-m", "qwen35.generate", "--model", str(tmp_path), "--prompt", "x"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and f"no tokenizer.json in {tmp_path}" in result.stderr
    no_template = tmp_path / "ckpt"
    no_template.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "chat_template.jinja":
            (no_template / f.name).write_bytes(f.read_bytes())
    result = subprocess.run([sys.executable, "-m", "qwen35.generate", "--model", str(no_template), "--prompt", "x",
                             "--chat"], capture_output=True, text=True)
    assert result.returncode != 0 and "no chat template (expected chat_template.jinja" in result.stderr


def test_cli_speculative_mtp_prints_greedy_text_and_acceptance(tmp_path, checkpoint):
    result = subprocess.run([sys.executable, "-m", "qwen35.generate", "--model", str(checkpoint), "--prompt", "x",
                             "--speculative", "mtp"], capture_output=True, text=True)
    assert result.returncode != 0 and "has no MTP head" in result.stderr
    # the same checkpoint with a (random) MTP head
    plain = qwen35.load_pretrained(checkpoint)
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config(**{**plain.config.__dict__, "mtp_num_hidden_layers": 1}))
    model.load_state_dict(plain.state_dict(), strict=False)
    with_mtp = tmp_path / "mtp"
    qwen35.save_pretrained(model, with_mtp)
    for f in checkpoint.iterdir():
        if not f.name.startswith(("model", "config")):
            (with_mtp / f.name).write_bytes(f.read_bytes())
    prompt = "Hello, delta rule!"
    result = subprocess.run([sys.executable, "-m", "qwen35.generate", "--model", str(with_mtp), "--prompt", prompt,
                             "--max-new-tokens", "12", "--speculative", "mtp"], capture_output=True, text=True,
                            check=True)
    assert result.stdout == prompt + _expected_text(checkpoint, prompt, 12, [0]) + "\n"
    assert "MTP drafts accepted" in result.stderr
