"""The default corpus and tokenizer bootstrap: made where missing, rebuilt when stale, never over a user's files."""

import json

import pytest

import torchtitan_ext  # noqa: F401  (compat shims before torchtitan)
from qwen35.tokenizer import Qwen35Tokenizer
from torchtitan_ext import debug_assets
from torchtitan_ext.debug_assets import STAMP_FILE, ensure_stdlib_assets

DOCS = [f"Document number {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(200)]


@pytest.fixture(autouse=True)
def small_corpus(monkeypatch):
    monkeypatch.setattr(debug_assets, "stdlib_documents", lambda: list(DOCS))


def test_creates_corpus_tokenizer_and_template_then_reuses_them(tmp_path):
    corpus, assets = tmp_path / "corpus.jsonl", tmp_path / "assets"
    ensure_stdlib_assets(corpus, assets, 300)
    assert sorted(json.loads(line)["text"] for line in corpus.read_text().splitlines()) == sorted(DOCS)
    tokenizer = Qwen35Tokenizer.from_dir(assets)
    assert tokenizer.vocab_size == 300 and (tokenizer.end_of_text_id, tokenizer.im_start_id) == (0, 1)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    modified = {p.name: p.stat().st_mtime_ns for p in [corpus, *assets.iterdir()]}
    ensure_stdlib_assets(corpus, assets, 300)
    assert modified == {p.name: p.stat().st_mtime_ns for p in [corpus, *assets.iterdir()]}
    ensure_stdlib_assets(corpus, assets, 400)  # another vocab size: the tokenizer is rebuilt, the corpus kept
    assert Qwen35Tokenizer.from_dir(assets).vocab_size == 400 and corpus.stat().st_mtime_ns == modified[corpus.name]


def test_stale_version_is_rebuilt(tmp_path):
    corpus, assets = tmp_path / "corpus.jsonl", tmp_path / "assets"
    ensure_stdlib_assets(corpus, assets, 300)
    corpus.write_text('{"text": "old"}\n')
    stamp = json.loads((assets / STAMP_FILE).read_text())
    (assets / STAMP_FILE).write_text(json.dumps(dict(stamp, version=stamp["version"] - 1)))
    ensure_stdlib_assets(corpus, assets, 300)
    assert len(corpus.read_text().splitlines()) == len(DOCS)


def test_never_overwrites_a_users_data_or_tokenizer(tmp_path):
    assets = tmp_path / "assets"
    ensure_stdlib_assets(tmp_path / "corpus.jsonl", assets, 300)
    users_data = tmp_path / "mine.jsonl"
    users_data.write_text('{"messages": []}\n')
    ensure_stdlib_assets(users_data, assets, 300)  # another data file with the bootstrap on
    assert users_data.read_text() == '{"messages": []}\n'

    users_tokenizer = tmp_path / "published"
    users_tokenizer.mkdir()
    (users_tokenizer / "tokenizer.json").write_text((assets / "tokenizer.json").read_text())
    ensure_stdlib_assets(tmp_path / "corpus.jsonl", users_tokenizer, 999)
    assert sorted(p.name for p in users_tokenizer.iterdir()) == ["tokenizer.json"]
    ensure_stdlib_assets(tmp_path / "new_corpus.jsonl", users_tokenizer, 999)  # writes a corpus, and a stamp
    ensure_stdlib_assets(tmp_path / "new_corpus.jsonl", users_tokenizer, 999)
    assert (users_tokenizer / "tokenizer.json").read_text() == (assets / "tokenizer.json").read_text()
    assert not (users_tokenizer / "chat_template.jinja").exists()
