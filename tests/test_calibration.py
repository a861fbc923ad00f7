"""The calibration fit recovers efficiencies that generated synthetic measurements."""

import json
import math
import random

import pytest

from autoplan.calibration import CalibrationRecord, apply_calibration, fit_calibration, load_calibration
from autoplan.cli import main
from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.executors import resolve_executor
from cost_models.memory import estimate_memory
from cost_models.specs import ClusterSpec, MODEL_PRESETS, resolve_gpu
from cost_models.step import estimate_step

TRUTH = {"matmul_efficiency": 0.61, "attention_efficiency": 0.42, "intra_node_bus_efficiency": 0.70,
         "inter_node_bus_efficiency": 0.55, "allocator_fragmentation": 0.08}
LAYOUTS = [  # (gpus, degrees, seq, ac): single- and multi-node, compute- and comm-heavy
    (8, {"dp_shard": 8}, 8192, "full"), (8, {"dp_shard": 4, "tp": 2}, 16384, "selective"),
    (8, {"dp_shard": 2, "cp": 4}, 65536, "full"), (8, {"tp": 8}, 4096, "none"),
    (16, {"dp_shard": 16}, 4096, "full"), (32, {"dp_shard": 32}, 8192, "full"),
    (32, {"dp_replicate": 4, "dp_shard": 8}, 8192, "selective"), (16, {"dp_shard": 2, "cp": 8}, 131072, "full"),
    (64, {"dp_shard": 64}, 4096, "full"), (16, {"dp_shard": 8, "tp": 2}, 32768, "full"),
    (8, {"dp_shard": 8}, 32768, "full"), (32, {"dp_shard": 4, "cp": 8}, 262144, "full"),
    (16, {"dp_shard": 16}, 16384, "selective"), (64, {"dp_shard": 8, "cp": 8}, 131072, "full"),
    (8, {"dp_shard": 8}, 4096, "none"), (32, {"dp_shard": 16, "tp": 2}, 16384, "full"),
]


def synthetic_records(truth, noise, seed, layouts=LAYOUTS, gpu_name="h100"):
    rng = random.Random(seed)
    model = MODEL_PRESETS["llama3-8b"]
    base = resolve_gpu(gpu_name)
    gpu = base.with_overrides(**{k: v for k, v in truth.items() if k != "allocator_fragmentation"})
    executor = resolve_executor("autoplan").with_overrides(allocator_fragmentation=truth["allocator_fragmentation"])
    records = []
    for gpus, degrees, seq, ac in layouts:
        cfg = TrainConfig(Parallelism(**degrees), seq, ac=ACPolicy.uniform(ac, model.n_layers),
                          cp_impl="allgather-kv")
        cluster = ClusterSpec(gpu, gpus)
        step = estimate_step(model, cluster, cfg, executor).step_time_s * math.exp(rng.gauss(0, noise))
        peak = estimate_memory(model, cfg, executor).peak_bytes * math.exp(rng.gauss(0, noise / 4))
        records.append(CalibrationRecord(
            model=model.to_dict(), gpu=base.to_dict(), num_gpus=gpus, gpus_per_node=min(8, gpus),
            parallelism=cfg.parallelism.as_dict(), mesh_order=list(cfg.mesh_order), seq_len=seq, local_batch_size=1,
            grad_accum_steps=1, layer_modes=list(cfg.ac.layer_modes), cp_impl=cfg.cp_impl, executor="autoplan",
            step_time_s=step, peak_memory_bytes=peak, source="synthetic"))
    return records


def test_fit_recovers_chosen_parameters_under_noise():
    fit = fit_calibration(synthetic_records(TRUTH, noise=0.02, seed=1))
    prior = resolve_gpu("h100")
    assert fit.rms_after < fit.rms_before / 3
    # Tolerances: 2% multiplicative noise on 16 records moves each time-dominant
    # parameter by a few percent; the comm efficiencies are seen through fewer records.
    assert fit.fitted["matmul_efficiency"] == pytest.approx(TRUTH["matmul_efficiency"], rel=0.06)
    assert fit.fitted["attention_efficiency"] == pytest.approx(TRUTH["attention_efficiency"], rel=0.10)
    assert fit.fitted["inter_node_bus_efficiency"] == pytest.approx(TRUTH["inter_node_bus_efficiency"], rel=0.15)
    assert fit.fitted["allocator_fragmentation"] == pytest.approx(TRUTH["allocator_fragmentation"], abs=0.02)
    # and it moved away from the (different) priors it started from
    assert abs(prior.matmul_efficiency - TRUTH["matmul_efficiency"]) > 0.1


def test_held_out_error_drops():
    records = synthetic_records(TRUTH, noise=0.02, seed=2)
    fit = fit_calibration(records[:12])
    held = records[12:]
    def mean_abs(values):
        return sum(map(abs, values)) / len(values)
    from autoplan.calibration import _time_errors
    assert mean_abs(_time_errors(held, fit.fitted)) < mean_abs(_time_errors(held, fit.prior)) / 3


def test_parameter_no_record_can_see_keeps_its_prior():
    single_node = [l for l in LAYOUTS if l[0] == 8]  # no record crosses the network
    fit = fit_calibration(synthetic_records(TRUTH, noise=0.0, seed=3, layouts=single_node))
    assert "inter_node_bus_efficiency" in fit.not_identifiable
    assert fit.fitted["inter_node_bus_efficiency"] == pytest.approx(resolve_gpu("h100").inter_node_bus_efficiency)


def test_calibrate_command_writes_a_file_the_planner_uses(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r.__dict__) for r in synthetic_records(TRUTH, 0.01, 4)))
    out = tmp_path / "calibration.yaml"
    assert main(["calibrate", str(path), "--out", str(out), "--holdout", "0.25"]) == 0
    assert "held-out" in capsys.readouterr().out
    data = load_calibration(out)
    gpu, executor = apply_calibration(resolve_gpu("h100"), resolve_executor("autoplan"), data)
    assert gpu.matmul_efficiency == pytest.approx(data["fitted"]["matmul_efficiency"])
    assert main(["--gpus", "8", "--target-seqlen", "8k", "--calibration", str(out)]) == 0
    assert "calibration" in capsys.readouterr().out
