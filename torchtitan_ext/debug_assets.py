"""A small training corpus and tokenizer that exist without any download, for the CPU debug runs.

Corpus: the docstrings of a fixed list of Python standard-library modules (and of their public classes,
functions and methods), as written by the running interpreter, one JSON-lines record `{"text": ...}` per
docstring. Tokenizer: a byte-level BPE trained on that corpus with the `tokenizers` library, with Qwen's
document and chat specials. Both are generated on first use; a later issue replaces this with the real data
pipeline.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Pure-Python modules with long, stable docstrings; importing them has no side effects.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "heapq", "hmac", "http.client",
    "http.server", "imaplib", "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "pathlib",
    "pickle", "pickletools", "pprint", "pydoc", "queue", "random", "re", "sched", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "turtle", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)
_MIN_DOC_CHARS = 40


def _docstrings(module_name: str) -> list[str]:
    """The module's docstring, then those of its own public classes and functions (sorted by name) and of
    the classes' own methods."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. a platform without the module's C dependency
        return []
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(obj.__doc__ and inspect.cleandoc(obj.__doc__))
        if inspect.isclass(obj):
            docs.extend(inspect.cleandoc(member.__doc__) for member_name, member in sorted(vars(obj).items())
                        if inspect.isfunction(member) and not member_name.startswith("_") and member.__doc__)
    return [d for d in docs if d and len(d) >= _MIN_DOC_CHARS]


def write_stdlib_corpus(path: Path) -> int:
    """Write the corpus (deduplicated, in a fixed order); returns the number of documents."""
    seen: set[str] = set()
    records = []
    for module_name in STDLIB_MODULES:
        for doc in _docstrings(module_name):
            if doc not in seen:
                seen.add(doc)
                records.append(json.dumps({"text": doc}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(records) + "\n")
    tmp.replace(path)
    return len(records)


def read_texts(path: Path) -> list[str]:
    """The "text" field of every JSON-lines record; a malformed line raises naming file and line."""
    texts = []
    with path.open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_number}: expected a JSON object with a \"text\" field ({err})") \
                    from None
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


def train_byte_level_bpe(corpus: Path, out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 / Qwen style pre-tokenisation), saved as an HF tokenizer directory."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(read_texts(corpus), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
    }
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def ensure_stdlib_assets(corpus: Path, tokenizer_dir: Path, vocab_size: int) -> None:
    """Create whichever of the corpus and the tokenizer is missing (the tokenizer from the corpus)."""
    if not corpus.exists():
        write_stdlib_corpus(corpus)
    if not (tokenizer_dir / TOKENIZER_FILE).exists():
        train_byte_level_bpe(corpus, tokenizer_dir, vocab_size)
