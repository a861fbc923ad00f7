"""What a block keeps for backward matches the formulas in runtime/model.py's docstring
(the memory cost model is written against them), and every AC mode trains identically."""

import pytest
import torch

from cost_models.specs import ModelSpec
from runtime.model import Transformer, init_weights
from runtime.parallelize import apply_ac
from runtime.saved_tensors import saved_bytes_per_block

SPEC = ModelSpec("m", vocab_size=128, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, rope_theta=1e4)


def expected(mode: str, S: int, tp: int, cp: int, b: int = 4) -> int:
    d, dq, dkv, f, H = SPEC.dim, SPEC.q_dim, SPEC.kv_dim, SPEC.ffn_dim, SPEC.n_heads
    T = S // cp
    if mode == "full":
        return b * T * d // tp
    if mode == "selective":
        wo_w2 = 2 * d  # saved before the reduce-scatter under TP
        return T * (b * (d // tp + (dq + 2 * dkv) // tp + dq // tp + wo_w2 + 2 * f // tp) + 4 * H // tp)
    attention = 2 * T * dq // tp + (2 * S * dkv // tp if cp > 1 else 2 * T * dkv // tp)
    return b * (2 * T * d // tp + 2 * T * d + attention + 4 * T * f // tp) + 4 * T * (2 + H) // tp


@pytest.mark.parametrize("tp, cp", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_saved_bytes_per_block_match_the_documented_formulas(mode, tp, cp):
    assert saved_bytes_per_block(SPEC, mode, seq_len=64, tp=tp, cp=cp) == expected(mode, 64, tp, cp)


def _loss_and_grads(modes, dtype=torch.float64):
    torch.manual_seed(0)
    model = Transformer(SPEC).to(dtype)
    init_weights(model, seed=3)
    apply_ac(model, modes)
    tokens = torch.randint(0, SPEC.vocab_size, (2, 33))
    hidden = model(tokens[:, :-1], torch.arange(32))
    loss = torch.nn.functional.cross_entropy(model.output(hidden).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad for name, p in model.named_parameters()}
    return loss.detach(), grads


def test_every_ac_mode_gives_the_same_loss_and_gradients():
    base_loss, base_grads = _loss_and_grads(("none", "none"))
    for modes in [("selective", "selective"), ("full", "full"), ("full", "selective"), ("none", "full")]:
        loss, grads = _loss_and_grads(modes)
        assert torch.equal(loss, base_loss), modes
        assert grads.keys() == base_grads.keys()
        worst = max((grads[k] - base_grads[k]).abs().max().item() for k in grads)
        assert worst < 1e-12, (modes, worst)
