"""torch.library registration of the gated delta rule: one op signature, a torch and a Triton implementation.

Ops (namespace `qwen35`):
  chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                             use_qk_l2norm, backend) -> (o, final_state, residuals)
  chunk_gated_delta_rule_bwd(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                             backend, residuals) -> (dq, dk, dv, dg, dbeta, dh0)
  recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                             use_qk_l2norm, backend) -> (o, final_state)          (decoding; no autograd)
  recurrent_gated_delta_rule_(q, k, v, g, beta, state, scale, cu_seqlens, use_qk_l2norm, backend) -> o
                             (decoding, advances `state` in place; no autograd)
Optional outputs that were not asked for (final_state, dh0 without an initial state) are empty tensors, since
an op's outputs must be tensors. `residuals` is what the backend's backward reads instead of recomputing the
forward (Triton: gamma, the inverse Tm, W, the chunk entry states h, V_new, the q/k norms and the chunk table;
torch: the reference's own saved tensors), with
shapes that depend only on the input shapes (a packed row's are padded to a bound), so fake kernels can state them.

`backend` is an op argument so that a compiled graph keeps the choice: None runs Triton on CUDA tensors and the
torch reference elsewhere; "torch" / "triton" force one. One exception, `triton_chunk_supported`: 16-bit CUDA
inputs with a head size under 32 take the torch path under None and are refused by "triton". Triton on CPU
tensors runs under the Triton interpreter (tests): the Triton modules are loaded a second time with
TRITON_INTERPRET=1 for CPU tensors, so that it works whatever the environment was when the modules were first
imported (Triton decides between compiling and interpreting when a kernel is decorated, not when it is launched).

These are `torch.library.custom_op`s with register_fake + register_autograd (not `triton_op`, which does not
compile on CPU): under torch.compile they are opaque nodes, so the model compiles with fullgraph=True.
The Triton modules are imported lazily: the torch path needs no Triton.
"""

import contextlib
import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from . import reference

BACKENDS = (None, "torch", "triton")  # None: by device
_interpreted_modules = {}


def _triton_module(name: str, device: torch.device):
    """`kernels.gated_delta_rule.<name>`; for CPU tensors a copy of it whose kernels run in the interpreter."""
    module = importlib.import_module(f"{__package__}.{name}")
    if device.type != "cpu":
        return module
    if name not in _interpreted_modules:
        spec = importlib.util.spec_from_file_location(f"{module.__name__}_interpreted", module.__file__)
        interpreted = importlib.util.module_from_spec(spec)
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            spec.loader.exec_module(interpreted)
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        _interpreted_modules[name] = interpreted
    return _interpreted_modules[name]


def check_backend(backend) -> None:
    """The one backend vocabulary of the delta-rule entry points: None (by device), "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (None picks by device), got {backend!r}")


def _uses_triton(device: torch.device, backend: Optional[str]) -> bool:
    check_backend(backend)
    return backend == "triton" or (backend is None and device.type == "cuda")


# The chunked Triton backward faults (illegal memory access in `_wy_bwd_kernel`) for 16-bit inputs with head size
# 16 on an H100 with Triton 3.6, where tl.dot takes the tensor-core path; fp32 and 16-bit head sizes 32-128 ran
# clean (BENCHMARKS.md, GPU). Until that is understood, None (by device) sends such shapes to the torch path and "triton"
# refuses them. Qwen3.5's delta-rule heads are 128 wide.
MIN_16BIT_HEAD_DIM_CUDA = 32


def triton_chunk_supported(device_type: str, dtype: torch.dtype, head_k_dim: int, head_v_dim: int) -> bool:
    return not (device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and min(head_k_dim, head_v_dim) < MIN_16BIT_HEAD_DIM_CUDA)


def _chunk_uses_triton(q: Tensor, k: Tensor, v: Tensor, backend: Optional[str]) -> bool:
    if not _uses_triton(q.device, backend):
        return False
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if triton_chunk_supported(q.device.type, dtype, q.shape[-1], v.shape[-1]):
        return True
    if backend == "triton":
        raise ValueError(f"the Triton chunked gated delta rule does not take {dtype} inputs with head sizes "
                         f"K={q.shape[-1]}, V={v.shape[-1]} on CUDA (both must be >= {MIN_16BIT_HEAD_DIM_CUDA}: "
                         f"smaller ones fault on Hopper); use backend=None or 'torch', or fp32 inputs")
    return False


def _num_states(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """fp32, or float64 for float64 inputs (the reference's compute dtype; Triton states are fp32)."""
    return torch.promote_types(torch.float32, torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


def _final_state_or_empty(final_state: Optional[Tensor], q: Tensor) -> Tensor:
    return final_state.contiguous() if final_state is not None else q.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Chunked forward / backward


@torch.library.custom_op("qwen35::chunk_gated_delta_rule_fwd", mutates_args=())
def chunk_gated_delta_rule_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                               initial_state: Optional[Tensor], output_final_state: bool,
                               cu_seqlens: Optional[Tensor], use_qk_l2norm: bool,
                               backend: Optional[str]) -> tuple[Tensor, Tensor, list[Tensor]]:
    if _chunk_uses_triton(q, k, v, backend):
        impl = _triton_module("triton_chunk", q.device).chunk_gated_delta_rule_fwd
    else:
        impl = reference.chunk_gated_delta_rule_with_residuals
    o, final_state, residuals = impl(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                     use_qk_l2norm=use_qk_l2norm)
    # outputs must have the contiguous strides the fake kernels promise (the reference may return views)
    return o.contiguous(), _final_state_or_empty(final_state, q), [r.contiguous() for r in residuals]


def _residual_specs(q, k, v, cu_seqlens, use_qk_l2norm, backend):
    """(shape, dtype) of each residual the forward op returns for the backward op, the Triton kernels' or the
    reference's: static in the input shapes."""
    (B, T, H, K), (HV, V) = q.shape, v.shape[2:]
    num_seqs = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if _chunk_uses_triton(q, k, v, backend):
        triton_chunk = importlib.import_module(f"{__package__}.triton_chunk")
        return [(shape, spec_dtype or dtype)
                for shape, spec_dtype in triton_chunk.residual_shapes(B, T, H, HV, K, V, num_seqs, use_qk_l2norm)]
    return [(shape, _state_dtype(q, k, v)) for shape in reference.residual_shapes(B, T, H, HV, K, V, num_seqs)]


@chunk_gated_delta_rule_fwd.register_fake
def _chunk_gated_delta_rule_fwd_fake(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                     use_qk_l2norm, backend):
    o, final_state = _forward_fake(q, k, v, output_final_state, cu_seqlens)
    return o, final_state, [q.new_empty(shape, dtype=dtype)
                            for shape, dtype in _residual_specs(q, k, v, cu_seqlens, use_qk_l2norm, backend)]


def _forward_fake(q, k, v, output_final_state, cu_seqlens):
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    final_shape = (_num_states(q, cu_seqlens), HV, K, V) if output_final_state else (0,)
    dtype = _state_dtype(q, k, v) if output_final_state else torch.float32
    return v.new_empty(v.shape), q.new_empty(final_shape, dtype=dtype)


@torch.library.custom_op("qwen35::chunk_gated_delta_rule_bwd", mutates_args=())
def chunk_gated_delta_rule_bwd(do: Tensor, dht: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                               beta: Tensor, scale: float, initial_state: Optional[Tensor],
                               cu_seqlens: Optional[Tensor], use_qk_l2norm: bool, backend: Optional[str],
                               residuals: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients from the residuals the forward op returned: no backend recomputes its forward."""
    if _chunk_uses_triton(q, k, v, backend):
        grads = _triton_module("triton_chunk", q.device).chunk_gated_delta_rule_bwd(
            do, dht, q, k, v, g, beta, residuals, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
            use_qk_l2norm=use_qk_l2norm)
    else:
        grads = _reference_chunk_bwd(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm,
                                     residuals)
    *input_grads, dh0 = grads
    return (*(d.contiguous() for d in input_grads), _final_state_or_empty(dh0, q))


_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor))


@contextlib.contextmanager
def _autograd_enabled():
    """Autograd inside an op implementation. A custom op runs below the autograd dispatch keys (they are in the
    thread-local exclude set, so nothing would be recorded even with grad mode on); the torch backward lifts
    that exclusion to differentiate the reference forward, then restores it."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _reference_chunk_bwd(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, residuals):
    """Vector-Jacobian product of the torch reference: autograd through its replay on the forward's residuals
    (the chunked core is not recomputed; its hand-written backward reads the residuals)."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    if initial_state is not None:
        inputs.append(initial_state.detach().requires_grad_())
    with _autograd_enabled():
        o, final_state = reference.chunk_gated_delta_rule_replay(
            residuals, *inputs[:5], scale=scale, initial_state=inputs[5] if initial_state is not None else None,
            output_final_state=dht is not None, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
        outputs, output_grads = [o], [do]
        if dht is not None:
            outputs.append(final_state)
            output_grads.append(dht)
        grads = torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True)
    grads = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]
    return (*grads[:5], grads[5] if initial_state is not None else None)


@chunk_gated_delta_rule_bwd.register_fake
def _chunk_gated_delta_rule_bwd_fake(do, dht, q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                     use_qk_l2norm, backend, residuals):
    dh0 = initial_state.new_empty(initial_state.shape) if initial_state is not None \
        else q.new_empty(0, dtype=torch.float32)
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g, beta)) + (dh0,)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, backend = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, *output[2])
    ctx.scale, ctx.output_final_state, ctx.use_qk_l2norm, ctx.backend = (scale, output_final_state,
                                                                          use_qk_l2norm, backend)


def _backward(ctx, do, dht, _residual_grads):
    q, k, v, g, beta, initial_state, cu_seqlens, *residuals = ctx.saved_tensors
    if not ctx.output_final_state:
        dht = None
    dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(
        do, dht, q, k, v, g, beta, ctx.scale, initial_state, cu_seqlens, ctx.use_qk_l2norm, ctx.backend, residuals)
    return dq, dk, dv, dg, dbeta, None, dh0 if initial_state is not None else None, None, None, None, None


chunk_gated_delta_rule_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Recurrent (decoding)


@torch.library.custom_op("qwen35::recurrent_gated_delta_rule", mutates_args=())
def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                               initial_state: Optional[Tensor], output_final_state: bool,
                               cu_seqlens: Optional[Tensor], use_qk_l2norm: bool,
                               backend: Optional[str]) -> tuple[Tensor, Tensor]:
    if _uses_triton(q.device, backend):
        impl = _triton_module("triton_recurrent", q.device).recurrent_gated_delta_rule_fwd
    else:
        impl = reference.recurrent_gated_delta_rule
    o, final_state = impl(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    return o.contiguous(), _final_state_or_empty(final_state, q)


@recurrent_gated_delta_rule.register_fake
def _recurrent_gated_delta_rule_fake(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                     use_qk_l2norm, backend):
    return _forward_fake(q, k, v, output_final_state, cu_seqlens)


@torch.library.custom_op("qwen35::recurrent_gated_delta_rule_", mutates_args=("state",))
def recurrent_gated_delta_rule_(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                                scale: float, cu_seqlens: Optional[Tensor], use_qk_l2norm: bool,
                                backend: Optional[str]) -> Tensor:
    if _uses_triton(q.device, backend):
        o, _ = _triton_module("triton_recurrent", q.device).recurrent_gated_delta_rule_fwd(
            q, k, v, g, beta, scale=scale, initial_state=state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
            inplace_state=True)
        return o
    o, final_state = reference.recurrent_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm)
    state.copy_(final_state)
    return o


@recurrent_gated_delta_rule_.register_fake
def _recurrent_gated_delta_rule_inplace_fake(q, k, v, g, beta, state, scale, cu_seqlens, use_qk_l2norm, backend):
    return v.new_empty(v.shape)


# ---------------------------------------------------------------------------------------------------------------
# Python entry points (the public functions in `kernels` validate inputs and call these)


def chunk_gated_delta_rule_op(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None, use_qk_l2norm=False, backend=None):
    """Chunked gated delta rule through the registered op (differentiable). Returns (o, final_state or None).
    backend: None (by device), "torch" or "triton"; see the module docstring."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final_state, _ = torch.ops.qwen35.chunk_gated_delta_rule_fwd(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, backend)
    return o, final_state if output_final_state else None


def recurrent_gated_delta_rule_op(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                  cu_seqlens=None, use_qk_l2norm=False, backend=None):
    """Token-by-token gated delta rule through the registered op (forward only). Returns (o, final_state or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final_state = torch.ops.qwen35.recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm, backend)
    return o, final_state if output_final_state else None


def recurrent_gated_delta_rule_inplace(q, k, v, g, beta, state, scale=None, cu_seqlens=None, use_qk_l2norm=False,
                                       backend=None):
    """Decode step that advances `state` ([N, HV, K, V], fp32, contiguous) in place and returns o (forward only):
    no state is allocated per step."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.qwen35.recurrent_gated_delta_rule_(q, k, v, g, beta, state, scale, cu_seqlens, use_qk_l2norm,
                                                        backend)
