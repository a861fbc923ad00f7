"""A pipeline rank's time and memory terms against independent references.

Time: a rank's compute, recompute and exposed TP / CP seconds per micro-batch, summed over
the ranks, are the whole model's for one micro-batch as ``estimate_step`` prices it at
pp = 1 on the other ranks (its per-layer walk plus the root on the last stage). FSDP
gathers: ``m + 1`` all-gathers of each block per schedule run hide behind the micro-
batches' compute; what does not hide is exposed (hand arithmetic on one block's gather
time). Memory: the overheads beside the tensors (allocator pools, fragmentation, the
last stage's stranded loss blocks, NCCL buffers) and the optimizer step's tensors, by
hand from the model's parameter counts.
"""

from dataclasses import replace

import pytest

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.memory import memory_terms, nccl_bytes
from cost_models.pipeline import estimate_pipeline, micro_config, micro_parts, p2p_seconds_per_microbatch, rank_layers
from cost_models.specs import MODEL_PRESETS, ClusterSpec, resolve_gpu
from cost_models.step import estimate_step

EXECUTOR = resolve_executor("autoplan")
MODES = ("full", "selective", "none", "selective")  # per layer of a 4-layer model
EIGHT_B = replace(MODEL_PRESETS["llama3-8b"], n_layers=4)
SEVENTY_B = replace(MODEL_PRESETS["llama3-70b"], n_layers=4)


@pytest.mark.parametrize("par, seq, cp_impl", [
    (Parallelism(dp_shard=2, tp=2, pp=2), 8192, "none"),
    (Parallelism(dp_shard=4, tp=2, pp=2), 1024, "none"),
    (Parallelism(tp=4, cp=2, pp=2), 16384, "allgather-kv"),
])
def test_rank_time_parts_add_up_to_the_whole_model_per_micro_batch(par, seq, cp_impl):
    gpu = resolve_gpu("h100")
    cfg = TrainConfig(par, seq, 4, pp_microbatches=4, cp_impl=cp_impl)
    pipeline = estimate_pipeline(EIGHT_B, ClusterSpec(gpu, par.world_size, 8), cfg, EXECUTOR, MODES)
    # One micro-batch (batch 1 of 4) through the whole model, pp = 1, on a pipeline rank's GPUs.
    flat = replace(micro_config(cfg), parallelism=replace(par, pp=1), ac=ACPolicy(MODES))
    whole = estimate_step(EIGHT_B, ClusterSpec(gpu, par.world_size // par.pp, 8), flat).time_breakdown_s
    total = {part: sum(stage.parts_s[part] for stage in pipeline.stages) for part in ("compute", "recompute", "tp", "cp")}
    assert total["compute"] == pytest.approx(whole["compute"], rel=1e-9)
    assert total["recompute"] == pytest.approx(whole["recompute"], rel=1e-9)
    assert total["tp"] == pytest.approx(whole["exposed_tp_comm"], rel=1e-9)
    assert total["cp"] == pytest.approx(whole["exposed_cp_comm"], rel=1e-9, abs=1e-15)
    p2p = p2p_seconds_per_microbatch(EIGHT_B, ClusterSpec(gpu, par.world_size, 8), cfg)
    for stage in pipeline.stages:
        assert stage.parts_s["p2p"] == p2p
        assert stage.microbatch_s == pytest.approx(sum(stage.parts_s.values()), rel=1e-12)
    # The last rank runs the root too (final norm, output projection, loss): more compute.
    assert pipeline.stages[-1].parts_s["compute"] > pipeline.stages[0].parts_s["compute"]


@pytest.mark.parametrize("gpu_name, exposed", [("a100-sxm-80gb", True), ("h100", False)])
def test_fsdp_gathers_not_hidden_by_compute_are_exposed(gpu_name, exposed):
    # 70B blocks, 32 tokens per micro-batch, FSDP over 16 ranks across nodes: on A100s
    # (slower network) two blocks' 3 gathers per micro-batch (m + 1 = 3 over m = 2) outlast
    # their compute; on H100s they hide.
    gpu = resolve_gpu(gpu_name)
    par = Parallelism(dp_shard=16, pp=2)
    cfg = TrainConfig(par, 32, 2, pp_microbatches=2, cp_impl="none")
    cluster = ClusterSpec(gpu, 32, 8)
    pipeline = estimate_pipeline(SEVENTY_B, cluster, cfg, EXECUTOR, MODES)
    layer = micro_parts(SEVENTY_B, cluster, micro_config(cfg), EXECUTOR)[0]
    for stage in pipeline.stages:
        gathers = len(stage.layers) * layer.fsdp_first_gather_s * 3 / 2
        hidden_by = stage.parts_s["compute"] + stage.parts_s["recompute"]
        assert (gathers > hidden_by) == exposed
        assert stage.parts_s["fsdp"] == pytest.approx(max(0.0, gathers - hidden_by), rel=1e-9, abs=0.0)
        assert stage.microbatch_s == pytest.approx(sum(stage.parts_s.values()), rel=1e-12)


def test_rank_memory_overheads_and_optimizer_step_by_hand():
    gpu = resolve_gpu("h100")
    model = EIGHT_B
    par = Parallelism(dp_shard=2, tp=2, pp=2)
    cfg = TrainConfig(par, 8192, 4, pp_microbatches=4, cp_impl="none")
    pipeline = estimate_pipeline(model, ClusterSpec(gpu, 8, 8), cfg, EXECUTOR, MODES)
    micro = micro_config(cfg)
    mt = memory_terms(model, micro, EXECUTOR)
    tp, shards = 2, 2
    block = model.params_per_layer / tp
    embed = model.embedding_params / tp
    out = (model.output_params + model.dim) / tp  # output projection + final norm
    # NCCL: the step's communicators plus one more, and a peer buffer each way for P2P.
    comm = nccl_bytes(micro, EXECUTOR) + EXECUTOR.nccl_communicator_bytes + 2 * EXECUTOR.nccl_alltoall_peer_bytes
    assert mt.loss_stranded_bytes > 0
    for stage, layers in zip(pipeline.stages, rank_layers(model.n_layers, 2)):
        root = embed if stage.first else out
        stage_params = len(layers) * block + root
        # fp32 master params and two fp32 AdamW states, sharded over FSDP.
        assert stage.breakdown_bytes["params"] == pytest.approx(stage_params / shards * 4)
        assert stage.breakdown_bytes["optimizer"] == pytest.approx(stage_params / shards * 8)
        # The optimizer step: states, the fp32 grads (reduced, sharded) and AdamW's temporaries.
        assert stage.optimizer_tensor_bytes == pytest.approx(stage_params / shards * (4 + 8 + 4)
                                                             + mt.optimizer_temp_bytes)
        tensor = max(stage.phase_tensor_bytes[stage.tensor_peak_phase], stage.optimizer_tensor_bytes)
        assert stage.tensor_bytes == pytest.approx(tensor)
        # Reserved: tensors (and, on the last rank, the loss's stranded blocks) over the
        # allocator's fragmentation, plus FSDP2's all-gather pool (bf16, the larger of the
        # root unit and the blocks in flight) and reduce-scatter pool (fp32, the stage's shard).
        stranded = mt.loss_stranded_bytes if stage.last else 0.0
        gather_pool = 2 * max(root, min(EXECUTOR.fsdp_blocks_in_flight, len(layers)) * block)
        scatter_pool = stage_params / shards * 4
        reserved = (tensor + stranded) * (1 + mt.fragmentation) + gather_pool + scatter_pool
        assert stage.breakdown_bytes["comm_buffers"] == pytest.approx(comm)
        assert stage.breakdown_bytes["overhead"] == pytest.approx(reserved - tensor + EXECUTOR.cuda_context_bytes)
        assert stage.peak_bytes == pytest.approx(reserved + EXECUTOR.cuda_context_bytes + comm)


def test_stage_split_edges_and_the_default_ac_by_hand():
    from cost_models.pipeline import pipeline_step_estimate, stage_layers

    assert stage_layers(4, 1) == [[0, 1, 2, 3]]  # one stage holds every layer
    with pytest.raises(ValueError) as error:
        stage_layers(2, 3)
    assert str(error.value) == "2 layers cannot fill 3 pipeline stages"
    # A config without an AC policy runs every layer without checkpointing.
    cfg = TrainConfig(Parallelism(dp_shard=2, pp=2), 1024, 2, pp_microbatches=2, cp_impl="none")
    cluster = ClusterSpec(resolve_gpu("h100"), 4, 4)
    unset = pipeline_step_estimate(EIGHT_B, cluster, cfg, EXECUTOR)
    explicit = pipeline_step_estimate(EIGHT_B, cluster, replace(cfg, ac=ACPolicy(("none",) * 4)), EXECUTOR)
    assert unset.step_time_s == explicit.step_time_s and unset.peak_memory_bytes == explicit.peak_memory_bytes


def test_config_messages_name_the_field():
    from cost_models.specs import SpecError

    for field, value in (("local_batch_size", 0), ("grad_accum_steps", -1)):
        with pytest.raises(SpecError) as error:
            TrainConfig(Parallelism(), 1024, **{field: value})
        assert str(error.value) == f"{field}={value} must be a positive integer"


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_one_block_ranks_phases_by_hand(mode):
    """Two layers over pp = 2 (one block per rank), TP 2, FSDP 2, 1F1B with 2 micro-batches
    of one 1k sequence: each rank's phases from the model's dimensions."""
    from cost_models.activations import layer_memory
    from cost_models.pipeline import in_flight_microbatches, p2p_bytes, stage_memory_phases

    model = replace(MODEL_PRESETS["llama3-8b"], n_layers=2)
    d, f, vocab, tp = 4096, 14336, 128256, 2
    cfg = TrainConfig(Parallelism(dp_shard=2, tp=2, pp=2), 1024, 2, pp_microbatches=2, cp_impl="none")
    micro = micro_config(cfg)
    mt = memory_terms(model, micro, EXECUTOR)
    raw = layer_memory(model, micro, EXECUTOR)
    tokens = 1024  # one sequence per micro-batch, no CP
    block_bf16 = model.params_per_layer / tp * 2
    w2_grad = d * f / tp * 2  # bf16
    output_grad = vocab * d / tp * 2  # bf16
    norm_in = 2 * tokens * d / tp + 4 * tokens / tp  # the RMSNorm's saved bf16 input and fp32 rstd
    own = mt.layer.saved[mode]
    moment = max(own + raw.working[mode] + w2_grad, min(own, norm_in) + block_bf16 + mt.norm_backward_working_bytes)
    for rank in (0, 1):
        first, last = rank == 0, rank == 1
        in_flight = in_flight_microbatches("1f1b", rank, 2, 2)
        phases = stage_memory_phases(model, cfg, EXECUTOR, mt, [mode], first, last, in_flight, rank)
        # One receive buffer per micro-batch into rank 1 (activations) and into rank 0 (grads).
        buffers = 2 * p2p_bytes(model, cfg) + 2 * mt.input_bytes
        backward = phases["layer_backward"]
        assert backward["recompute_working"] == pytest.approx(moment)
        assert backward["activations"] == pytest.approx((in_flight - 1) * own + buffers)
        assert backward["logits_loss"] == (output_grad if last else 0.0)
        assert ("embedding_backward" in phases) == first and ("loss" in phases) == last
        if first:  # the dense [vocab, d] bf16 grad DTensor writes on every TP rank, and its incoming grad
            embedding = phases["embedding_backward"]
            assert embedding["recompute_working"] == pytest.approx(vocab * d * 2 + 2 * tokens * d)
            assert embedding["logits_loss"] == 0.0
            assert embedding["activations"] == pytest.approx(max(0.0, in_flight - 1) * own + buffers)


def test_estimate_step_prices_any_pipeline_as_a_pipeline():
    # pp = 2, the smallest pipeline: the step is the schedule's (bubble included), not a
    # whole-model step on each rank.
    cfg = TrainConfig(Parallelism(dp_shard=2, pp=2), 1024, 2, pp_microbatches=2, cp_impl="none")
    cluster = ClusterSpec(resolve_gpu("h100"), 4, 4)
    est = estimate_step(EIGHT_B, cluster, cfg, EXECUTOR)
    pipeline = estimate_pipeline(EIGHT_B, cluster, cfg, EXECUTOR, ("none",) * 4)
    assert est.pipeline is not None and est.step_time_s == pytest.approx(pipeline.step_time_s, rel=1e-12)
    assert pipeline.bubble_s > 0
    # Its summary (what `autoplan cost` prints as JSON) names the slowest and each rank's peak.
    slowest = max(pipeline.stages, key=lambda stage: stage.microbatch_s).rank
    summary = est.summary()
    assert summary["slowest_stage"] == slowest
    assert summary["stage_peak_memory_bytes"] == [stage.peak_bytes for stage in pipeline.stages]
    assert summary["pipeline_bubble_fraction"] == pytest.approx(1 / 3)  # (pp - 1) / (m + pp - 1)
