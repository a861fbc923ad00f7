"""Run several plans in ONE torchrun launch (one process group, a new mesh per plan), so
the equivalence tests pay process start-up once. Usage (under torchrun):
``python tests/runtime_layout_worker.py JOBS.json`` with a list of
``{"plan": PATH, "metrics": PATH, "steps": N, "shard_over_cp": bool}``."""

import json
import sys

import torch
import torch.distributed as dist

from autoplan.plan import Plan
from runtime.data import TokenSource
from runtime.mesh import ParallelDims, build_mesh
from runtime.train import train_loop


def main(jobs_path: str) -> None:
    jobs = json.loads(open(jobs_path).read())
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            plan = Plan.load(job["plan"])
            p = plan.parallelism
            dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, dist.get_world_size())
            mesh = build_mesh(dims, "cpu", plan.mesh_order)
            source = TokenSource(plan.model_spec().vocab_size, plan.seq_len, seed=0)
            train_loop(plan, mesh, dims, torch.device("cpu"), source, job["steps"], seed=0,
                       metrics_path=job["metrics"], shard_over_cp=job.get("shard_over_cp", True))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
