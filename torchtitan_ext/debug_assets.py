"""The embedded default corpus and tokenizer: real text that exists on every machine without a download.

Corpus: the documentation of the running Python's standard library — every module, class and function docstring
of its source files (read with `ast`, nothing is imported) and the language-reference topics `pydoc` ships
(`pydoc_data.topics`) — about 2 MB as JSON lines `{"text": ...}`, one document per docstring / topic, written
in a fixed shuffled order (for `[data] shuffle = false`, which reads in file order). Tokenizer: a byte-level BPE trained on it
with Qwen's special tokens and a ChatML chat template, saved as an HF tokenizer directory.

Both are created on first use (`ensure_stdlib_assets`, ~20 s on 2 cores) where missing, and rebuilt when the stamp
file beside the tokenizer says this script made them with another version; files it did not make are never
overwritten. Also a script:

    python -m torchtitan_ext.debug_assets OUT_DIR [--vocab-size 2048]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen35.tokenizer import CHAT_TEMPLATE_FILE, END_OF_TEXT, IM_END, IM_START, TOKENIZER_CONFIG_FILE, \
    TOKENIZER_FILE

CORPUS_FILE = "stdlib_docs.jsonl"
STAMP_FILE = "debug_assets.json"
VERSION = 2  # bump when the corpus or tokenizer recipe changes: cached assets are then rebuilt
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2
# ChatML, the frame of every Qwen chat template (no system prompt by default, no thinking block).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Source trees that are tests, GUI demos or vendored code rather than library documentation.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3"}
_MIN_DOC_CHARS = 40
_ORDER_SEED = 0


def stdlib_documents() -> list[str]:
    """Docstrings of the standard library's source files (sorted by path, in source order), then the pydoc
    topics (sorted by name); deduplicated, each at least 40 characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are deliberately invalid
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docs.append(ast.get_docstring(node) or "")
    try:
        from pydoc_data.topics import topics
        docs.extend(topics[name] for name in sorted(topics))
    except ImportError:  # distributions may split pydoc_data out
        pass
    return [d for d in dict.fromkeys(docs) if len(d) >= _MIN_DOC_CHARS]


def shuffled_stdlib_documents() -> list[str]:
    docs = stdlib_documents()
    random.Random(_ORDER_SEED).shuffle(docs)
    return docs


def write_corpus(path: Path, docs: list[str]) -> None:
    """JSON lines {"text": ...}, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tmp.replace(path)


def train_byte_level_bpe(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 / Qwen style pre-tokenisation) with Qwen's specials as ids 0-2, saved with its
    tokenizer_config.json and a ChatML chat_template.jinja."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": END_OF_TEXT,
              "pad_token": END_OF_TEXT, "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 20}
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte (no merges) after Qwen's specials (ids 0-2): any text round-trips, and a text's token
    count is its UTF-8 length, which makes token counts in tests checkable by hand."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(sorted(pre_tokenizers.ByteLevel.alphabet())))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def ensure_stdlib_assets(corpus: Path, tokenizer_dir: Path, vocab_size: int) -> None:
    """Create the corpus and the tokenizer where they are missing, and rebuild those this script made with another
    version (or vocab size). A file it did not make (a user's data or tokenizer) is never overwritten."""
    stamp_file = tokenizer_dir / STAMP_FILE
    stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None  # None: nothing made here
    stale = stamp is None or stamp["version"] != VERSION
    made, docs = {}, None
    if not corpus.exists() or (stale and stamp is not None and stamp.get("corpus") == str(corpus.resolve())):
        write_corpus(corpus, docs := shuffled_stdlib_documents())
        made["corpus"] = str(corpus.resolve())
    if not (tokenizer_dir / TOKENIZER_FILE).exists() or \
            (stamp is not None and "vocab_size" in stamp and (stale or stamp["vocab_size"] != vocab_size)):
        train_byte_level_bpe(docs or shuffled_stdlib_documents(), tokenizer_dir, vocab_size)
        made["vocab_size"] = vocab_size
    if made:
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps({**(stamp or {}), **made, "version": VERSION}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_ext.debug_assets", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help=f"written: {CORPUS_FILE} and the tokenizer files")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    ensure_stdlib_assets(args.out_dir / CORPUS_FILE, args.out_dir, args.vocab_size)
    print(f"wrote {args.out_dir / CORPUS_FILE} and a {args.vocab_size}-token BPE tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
