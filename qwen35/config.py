"""Qwen3.5 text-decoder configuration: one dataclass for dense and MoE, published flavors, HF config.json I/O.

Field names follow transformers' `Qwen3_5TextConfig` / `Qwen3_5MoeTextConfig` so that reading and writing
`config.json` is a rename-free copy. transformers' class defaults differ from the published checkpoints
(rope_theta, max_position_embeddings, tie_word_embeddings), so reading a config never falls back to them:
every architecture key must be present in the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)

TEXT_MODEL_TYPES = {"qwen3_5_text": False, "qwen3_5_moe_text": True}  # model_type -> is MoE
MULTIMODAL_MODEL_TYPES = {"qwen3_5": False, "qwen3_5_moe": True}

# Keys that define the architecture: a config.json without one of them is rejected rather than defaulted.
_REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "rms_norm_eps",
)
_REQUIRED_DENSE_KEYS = ("intermediate_size",)
_REQUIRED_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def hybrid_layer_types(num_layers: int, full_attention_interval: int = 4) -> list[str]:
    """Layer i is full attention iff (i + 1) % interval == 0 (3 Gated DeltaNet : 1 attention for interval 4)."""
    return [FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]


@dataclass
class Qwen35Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_value_heads: int
    vocab_size: int = 248320
    head_dim: int = 256
    intermediate_size: int | None = None  # dense SwiGLU width; None for MoE
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: list[str] | None = None  # None -> 3:1 hybrid pattern
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    # Multimodal RoPE split of rotary_dim / 2 over (t, h, w); no effect on text-only positions (all three are the
    # token index). None: absent from config.json (transformers then uses none either).
    mrope_section: list[int] | None = field(default_factory=lambda: [11, 11, 10])
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.001
    # Multi-token prediction head (`mtp.*`, qwen35/mtp.py): 0 builds none; published checkpoints ship 1.
    mtp_num_hidden_layers: int = 0
    # Training only (not written to config.json): weight of the MTP next-next-token loss; 0 = off.
    mtp_loss_weight: float = 0.0
    # special tokens (informational for the model; used by decoding)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = hybrid_layer_types(self.num_hidden_layers)
        self.layer_types = list(self.layer_types)
        if self.mrope_section is not None:
            self.mrope_section = list(self.mrope_section)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN causal conv: q, k and v (not z, a, b)."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(key: str, rule: str):
            raise ValueError(f"Qwen35Config.{key}: {rule} (got {getattr(self, key)!r})")

        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "linear_num_value_heads", "vocab_size", "head_dim", "linear_num_key_heads",
                    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads", f"must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            fail("linear_num_value_heads", f"must be a multiple of linear_num_key_heads={self.linear_num_key_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"must have num_hidden_layers={self.num_hidden_layers} entries, has "
                                f"{len(self.layer_types)}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            fail("layer_types", f"entries must be one of {LAYER_TYPES}, found {bad}")
        if not 0 < self.partial_rotary_factor <= 1:
            fail("partial_rotary_factor", "must be in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            fail("partial_rotary_factor", f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even and > 0")
        if self.mrope_section is None or sum(self.mrope_section) != self.rotary_dim // 2:
            # transformers saves and runs such configs (its own tester configs do): accept them.
            _warn_once(f"Qwen35Config.mrope_section = {self.mrope_section} does not split rotary_dim / 2 = "
                       f"{self.rotary_dim // 2}; it only matters for image/video positions, which this text "
                       "model does not use, so it is ignored")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.mtp_num_hidden_layers not in (0, 1):
            fail("mtp_num_hidden_layers", "must be 0 (no MTP head) or 1 (the published one-layer head)")
        if not self.mtp_loss_weight >= 0:
            fail("mtp_loss_weight", "must be >= 0 (0 = no MTP loss)")
        if self.mtp_loss_weight and not self.mtp_num_hidden_layers:
            fail("mtp_loss_weight", "needs an MTP head (mtp_num_hidden_layers = 1)")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' is supported")
        if self.attention_bias:
            fail("attention_bias", "biased attention projections are not supported (no Qwen3.5 checkpoint uses them)")
        if self.is_moe:
            if self.intermediate_size is not None:
                fail("intermediate_size", "must be None for an MoE config (every layer is an MoE block)")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
            for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(self, key) <= 0:
                    fail(key, "must be a positive integer for an MoE config")
            # torch._grouped_mm needs 16-byte aligned strides for every dtype we train in (moe_intermediate_size
            # is padded for it: GroupedExperts).
            if self.hidden_size % 8:
                fail("hidden_size", "must be a multiple of 8 for the grouped expert GEMM")
        else:
            if self.intermediate_size is None or self.intermediate_size <= 0:
                fail("intermediate_size", "must be a positive integer for a dense config")
            if self.num_experts_per_tok or self.moe_intermediate_size or self.shared_expert_intermediate_size:
                fail("num_experts", "is 0 (dense) but MoE sizes are set")

    # ------------------------------------------------------------------ flavors
    @classmethod
    def from_flavor(cls, name: str, **overrides) -> "Qwen35Config":
        if name not in FLAVORS:
            raise ValueError(f"unknown Qwen3.5 flavor {name!r}; known flavors: {', '.join(FLAVORS)}")
        return dataclasses.replace(FLAVORS[name], **overrides) if overrides else dataclasses.replace(FLAVORS[name])

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "Qwen35Config":
        """Read a transformers config dict: text-only (`qwen3_5_text`, `qwen3_5_moe_text`) or multimodal
        (`qwen3_5`, `qwen3_5_moe`, whose `text_config` holds the decoder and whose top-level
        `tie_word_embeddings` wins)."""
        model_type = hf.get("model_type")
        if model_type in MULTIMODAL_MODEL_TYPES:
            if not isinstance(hf.get("text_config"), dict):
                raise ValueError(f"{source}: model_type {model_type!r} needs a 'text_config' object")
            text = dict(hf["text_config"])
            text["tie_word_embeddings"] = hf.get("tie_word_embeddings", False)  # transformers: top level decides
            is_moe = MULTIMODAL_MODEL_TYPES[model_type]
        elif model_type in TEXT_MODEL_TYPES:
            text = hf
            is_moe = TEXT_MODEL_TYPES[model_type]
        else:
            known = sorted({**TEXT_MODEL_TYPES, **MULTIMODAL_MODEL_TYPES})
            raise ValueError(f"{source}: model_type {model_type!r} is not a Qwen3.5 model type ({', '.join(known)})")

        required = _REQUIRED_KEYS + (_REQUIRED_MOE_KEYS if is_moe else _REQUIRED_DENSE_KEYS)
        missing = [k for k in required if k not in text]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing} for model_type {model_type!r}")

        rope = text.get("rope_parameters") or {}
        if "rope_theta" not in rope and "rope_theta" not in text:
            raise ValueError(f"{source}: missing 'rope_parameters.rope_theta' (transformers' default 10000 differs "
                             "from every published checkpoint's 1e7, so it is never assumed)")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                             "(only 'default')")
        layer_types = text.get("layer_types")
        if layer_types is None:
            layer_types = hybrid_layer_types(text["num_hidden_layers"], text.get("full_attention_interval", 4))

        kwargs = {k: text[k] for k in required}
        kwargs.update(
            layer_types=layer_types,
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta"))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
            mrope_section=rope.get("mrope_section"),
        )
        for key in ("max_position_embeddings", "tie_word_embeddings", "attention_bias", "hidden_act",
                    "initializer_range", "router_aux_loss_coef", "mtp_num_hidden_layers", "pad_token_id",
                    "bos_token_id", "eos_token_id"):
            if key in text:
                kwargs[key] = text[key]
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "Qwen35Config":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(hf, source=str(path))

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """A text-only transformers config (`Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`)."""
        hf = {
            "architectures": ["Qwen3_5MoeForCausalLM" if self.is_moe else "Qwen3_5ForCausalLM"],
            "model_type": "qwen3_5_moe_text" if self.is_moe else "qwen3_5_text",
            "dtype": dtype,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
                **({} if self.mrope_section is None else {"mrope_section": self.mrope_section}),
                "mrope_interleaved": True,
            },
        }
        skip = {"rope_theta", "partial_rotary_factor", "mrope_section", "mtp_loss_weight"}
        skip |= {"intermediate_size"} if self.is_moe else set(_REQUIRED_MOE_KEYS) | {"router_aux_loss_coef"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                hf[f.name] = getattr(self, f.name)
        return hf


def _published(hidden, layers, heads, kv_heads, v_heads, tie, intermediate=None, moe=None) -> Qwen35Config:
    moe_kwargs = {}
    if moe is not None:
        experts, top_k, moe_inter, shared_inter = moe
        moe_kwargs = dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_inter,
                          shared_expert_intermediate_size=shared_inter)
    return Qwen35Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, linear_num_value_heads=v_heads, tie_word_embeddings=tie,
                        intermediate_size=intermediate, pad_token_id=None, eos_token_id=248044, **moe_kwargs)


# Published sizes: ../shared/reference/qwen35-architecture.md section 10.
FLAVORS: dict[str, Qwen35Config] = {
    "0.8B": _published(1024, 24, 8, 2, 16, True, intermediate=3584),
    "2B": _published(2048, 24, 8, 2, 16, True, intermediate=6144),
    "4B": _published(2560, 32, 16, 4, 32, True, intermediate=9216),
    "9B": _published(4096, 32, 16, 4, 32, False, intermediate=12288),
    "27B": _published(5120, 64, 24, 4, 48, False, intermediate=17408),
    "35B-A3B": _published(2048, 40, 16, 2, 32, False, moe=(256, 8, 512, 512)),
    "122B-A10B": _published(3072, 48, 32, 2, 64, False, moe=(256, 8, 1024, 1024)),
    "397B-A17B": _published(4096, 60, 32, 2, 64, False, moe=(512, 10, 1024, 1024)),
    # Small CPU flavors: every feature of the big ones (GQA, Hv > Hk, partial RoPE, 3:1 hybrid).
    "debug": Qwen35Config(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        intermediate_size=384, vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False,
        mrope_section=[2, 1, 1], eos_token_id=0,
    ),
    "debug-moe": Qwen35Config(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False, mrope_section=[2, 1, 1],
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        eos_token_id=0,
    ),
}
