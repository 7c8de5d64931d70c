"""MoE training loss = cross entropy + router_aux_loss_coef * load-balancing loss, through torchtitan's Trainer.

One training step of the debug-moe flavor is intercepted: the weights before the step, the batch, the loss the
trainer backpropagated and the router gradients it produced are compared with an independent computation on a
plain qwen35 model with the same weights and batch (cross entropy by torch, the balancing loss by
`return_aux_loss=True`, which is tested against transformers in test_model_parity.py).
"""

import pytest
import torch
import torch.nn.functional as F

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.moe import RouterStatistics
from test_train_helpers import debug_args, debug_assets, run_instrumented
from torchtitan_ext.loss import Qwen35Loss, global_balancing_share
from torchtitan_ext.model import TrainingOutput
from torchtitan_ext.train import load_config

ROUTER = ".mlp.gate.weight"
AC_WRAPPER = "_checkpoint_wrapped_module."  # in parameter names (not state-dict keys) under activation checkpointing


def _one_step(dump_folder, *overrides):
    """Run one step; return (weights before it, its input dict, labels, loss, {name: grad})."""
    debug_assets()
    config = load_config(debug_args(dump_folder, "--model.flavor", "debug-moe", "--training.steps", "1", *overrides))
    seen = {}

    def intercept(trainer):
        (model,) = trainer.model_parts
        forward_backward_step = trainer.forward_backward_step

        def intercepted(*, input_dict, labels, global_valid_tokens):
            seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            seen["inputs"] = {k: v.clone() for k, v in input_dict.items()}
            seen["labels"] = labels.clone()
            loss = forward_backward_step(input_dict=input_dict, labels=labels,
                                         global_valid_tokens=global_valid_tokens)
            seen["loss"] = loss.detach().clone()
            seen["grads"] = {n.replace(AC_WRAPPER, ""): p.grad.detach().clone()
                             for n, p in model.named_parameters() if n.endswith(ROUTER)}
            return loss

        trainer.forward_backward_step = intercepted

    run_instrumented(config, intercept)
    return seen


def _oracle(weights, inputs, labels, aux_coef):
    """(loss, router grads) of mean CE + aux_coef * balancing loss on a plain model with `weights`."""
    model = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug-moe"))
    model.load_state_dict(weights)
    logits, balance = model(inputs["input"], cu_seqlens=inputs["cu_seqlens"], return_aux_loss=True)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss = ce + aux_coef * balance
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if n.endswith(ROUTER)}


@pytest.mark.parametrize("ac_mode", ["none", "full"])
def test_moe_training_loss_adds_scaled_load_balancing_loss(tmp_path, ac_mode):
    seen = _one_step(tmp_path, "--activation_checkpoint.mode", ac_mode)
    coef = Qwen35Config.from_flavor("debug-moe").router_aux_loss_coef
    assert coef == 0.001
    expected, expected_grads = _oracle(seen["weights"], seen["inputs"], seen["labels"], coef)
    ce_only, ce_grads = _oracle(seen["weights"], seen["inputs"], seen["labels"], 0.0)
    # The aux term is large enough against the tolerance for the test to fail without it or mis-scaled (x2 / x0.5).
    assert expected - ce_only > 1e-3
    torch.testing.assert_close(seen["loss"], expected, rtol=0, atol=2e-5)
    assert len(seen["grads"]) == 4
    for name, grad in seen["grads"].items():
        # Same gradients (relative error <= 1e-5) while the aux term moves them by > 1e-3 (about 2e-3 here): a
        # missing or mis-scaled term would fail.
        assert (grad - expected_grads[name]).norm() <= 1e-5 * expected_grads[name].norm(), name
        assert (expected_grads[name] - ce_grads[name]).norm() > 1e-3 * expected_grads[name].norm(), name


def test_loss_weights_aux_by_share_of_global_tokens():
    """Microbatches / ranks: each adds coef * balancing loss * (its valid tokens / global valid tokens); without a
    token count the summed-loss convention scales it by the valid tokens. In one process the balancing loss is
    that of the statistics the model returned."""
    loss_fn = Qwen35Loss.Config().build()
    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[1, 2, -100, 3, 4, 5]])
    # 4 experts, top-2, 3 (layer, token) rows: 6 assignments
    stats = RouterStatistics(assignments=torch.tensor([3, 1, 0, 2]), prob_sum=torch.tensor([1.5, 0.5, 0.25, 0.75]),
                             rows=3)
    balance = 4 * (3 * 1.5 + 1 * 0.5 + 0 * 0.25 + 2 * 0.75) / 9  # E * sum_e (A_e / N) * (S_e / N)
    coef = 0.25
    ce_sum = F.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum")
    identity_head = torch.eye(10)  # the hidden states are the logits
    loss, _ = loss_fn(TrainingOutput(logits, identity_head, stats, coef), labels, torch.tensor(20))
    torch.testing.assert_close(loss, ce_sum / 20 + coef * balance * 5 / 20)
    loss, _ = loss_fn(TrainingOutput(logits, identity_head, stats, coef), labels)
    torch.testing.assert_close(loss, ce_sum + coef * balance * 5)
    dense, _ = loss_fn(TrainingOutput(logits, identity_head, None, 0.0), labels, torch.tensor(20))
    torch.testing.assert_close(dense, ce_sum / 20)
    eval_logits, _ = loss_fn(logits, labels, torch.tensor(20))  # eval mode: plain cross entropy of the logits
    torch.testing.assert_close(eval_logits, ce_sum / 20)


def test_router_statistics_give_the_load_balancing_loss():
    """The statistics the training model returns are those of its router logits: one process adds exactly
    load_balancing_loss (value and router gradients bit for bit)."""
    model = Qwen35ForCausalLM(Qwen35Config.from_flavor("debug-moe"))
    ids = torch.randint(0, 2048, (2, 16))
    logits, balance = model(ids, return_aux_loss=True)
    (balance_grad,) = torch.autograd.grad(balance, model.model.layers[0].mlp.gate.weight)
    logits, stats = model(ids, return_router_stats=True)
    assert stats.rows == 4 * 2 * 16 and stats.assignments.sum().item() == stats.rows * 2
    assert not stats.assignments.requires_grad and stats.prob_sum.requires_grad
    share, valid = global_balancing_share(stats, torch.tensor(32))
    assert torch.equal(share, balance) and valid.item() == 32
    (share_grad,) = torch.autograd.grad(share, model.model.layers[0].mlp.gate.weight)
    assert torch.equal(share_grad, balance_grad)


def test_training_mode_returns_hidden_states_and_eval_mode_logits():
    from torchtitan_ext.model_spec import model_registry

    for flavor in ("debug", "debug-moe"):
        model = model_registry(flavor).model.build()
        ids = torch.randint(0, 2048, (1, 8))
        out = model(ids)
        assert isinstance(out, TrainingOutput) and out.lm_head_weight is model.lm_head.weight
        assert out.hidden_states.shape == (1, 8, model.config.hidden_size)
        assert (out.router_stats is not None) == (flavor == "debug-moe")
        model.eval()
        assert isinstance(model(ids), torch.Tensor)


def test_moe_aux_loss_with_compiled_checkpointed_blocks(tmp_path):
    """torch.compile(fullgraph) per block + selective AC, in bf16 (the compiled MoE block needs it): the aux loss
    comes from the router logits the compiled blocks return. bf16 logits move the loss by ~1e-4, the aux term is
    ~2e-3, so the comparison is against an fp32 oracle with the same (bf16) weights at 5e-4."""
    seen = _one_step(tmp_path, "--compile.enable", "true", "--training.dtype", "bfloat16",
                     "--activation_checkpoint.mode", "selective")
    weights = {k: v.float() for k, v in seen["weights"].items()}
    coef = Qwen35Config.from_flavor("debug-moe").router_aux_loss_coef
    expected, _ = _oracle(weights, seen["inputs"], seen["labels"], coef)
    ce_only, _ = _oracle(weights, seen["inputs"], seen["labels"], 0.0)
    assert expected - ce_only > 1.5e-3
    torch.testing.assert_close(seen["loss"].float(), expected, rtol=0, atol=5e-4)
    assert all(grad.abs().max() > 0 for grad in seen["grads"].values())
