"""export_hf refuses what would lose data or give wrong weights (issue 14 items 3, 4, 9, 14, 15): a non-empty
output without --overwrite, a tied config on an untied checkpoint, a truncated checkpoint; it writes through a
temporary directory and with the user's umask."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from test_train_helpers import DEBUG_TOML, debug_assets
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from torchtitan_ext.export_hf import load_dcp_model, main as export_main


def _checkpoint(directory, **overrides):
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug", **overrides))
    dcp.save(model.state_dict(), checkpoint_id=str(directory))
    return model


def _export(checkpoint, output, *extra, config=DEBUG_TOML):
    export_main(["--config", str(config), "--checkpoint", str(checkpoint), "--output", str(output), *extra])


def test_non_empty_output_needs_overwrite_then_is_replaced_with_the_umask(tmp_path, monkeypatch):
    monkeypatch.chdir(DEBUG_TOML.parent.parent)  # debug.toml's hf_assets_path is relative to the repository
    debug_assets()
    _checkpoint(tmp_path / "step-1")
    output = tmp_path / "hf"
    output.mkdir()
    user_files = {"config.json": "{\"mine\": 1}", "tokenizer.json": "mine", "model-00001-of-00002.safetensors": "x"}
    for name, text in user_files.items():
        (output / name).write_text(text)
    with pytest.raises(SystemExit, match=rf"--output {output} is not empty; pass --overwrite"):
        _export(tmp_path / "step-1", output)
    with pytest.raises(SystemExit, match=rf"--output {tmp_path} contains --checkpoint {tmp_path / 'step-1'}"):
        _export(tmp_path / "step-1", tmp_path, "--overwrite")
    assert {p.name: p.read_text() for p in output.iterdir()} == user_files

    previous = os.umask(0o027)
    try:
        _export(tmp_path / "step-1", output, "--overwrite")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in output.iterdir()) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert "mine" not in (output / "config.json").read_text()
    for path in output.iterdir():  # safetensors used to be 0600 while the other files followed the umask
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "step-1"]  # no temporary directory left


def test_failed_export_writes_nothing(tmp_path):
    _checkpoint(tmp_path / "step-1", hidden_size=64)  # another architecture than debug.toml's
    with pytest.raises(SystemExit, match=r"tensor .* has shape .* the model expects"):
        _export(tmp_path / "step-1", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_tied_config_on_untied_checkpoint_is_refused(tmp_path):
    _checkpoint(tmp_path / "untied")  # the debug flavor is untied
    tied_toml = tmp_path / "tied.toml"
    tied_toml.write_text(DEBUG_TOML.read_text().replace("[model]\n", "[model]\ntie_word_embeddings = true\n"))
    with pytest.raises(SystemExit, match=r"ties lm_head to embed_tokens .* the checkpoint's lm_head.weight differs "
                                         r"from its model.embed_tokens.weight: it was trained untied"):
        _export(tmp_path / "untied", tmp_path / "hf", config=tied_toml)
    assert not (tmp_path / "hf").exists()
    # A checkpoint of a tied model (both keys stored, equal) still loads.
    tied = _checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    loaded = load_dcp_model(tied.config, tmp_path / "tied")
    assert torch.equal(loaded.lm_head.weight, tied.lm_head.weight) and loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_truncated_checkpoint_names_the_file(tmp_path):
    _checkpoint(tmp_path / "step-1")
    data_file = next((tmp_path / "step-1").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=rf"{data_file}: truncated \(1000 bytes, the checkpoint metadata needs"):
        _export(tmp_path / "step-1", tmp_path / "hf")


def test_help_says_checkpoints_are_read_with_pickle(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pickle" in text and "trusted source" in text and "--overwrite" in text
