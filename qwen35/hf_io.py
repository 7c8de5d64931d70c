"""HF checkpoint import/export. Our module names are transformers' text-model names, so loading is key
normalisation only: the multimodal prefix is dropped, per-expert MoE tensors are stacked into the fused layout,
vision tensors are skipped, and the MTP head (`mtp.*`) loads by name when the config declares one. Nothing is
converted arithmetically, so HF -> here -> HF is bit-exact."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Qwen35Config
from .model import Qwen35ForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MULTIMODAL_PREFIX = "model.language_model."
_SKIPPED_PREFIXES = ("model.visual.",)
MTP_PREFIX = "mtp."
_PER_EXPERT_KEY = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
                             r"\.weight$")


def _checkpoint_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    elif (hf_dir / SINGLE_FILE).exists():
        files = [hf_dir / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in {index} but missing")
    return files


def _read_text_tensors(hf_dir: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All decoder tensors under text-model names (`model.*`, `lm_head.weight`), per-expert keys still split."""
    tensors: dict[str, torch.Tensor] = {}
    skipped: dict[str, int] = {}
    for path in _checkpoint_files(hf_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                prefix = next((p for p in _SKIPPED_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    skipped[prefix] = skipped.get(prefix, 0) + 1
                    continue
                name = "model." + key[len(_MULTIMODAL_PREFIX):] if key.startswith(_MULTIMODAL_PREFIX) else key
                if name in tensors:
                    raise ValueError(f"{path}: tensor {key!r} appears twice in the checkpoint (as {name!r})")
                tensors[name] = f.get_tensor(key).to(device=device, dtype=dtype)
    if skipped:
        log.info("load_pretrained(%s): skipped %s (not part of the text decoder)", hf_dir,
                 ", ".join(f"{n} tensors under {p}*" for p, n in skipped.items()))
    return tensors


def _fuse_per_expert(tensors: dict[str, torch.Tensor], num_experts: int) -> None:
    """Stack `experts.{e}.{gate,up,down}_proj.weight` into `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj`."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key in [k for k in tensors if _PER_EXPERT_KEY.match(k)]:
        base, expert, proj = _PER_EXPERT_KEY.match(key).groups()
        groups.setdefault(base, {})[(int(expert), proj)] = tensors.pop(key)
    for base, parts in groups.items():
        for e in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if (e, proj) not in parts:
                    raise ValueError(f"checkpoint has per-expert tensors under {base} but is missing "
                                     f"{base}.{e}.{proj}.weight")
        extra = sorted(e for e, _ in parts if e >= num_experts)
        if extra:
            raise ValueError(f"unexpected tensor {base}.{extra[0]}.*: config has num_experts={num_experts}")
        tensors[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(num_experts)])
        tensors[f"{base}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(num_experts)])


def _reconcile_mtp(config: Qwen35Config, tensors: dict[str, torch.Tensor], hf_dir: Path) -> Qwen35Config:
    """The config of the model to build. A config without an MTP head drops the checkpoint's `mtp.*` tensors
    (as transformers does); a config with one whose checkpoint has no `mtp.*` tensor at all (transformers'
    save_pretrained drops them) builds the model without the head. Both are logged; a partial head is an error
    (reported as missing tensors)."""
    mtp_keys = [k for k in tensors if k.startswith(MTP_PREFIX)]
    if config.mtp_num_hidden_layers and not mtp_keys:
        log.warning("load_pretrained(%s): config.json declares mtp_num_hidden_layers=%d but the checkpoint has no "
                    "mtp.* tensors; loading without the MTP head", hf_dir, config.mtp_num_hidden_layers)
        return dataclasses.replace(config, mtp_num_hidden_layers=0)
    if not config.mtp_num_hidden_layers and mtp_keys:
        log.info("load_pretrained(%s): skipped %d mtp.* tensors (config.json declares no MTP head)", hf_dir,
                 len(mtp_keys))
        for key in mtp_keys:
            del tensors[key]
    return config


def load_pretrained(hf_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> Qwen35ForCausalLM:
    """Load an HF directory (config.json + one or sharded safetensors; text-only or multimodal keys; fused or
    per-expert MoE). Every missing, unexpected or mis-shaped tensor raises before a model is returned."""
    hf_dir = Path(hf_dir)
    config = Qwen35Config.from_hf_file(hf_dir / "config.json")
    tensors = _read_text_tensors(hf_dir, dtype, device)
    config = _reconcile_mtp(config, tensors, hf_dir)
    if config.is_moe:
        _fuse_per_expert(tensors, config.num_experts)

    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        lm_head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is None or not torch.equal(lm_head, embed):
            raise ValueError(f"{hf_dir}: config ties lm_head to embed_tokens but the checkpoint's lm_head.weight "
                             "differs from model.embed_tokens.weight")
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{hf_dir}: checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r} "
                         f"(expected shape {tuple(expected[missing[0]])}); all missing: {missing}")
    if unexpected:
        raise ValueError(f"{hf_dir}: checkpoint has {len(unexpected)} unexpected tensor(s), first "
                         f"{unexpected[0]!r} with shape {tuple(tensors[unexpected[0]].shape)}; all: {unexpected}")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise ValueError(f"{hf_dir}: tensor {key!r} has shape {tuple(tensors[key].shape)} in the checkpoint, "
                             f"the model expects {tuple(shape)}")

    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.to_empty(device=device).reset_parameters()
    return model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB', '200MB'")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process umask (read by setting it back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def split_per_expert(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The fused expert tensors under `prefix` as the per-expert keys `experts.{e}.{gate,up,down}_proj.weight`
    (the layout of the published MTP layer); other tensors unchanged, order kept."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(prefix) and key.endswith(".mlp.experts.gate_up_proj"):
            base = key.removesuffix(".gate_up_proj")
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor.unbind()):
                out[f"{base}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{base}.{e}.up_proj.weight"] = up.contiguous()
                out[f"{base}.{e}.down_proj.weight"] = state[f"{base}.down_proj"][e].contiguous()
        elif not (key.startswith(prefix) and key.endswith(".mlp.experts.down_proj")):
            out[key] = tensor
    return out


def checkpoint_state(model: Qwen35ForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors written to an HF checkpoint under text-model names: no tied lm_head, the MTP layer's experts
    per expert as published."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return split_per_expert(state, MTP_PREFIX)


def save_pretrained(model: Qwen35ForCausalLM, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json + safetensors (sharded with an index above `max_shard_size`) that transformers'
    AutoModelForCausalLM loads. Files are written under temporary names and renamed only once all are complete."""
    state = checkpoint_state(model)
    dtypes = {v.dtype for v in state.values()}
    dtype_name = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    outputs = _weight_files(state, _parse_size(max_shard_size))
    outputs["config.json"] = json.dumps(model.config.to_hf_dict(dtype_name), indent=2).encode()
    _write_atomically(Path(out_dir), outputs)


def _weight_files(state: dict[str, torch.Tensor], limit: int) -> dict[str, bytes | dict[str, torch.Tensor]]:
    """One model.safetensors, or shards of at most `limit` bytes (a larger tensor alone) with an index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    outputs: dict[str, bytes | dict[str, torch.Tensor]] = dict(zip(names, shards))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    outputs[INDEX_FILE] = json.dumps(index, indent=2).encode()
    return outputs


def _write_atomically(out_dir: Path, outputs: dict[str, bytes | dict[str, torch.Tensor]]) -> None:
    """Write every file under a temporary name, then rename them all; weight files of an earlier save that
    this one does not overwrite are removed (they would be read as part of it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = []
    try:
        for name, content in outputs.items():
            tmp = out_dir / f".{name}.tmp"
            temporary.append((tmp, out_dir / name))
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                save_file(content, tmp, metadata={"format": "pt"})
                os.chmod(tmp, _new_file_mode())  # safetensors creates its files 0600
    except BaseException:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
        raise
    for stale in (out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")):
        if stale.name not in outputs:
            stale.unlink(missing_ok=True)
    for tmp, final in temporary:
        os.replace(tmp, final)


def text_tensor_names(hf_dir: str | os.PathLike) -> set[str]:
    """The decoder tensors an HF directory holds, under our names (multimodal prefix dropped, per-expert MoE keys
    as their fused tensor), without reading any tensor; vision tensors are left out as load_pretrained skips
    them."""
    names = set()
    for path in _checkpoint_files(Path(hf_dir)):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith(_SKIPPED_PREFIXES):
                    continue
                name = "model." + key[len(_MULTIMODAL_PREFIX):] if key.startswith(_MULTIMODAL_PREFIX) else key
                per_expert = _PER_EXPERT_KEY.match(name)
                if per_expert:
                    base, _, proj = per_expert.groups()
                    name = f"{base}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
                names.add(name)
    return names


# Files of the source directory that the exported one gets from the model, not by copying.
_WEIGHT_FILE = re.compile(r"^(.*\.safetensors|.*\.safetensors\.index\.json|config\.json)$")


def _source_tensor_names(source_dir: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in _checkpoint_files(source_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names


def _check_source_config(config: Qwen35Config, source_config: dict, source: Path) -> None:
    if source_config.get("model_type") not in {"qwen3_5", "qwen3_5_moe"}:
        raise ValueError(f"{source}/config.json: model_type {source_config.get('model_type')!r} is not a published "
                         "(multimodal) Qwen3.5 layout ('qwen3_5' or 'qwen3_5_moe'); use the text layout")
    theirs = Qwen35Config.from_hf_dict(source_config, source=f"{source}/config.json")
    ours_hf, theirs_hf = config.to_hf_dict(), theirs.to_hf_dict()
    ignored = {"mtp_num_hidden_layers", "pad_token_id", "bos_token_id", "eos_token_id"}
    differ = sorted(k for k in set(ours_hf) | set(theirs_hf)
                    if k not in ignored and ours_hf.get(k) != theirs_hf.get(k))
    if differ:
        raise ValueError(f"{source}/config.json does not describe this checkpoint's model: "
                         + "; ".join(f"{k} = {theirs_hf.get(k)!r} there, {ours_hf.get(k)!r} in the checkpoint"
                                     for k in differ))


def save_published(model: Qwen35ForCausalLM, out_dir: str | os.PathLike, source_dir: str | os.PathLike,
                   dtype: torch.dtype | None = None) -> None:
    """Write `model` in the layout of the published checkpoint `source_dir` (a multimodal Qwen3.5 directory of the
    same architecture): its config.json (vision_config kept, dtype updated), `model.language_model.*` and
    `lm_head.weight` from the model, `model.visual.*` copied bit-identically from the source, the model's MTP
    head as `mtp.*` (experts per expert), every other file of the source (generation_config.json, tokenizer
    files, chat template, processor configs) copied. Text tensors are cast to `dtype` (default: the source's
    text dtype). One file or shards with an index as the source has (shards no larger than its largest)."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    source_config = json.loads((source_dir / "config.json").read_text())
    _check_source_config(model.config, source_config, source_dir)
    names = _source_tensor_names(source_dir)
    embed_key = _MULTIMODAL_PREFIX + "embed_tokens.weight"
    if embed_key not in names:
        raise ValueError(f"{source_dir}: no {embed_key} tensor: not a published-layout checkpoint")
    if model.config.mtp_num_hidden_layers == 0 and any(k.startswith(MTP_PREFIX) for k in names):
        raise ValueError(f"{source_dir} ships an MTP head (mtp.*) but the model has none (mtp_num_hidden_layers = 0):"
                         " the export would drop it")
    with safe_open(names[embed_key], framework="pt", device="cpu") as f:
        source_dtype = f.get_slice(embed_key).get_dtype()
    dtype = dtype or {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[source_dtype]
    dtype_name = str(dtype).removeprefix("torch.")

    state: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint_state(model).items():
        key = _MULTIMODAL_PREFIX + key.removeprefix("model.") if key.startswith("model.") else key
        state[key] = tensor.to(dtype)
    if any(_PER_EXPERT_KEY.match("model." + k.removeprefix(_MULTIMODAL_PREFIX)) for k in names
           if k.startswith(_MULTIMODAL_PREFIX)):
        state = split_per_expert(state, _MULTIMODAL_PREFIX)  # the source stores its decoder experts per expert
    for key, path in names.items():
        if key.startswith("model.visual."):
            with safe_open(path, framework="pt", device="cpu") as f:
                state[key] = f.get_tensor(key)

    files = _checkpoint_files(source_dir)
    limit = max(p.stat().st_size for p in files) if len(files) > 1 else sum(
        t.numel() * t.element_size() for t in state.values())
    outputs = _weight_files(state, limit)
    config = dict(source_config)
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            section["dtype"] = dtype_name
            section.pop("torch_dtype", None)
    config["text_config"]["mtp_num_hidden_layers"] = model.config.mtp_num_hidden_layers
    outputs["config.json"] = json.dumps(config, indent=2).encode()
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not _WEIGHT_FILE.match(path.name):
            outputs[path.name] = path.read_bytes()
    _write_atomically(out_dir, outputs)
