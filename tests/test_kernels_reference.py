"""Torch reference kernels: gated delta rule (chunked and recurrent) and causal depthwise conv.

Oracles: the float64 per-token loop in delta_rule_oracle.py, transformers' torch fallbacks, and an explicit
per-token loop for the conv. Shapes stay tiny (the whole file runs in seconds on 2 CPU cores).
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from delta_rule_oracle import naive_gated_delta_rule_f64

RULES = {"chunk": kernels.chunk_gated_delta_rule, "recurrent": kernels.recurrent_gated_delta_rule}


def _inputs(B, T, H, HV, K, V, n_states, l2norm, seed=0, dtype=torch.float32):
    """Well-conditioned inputs: keys of norm <= 1 without l2norm (the rule is unstable for |k|^2 beta > 2)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2norm:
        k = F.normalize(k, dim=-1) * torch.rand(B, T, H, 1, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2)  # log decay in (-inf, 0), mostly near 0
    beta = torch.rand(B, T, HV, generator=gen)
    s0 = torch.randn(n_states, HV, K, V, generator=gen) * 0.5
    return [x.to(dtype) for x in (q, k, v, g, beta)], s0.to(dtype)


# (B, T, H, HV, K, V, cu_seqlens, with initial state, use_qk_l2norm, scale)
CASES = {
    "T100-l2-gva": (2, 100, 2, 4, 16, 8, None, True, True, None),
    "T130-nol2": (1, 130, 2, 2, 8, 16, None, False, False, 0.5),
    "T64-exact-chunk": (2, 64, 1, 2, 8, 8, None, True, True, None),
    "varlen-gva-state": (1, 161, 1, 2, 16, 8, [0, 37, 50, 130, 161], True, True, None),
    "varlen-empty-seq": (1, 75, 2, 2, 8, 8, [0, 7, 7, 75], False, False, None),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES)
def test_delta_rule_matches_f64_oracle(rule, case):
    B, T, H, HV, K, V, cu, with_state, l2norm, scale = CASES[case]
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    n_states = B if cu is None else len(cu) - 1
    inputs, s0 = _inputs(B, T, H, HV, K, V, n_states, l2norm)
    leaves = [x.requires_grad_() for x in inputs] + ([s0.requires_grad_()] if with_state else [])
    kwargs = dict(scale=scale, initial_state=s0 if with_state else None, cu_seqlens=cu_seqlens, use_qk_l2norm=l2norm)

    o, state = RULES[rule](*inputs, output_final_state=True, **kwargs)
    o_ref, state_ref = naive_gated_delta_rule_f64(*inputs, **kwargs)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert o.shape == (B, T, HV, V) and state.shape == (n_states, HV, K, V)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-5, rtol=0)

    gen = torch.Generator().manual_seed(1)
    w_o, w_s = torch.randn(o.shape, generator=gen), torch.randn(state.shape, generator=gen)
    grads = torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (state_ref * w_s).sum(), leaves)
    for name, got, want in zip("q k v g beta initial_state".split(), grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"d{name}: {m}")


def test_chunked_equals_recurrent_long_sequence_strong_decay():
    # Several chunks, and decays strong enough that exp(gamma) underflows inside a chunk (no inf / nan).
    (q, k, v, g, beta), s0 = _inputs(2, 300, 2, 4, 16, 16, 2, l2norm=True, seed=3)
    g = g * torch.linspace(0.1, 40, 300)[None, :, None]
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]
    gen = torch.Generator().manual_seed(2)
    w_o, w_s = torch.randn(v.shape, generator=gen), torch.randn(s0.shape, generator=gen)
    results = []
    for rule in RULES.values():
        o, state = rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
        results.append((o, state, torch.autograd.grad((o * w_o).sum() + (state * w_s).sum(), leaves)))
    (o, state, grads), (o_rec, state_rec, grads_rec) = results
    assert torch.isfinite(o).all() and all(torch.isfinite(d).all() for d in grads)
    torch.testing.assert_close(o, o_rec, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, state_rec, atol=1e-5, rtol=0)
    for got, want in zip(grads, grads_rec):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_varlen_equals_separate_sequences():
    (q, k, v, g, beta), s0 = _inputs(1, 161, 2, 4, 8, 8, 4, l2norm=True, seed=4)
    cu = [0, 37, 50, 130, 161]
    o, state = kernels.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                              cu_seqlens=torch.tensor(cu), use_qk_l2norm=True)
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        o_n, state_n = kernels.chunk_gated_delta_rule(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=s0[n:n + 1],
            output_final_state=True, use_qk_l2norm=True)
        torch.testing.assert_close(o[:, s:e], o_n, atol=1e-6, rtol=0)
        torch.testing.assert_close(state[n:n + 1], state_n, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_delta_rule_matches_transformers(rule):
    modeling = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    hf = {"chunk": modeling.torch_chunk_gated_delta_rule,
          "recurrent": modeling.torch_recurrent_gated_delta_rule}[rule]
    hf = getattr(hf, "__wrapped__", hf)  # the undecorated torch code, whatever kernel packages are importable
    (q, k, v, g, beta), s0 = _inputs(2, 150, 2, 4, 16, 32, 2, l2norm=True, seed=5)
    o, state = RULES[rule](q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    o_hf, state_hf = hf(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(o, o_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, state_hf, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_delta_rule_dtypes(rule):
    (q, k, v, g, beta), s0 = _inputs(1, 70, 1, 2, 8, 8, 1, l2norm=True, seed=6)
    o32, s32 = RULES[rule](q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    half = [x.bfloat16() for x in (q, k, v)] + [g, beta]
    o16, s16 = RULES[rule](*half, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    torch.testing.assert_close(o16.float(), o32, atol=0.05, rtol=0.05)
    o64, s64 = RULES[rule](*(x.double() for x in (q, k, v, g, beta)), initial_state=s0.double(),
                           output_final_state=True, use_qk_l2norm=True)
    assert o64.dtype == torch.float64 and s64.dtype == torch.float64
    o_ref, s_ref = naive_gated_delta_rule_f64(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    torch.testing.assert_close(o64, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(s64, s_ref, atol=1e-12, rtol=0)
    assert RULES[rule](q, k, v, g, beta)[1] is None


@pytest.mark.parametrize("rule", RULES)
def test_delta_rule_ignores_autocast(rule):
    """Under torch.autocast (mixed precision without FSDP) the reference still computes in fp32: outputs and
    gradients equal those without autocast (autocast would otherwise run its matmuls, the state's too, in bf16)."""
    (q, k, v, g, beta), s0 = _inputs(1, 100, 2, 4, 16, 16, 1, l2norm=True, seed=9)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]

    def outputs_and_grads():
        o, state = RULES[rule](*inputs[:5], initial_state=inputs[5], output_final_state=True, use_qk_l2norm=True)
        if rule == "recurrent":  # decoding: forward only
            return [o, state]
        return [o, state, *torch.autograd.grad(o.square().sum() + state.sum(), inputs)]

    want = outputs_and_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads()
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_delta_rule_accepts_strided_inputs(rule):
    # As the model produces them: q, k, v split from one fused projection, g / beta from a transposed layout.
    (q, k, v, g, beta), s0 = _inputs(2, 128, 2, 4, 8, 8, 2, l2norm=False, seed=8)  # no padding copy
    fused = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
    q_s, k_s, v_s = (x.unflatten(-1, (-1, 8)) for x in fused.split([16, 16, 32], dim=-1))
    g_s, beta_s = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (g, beta))
    assert not any(x.is_contiguous() for x in (q_s, k_s, v_s, g_s, beta_s))
    s0_s = s0.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = RULES[rule](q_s, k_s, v_s, g_s, beta_s, initial_state=s0_s, output_final_state=True)
    # Against the oracle with a tolerance: strided and contiguous inputs may take different BLAS paths, whose
    # float32 results legitimately differ in the last bits.
    want = naive_gated_delta_rule_f64(q, k, v, g, beta, initial_state=s0)
    for got_part, want_part in zip(got, want):
        assert got_part.dtype == torch.float32
        torch.testing.assert_close(got_part.double(), want_part, atol=1e-5, rtol=0)


def test_decode_steps_continue_a_prefill():
    (q, k, v, g, beta), _ = _inputs(2, 40, 2, 4, 8, 8, 2, l2norm=True, seed=7)
    o_full, s_full = kernels.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True)
    _, state = kernels.chunk_gated_delta_rule(*(x[:, :33] for x in (q, k, v, g, beta)), output_final_state=True,
                                              use_qk_l2norm=True)
    for t in range(33, 40):
        o_t, state = kernels.recurrent_gated_delta_rule(*(x[:, t:t + 1] for x in (q, k, v, g, beta)),
                                                        initial_state=state, output_final_state=True,
                                                        use_qk_l2norm=True)
        torch.testing.assert_close(o_t, o_full[:, t:t + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(state, s_full, atol=1e-5, rtol=0)


def test_delta_rule_errors():
    (q, k, v, g, beta), s0 = _inputs(2, 10, 2, 4, 8, 8, 2, l2norm=True)
    rule = kernels.chunk_gated_delta_rule
    with pytest.raises(ValueError, match="multiple of"):
        rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="B must be 1"):
        rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"initial_state must be \[N, HV, K, V\]"):
        rule(q, k, v, g, beta, initial_state=s0[:1])
    with pytest.raises(ValueError, match="initial_state"):
        rule(q[:1], k[:1], v[:1], g[:1], beta[:1], initial_state=s0, cu_seqlens=torch.tensor([0, 4, 6, 10]),
             output_final_state=True)
    with pytest.raises(ValueError, match="g must be"):
        rule(q, k, v, g[:, :, :2], beta)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing from 0 to T=10"):
        rule(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32/int64"):
        rule(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0.0, 10.0]))
    for backend in ("cuda", "auto"):  # one vocabulary: None, not "auto", picks by device
        with pytest.raises(ValueError, match=r"backend must be one of \(None, 'torch', 'triton'\)"):
            rule(q, k, v, g, beta, backend=backend)
    o, _ = rule(q, k, v, g, beta, backend="torch")
    assert o.shape == v.shape
    o_triton, _ = rule(q, k, v, g, beta, backend="triton")  # the Triton kernels, interpreted on CPU
    torch.testing.assert_close(o_triton, o, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- causal conv


def _conv_loop(x, weight, initial_state=None, cu_seqlens=None, activation="silu"):
    """Explicit per-token float64 loop over a rolling window of the last W inputs (differentiable)."""
    B, T, C = x.shape
    W = weight.shape[1]
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    ys, finals = [[None] * T for _ in range(B)], []
    for n, (b, s, e) in enumerate(spans):
        window = x.new_zeros(C, W, dtype=torch.float64) if initial_state is None else initial_state[n].double()
        for t in range(s, e):
            window = torch.cat([window[:, 1:], x[b, t].double()[:, None]], dim=1)
            y = (window * weight.double()).sum(1)
            ys[b][t] = F.silu(y) if activation == "silu" else y
        finals.append(window)
    return torch.stack([torch.stack(row) for row in ys]), torch.stack(finals)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("cu", [None, [0, 2, 2, 9, 10, 17]], ids=["batched", "varlen"])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv_matches_loop(activation, cu, with_state):
    B, T, C, W = (3, 11, 6, 4) if cu is None else (1, 17, 6, 4)
    n = B if cu is None else len(cu) - 1
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(B, T, C, generator=gen, requires_grad=True), torch.randn(C, W, generator=gen)
    weight.requires_grad_()
    s0 = torch.randn(n, C, W, generator=gen, requires_grad=True) if with_state else None
    y, final = kernels.causal_conv1d(x, weight, initial_state=s0, output_final_state=True,
                                     cu_seqlens=None if cu is None else torch.tensor(cu), activation=activation)
    y_ref, final_ref = _conv_loop(x, weight, s0, cu, activation)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(final.double(), final_ref, atol=0, rtol=0)
    leaves = [x, weight] + ([s0] if with_state else [])
    w_y = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad((y * w_y).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * w_y).sum(), leaves)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_causal_conv_update_steps_equal_full_conv():
    B, T, C, W = 2, 9, 5, 4
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(B, T, C, generator=gen), torch.randn(C, W, generator=gen)
    s0 = torch.randn(B, C, W, generator=gen)
    y_full, final_full = kernels.causal_conv1d(x, weight, initial_state=s0, output_final_state=True)
    y_pre, state = kernels.causal_conv1d(x[:, :2], weight, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(y_pre, y_full[:, :2], atol=1e-6, rtol=0)
    state_ptr = state.data_ptr()
    for t in range(2, T):
        y_t = kernels.causal_conv1d_update(x[:, t], state, weight)
        assert y_t.shape == (B, C) and state.data_ptr() == state_ptr
        torch.testing.assert_close(y_t, y_full[:, t], atol=1e-6, rtol=0)
    torch.testing.assert_close(state, final_full, atol=0, rtol=0)


@pytest.mark.parametrize("cu", [None, [0, 3, 9]], ids=["batched", "varlen"])
def test_causal_conv_accepts_strided_inputs(cu):
    B = 2 if cu is None else 1
    gen = torch.Generator().manual_seed(2)
    fused, weight = torch.randn(B, 9, 10, generator=gen), torch.randn(6, 4, generator=gen)
    x = fused[..., 2:8]
    s0 = torch.randn(B if cu is None else 2, 4, 6, generator=gen).transpose(1, 2)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    want = kernels.causal_conv1d(x.contiguous(), weight, initial_state=s0.contiguous(), output_final_state=True,
                                 cu_seqlens=cu_seqlens)
    got = kernels.causal_conv1d(x, weight, initial_state=s0, output_final_state=True, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_causal_conv_short_prompt_state_is_zero_padded_and_dtypes():
    C, W = 4, 4
    x = torch.randn(1, 2, C, dtype=torch.bfloat16)
    weight = torch.randn(C, W)
    y, final = kernels.causal_conv1d(x, weight, output_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16 and final.shape == (1, C, W)
    assert (final[..., :2] == 0).all() and torch.equal(final[0, :, 2:], x[0].T)
    assert kernels.causal_conv1d(x, weight)[1] is None


def test_causal_conv_errors():
    x, weight = torch.randn(2, 5, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight must be \[C=4, W\]"):
        kernels.causal_conv1d(x, weight[None])
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.causal_conv1d(x, weight, activation="gelu")
    with pytest.raises(ValueError, match="B must be 1"):
        kernels.causal_conv1d(x, weight, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"initial_state must be \[N, C, W\] = \(2, 4, 3\)"):
        kernels.causal_conv1d(x, weight, initial_state=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"conv_state must be \[B, C, W\]"):
        kernels.causal_conv1d_update(x[:, 0], torch.zeros(2, 4, 2), weight)
    with pytest.raises(ValueError, match=r"x must be \[B, C\]"):
        kernels.causal_conv1d_update(x, torch.zeros(2, 4, 3), weight)
