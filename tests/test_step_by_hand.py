"""Specs, models and executor profiles by hand: validation messages, GPU files, the
power-capped clock, parameter counts of a small model counted by hand, and name lookups."""

import json

import pytest

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import EXECUTOR_PROFILES, ExecutorProfile, resolve_executor
from cost_models.models import ModelSpec, model_from_hf_config, resolve_model
from cost_models.specs import GPU_PRESETS, ClusterSpec, GPUSpec, SpecError, gpu_from_file, resolve_gpu
from cost_models.step import StepEstimate, TimeTerms, _collectives, estimate_step

H100 = GPU_PRESETS["h100-sxm-80gb"]


def test_gpu_field_checks_name_the_field():
    cases = {
        "memory_bytes": (0, "GPU field memory_bytes=0 must be a positive number"),
        "hbm_bytes_per_s": (float("inf"), "GPU field hbm_bytes_per_s=inf must be a positive number"),
        "gpus_per_node": ("8", "GPU field gpus_per_node='8' must be a positive number"),
        "matmul_efficiency": (1.5, "GPU field matmul_efficiency=1.5 must be in (0, 1]"),
        "attention_efficiency": (0, "GPU field attention_efficiency=0 must be in (0, 1]"),
        "clock_fraction_at_limit": (2.0, "GPU field clock_fraction_at_limit=2.0 must be in (0, 1]"),
        "intra_node_latency_s": (-1e-6, "GPU field intra_node_latency_s=-1e-06 must be a number of seconds >= 0"),
        "collective_base_latency_s": (float("nan"),
                                      "GPU field collective_base_latency_s=nan must be a number of seconds >= 0"),
        "sm_count": (0, "GPU field sm_count=0 must be a positive integer"),
        "tdp_w": (0, "GPU field tdp_w=0 must be a positive number of watts"),
        "power_limit_w": (-5, "GPU field power_limit_w=-5 must be a positive number of watts"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(SpecError) as info:
            H100.with_overrides(**{field: value})
        assert str(info.value) == message, field
    H100.with_overrides(matmul_efficiency=1.0, intra_node_latency_s=0.0, clock_fraction_at_limit=None,
                        power_limit_w=None)  # the edges that are allowed


def test_clock_fraction_under_a_power_limit():
    assert H100.clock_fraction == 1.0  # no limit
    assert H100.with_overrides(power_limit_w=700.0).clock_fraction == 1.0  # at TDP
    assert H100.with_overrides(power_limit_w=800.0).clock_fraction == 1.0  # above TDP
    # the cube law: (350 / 700) ** (1/3) = 0.7937
    assert H100.with_overrides(power_limit_w=350.0).clock_fraction == pytest.approx(0.5 ** (1 / 3), rel=1e-12)
    assert H100.with_overrides(power_limit_w=350.0, clock_fraction_at_limit=0.6).clock_fraction == 0.6


def test_gpu_dict_round_trip_drops_aliases():
    data = GPU_PRESETS["mi300x"].to_dict()
    assert "aliases" not in data and data["name"] == "mi300x"
    back = GPUSpec.from_dict({**data, "unknown": 1, "aliases": ("x",)})
    assert back == GPU_PRESETS["mi300x"] and back.aliases == ()


def test_gpu_files_by_hand(tmp_path):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path
    spec = gpu_from_file(write("capped.yaml", "base: h100\npower_limit_w: 500\nhbm_bytes_per_s: 2.4e12\n"
                                              "memory_bytes: 85899345920.0\nsm_count: 114.0\n"))
    assert spec.name == "capped" and spec.power_limit_w == 500 and spec.hbm_bytes_per_s == 2.4e12
    assert spec.memory_bytes == 85899345920 and type(spec.memory_bytes) is int and type(spec.sm_count) is int
    assert spec.clock_fraction == pytest.approx((500 / 700) ** (1 / 3)) and spec.aliases == ()
    assert gpu_from_file(write("a.json", json.dumps({"base": "a100", "name": "mine"}))).name == "mine"
    assert gpu_from_file(write("d.yaml", "{}")).bf16_flops_per_s == H100.bf16_flops_per_s  # default base
    # a preset with its own clock at the limit: a new limit derives it again
    base = write("b.yaml", "base: h100\npower_limit_w: 400\nclock_fraction_at_limit: 0.9\n")
    assert gpu_from_file(base).clock_fraction == 0.9
    assert gpu_from_file(write("n.yaml", "power_limit_w: null\narch: ampere\n")).arch == "ampere"
    where = tmp_path
    errors = {
        "missing.yaml": f"--gpu {where}/missing.yaml: file not found",
        write("bad.json", "{oops"): f"--gpu {where}/bad.json: not valid JSON (Expecting property name enclosed in "
                                    "double quotes at line 1)",
        write("bad.yaml", "a: [1,\n"): f"--gpu {where}/bad.yaml: not valid YAML at line 2",
        write("list.yaml", "- 1\n"): f"--gpu {where}/list.yaml: expected a mapping of GPU fields (base: PRESET, "
                                     "field: value, ...)",
        write("base.yaml", "base: 3\n"): f"--gpu {where}/base.yaml: base=3 must be a GPU preset name",
        write("nobase.yaml", "base: tpu\n"): f"--gpu {where}/nobase.yaml: base='tpu' is no GPU preset; use one of "
                                             + ", ".join(GPU_PRESETS),
        write("field.yaml", "speed: 3\n"): f"--gpu {where}/field.yaml: unknown GPU field 'speed' (known: "
                                           + ", ".join(f for f in GPUSpec.__dataclass_fields__ if f != "aliases")
                                           + ")",
        write("text.yaml", "tdp_w: lots\n"): f"--gpu {where}/text.yaml: field tdp_w='lots' must be a number",
        write("bool.yaml", "tdp_w: true\n"): f"--gpu {where}/bool.yaml: field tdp_w=True must be a number",
        write("neg.yaml", "tdp_w: -1\n"): f"--gpu {where}/neg.yaml: GPU field tdp_w=-1 must be a positive number "
                                          "of watts",
    }
    for path, message in errors.items():
        with pytest.raises(SpecError) as info:
            gpu_from_file(tmp_path / path)
        assert str(info.value) == message, path
    with pytest.raises(SpecError, match=r"^--gpu .*: cannot read \(IsADirectoryError\)$"):
        gpu_from_file(tmp_path)


def test_resolve_gpu_by_hand(tmp_path):
    assert resolve_gpu(None) is H100 and resolve_gpu(" H100_SXM-80GB ") is H100
    assert resolve_gpu("mi300") is GPU_PRESETS["mi300x"]  # an alias
    path = tmp_path / "g.yaml"
    path.write_text("base: a100\n")
    assert resolve_gpu(str(path)).name == "g"
    with pytest.raises(SpecError, match=r"^--gpu 'tpu': unknown GPU; use one of .* or a path to a YAML/JSON file"):
        resolve_gpu("tpu")


def test_cluster_checks():
    assert ClusterSpec(H100, 4).gpus_per_node == 4 and ClusterSpec(H100, 16).gpus_per_node == 8
    assert ClusterSpec(H100, 16).num_nodes == 2 and ClusterSpec(H100, 4).num_nodes == 1
    for kwargs, message in (({"num_gpus": 0}, "--gpus 0: must be a positive integer"),
                            ({"num_gpus": 8, "gpus_per_node": 0}, "--gpus-per-node 0: must be a positive integer"),
                            ({"num_gpus": 12}, "--gpus 12: not a whole number of nodes of 8 GPUs (set "
                                               "--gpus-per-node)")):
        with pytest.raises(SpecError) as info:
            ClusterSpec(H100, **kwargs)
        assert str(info.value) == message


def test_model_sizes_by_hand():
    # d 16, 4 heads of 4, 2 K/V heads, FFN 32, vocab 100
    m = ModelSpec("m", vocab_size=100, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=32)
    assert (m.head_dim, m.q_dim, m.kv_dim) == (4, 16, 8)
    assert m.params_per_layer == 16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32 + 2 * 16 == 2336
    assert (m.embedding_params, m.output_params, m.root_params) == (1600, 1600, 3216)
    assert m.num_params == 3 * 2336 + 3216 and m.non_embedding_params == 3 * 2336 + 16 + 1600
    tied_bias = ModelSpec("t", vocab_size=100, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=32,
                          tie_embeddings=True, qkv_bias=True, head_dim=8)  # q 32, kv 16
    assert tied_bias.bias_params_per_layer == 32 + 2 * 16
    assert tied_bias.params_per_layer == 16 * 32 + 2 * 16 * 16 + 32 * 16 + 3 * 16 * 32 + 32 + 64
    assert tied_bias.output_params == 0 and tied_bias.root_params == 1616
    assert tied_bias.non_embedding_params == 3 * tied_bias.params_per_layer + 16 + 1600
    assert m.to_dict()["num_params"] == m.num_params and ModelSpec.from_dict({**m.to_dict(), "x": 1}) == m


def test_model_checks_name_the_field():
    base = dict(vocab_size=100, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=32)
    cases = [({"dim": 0}, "model field dim=0 must be a positive integer"),
             ({"ffn_dim": 2.0}, "model field ffn_dim=2.0 must be a positive integer"),
             ({"dim": 18}, "model dim=18 is not divisible by n_heads=4; give head_dim explicitly"),
             ({"n_kv_heads": 3}, "model n_heads=4 must be a multiple of n_kv_heads=3"),
             ({"norm": "layernorm"}, "model norm='layernorm'/activation='swiglu': only rmsnorm + swiglu (Llama "
                                     "family) are supported"),
             ({"activation": "gelu"}, "model norm='rmsnorm'/activation='gelu': only rmsnorm + swiglu (Llama "
                                      "family) are supported")]
    for change, message in cases:
        with pytest.raises(SpecError) as info:
            ModelSpec("m", **{**base, **change})
        assert str(info.value) == message
    assert ModelSpec("m", **{**base, "dim": 18, "head_dim": 4}).q_dim == 16


def test_hf_config_by_hand(tmp_path):
    def config(name, **fields):
        path = tmp_path / name / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(fields))
        return path
    required = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=100)
    m = model_from_hf_config(config("plain", **required))
    assert (m.name, m.n_kv_heads, m.tie_embeddings, m.norm_eps, m.rope_theta, m.qkv_bias, m.rope_scaling) == \
        ("plain", 4, False, 1e-5, 10000.0, False, None)
    q = model_from_hf_config(config("q", **required, model_type="qwen2", num_key_value_heads=2, head_dim=8,
                                    tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
                                    rope_scaling={"type": "yarn"}, _name_or_path="org/q", sliding_window=4096))
    assert (q.name, q.n_kv_heads, q.head_dim, q.tie_embeddings, q.norm_eps, q.rope_theta, q.qkv_bias,
            q.rope_scaling) == ("org/q", 2, 8, True, 1e-6, 1e6, True, "yarn")
    named = model_from_hf_config(config("r", **required, rope_scaling={"rope_type": "llama3", "type": "x"}))
    assert named.rope_scaling == "llama3"
    assert model_from_hf_config(config("u", **required, rope_scaling={"factor": 8})).rope_scaling == "unnamed"
    errors = [
        (config("t", **required, model_type="gpt2"), "model_type='gpt2' is not a Llama-family decoder (supported: "
                                                     "llama, mistral, qwen2)"),
        (config("h", **{k: v for k, v in required.items() if k != "vocab_size"}),
         "config.json lacks the field 'vocab_size'"),
        (config("a", **required, hidden_act="gelu"), "hidden_act='gelu'; only silu (SwiGLU) is supported"),
        (config("s", **required, rope_scaling=2.0), "rope_scaling=2.0 must be an object or null"),
        (config("w", **required, model_type="mistral", sliding_window=4096),
         "sliding_window=4096 (sliding-window attention) is not modeled: the planner would price full causal "
         "attention; set it to null to plan full attention"),
    ]
    for path, message in errors:
        with pytest.raises(SpecError) as info:
            model_from_hf_config(path)
        assert str(info.value) == f"--model {path}: {message}"
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    with pytest.raises(SpecError, match=r": expected a JSON object$"):
        model_from_hf_config(listed)


def test_resolve_model_and_executor_by_hand(tmp_path):
    assert resolve_model(None).name == "llama3-8b" and resolve_model(" 70B ").name == "llama3-70b"
    with pytest.raises(SpecError, match=r"^--model 'gpt': unknown model; use one of .* or a path to a Hugging Face"):
        resolve_model("gpt")
    assert resolve_executor(None) is EXECUTOR_PROFILES["autoplan"]
    assert resolve_executor(" TorchTitan ") is EXECUTOR_PROFILES["torchtitan"]
    with pytest.raises(SpecError, match=r"^--executor 'jax': use one of autoplan, torchtitan, torchtitan-0.3, "
                                        r"torchtitan-compile$"):
        resolve_executor("jax")


def test_executor_profile_dict_round_trip_and_errors():
    tt = EXECUTOR_PROFILES["torchtitan"]
    data = json.loads(json.dumps(tt.to_dict()))  # tuples become lists in JSON
    assert ExecutorProfile.from_dict(data) == tt and hash(ExecutorProfile.from_dict(data)) == hash(tt)
    with pytest.raises(SpecError, match=r"^plan\.executor_profile: expected a mapping of profile fields$"):
        ExecutorProfile.from_dict([1], where="plan.executor_profile")
    with pytest.raises(SpecError, match=r"^executor_profile\.bogus: unknown executor profile field \(known: "):
        ExecutorProfile.from_dict({**data, "bogus": 1, "zzz": 2})
    with pytest.raises(SpecError, match=r"^executor_profile: .*missing 1 required"):
        ExecutorProfile.from_dict({"name": "x"})
    assert tt.sdpa_kv_expanded and not EXECUTOR_PROFILES["autoplan"].sdpa_kv_expanded
    assert tt.selective_recomputed_matmuls == ("wk", "wo", "w3")  # keeps wq, wv, w1, w2


# ----------------------------------------------------------------------------- step time


# d 64, 8 heads of 8 (q 64), 4 K/V heads (kv 32), FFN 128, vocab 256, 3 blocks: per block
# 4096 + 2 x 2048 + 4096 + 3 x 8192 + 128 = 36992; root 2 x 16384 + 64 = 32832; all 143808
MID = ModelSpec("mid", vocab_size=256, dim=64, n_layers=3, n_heads=8, n_kv_heads=4, ffn_dim=128)


def test_collectives_volumes_and_counts_by_hand():
    assert (MID.params_per_layer, MID.root_params, MID.num_params) == (36992, 32832, 143808)
    cluster = ClusterSpec(H100, 16)
    par = Parallelism(dp_replicate=2, dp_shard=2, cp=2, tp=2)

    def rows(impl, n_full=1):
        cfg = TrainConfig(par, 64, grad_accum_steps=3, cp_impl=impl)  # 32 tokens per GPU
        return [(c.name, c.kind, c.group, c.group_size, c.bytes_per_call, c.calls)
                for c in _collectives(MID, cluster, cfg, n_full)]
    common = [
        ("fsdp all-gather params (fwd + bwd)", "all_gather", "dp_shard+cp", 4, 36992 / 2 * 2, 2 * 3 * 3),
        ("fsdp reduce-scatter grads", "reduce_scatter", "dp_shard+cp", 4, 36992 / 2 * 4, 3 * 3),
        ("fsdp root unit all-gather (embedding, norm, output)", "all_gather", "dp_shard+cp", 4, 32832 / 2 * 2, 3),
        ("fsdp root unit reduce-scatter", "reduce_scatter", "dp_shard+cp", 4, 32832 / 2 * 4, 3),
        ("hsdp all-reduce grad shards", "all_reduce", "dp_replicate", 2, 143808 / 2 / 4 * 4, 3),
        # 8 per block (all-gather + reduce-scatter before/after attention and FFN, fwd + bwd)
        # + 2 per fully recomputed block
        ("tp all-gather / reduce-scatter (SP)", "all_gather", "tp", 2, 2 * 32 * 64, (8 * 3 + 2) * 3),
    ]
    kv = 2 * 64 * 2 * 32 / 2  # bf16 K and V of the whole sequence, this GPU's heads: 4096
    assert rows("allgather-kv") == common + [
        ("cp all-gather K/V", "all_gather", "cp", 2, kv, (3 + 1) * 3),
        ("cp reduce-scatter dK/dV", "reduce_scatter", "cp", 2, kv, 3 * 3)]
    assert rows("ring-allgather") == common + [
        ("cp ring all-gather K/V (fwd + bwd)", "all_gather", "cp", 2, kv, (2 * 3 + 1) * 3),
        ("cp ring dK/dV rotations (fp32)", "send_recv", "cp", 2, kv / 2 / 2 * 4, 2 * 3 * 3)]
    assert rows("ring-alltoall", n_full=0)[-2:] == [
        ("cp ring K/V rotations (fwd + bwd)", "send_recv", "cp", 2, kv / 2, 2 * 3 * 1 * 3),
        ("cp ring dK/dV rotations (fp32)", "send_recv", "cp", 2, kv / 2 / 2 * 4, 2 * 3 * 3)]
    plain = _collectives(MID, ClusterSpec(H100, 4), TrainConfig(Parallelism(dp_shard=4), 64), 0)
    assert [c.name for c in plain] == [r[0] for r in common[:4]]


def test_time_terms_arithmetic_by_hand():
    terms = TimeTerms(base_s=10.0, hiding_compute_s=4.0, fsdp_comm_s=7.0, fsdp_tail_s=0.0,
                      recompute_s={"none": 0.0, "selective": 1.0, "full": 2.0},
                      recompute_comm_s={"none": 0.0, "selective": 0.5, "full": 0.25}, optimizer_s=3.0,
                      grad_accum_steps=2, compute_s=0.0, root_recompute_s=0.0, tp_comm_s=0.0, cp_comm_s=0.0)
    mixed = {"none": 1, "selective": 1, "full": 1}
    # recompute 3 hides the remaining FSDP traffic (7 - 4 - 3 = 0); comm redone 0.75
    assert terms.micro_s(mixed) == 13.75 and terms.step_s(mixed) == 2 * 13.75 + 3
    # no recompute: 7 - 4 = 3 of FSDP traffic exposed
    assert terms.micro_s({"none": 3}) == 13.0 and terms.step_s({"none": 3}) == 29.0
    assert terms.micro_s({"full": 3}) == 10.0 + 6.0 + 0.75  # more recompute than traffic: none exposed


def test_step_estimate_summary_and_phase():
    est = StepEstimate(peak_memory_bytes=5.0, memory_breakdown_bytes={"a": 1.0}, memory_capacity_bytes=9.0, fits=True,
                       step_time_s=2.0, tokens_per_second_per_gpu=3.0, mfu=0.4, flops_per_token=7.0,
                       executed_flops_per_step=8.0, time_breakdown_s={"compute": 2.0})
    assert est.peak_phase == "unknown"
    summary = est.summary()
    assert summary == {"peak_memory_bytes": 5.0, "peak_memory_reserved_bytes": None,
                       "memory_breakdown_bytes": {"a": 1.0}, "memory_capacity_bytes": 9.0, "step_time_s": 2.0,
                       "tokens_per_second_per_gpu": 3.0, "mfu": 0.4, "flops_per_token": 7.0,
                       "time_breakdown_s": {"compute": 2.0}}
    assert summary["memory_breakdown_bytes"] is not est.memory_breakdown_bytes  # copies
    assert summary["time_breakdown_s"] is not est.time_breakdown_s
    cfg = TrainConfig(Parallelism(dp_shard=4), 1024)
    full = estimate_step(MID, ClusterSpec(H100, 4), cfg)
    assert full.peak_phase == full.memory.peak_phase
    assert full.summary()["peak_memory_reserved_bytes"] == full.memory.reserved_peak_bytes


@pytest.mark.parametrize("par, impl, ac, ga", [
    (Parallelism(dp_shard=8), "allgather-kv", ("none", "none", "none"), 1),
    (Parallelism(dp_shard=2, cp=2, tp=2), "allgather-kv", ("full", "selective", "none"), 2),
    (Parallelism(dp_replicate=2, dp_shard=2, cp=4), "ring-allgather", ("full", "full", "none"), 3),
    (Parallelism(dp_shard=2, cp=4), "ring-alltoall", ("selective", "none", "full"), 1),
])
def test_step_estimate_adds_up(par, impl, ac, ga):
    from cost_models import flops

    cluster = ClusterSpec(H100, par.world_size)
    cfg = TrainConfig(par, 2048, local_batch_size=2, grad_accum_steps=ga, ac=ACPolicy(ac), cp_impl=impl)
    est = estimate_step(MID, cluster, cfg)
    t = est.time_breakdown_s
    # the step is its compute, recompute, exposed communication and optimizer
    assert t["compute"] + t["recompute"] + t["exposed_comm"] + t["optimizer"] == pytest.approx(est.step_time_s,
                                                                                            rel=1e-12)
    assert t["exposed_comm"] == pytest.approx(t["exposed_tp_comm"] + t["exposed_cp_comm"] + t["exposed_fsdp_comm"],
                                              rel=1e-12)
    assert (t["exposed_tp_comm"] > 0) == (par.tp > 1) and (t["exposed_cp_comm"] > 0) == (par.cp > 1)
    assert t["recompute"] > 0 and t["optimizer"] > 0 and t["matmul"] > 0 and t["attention"] > 0
    assert (t["cp_elementwise"] > 0) == (par.cp > 1)
    # tokens per GPU per step: 2048 x 2 x ga over the cp x tp GPUs that share a sequence
    tokens = 2048 * 2 * ga / (par.cp * par.tp)
    assert est.tokens_per_second_per_gpu == pytest.approx(tokens / est.step_time_s, rel=1e-12)
    assert est.flops_per_token == flops.model_flops_per_token(MID, 2048)
    assert est.mfu == pytest.approx(est.flops_per_token * est.tokens_per_second_per_gpu / H100.bf16_flops_per_s,
                                    rel=1e-12)
    executed = flops.step_forward_backward_flops(MID, cfg.tokens_per_gpu, 2048, par.cp, par.tp)
    assert est.executed_flops_per_step == pytest.approx(ga * sum(executed.values()), rel=1e-12)
    assert est.memory_capacity_bytes == float(H100.memory_bytes)
    assert est.fits == (est.peak_memory_bytes <= H100.memory_bytes)
    assert est.peak_memory_bytes == est.memory.peak_bytes and est.memory_breakdown_bytes == est.memory.breakdown_bytes


def test_step_estimate_refuses_a_layout_that_cannot_run():
    odd = ModelSpec("odd", vocab_size=16, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=10)
    with pytest.raises(SpecError) as info:
        estimate_step(odd, ClusterSpec(H100, 4), TrainConfig(Parallelism(tp=4), 64))
    assert str(info.value) == ("layout cannot run: tp=4 does not divide n_heads=6; tp=4 does not divide "
                               "n_kv_heads=2; tp=4 does not divide ffn_dim=10")


def test_step_estimate_parts_by_hand():
    from cost_models.memory import estimate_memory
    from cost_models.step import layer_time, time_terms

    par = Parallelism(dp_shard=2, tp=2)
    cluster = ClusterSpec(H100, 4)
    cfg = TrainConfig(par, 2048, local_batch_size=2, grad_accum_steps=3,
                      ac=ACPolicy(("full", "selective", "selective")))
    est = estimate_step(MID, cluster, cfg, "torchtitan")
    terms = time_terms(MID, cluster, cfg, "torchtitan")
    layer = layer_time(MID, cluster, cfg, resolve_executor("torchtitan"))
    counts = {"none": 0, "selective": 2, "full": 1}
    t = est.time_breakdown_s
    assert est.step_time_s == pytest.approx(terms.step_s(counts), rel=1e-12)
    layers_recompute = 2 * terms.recompute_s["selective"] + terms.recompute_s["full"]
    assert t["recompute"] == pytest.approx(3 * (terms.root_recompute_s + layers_recompute), rel=1e-12)
    assert t["exposed_fsdp_comm"] == pytest.approx(3 * (terms.fsdp_tail_s + max(
        0.0, terms.fsdp_comm_s - terms.hiding_compute_s - layers_recompute)), rel=1e-12)
    # torchtitan's selective AC re-gathers two TP inputs per selective block
    assert layer.tp_selective_recompute_comm_s > 0
    assert t["exposed_tp_comm"] == pytest.approx(3 * (terms.tp_comm_s + layer.tp_recompute_comm_s
                                                      + 2 * layer.tp_selective_recompute_comm_s), rel=1e-12)
    for key, per_layer in (("matmul", layer.matmul_s), ("attention", layer.attention_s),
                           ("elementwise", layer.elementwise_s), ("cp_elementwise", layer.cp_elementwise_s)):
        assert t[key] == pytest.approx(3 * 3 * per_layer, rel=1e-12), key
    assert est.memory == estimate_memory(MID, cfg, "torchtitan")  # the executor asked for, not the default


def test_step_estimate_checks_the_cluster_and_fits_at_capacity():
    with pytest.raises(SpecError, match=r"^layout cannot run: degrees multiply to 4, cluster has 8 GPUs$"):
        estimate_step(MID, ClusterSpec(H100, 8), TrainConfig(Parallelism(dp_shard=4), 64))
    cfg = TrainConfig(Parallelism(dp_shard=4), 1024)
    peak = estimate_step(MID, ClusterSpec(H100, 4), cfg).peak_memory_bytes
    exact = ClusterSpec(H100.with_overrides(memory_bytes=peak), 4)  # a GPU with exactly that memory
    assert estimate_step(MID, exact, cfg).fits


def test_alltoall_rotations_per_cp_rank():
    cfg = TrainConfig(Parallelism(cp=4), 64, grad_accum_steps=2, cp_impl="ring-alltoall")  # 16 tokens per GPU
    rows = {c.name: (c.bytes_per_call, c.calls) for c in _collectives(MID, ClusterSpec(H100, 4), cfg, 1)}
    # K/V of the local tokens (2 x 16 x 2 x 32), (2 x 3 blocks + 1 recomputed) x (cp - 1) x accumulation
    assert rows["cp ring K/V rotations (fwd + bwd)"] == (2 * 16 * 2 * 32, (2 * 3 + 1) * 3 * 2)


def test_gpu_spec_edges_by_hand(tmp_path):
    H100.with_overrides(gpus_per_node=1, sm_count=1, tdp_w=0.5, power_limit_w=0.5)  # small but positive
    with pytest.raises(SpecError, match=r"^GPU field power_limit_w=0 must be a positive number of watts$"):
        H100.with_overrides(power_limit_w=0)
    assert resolve_gpu("h100 sxm 80gb") is H100
    names = ", ".join(GPU_PRESETS)
    with pytest.raises(SpecError) as info:
        resolve_gpu("tpu")
    assert str(info.value) == (f"--gpu 'tpu': unknown GPU; use one of {names} or a path to a YAML/JSON file "
                               "(base: PRESET + fields)")
    for missing in ("missing.yml", "missing.JSON", "missing.yaml"):
        with pytest.raises(SpecError, match=rf"^--gpu {missing}: file not found$"):
            resolve_gpu(missing)


def test_gpu_file_edges_by_hand(tmp_path):
    def write(name, text):
        path = tmp_path / name
        path.write_bytes(text.encode())
        return path
    with pytest.raises(SpecError) as info:  # a reader error has no line mark
        gpu_from_file(write("ctl.yaml", "a: \x07\n"))
    assert str(info.value) == f"--gpu {tmp_path}/ctl.yaml: not valid YAML"
    with pytest.raises(SpecError) as info:
        gpu_from_file(write("none.yaml", "tdp_w: null\n"))
    assert str(info.value) == f"--gpu {tmp_path}/none.yaml: field tdp_w=None must be a number"
    with pytest.raises(SpecError) as info:  # checked after a name field too
        gpu_from_file(write("late.yaml", "name: x\ntdp_w: lots\n"))
    assert str(info.value) == f"--gpu {tmp_path}/late.yaml: field tdp_w='lots' must be a number"
    assert gpu_from_file(write("cf.yaml", "clock_fraction_at_limit: null\n")).clock_fraction_at_limit is None
    spec = gpu_from_file(write("gpn.yaml", "gpus_per_node: 4.0\n"))
    assert spec.gpus_per_node == 4 and type(spec.gpus_per_node) is int
    # the 500 W preset keeps its measured clock unless the file changes a power number
    assert gpu_from_file(write("p1.yaml", "base: h100-96gb-500w\nname: q\n")).clock_fraction == 0.8939
    retdp = gpu_from_file(write("p2.yaml", "base: h100-96gb-500w\ntdp_w: 1000\n"))
    assert retdp.clock_fraction == pytest.approx(0.5 ** (1 / 3), rel=1e-12)


def test_executor_unknown_field_lists_the_known():
    from dataclasses import fields

    known = ", ".join(sorted(f.name for f in fields(ExecutorProfile)))
    with pytest.raises(SpecError) as info:
        ExecutorProfile.from_dict({"name": "x", "bogus": 1})
    assert str(info.value) == f"executor_profile.bogus: unknown executor profile field (known: {known})"


# ----------------------------------------------------------------------------- one block's time

RATES = {"all_gather": 1.0, "reduce_scatter": 2.0, "send_recv": 3.0, "all_reduce": 4.0}  # seconds per GB


@pytest.fixture
def stand_in_collectives(monkeypatch):
    """Collectives at made-up rates per kind (so each term is traceable); FSDP's cached
    per-block traffic is emptied before and after."""
    import cost_models.step as step

    calls = []

    def seconds(cluster, par, order, kind, dims, nbytes):
        calls.append((kind, dims, nbytes))
        return RATES[kind] * nbytes / 1e9 * SCALE[0]
    step._fsdp_block_comm_s.cache_clear()
    step._time_terms.cache_clear()
    monkeypatch.setattr(step, "collective_seconds", seconds)
    yield calls
    step._fsdp_block_comm_s.cache_clear()
    step._time_terms.cache_clear()


SCALE = [1.0]


def _pieces(model, cfg, ex, tokens):
    from cost_models import flops
    from cost_models.kernels import (
        attention_backend_for,
        attention_keys_per_call,
        attention_rate_per_s,
        elementwise_bytes_per_token,
        layer_matmul_s,
    )
    tp = cfg.parallelism.tp
    mm_f, mm_b, per_gemm = layer_matmul_s(model, H100, tokens, tp)
    attn = flops.layer_forward_flops(model, tokens, cfg.seq_len, cfg.parallelism.cp, tp).attention
    backend, keys = attention_backend_for(cfg, ex, model), attention_keys_per_call(cfg)
    attn_f = attn / attention_rate_per_s(H100, backend, False, keys)
    attn_b = flops.ATTENTION_BACKWARD_FACTOR * attn / attention_rate_per_s(H100, backend, True, keys)
    ew = elementwise_bytes_per_token(model, ex) * tokens / tp / H100.hbm_bytes_per_s  # bf16: a / 2 = 1
    return mm_f, mm_b, dict(per_gemm), attn_f, attn_b, ew


def test_layer_time_under_tp_by_hand(stand_in_collectives):
    from cost_models.step import layer_time

    ex = resolve_executor("torchtitan")  # eager: 60 host ops a block, DTensor ops 30 us, plain 10 us
    cluster = ClusterSpec(H100, 4)
    for seq in (262144, 16):  # GPU-bound (attention), then host-bound
        SCALE[0] = 1.0
        cfg = TrainConfig(Parallelism(dp_shard=2, tp=2), seq)
        lt = layer_time(MID, cluster, cfg, ex)
        mm_f, mm_b, gemm, attn_f, attn_b, ew = _pieces(MID, cfg, ex, seq)
        host = 60 * 10e-6 + 7 * (30e-6 - 10e-6)  # the 7 linears are DTensor ops under TP
        forward = max(mm_f + attn_f + ew, host)
        copy = 36992 / 2 * (2 * 2 * 2 * 2 + 2 + 4) / H100.hbm_bytes_per_s  # FSDP copy-in/out, grad cast
        assert lt.forward_s == pytest.approx(forward, rel=1e-12)
        assert lt.backward_s == pytest.approx(max(mm_b + attn_b + 2 * ew, 2 * host) + copy, rel=1e-12)
        assert (forward == host) == (seq == 16)
        ag, rs = 1.0 * 2 * seq * 64 / 1e9, 2.0 * 2 * seq * 64 / 1e9  # bf16 hidden states, gathered width
        assert lt.tp_comm_s == pytest.approx(2 * (2 * ag + 2 * rs), rel=1e-12)
        assert lt.tp_recompute_comm_s == pytest.approx(2 * ag + 2 * rs, rel=1e-12)
        assert lt.tp_selective_recompute_comm_s == pytest.approx(2 * ag, rel=1e-12)  # wk's and w3's inputs
        gather, scatter = 1.0 * 18496 * 2 / 1e9, 2.0 * 18496 * 4 / 1e9
        replicate = 4.0 * 18496 * 4 / 2 / 1e9  # dp_replicate = 1: a group of one
        assert lt.fsdp_comm_s == pytest.approx(2 * gather + scatter + replicate, rel=1e-12)
        assert lt.fsdp_first_gather_s == pytest.approx(gather) and lt.fsdp_last_scatter_s == pytest.approx(
            scatter + replicate)
        assert lt.recompute_s == pytest.approx({"none": 0.0, "selective": ew + gemm["wk"] + gemm["wo"] + gemm["w3"],
                                                "full": forward}, rel=1e-12)
        assert lt.matmul_s == pytest.approx(mm_f + mm_b) and lt.attention_s == pytest.approx(attn_f + attn_b)
        assert lt.elementwise_s == pytest.approx(3 * ew + copy, rel=1e-12)
        assert lt.cp_comm_s == lt.cp_elementwise_s == lt.cp_hidden_comm_s == 0.0
    compiled = layer_time(MID, cluster, TrainConfig(Parallelism(dp_shard=2, tp=2), 16),
                          ex.with_overrides(compile=True))
    assert compiled.forward_s == pytest.approx(15 * 10e-6 + 7 * 20e-6, rel=1e-12)  # 15 compiled host ops
    one = layer_time(MID, ClusterSpec(H100, 2), TrainConfig(Parallelism(dp_shard=2), 16), ex)
    assert one.forward_s == pytest.approx(60 * 10e-6, rel=1e-12) and one.tp_comm_s == 0.0


@pytest.mark.parametrize("scale", [1e4, 1e-6])  # communication exposed, then hidden
@pytest.mark.parametrize("cp, tp", [(2, 1), (4, 1), (2, 2)])
def test_layer_time_under_cp_by_hand(stand_in_collectives, scale, cp, tp):
    from cost_models.step import layer_time

    SCALE[0] = scale
    ex = resolve_executor("autoplan")
    cluster = ClusterSpec(H100, 2 * cp * tp)
    hbm = H100.hbm_bytes_per_s
    dq, dkv = 64 / tp, 32 / tp  # this GPU's query and K/V widths
    tokens = 2048 // cp
    for impl in ("ring-alltoall", "ring-allgather", "allgather-kv"):
        cfg = TrainConfig(Parallelism(dp_shard=2, cp=cp, tp=tp), 2048, cp_impl=impl)
        lt = layer_time(MID, cluster, cfg, ex)
        _, _, _, attn_f, attn_b, _ = _pieces(MID, cfg, ex, tokens)
        kv_local = 2 * tokens * 2 * dkv  # bf16 K and V of the local tokens
        hop = 3.0 * kv_local / 1e9 * scale
        dkv_hop = 3.0 * kv_local * 2 / 1e9 * scale  # fp32 dK, dV
        gather = 1.0 * cp * kv_local / 1e9 * scale
        step_f, step_b = attn_f / cp, attn_b / cp
        if impl == "ring-alltoall":  # cp - 1 rotations, each behind one step's attention
            forward = (cp - 1) * max(0.0, hop - step_f)
            comm = forward + (cp - 1) * max(0.0, hop + dkv_hop - step_b) + dkv_hop
            hidden = 2 * (cp - 1) * hop + cp * dkv_hop - comm
        elif impl == "ring-allgather":  # one gather behind the diagonal step; fp32 dK/dV hops
            forward = max(0.0, gather - step_f)
            comm = forward + max(0.0, gather - step_b) + (cp - 1) * max(0.0, dkv_hop - step_b) + dkv_hop
            hidden = 2 * gather + cp * dkv_hop - comm
        else:  # all-gather K/V, reduce-scatter dK/dV: exposed
            forward = gather
            comm = gather + 2.0 * cp * kv_local / 1e9 * scale
            hidden = 0.0
        assert lt.cp_recompute_comm_s == pytest.approx(forward, rel=1e-9, abs=1e-18), impl
        assert lt.cp_comm_s == pytest.approx(comm, rel=1e-9, abs=1e-18), impl
        moved = 2 * (cp - 1) * hop + cp * dkv_hop + 2 * gather  # the difference cancels most of this
        assert lt.cp_hidden_comm_s == pytest.approx(max(0.0, hidden), abs=1e-9 * moved + 1e-18), impl
        if impl == "allgather-kv":  # gathered K/V expanded to the query heads and summed back
            merge_f = merge_b = 1 * 2048 * 2 * dq * 4.0 / hbm
        else:  # per ring step after the first: merge, K/V cat; backward: dq, dK/dV accumulate + cat
            merge_f = tokens * ((cp - 1) * (0.75 * 40 * dq + 4 * 2 * dkv) + 12 * dq) / hbm
            merge_b = tokens * (cp - 1) * (0.75 * 10 * dq + 18 * 2 * dkv + 4 * 2 * dkv) / hbm
        assert lt.cp_elementwise_s == pytest.approx(merge_f + merge_b, rel=1e-12), impl


def test_cp_elementwise_work_is_on_the_gpu_time(stand_in_collectives):
    from cost_models.step import layer_time

    SCALE[0] = 1.0
    ex = resolve_executor("autoplan")
    for impl in ("ring-alltoall", "allgather-kv"):
        cfg = TrainConfig(Parallelism(cp=2), 262144, cp_impl=impl)  # long: GPU-bound
        lt = layer_time(MID, ClusterSpec(H100, 2), cfg, ex)
        mm_f, mm_b, _, attn_f, attn_b, ew = _pieces(MID, cfg, ex, 131072)
        fwd = mm_f + attn_f + ew
        if impl == "allgather-kv":  # the expansion runs once forward, once backward
            assert lt.forward_s - fwd == pytest.approx(lt.cp_elementwise_s / 2, rel=1e-9)
        assert lt.forward_s > fwd
        copy = 36992 * (8 * 2 + 2 + 4) / H100.hbm_bytes_per_s  # FSDP over dp_shard x cp = 2 ranks
        assert lt.forward_s + lt.backward_s == pytest.approx(mm_f + mm_b + attn_f + attn_b + 3 * ew + copy
                                                             + lt.cp_elementwise_s, rel=1e-12)


def test_single_gpu_has_no_fsdp_copies(stand_in_collectives):
    from cost_models.step import layer_time

    SCALE[0] = 1.0
    ex = resolve_executor("torchtitan")
    lt = layer_time(MID, ClusterSpec(H100, 1), TrainConfig(Parallelism(), 16), ex)  # host-bound
    assert lt.backward_s == pytest.approx(2 * 60 * 10e-6, rel=1e-12) and lt.elementwise_s == pytest.approx(
        3 * _pieces(MID, TrainConfig(Parallelism(), 16), ex, 16)[5], rel=1e-12)


@pytest.mark.parametrize("recomputed, groups", [("wq", 1), ("wv", 1), ("w1", 1), ("w2", 0)])
def test_selective_regathers_the_inputs_of_recomputed_matmuls(stand_in_collectives, recomputed, groups):
    from cost_models.step import layer_time

    SCALE[0] = 1.0
    all_saves = ("block_input", "wq", "wk", "wv", "attention", "wo", "w1", "w3", "w2")
    ex = resolve_executor("torchtitan").with_overrides(selective_saves=tuple(s for s in all_saves if s != recomputed))
    lt = layer_time(MID, ClusterSpec(H100, 2), TrainConfig(Parallelism(tp=2), 64), ex)
    # the attention input (wq, wv) or the FFN input (w1) is all-gathered again; w2's is not
    assert lt.tp_selective_recompute_comm_s == pytest.approx(groups * 1.0 * 2 * 64 * 64 / 1e9, rel=1e-12)


def test_exposed_fsdp_traffic_by_hand(stand_in_collectives):
    from cost_models.step import time_terms

    SCALE[0] = 1e3  # slow links: FSDP traffic outlasts compute
    cluster = ClusterSpec(H100, 4)
    cfg = TrainConfig(Parallelism(dp_shard=2, cp=2), 4096, grad_accum_steps=2,
                      ac=ACPolicy(("selective", "full", "none")))
    est = estimate_step(MID, cluster, cfg, "autoplan")  # chunked loss: the root's recompute counts
    terms = time_terms(MID, cluster, cfg, "autoplan")
    layers = terms.recompute_s["selective"] + terms.recompute_s["full"]
    assert terms.root_recompute_s > 0 and terms.fsdp_comm_s > terms.hiding_compute_s + layers
    exposed = terms.fsdp_tail_s + terms.fsdp_comm_s - terms.hiding_compute_s - layers
    assert est.time_breakdown_s["exposed_fsdp_comm"] == pytest.approx(2 * exposed, rel=1e-12)
    layer_cp = est.time_breakdown_s["cp_elementwise"]
    from cost_models.step import layer_time
    assert layer_cp == pytest.approx(2 * 3 * layer_time(MID, cluster, cfg, resolve_executor("autoplan"))
                                     .cp_elementwise_s, rel=1e-12) and layer_cp > 0


def test_hf_messages_by_hand(tmp_path):
    required = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                    vocab_size=100, num_key_value_heads=1)
    for name, extra, message in (
            ("ab", {"attention_bias": True}, "attention_bias=true (biases on q, k, v and o_proj) is not modeled; "
                                             "only Qwen2-style q/k/v biases are: set it to false to plan without "
                                             "biases"),
            ("mb", {"mlp_bias": True}, "mlp_bias=true (biases on the MLP projections) is not modeled; set it to "
                                       "false to plan without them")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**required, **extra}))
        with pytest.raises(SpecError) as info:
            model_from_hf_config(path)
        assert str(info.value) == f"--model {path}: {message}"
    one = tmp_path / "one.json"
    one.write_text(json.dumps(required))
    assert model_from_hf_config(one).n_layers == 1 and model_from_hf_config(one).n_kv_heads == 1
    with pytest.raises(SpecError) as info:
        resolve_model(str(tmp_path / "missing.json"))
    assert str(info.value) == f"--model {tmp_path}/missing.json: file not found"
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SpecError) as info:
        model_from_hf_config(bad)
    assert str(info.value) == (f"--model {bad}: not valid JSON (Expecting property name enclosed in double quotes "
                               "at line 1)")
