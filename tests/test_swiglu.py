"""The fused SwiGLU MLP (kernels/swiglu.py): bit for bit eager autograd, fewer saved activations."""


import pytest
import torch

import tiny
from preftune.kernels.swiglu import SwiGLU, disable_swiglu, enable_swiglu, swiglu_mlps


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_eager_autograd_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(3, 7, 48, generator=gen).to(dtype) for _ in range(3))
    a = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    b = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    eager = torch.nn.functional.silu(a[0]) * a[1]
    fused = SwiGLU.apply(*b)
    assert torch.equal(eager, fused)
    eager.backward(grad)
    fused.backward(grad)
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)


def test_a_model_with_swiglu_gives_the_same_loss_and_gradients_and_keeps_less(chat_tokenizer):
    """A whole tiny Llama: logits and every parameter gradient equal bit for bit; the saved
    activations shrink by one (tokens, intermediate) tensor per layer, silu(gate); disabling restores eager."""
    model = tiny.make_model(chat_tokenizer)
    ids = torch.randint(4, len(chat_tokenizer), (2, 11), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(set_to_none=True)
        logits, saved = saved_bytes(lambda: model(input_ids=ids).logits)
        logits.float().logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    plain_logits, plain_grads, plain_saved = run()
    mlps = enable_swiglu(model)
    layers = model.config.num_hidden_layers
    assert len(mlps) == layers and swiglu_mlps(model) == []  # enabled once: not found again
    logits, grads, saved = run()
    assert torch.equal(plain_logits, logits)
    for name, grad in grads.items():
        assert torch.equal(plain_grads[name], grad), name
    per_layer = ids.numel() * model.config.intermediate_size * 4  # one fp32 (B, T, I) tensor
    assert plain_saved - saved == layers * per_layer
    disable_swiglu(mlps)
    assert len(swiglu_mlps(model)) == layers and torch.equal(run()[0], plain_logits)


def test_other_mlps_are_left_alone():
    class GeluMLP(torch.nn.Module):  # same attribute names, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(4, 4)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) + self.up_proj(x))

    assert swiglu_mlps(torch.nn.Sequential(GeluMLP())) == []


def test_training_reports_swiglu_layers_and_matches_without(tiny_model_dir, tmp_path):
    """The memory plan turns it on by default (no checkpointing) and the run's numbers equal a run
    without it exactly; with gradient checkpointing it stays off."""
    from test_train import base_config, rows
    from preftune import train

    runs = {}
    for fused in (True, False):
        out = tmp_path / f"fused_{fused}"
        runs[fused] = train(base_config(tiny_model_dir, tmp_path, output_dir=str(out), max_steps=3,
                                        finetuning_type="full", fused_swiglu=fused))  # fmt: skip
        runs[fused]["rows"] = [{k: v for k, v in r.items() if "per_second" not in k} for r in rows(out)]
    assert runs[True]["fused_swiglu_layers"] == 2 and runs[False]["fused_swiglu_layers"] == 0
    assert runs[True]["rows"] == runs[False]["rows"]
    ckpt = train(base_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "ckpt"), max_steps=1,
                             gradient_checkpointing=True))  # fmt: skip
    assert ckpt["fused_swiglu_layers"] == 0
