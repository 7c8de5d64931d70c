"""Qwen3.5 tokenizer from an HF directory: `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`).

Encoding is the `tokenizers` library's; the chat template is rendered with jinja2 the way transformers renders it
(sandboxed, trim_blocks / lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`), so a published template
gives the same text. `encode_chat` also returns which tokens an SFT loss should train on: the assistant turns,
located in the rendered text by their ChatML frame `<|im_start|>assistant\\n ... <|im_end|>` (the format every
Qwen template renders), so it works for any Qwen template, thinking blocks included, without per-template code.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", \
    "chat_template.jinja"
_ASSISTANT_TURN = re.compile(re.escape(IM_START) + r"assistant\n(.*?" + re.escape(IM_END) + ")", re.DOTALL)


class Qwen35Tokenizer:
    def __init__(self, tokenizer: Tokenizer, *, eos_token: str = END_OF_TEXT, chat_template: str | None = None,
                 source: str = "<memory>"):
        self.tokenizer, self.source, self.chat_template = tokenizer, source, chat_template
        ids = {}
        for token in (END_OF_TEXT, IM_START, IM_END, eos_token):
            ids[token] = tokenizer.token_to_id(token)
            if ids[token] is None:
                raise ValueError(f"{source}: the tokenizer has no {token} token (Qwen's special tokens "
                                 f"{END_OF_TEXT}, {IM_START}, {IM_END} are required)")
        self.end_of_text_id, self.im_start_id, self.im_end_id = ids[END_OF_TEXT], ids[IM_START], ids[IM_END]
        self.eos_id = ids[eos_token]  # what ends generation: <|im_end|> for chat models, <|endoftext|> for base
        self._template = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Qwen35Tokenizer:
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{tokenizer_file}: not a valid tokenizers file ({err})") from None
        config = {}
        if (config_file := path / TOKENIZER_CONFIG_FILE).is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_file}: invalid JSON ({err})") from None
        eos = config.get("eos_token") or END_OF_TEXT
        eos = eos["content"] if isinstance(eos, dict) else eos
        template = None
        if (template_file := path / CHAT_TEMPLATE_FILE).is_file():
            template = template_file.read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # named templates: [{"name", "template"}]
            template = next((t["template"] for t in config["chat_template"] if t.get("name") == "default"), None)
        return cls(tokenizer, eos_token=eos, chat_template=template, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Token ids in use, added tokens included (an embedding needs at least this many rows)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def check_fits(self, embedding_rows: int) -> None:
        if self.vocab_size > embedding_rows:
            raise ValueError(f"{self.source}: the tokenizer has {self.vocab_size} tokens, more than the model's "
                             f"{embedding_rows} embedding rows (vocab_size)")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS/EOS added (special tokens written in the text are recognised)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            **template_kwargs) -> str:
        """The chat template rendered for `messages` (transformers' `apply_chat_template(tokenize=False)`)."""
        if self._template is None:
            self._template = _compile_template(self.chat_template, self.source)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **template_kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], **template_kwargs) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether it belongs to an assistant reply (its
        content and closing <|im_end|>; not the `<|im_start|>assistant\\n` header or any other turn)."""
        text = self.apply_chat_template(messages, **template_kwargs)
        spans = [match.span(1) for match in _ASSISTANT_TURN.finditer(text)]
        expected = sum(m.get("role") == "assistant" for m in messages)
        if len(spans) != expected:
            raise ValueError(f"{self.source}: the chat template rendered {len(spans)} assistant turns "
                             f"(<|im_start|>assistant ... <|im_end|>) for {expected} assistant messages")
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        trained, span = [], 0
        for start, end in encoding.offsets:
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            trained.append(span < len(spans) and start >= spans[span][0] and end <= spans[span][1])
        return encoding.ids, trained


def _compile_template(template: str | None, source: str):
    if template is None:
        raise ValueError(f"{source}: no chat template (expected {CHAT_TEMPLATE_FILE} or a 'chat_template' in "
                         f"{TOKENIZER_CONFIG_FILE})")
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationBlock])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{source}: chat template syntax error, line {err.lineno}: {err.message}") from None
