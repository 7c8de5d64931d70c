"""The MTP head: forward vs an independent float64 implementation of the published design, training targets of
packed rows, checkpoint round trip (`mtp.*`, per-expert MoE keys)."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import qwen35
from qwen35.mtp import IGNORE_INDEX, mtp_hidden_states, mtp_loss_terms, mtp_targets
from tiny_configs import TINY_CONFIGS


def _mtp_model(name, seed=0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]
    model = qwen35.Qwen35ForCausalLM(type(config)(**{**config.__dict__, "mtp_num_hidden_layers": 1})).eval()
    with torch.no_grad():  # non-trivial (1 + w) norm weights, so a swapped norm shows
        for name_, p in model.named_parameters():
            if name_.endswith("norm.weight") or "norm_" in name_:
                p.normal_(0.0, 0.3)
    return model


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def _reference_mtp_logits(model, hidden, ids):
    """Published design, float64, from the checkpoint tensors: at t, fc([norm_e(embed(ids[t+1])) || norm_h(h_t)]),
    one gated-attention decoder layer (RoPE at position t) with the model's MLP, norm, shared lm_head."""
    c = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    p = "mtp.layers.0."
    eps = c.rms_norm_eps
    B, T = ids.shape
    n = T - 1
    x = torch.cat([_rms(W["model.embed_tokens.weight"][ids[:, 1:]], W["mtp.pre_fc_norm_embedding.weight"], eps),
                   _rms(hidden[:, :-1].double(), W["mtp.pre_fc_norm_hidden.weight"], eps)], -1)
    x = x @ W["mtp.fc.weight"].T
    # attention
    h = _rms(x, W[p + "input_layernorm.weight"], eps)
    D, Nh, Nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    qg = (h @ W[p + "self_attn.q_proj.weight"].T).view(B, n, Nh, 2 * D)
    q, gate = qg[..., :D], qg[..., D:].reshape(B, n, Nh * D)
    k = (h @ W[p + "self_attn.k_proj.weight"].T).view(B, n, Nkv, D)
    v = (h @ W[p + "self_attn.v_proj.weight"].T).view(B, n, Nkv, D)
    q, k = _rms(q, W[p + "self_attn.q_norm.weight"], eps), _rms(k, W[p + "self_attn.k_norm.weight"], eps)
    r = c.rotary_dim
    inv = 1.0 / c.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(t):
        a, b, rest = t[..., :r // 2], t[..., r // 2:r], t[..., r:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], -1)

    q, k = rope(q), rope(k)
    out = torch.zeros(B, n, Nh, D, dtype=torch.float64)
    for head in range(Nh):
        kv = head // (Nh // Nkv)
        scores = torch.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, head] = scores.softmax(-1) @ v[:, :, kv]
    x = x + (out.reshape(B, n, Nh * D) * torch.sigmoid(gate)) @ W[p + "self_attn.o_proj.weight"].T
    # MLP
    h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)

    def swiglu(y, g, u, d):
        return (torch.nn.functional.silu(y @ g.T) * (y @ u.T)) @ d.T

    if c.is_moe:
        m = p + "mlp."
        probs = (h @ W[m + "gate.weight"].T).softmax(-1)
        top_w, top_i = probs.topk(c.num_experts_per_tok, -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        I_moe = c.moe_intermediate_size
        routed = torch.zeros_like(h)
        for b in range(B):
            for t in range(n):
                for w, e in zip(top_w[b, t], top_i[b, t]):
                    gu = W[m + "experts.gate_up_proj"][e]
                    routed[b, t] += w * swiglu(h[b, t], gu[:I_moe], gu[I_moe:], W[m + "experts.down_proj"][e])
        shared = swiglu(h, W[m + "shared_expert.gate_proj.weight"], W[m + "shared_expert.up_proj.weight"],
                        W[m + "shared_expert.down_proj.weight"])
        x = x + routed + torch.sigmoid(h @ W[m + "shared_expert_gate.weight"].T) * shared
    else:
        x = x + swiglu(h, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"], W[p + "mlp.down_proj.weight"])
    lm_head = W["model.embed_tokens.weight"] if c.tie_word_embeddings else W["lm_head.weight"]
    return _rms(x, W["mtp.norm.weight"], eps) @ lm_head.T


@pytest.mark.parametrize("name", ["dense_untied_gqa2_hv2x", "moe_tied_hv2x"])
def test_mtp_forward_matches_independent_float64_implementation(name):
    model = _mtp_model(name)
    ids = torch.randint(2, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hidden = model(ids, output="logits_and_hidden")
        ours = model.lm_head(mtp_hidden_states(model, hidden, ids)[0])
    expected = _reference_mtp_logits(model, hidden, ids)
    assert ours.shape == (2, 10, model.config.vocab_size)
    assert (ours.double() - expected).abs().max().item() <= 1e-5


def test_mtp_targets_mask_predictions_across_packed_documents():
    labels = torch.tensor([[11, 12, 13, 14, 15, 16, IGNORE_INDEX, 18]])
    # documents [0, 3), [3, 8): row t predicts labels[t + 1], the label of position t + 1; row 2 would take the
    # second document's label for the first document's hidden state
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert mtp_targets(labels, cu_seqlens).tolist() == [[12, 13, IGNORE_INDEX, 15, 16, IGNORE_INDEX, 18]]
    assert mtp_targets(labels).tolist() == [[12, 13, 14, 15, 16, IGNORE_INDEX, 18]]


def test_mtp_loss_of_packed_row_equals_sum_over_separate_documents():
    model = _mtp_model("dense_untied_gqa2_hv2x")
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, model.config.vocab_size, (1, n + 1), generator=g) for n in (7, 9)]
    with torch.no_grad():
        separate = []
        for doc in docs:
            ids, labels = doc[:, :-1], doc[:, 1:]
            _, hidden = model(ids, output="logits_and_hidden")
            separate.append(mtp_loss_terms(hidden, ids, labels, None, model))
        ids = torch.cat([d[:, :-1] for d in docs], 1)
        labels = torch.cat([d[:, 1:] for d in docs], 1)
        cu_seqlens = torch.tensor([0, 7, 16], dtype=torch.int32)
        _, hidden = model(ids, cu_seqlens=cu_seqlens, output="logits_and_hidden")
        packed_sum, packed_count = mtp_loss_terms(hidden, ids, labels, cu_seqlens, model)
    # each document contributes its own n - 1 rows; the row pairing the first document's last hidden state
    # with the second document's first token is dropped
    assert packed_count.item() == sum(c.item() for _, c in separate) == 6 + 8
    assert abs(packed_sum.item() - sum(s.item() for s, _ in separate)) <= 1e-4


def test_checkpoint_round_trip_keeps_mtp_with_per_expert_keys(tmp_path, caplog):
    model = _mtp_model("moe_untied")
    qwen35.save_pretrained(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "mtp.layers.0.mlp.experts.7.down_proj.weight" in keys
    assert not any(k.startswith("mtp.") and k.endswith("gate_up_proj") for k in keys)
    loaded = qwen35.load_pretrained(tmp_path)
    assert loaded.config.mtp_num_hidden_layers == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # a config that declares the head with a checkpoint that has none (transformers' save_pretrained drops
    # mtp.*): loads without the head and says so
    text_only = tmp_path / "no_mtp"
    qwen35.save_pretrained(qwen35.Qwen35ForCausalLM(TINY_CONFIGS["moe_untied"]), text_only)
    config = json.loads((text_only / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    assert qwen35.load_pretrained(text_only).mtp is None
    assert "no mtp.* tensors" in caplog.text


def test_forward_outputs_logits_hidden_states_or_both():
    torch.manual_seed(0)
    model = qwen35.Qwen35ForCausalLM(TINY_CONFIGS["moe_untied"]).eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
        hidden = model(ids, output="hidden")
        last_logits, all_hidden, aux = model(ids, output="logits_and_hidden", num_logits_to_keep=2,
                                             return_aux_loss=True)
    assert hidden.shape == (2, 9, model.config.hidden_size) and torch.equal(all_hidden, hidden)
    assert torch.equal(model.lm_head(hidden), logits) and torch.equal(last_logits, logits[:, -2:])
    assert torch.equal(aux, model(ids, return_aux_loss=True)[1])
    with pytest.raises(ValueError, match="output = 'hidden_states'; expected one of logits, hidden"):
        model(ids, output="hidden_states")


@pytest.mark.parametrize("packed", [False, True])
def test_mtp_layer_router_rows_join_the_load_balancing_loss(packed):
    """Training output of an MoE model with an MTP head: the router statistics cover the main layers' rows and the
    MTP layer's, and give E * sum_e f_e * P_e over all of them, computed here from the router logits (float64).
    In a packed row, the MTP rows that join two documents (position t in one, token t+1 in the next) do not count:
    they have no target and exist or not depending on how documents are packed into rows and dealt to ranks."""
    from qwen35.moe import TopKRouter, balancing_loss_share
    from torchtitan_ext.model import Qwen35TitanModel

    config = qwen35.Qwen35Config.from_flavor("debug-moe", mtp_num_hidden_layers=1, mtp_loss_weight=0.5)
    torch.manual_seed(0)
    model = Qwen35TitanModel(Qwen35TitanModel.Config(flavor="debug-moe", architecture=config))
    router_logits = []
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(lambda m, args, out: router_logits.append(out[0].detach().double()))
    batch, cu_seqlens = (1, torch.tensor([0, 5, 11, 16])) if packed else (2, None)
    ids = torch.randint(0, config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    stats = model(ids, cu_seqlens=cu_seqlens).router_stats
    assert len(router_logits) == config.num_hidden_layers + 1  # every main layer and the MTP layer are MoE
    mtp_rows = router_logits[-1]
    if packed:  # MTP rows 4 and 10: positions 4 and 10 end a document
        mtp_rows = mtp_rows[[t for t in range(15) if t not in (4, 10)]]
    rows = torch.cat([*router_logits[:-1], mtp_rows])
    assert stats.rows == len(rows) == config.num_hidden_layers * batch * 16 + batch * 15 - (2 if packed else 0)
    probs = torch.softmax(rows, dim=-1)
    chosen = probs.topk(config.num_experts_per_tok, dim=-1).indices
    counts = torch.stack([(chosen == e).sum() for e in range(config.num_experts)])
    assert torch.equal(stats.assignments, counts)
    expected = config.num_experts * sum(counts[e] / len(rows) * probs[:, e].mean() for e in range(config.num_experts))
    share = balancing_loss_share(stats.prob_sum, stats.assignments, stats.rows)
    assert abs(share.item() - expected.item()) <= 1e-6


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_covers_the_mtp_layer_and_keeps_gradients(mode):
    """The MTP head's decoder layer is checkpointed like the blocks (its activations are a block's), and the
    main + MTP loss has the gradients of the unwrapped model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from parallelism.activation_checkpoint import apply_activation_checkpointing

    ids = torch.randint(2, TINY_CONFIGS["moe_untied"].vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = _mtp_model("moe_untied").train()
        if checkpointed:
            apply_activation_checkpointing(model, mode)
            assert all(isinstance(layer, CheckpointWrapper) for layer in model.decoder_layers())
        logits, hidden = model(ids, output="logits_and_hidden")
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        mtp_sum, count = mtp_loss_terms(hidden, ids, ids, None, model)
        (loss + 0.3 * mtp_sum / count).backward()
        grads.append({name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(name.startswith("mtp.layers") for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
