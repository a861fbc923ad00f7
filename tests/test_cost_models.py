"""Cost models against numbers derived by hand (independently of the code's formulas)."""

import json

import pytest

from cost_models import flops
from cost_models.comm import collective_link_bytes, group_tier
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.memory import estimate_memory, layer_memory, memory_terms
from cost_models.specs import (GPU_PRESETS, MODEL_PRESETS, ClusterSpec, SpecError, model_from_hf_config,
                               resolve_gpu, resolve_model)
from cost_models.step import estimate_step

L8B = MODEL_PRESETS["llama3-8b"]


def test_llama3_8b_parameter_count():
    # embedding 128256*4096 twice (untied) + 32 x (attn 4096*(4096+1024+1024+4096) + ffn 3*4096*14336
    # + 2 norms 4096) + final norm 4096
    per_layer = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
    expected = 2 * 128256 * 4096 + 32 * per_layer + 4096
    assert expected == 8_030_261_248
    assert L8B.num_params == expected


@pytest.mark.parametrize("name, billions", [("llama3.2-1b", 1.24), ("llama3.2-3b", 3.21),
                                            ("llama3-70b", 70.55), ("llama3.1-405b", 405.85)])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    assert MODEL_PRESETS[name].num_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_flops_per_token_llama3_8b_at_8k():
    # torchtitan convention: 6 x (params - embedding) + 12 x layers x heads x head_dim x seq
    non_embedding = 8_030_261_248 - 128256 * 4096
    expected = 6 * non_embedding + 12 * 32 * 32 * 128 * 8192
    assert flops.model_flops_per_token(L8B, 8192) == expected == 57_914_449_920


def test_executed_attention_flops_halve_under_causal_mask():
    full = flops.layer_forward_flops(L8B, 8192, 8192, cp=1, tp=1, causal_skip=False)
    causal = flops.layer_forward_flops(L8B, 8192, 8192, cp=1, tp=1)
    assert causal.attention == pytest.approx(full.attention / 2)
    # QK^T and PV: 2 matmuls x 2 FLOPs x S_q x S_k x d_q, halved by the mask.
    assert causal.attention == pytest.approx(2 * 2 * 8192 * 8192 * 4096 / 2)
    assert causal.linear == pytest.approx(2 * 8192 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336))


def test_adamw_state_bytes_under_fsdp8():
    cfg = TrainConfig(Parallelism(dp_shard=8), seq_len=8192, ac=ACPolicy.uniform("full", 32))
    est = estimate_memory(L8B, cfg)
    assert est.breakdown_bytes["optimizer"] == pytest.approx(8 * 8_030_261_248 / 8)
    assert est.breakdown_bytes["params"] == pytest.approx(4 * 8_030_261_248 / 8)


def test_layer_activation_bytes_no_ac_by_hand():
    tokens, d, dkv, f, heads = 8192, 4096, 1024, 14336, 32
    cfg = TrainConfig(Parallelism(dp_shard=8), seq_len=tokens)
    saved = layer_memory(L8B, cfg, resolve_executor("autoplan")).saved
    # norm in/out; q and the attention output (wo's input is a view of it); k and v at
    # kv-head width (SDPA's native GQA); four SwiGLU tensors
    bf16 = 2 * tokens * (2 * d + 2 * d + 2 * d + 2 * dkv + 4 * f)
    fp32 = 4 * tokens * (2 + heads)  # two rstd + attention lse
    assert saved["none"] == pytest.approx(bf16 + fp32)
    assert saved["full"] == pytest.approx(2 * tokens * d)


def test_tp_and_cp_shrink_activations_as_derived():
    base = TrainConfig(Parallelism(), seq_len=16384)
    cp = TrainConfig(Parallelism(cp=2), seq_len=16384)
    tp = TrainConfig(Parallelism(tp=2), seq_len=16384)
    ex = resolve_executor("autoplan")
    assert layer_memory(L8B, cp, ex).saved["full"] == pytest.approx(layer_memory(L8B, base, ex).saved["full"] / 2)
    assert layer_memory(L8B, tp, ex).saved["full"] == pytest.approx(layer_memory(L8B, base, ex).saved["full"] / 2)


def test_full_logits_dominate_torchtitan_at_long_context():
    # 32k tokens per GPU x 128256 vocab: log_softmax output + two fp32 grads = 12 bytes/elem.
    cfg = TrainConfig(Parallelism(dp_shard=8, cp=8), seq_len=262144, ac=ACPolicy.uniform("full", 32))
    terms = memory_terms(L8B, cfg, "torchtitan")
    assert terms.loss_logits_bytes == pytest.approx(12 * 32768 * 128256)
    # Allocator, by hand: forward frees the fp32 copy (4 B/elem) and, after ``del pred``,
    # the adjacent bf16 logits (2): backward's first fp32 grad reuses 4 of those 6, the
    # second fp32 grad fits nowhere, so 2 B/elem stay reserved but unused (a multiple of
    # 2 MiB here: 2 x 32768 x 128256 = 2^24 x 501).
    assert terms.loss_stranded_bytes == 2 * 32768 * 128256
    assert terms.loss_working_bytes == pytest.approx(14 * 32768 * 128256)
    chunked = memory_terms(L8B, cfg, "autoplan")
    # one 4096-token chunk + the output projection's bf16 grad accumulated over chunks
    # + d(hidden) accumulated over the chunks (32768 tokens x d 4096, bf16)
    assert chunked.loss_logits_bytes == pytest.approx(12 * 4096 * 128256 + 2 * 128256 * 4096 + 2 * 32768 * 4096)


def test_ring_collective_volumes():
    assert collective_link_bytes("all_gather", 800.0, 8) == pytest.approx(700.0)
    assert collective_link_bytes("all_reduce", 800.0, 8) == pytest.approx(1400.0)
    assert collective_link_bytes("reduce_scatter", 800.0, 1) == 0.0


def test_bandwidth_tier_follows_mesh_order():
    cluster = ClusterSpec(resolve_gpu("h100"), 64)
    par = Parallelism(dp_shard=8, tp=8)
    inner_tp = ("dp_replicate", "dp_shard", "cp", "tp")
    inner_dp = ("dp_replicate", "cp", "tp", "dp_shard")
    assert group_tier(cluster, par, inner_tp, ("tp",)) == "intra-node"
    assert group_tier(cluster, par, inner_tp, ("dp_shard",)) == "inter-node"
    assert group_tier(cluster, par, inner_dp, ("dp_shard",)) == "intra-node"
    assert group_tier(cluster, par, inner_dp, ("tp",)) == "inter-node"


def test_mfu_is_model_flops_over_peak():
    cfg = TrainConfig(Parallelism(dp_shard=8), seq_len=8192, ac=ACPolicy.uniform("full", 32))
    est = estimate_step(L8B, ClusterSpec(resolve_gpu("h100"), 8), cfg)
    tokens_per_gpu_per_s = 8192 / est.step_time_s
    assert est.tokens_per_second_per_gpu == pytest.approx(tokens_per_gpu_per_s)
    assert est.mfu == pytest.approx(57_914_449_920 * tokens_per_gpu_per_s / 989e12)
    assert 0.2 < est.mfu < 0.7


def test_gpu_presets_and_aliases():
    assert resolve_gpu("H100").name == "h100-sxm-80gb"
    assert resolve_gpu(None).name == "h100-sxm-80gb"
    assert resolve_gpu("a100").name == "a100-sxm-80gb"
    for name in ("h100-sxm-80gb", "h100-pcie-80gb", "h200", "a100-sxm-80gb", "a100-40gb", "b200", "l40s", "mi300x"):
        assert name in GPU_PRESETS
    with pytest.raises(SpecError, match="--gpu"):
        resolve_gpu("tpu-v5")


def test_hf_config_loading(tmp_path):
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": False, "rope_theta": 500000.0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = resolve_model(str(path))
    assert spec.num_params == L8B.num_params
    del config["num_attention_heads"]
    path.write_text(json.dumps(config))
    with pytest.raises(SpecError, match="num_attention_heads"):
        model_from_hf_config(path)
    path.write_text(json.dumps(dict(config, model_type="gpt2", num_attention_heads=32)))
    with pytest.raises(SpecError, match="model_type"):
        model_from_hf_config(path)


def test_invalid_layouts_raise_clear_errors():
    cluster = ClusterSpec(resolve_gpu("h100"), 24)
    cfg = TrainConfig(Parallelism(dp_shard=8, tp=3), seq_len=8192)
    with pytest.raises(SpecError, match="tp=3 does not divide n_heads=32"):
        estimate_step(L8B, cluster, cfg)
    with pytest.raises(SpecError, match="2 x cp"):
        TrainConfig(Parallelism(cp=4), seq_len=1004)
    with pytest.raises(SpecError, match="dp_shard"):
        Parallelism(dp_shard=0)
