"""qwen35.tokenizer against transformers: the same chat text and ids, and the assistant mask transformers computes
from `{% generation %}` markers; Qwen-style thinking templates; errors name the file."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from qwen35.tokenizer import Qwen35Tokenizer
from test_train_helpers import debug_assets

# ChatML with transformers' assistant-mask markers around what an SFT loss should train.
MARKED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The shape of Qwen3's templates: the last assistant turn after the last user message carries a (here empty)
# thinking block, earlier ones do not; `enable_thinking=false` opens an empty block in the generation prompt.
THINKING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20"},
]


@pytest.fixture
def tokenizer_dir(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((debug_assets() / name).read_bytes())
    return tmp_path


def _hf(tokenizer_dir):
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))


def test_chat_text_ids_and_assistant_mask_equal_transformers(tokenizer_dir):
    (tokenizer_dir / "chat_template.jinja").write_text(MARKED_TEMPLATE)
    ours = Qwen35Tokenizer.from_dir(tokenizer_dir)
    hf = _hf(tokenizer_dir)
    for generation_prompt in (False, True):
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt) == \
            hf.apply_chat_template(CONVERSATION, chat_template=MARKED_TEMPLATE, tokenize=False,
                                   add_generation_prompt=generation_prompt)
    ids, trained = ours.encode_chat(CONVERSATION)
    expected = hf.apply_chat_template(CONVERSATION, chat_template=MARKED_TEMPLATE, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
    assert ids == expected["input_ids"]
    assert trained == [bool(m) for m in expected["assistant_masks"]]
    assert sum(trained) == len(ours.encode("2 + 3 = 5\n#### 5")) + len(ours.encode("20")) + 2  # + 2 x <|im_end|>


def test_thinking_template_trains_the_thinking_block_of_the_last_turn_only(tokenizer_dir):
    (tokenizer_dir / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    tok = Qwen35Tokenizer.from_dir(tokenizer_dir)
    ids, trained = tok.encode_chat(CONVERSATION)
    trained_text = tok.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text == "2 + 3 = 5\n#### 5<|im_end|><think>\n\n</think>\n\n20<|im_end|>"
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_template_that_loses_an_assistant_turn_is_an_error(tokenizer_dir):
    (tokenizer_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match=r"rendered 0 assistant turns .* for 2 assistant messages"):
        Qwen35Tokenizer.from_dir(tokenizer_dir).encode_chat(CONVERSATION)


def test_specials_eos_vocab_and_template_sources(tokenizer_dir):
    tok = Qwen35Tokenizer.from_dir(tokenizer_dir)
    assert (tok.end_of_text_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    assert tok.eos_id == 0 and tok.vocab_size == 2048 and tok.chat_template is None
    tok.check_fits(2048)
    with pytest.raises(ValueError, match=r"2048 tokens, more than the model's 1000 embedding rows"):
        tok.check_fits(1000)
    with pytest.raises(ValueError, match=r"no chat template \(expected chat_template.jinja"):
        tok.apply_chat_template(CONVERSATION)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.update(eos_token={"content": "<|im_end|>"}, chat_template=MARKED_TEMPLATE)
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Qwen35Tokenizer.from_dir(tokenizer_dir)
    assert tok.eos_id == 2 and tok.chat_template == MARKED_TEMPLATE


def test_missing_special_token_and_bad_files_name_the_path(tokenizer_dir, tmp_path):
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|im_start|>"]
    del spec["model"]["vocab"]["<|im_start|>"]
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"{tokenizer_dir}: the tokenizer has no <\|im_start\|> token"):
        Qwen35Tokenizer.from_dir(tokenizer_dir)
    (tokenizer_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        Qwen35Tokenizer.from_dir(tokenizer_dir)
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer\.json in {tmp_path / 'nowhere'}"):
        Qwen35Tokenizer.from_dir(tmp_path / "nowhere")
