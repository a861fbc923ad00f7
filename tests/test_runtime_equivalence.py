"""Every layout trains exactly like one process: same seed, same global batch, fp32, gloo.

Reference: a single process running the same plan shape (global batch 4 x 32 tokens).
Each layout runs 20 steps under torchrun; max |loss difference| must stay <= 1e-4.
A negative control (FSDP sharded over dp_shard only while cp=2) must diverge.
"""

import pytest

from runtime_helpers import run_plan, write_plan

STEPS = 20
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    code, losses, err = run_plan(write_plan(tmp / "single.yaml", {}, local_batch_size=GLOBAL_BATCH), 1, STEPS, tmp)
    assert code == 0, err[-3000:]
    assert len(losses) == STEPS and losses[-1] < losses[0]  # it actually trains
    return losses


LAYOUTS = {
    "dp_shard4": dict(parallelism={"dp_shard": 4}),
    "dp_shard2_cp2": dict(parallelism={"dp_shard": 2, "cp": 2}, modes=["full", "selective"]),
    "cp4": dict(parallelism={"cp": 4}),
    "tp2_cp2": dict(parallelism={"tp": 2, "cp": 2}, modes=["selective", "none"]),
    "hsdp_rep2_shard2": dict(parallelism={"dp_replicate": 2, "dp_shard": 2}),
    "tp2_dp_shard2": dict(parallelism={"tp": 2, "dp_shard": 2}, modes=["full", "full"]),
    "hsdp_cp_8proc": dict(parallelism={"dp_replicate": 2, "dp_shard": 2, "cp": 2}),
    "cp_outermost_order": dict(parallelism={"dp_shard": 2, "cp": 2},
                               mesh_order=["cp", "tp", "dp_replicate", "dp_shard"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    spec = dict(LAYOUTS[name])
    parallelism = spec.pop("parallelism")
    dp = parallelism.get("dp_replicate", 1) * parallelism.get("dp_shard", 1)
    world = dp * parallelism.get("cp", 1) * parallelism.get("tp", 1)
    plan = write_plan(tmp_path / f"{name}.yaml", parallelism, local_batch_size=GLOBAL_BATCH // dp, **spec)
    code, losses, err = run_plan(plan, world, STEPS, tmp_path)
    assert code == 0, err[-3000:]
    assert len(losses) == STEPS
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    assert worst <= 1e-4, f"{name}: max |loss diff| {worst:.2e}"


@pytest.mark.timeout(300)
def test_negative_control_fsdp_over_dp_shard_only_diverges(reference, tmp_path):
    """CP ranks hold different tokens: not reducing their gradients must break training."""
    plan = write_plan(tmp_path / "wrong.yaml", {"dp_shard": 2, "cp": 2}, local_batch_size=2)
    code, losses, err = run_plan(plan, 4, STEPS, tmp_path, extra=["--debug-fsdp-over-dp-shard-only"])
    assert code == 0, err[-3000:]
    assert max(abs(a - b) for a, b in zip(losses, reference)) > 1e-3
