"""Train a plan: ``torchrun --nproc-per-node N -m runtime.train --plan PLAN.yaml``.

CUDA + NCCL when GPUs are present, CPU + gloo otherwise (or with ``--device cpu``).
On CPU everything runs in fp32 (exactness tests compare layouts to 1e-6).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from autoplan.plan import Plan, PlanError

from . import checkpoint as ckpt
from . import pipeline as pp
from .context_parallel import shard_sequence
from .data import TOKEN_DTYPES, DataError, TokenSource, batch_for_step
from .loss import chunked_cross_entropy_sum, parallel_cross_entropy_sum
from .mesh import LayoutError, ParallelDims, build_mesh
from .metrics import StepMetrics, format_summary, run_device_name, summarize_run  # noqa: F401 (re-exported)
from .model import Transformer, init_weights
from .parallelize import parallelize, uses_native_cp
from .preflight import DEFAULT_CHECKPOINT_EVERY, ArgumentError, preflight

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TrainingState:
    plan: Plan
    dims: ParallelDims
    mesh: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    step: int = 0
    pipeline: pp.Pipeline | None = None  # pp > 1


def lr_lambda(warmup: int, total: int | None):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not total or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_parallel_model(plan: Plan, mesh, dims: ParallelDims, device: torch.device, shard_over_cp: bool = True,
                         param_dtype: torch.dtype | None = None) -> Transformer:
    """The model on the meta device with every parallelism applied (no memory yet)."""
    spec = plan.model_spec()
    with torch.device("meta"):
        model = Transformer(spec)
    layer_modes = plan.activation_checkpoint.layer_modes(spec.n_layers)
    if param_dtype is None:
        param_dtype = DTYPES[plan.precision.param_dtype] if device.type == "cuda" else torch.float32
    reduce_dtype = DTYPES[plan.precision.reduce_dtype] if device.type == "cuda" else torch.float32
    parallelize(model, dims, mesh, layer_modes, param_dtype, reduce_dtype, shard_over_cp, plan.cp_impl, device.type)
    return model


def build_pipeline(plan: Plan, mesh, dims: ParallelDims, device: torch.device, shard_over_cp: bool = True,
                   param_dtype: torch.dtype | None = None) -> tuple[pp.Pipeline, pp.LocalStages]:
    """This pp rank's stages on the meta device, each parallelized like a whole model."""
    if dims.cp > 1 and uses_native_cp(plan.cp_impl, device.type):
        raise LayoutError(f"cp_impl {plan.cp_impl!r} with pp > 1: the ring runs inside context_parallel() around "
                          "one model's step, not a pipeline schedule; use cp_impl allgather-kv")
    spec = plan.model_spec()
    with torch.device("meta"):
        model = Transformer(spec)
    pipe = pp.split_model(model, mesh, dims, plan.pp_virtual_stages, plan.pp_schedule, plan.microbatches)
    layer_modes = plan.activation_checkpoint.layer_modes(spec.n_layers)
    if param_dtype is None:
        param_dtype = DTYPES[plan.precision.param_dtype] if device.type == "cuda" else torch.float32
    reduce_dtype = DTYPES[plan.precision.reduce_dtype] if device.type == "cuda" else torch.float32
    for stage in pipe.stages:
        modes = tuple(layer_modes[int(name)] for name in stage.layers)
        parallelize(stage, dims, mesh, modes, param_dtype, reduce_dtype, shard_over_cp, plan.cp_impl,
                    device.type)
    return pipe, pp.LocalStages(pipe.stages)


def build_training_state(plan: Plan, mesh, dims: ParallelDims, device: torch.device, seed: int = 0,
                         materialize: bool = True, shard_over_cp: bool = True,
                         param_dtype: torch.dtype | None = None, model: Transformer | None = None,
                         pp_schedule_scales_grads: bool = False, pp_static_shapes: bool = False,
                         pipeline: pp.Pipeline | None = None) -> TrainingState:
    """Model built on meta, parallelized, then materialized shard by shard (+ AdamW).

    ``pp_schedule_scales_grads`` (pp > 1, negative control only): PyTorch's default loss
    scaling, wrong under gradient accumulation (runtime/pipeline.py). ``pp_static_shapes``
    (pp > 1): give the stages their shapes instead of exchanging them on the first step
    (the fake process group's P2P carries no data; runtime/trace.py). ``pipeline`` and
    ``model``: a pipeline already built by ``build_pipeline`` (its stages and LocalStages)."""
    if dims.pp > 1 and pipeline is None:
        pipeline, model = build_pipeline(plan, mesh, dims, device, shard_over_cp, param_dtype)
    pipe = pipeline
    if pipe is None and model is None:
        model = build_parallel_model(plan, mesh, dims, device, shard_over_cp, param_dtype)
    assert model is not None
    model.to_empty(device=device)
    if materialize:
        init_weights(model, seed)
    if pipe is not None:
        pipe.scale_grads = pp_schedule_scales_grads
        tokens = plan.local_batch_size * plan.seq_len // dims.cp * plan.grad_accum_steps  # per rank and step
        loss_fn = pp.pipeline_loss_fn(pipe.stages[-1], dims.tp, plan.loss_chunk_tokens,
                                      tokens // pipe.microbatches if pipe.scale_grads else tokens)
        static = None
        if pp_static_shapes:
            dtype = param_dtype or (DTYPES[plan.precision.param_dtype] if device.type == "cuda" else torch.float32)
            static = pp.static_stage_args(pipe, plan.local_batch_size // pipe.microbatches, plan.seq_len // dims.cp,
                                          dims.tp, dtype)
        pp.build_schedule(pipe, device, loss_fn, static)
    opt = plan.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas),
                                  weight_decay=opt.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt.warmup_steps, opt.total_steps))
    return TrainingState(plan, dims, mesh, model, optimizer, scheduler, device, pipeline=pipe)


def local_tokens(state: TrainingState, inputs: torch.Tensor, labels: torch.Tensor):
    """This rank's (inputs, labels, positions) after context-parallel sharding."""
    positions = torch.arange(inputs.shape[1])
    cp = state.dims.cp
    if cp > 1:
        rank = state.mesh["cp"].get_local_rank()
        inputs, labels = shard_sequence(inputs, rank, cp), shard_sequence(labels, rank, cp)
        positions = shard_sequence(positions, rank, cp, dim=0)
    return inputs.to(state.device), labels.to(state.device), positions.to(state.device)


def micro_loss(state: TrainingState, inputs, labels, positions) -> torch.Tensor:
    """Mean token loss on this rank's tokens (FSDP's gradient averaging makes it global)."""
    model = state.model
    hidden = model(inputs, positions)
    if state.dims.tp > 1:
        loss_sum = parallel_cross_entropy_sum(hidden, model.output, labels, state.plan.loss_chunk_tokens)
    else:
        loss_sum = chunked_cross_entropy_sum(hidden, model.output, labels, state.plan.loss_chunk_tokens)
    return loss_sum / labels.numel()


def loss_backward_context(dims: ParallelDims):
    """A fresh context for one backward of the loss: TP's ``loss_parallel`` (a generator
    context, not re-enterable: each micro-batch needs its own) or nothing."""
    if dims.tp > 1:
        from torch.distributed.tensor.parallel import loss_parallel
        return loss_parallel()
    return contextlib.nullcontext()


def _native_cp_micro_step(state: TrainingState, inputs, labels, accum: int):
    """CUDA ring attention: PyTorch's ``context_parallel`` shards the buffers (its own
    head-tail load balancing) and swaps SDPA for ring attention inside the block."""
    from torch.distributed.tensor.experimental import context_parallel

    inputs, labels = inputs.to(state.device), labels.to(state.device)
    positions = torch.arange(inputs.shape[1], device=state.device)
    with context_parallel(state.mesh["cp"], buffers=[inputs, labels, positions], buffer_seq_dims=[1, 1, 0],
                          no_restore_buffers={inputs, labels, positions}):
        loss = micro_loss(state, inputs, labels, positions) / accum
        with loss_backward_context(state.dims):
            loss.backward()
    return loss


def train_step(state: TrainingState, batches) -> dict:
    """One optimizer step over ``grad_accum_steps`` micro-batches.

    Returns tensors (loss averaged over dp x cp, identical on every rank; the total grad
    norm) and the learning rate used; nothing here reads a value back to the host, so a
    step can be traced under FakeTensorMode.
    """
    plan = state.plan
    accum = plan.grad_accum_steps
    total = torch.zeros((), device=state.device)
    native_cp = state.dims.cp > 1 and uses_native_cp(plan.cp_impl, state.device.type)
    for inputs, labels in batches:
        if state.pipeline is not None:
            inputs, labels, positions = local_tokens(state, inputs, labels)
            with loss_backward_context(state.dims):  # the schedule runs every backward
                total += pp.forward_backward(state.pipeline, inputs, labels, positions)
            continue
        if native_cp:
            loss = _native_cp_micro_step(state, inputs, labels, accum)
        else:
            inputs, labels, positions = local_tokens(state, inputs, labels)
            loss = micro_loss(state, inputs, labels, positions) / accum
            with loss_backward_context(state.dims):
                loss.backward()
        total += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
    if state.pipeline is not None:
        grad_norm = pp.clip_grad_norm_(state.pipeline, state.model.parameters(), plan.optimizer.max_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), plan.optimizer.max_norm, foreach=False)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    dist.all_reduce(total, op=dist.ReduceOp.AVG, group=state.mesh["dp_cp"].get_group())
    if state.pipeline is not None:
        pp.broadcast_from_last(state.pipeline, total)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return {"loss": total, "grad_norm": grad_norm, "lr": lr}


# ----------------------------------------------------------------------------- driver


def _init_distributed(device_arg: str) -> torch.device:
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise LayoutError("--device cuda: no CUDA device is available")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def train_loop(plan: Plan, mesh, dims: ParallelDims, device: torch.device, source: TokenSource, steps: int,
               seed: int = 0, metrics_path: str | None = None, checkpoint_dir: str | None = None,
               checkpoint_every: int | None = None, resume: bool = False, shard_over_cp: bool = True,
               start_checkpoint: Path | None = None, log_every: int = 0,
               pp_schedule_scales_grads: bool = False) -> list[dict]:
    """Train ``plan`` on an existing mesh up to step ``steps``; returns the step records.

    With ``checkpoint_dir`` it saves every ``checkpoint_every`` steps (default
    DEFAULT_CHECKPOINT_EVERY; 0: only at the end) and always after the last step.
    ``start_checkpoint`` (or, with ``resume``, the newest whole one) is loaded first.
    """
    state = build_training_state(plan, mesh, dims, device, seed, shard_over_cp=shard_over_cp,
                                 pp_schedule_scales_grads=pp_schedule_scales_grads)
    if start_checkpoint is None and resume and checkpoint_dir:
        start_checkpoint = ckpt.choose(checkpoint_dir, plan)[0]
    if start_checkpoint is not None:
        _restore(state, start_checkpoint)
    if checkpoint_every is None:
        checkpoint_every = DEFAULT_CHECKPOINT_EVERY
    dp_rank, dp = mesh["dp"].get_local_rank(), dims.dp_replicate * dims.dp_shard
    log = StepMetrics(plan, device, dist.get_world_size(), metrics_path, write=dist.get_rank() == 0,
                      start_step=state.step, log_every=log_every, last_step=steps)
    try:
        for step in range(state.step, steps):
            batches = [batch_for_step(source, step * plan.grad_accum_steps + m, plan.local_batch_size, dp_rank, dp)
                       for m in range(plan.grad_accum_steps)]
            _synchronize(device)
            began = time.perf_counter()
            raw = train_step(state, batches)
            raw = {key: float(value) for key, value in raw.items()}  # waits for the step
            _synchronize(device)
            log.record(step + 1, raw, time.perf_counter() - began)
            last = step + 1 == steps
            if checkpoint_dir and (last or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                ckpt.save(checkpoint_dir, step + 1, state.model, state.optimizer,
                          {"step": step + 1, "scheduler": state.scheduler.state_dict(), "rng": ckpt.rng_state(),
                           "data_position": (step + 1) * plan.grad_accum_steps,
                           "fingerprint": ckpt.fingerprint(plan)}, pipelined=state.pipeline is not None)
    finally:
        log.close()
    return log.records


def _restore(state: TrainingState, found: Path) -> None:
    trainer = ckpt.load(found, state.model, state.optimizer, pipelined=state.pipeline is not None)
    try:
        state.scheduler.load_state_dict(trainer["scheduler"])
        ckpt.set_rng_state(trainer["rng"])
        state.step = int(trainer["step"])
    except (KeyError, TypeError, ValueError) as error:
        raise ckpt.CheckpointError(f"checkpoint {found} cannot be loaded (trainer state lacks {error}); "
                                   "delete it or point --checkpoint-dir elsewhere") from None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PreflightError(Exception):
    """A one-line error found before any process group exists (printed by rank 0 only)."""


def _quiet_other_ranks(rank: int) -> None:
    """DTensor's 'inconsistent results between ranks' warning is the same on every rank:
    let rank 0 print it."""
    if rank != 0:
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def run(args) -> dict:
    rank = int(os.environ.get("RANK", "0"))
    _quiet_other_ranks(rank)
    try:
        plan = Plan.load(args.plan)
        p = plan.parallelism
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, world, p.pp)  # checked before any collective
        if plan.seq_len % (2 * p.cp) or (p.tp > 1 and (plan.seq_len // p.cp) % p.tp):
            raise LayoutError(f"seq_len={plan.seq_len} must split into 2 x cp = {2 * p.cp} equal chunks "
                              f"(and each rank's {plan.seq_len // p.cp} tokens by tp={p.tp})")
        start, source = preflight(args, plan)
    except (PlanError, LayoutError, DataError, ArgumentError, ckpt.CheckpointError) as error:
        raise PreflightError(str(error)) from None
    if rank == 0:
        for warning in start.warnings:
            print(f"runtime.train: {warning}", file=sys.stderr)
    device = _init_distributed(args.device)
    mesh = build_mesh(dims, device.type, plan.mesh_order)
    records = train_loop(plan, mesh, dims, device, source, args.steps, args.seed, args.metrics,
                         args.checkpoint_dir, args.checkpoint_every,
                         shard_over_cp=not args.debug_fsdp_over_dp_shard_only, start_checkpoint=start.checkpoint, log_every=args.log_every,
                         pp_schedule_scales_grads=args.debug_pp_schedule_scales_grads)
    summary = summarize_run(plan, records)
    if dist.get_rank() == 0:
        run_device = run_device_name(device)
        print(format_summary(plan, summary, run_device))
        if args.record:
            with open(args.record, "a") as out:
                out.write(json.dumps({"plan": plan.model_dump(mode="json", exclude={"alternatives"}),
                                      "measured": summary, "device": str(device),
                                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                                      else "cpu"}) + "\n")
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m runtime.train", description=__doc__)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--steps", type=int, default=10, help="train up to this step (a resumed run continues)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics", default=None, help="JSONL, one object per step (rank 0)")
    parser.add_argument("--data", default=None,
                        help="token ids: .npy, or a raw file whose dtype is in PATH.json or --data-dtype")
    parser.add_argument("--data-dtype", choices=TOKEN_DTYPES, default=None,
                        help="dtype of a raw --data file without a PATH.json sidecar")
    parser.add_argument("--checkpoint-dir", default=None, help="save here (always after the last step)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help=f"steps between checkpoints (default {DEFAULT_CHECKPOINT_EVERY}; 0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest whole checkpoint")
    parser.add_argument("--log-every", type=int, default=10, help="progress line every N steps (0: none)")
    parser.add_argument("--record", default=None, help="append a calibration record (JSONL)")
    parser.add_argument("--debug-fsdp-over-dp-shard-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--debug-pp-schedule-scales-grads", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
        code = 0
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    except PreflightError as error:  # the same on every rank: said once
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"runtime.train: error: {error}", file=sys.stderr)
        code = 2
    except (PlanError, LayoutError, DataError, ckpt.CheckpointError) as error:
        print(f"runtime.train: error: {error}", file=sys.stderr)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    exit_code = main()
    if exit_code != 0:
        # An error: leave as usual. (A rank that left at once here could have torchrun stop
        # rank 0 before it printed the error that only rank 0 prints.)
        sys.exit(exit_code)
    # torch 2.13's gloo can abort a rank in a C++ destructor at interpreter exit, after
    # destroy_process_group returned ("terminate called without an active exception": 3 in
    # ~130 two-rank CPU launches here, the flaky resume test). After a run, everything is
    # written, flushed and closed and the peers passed the final barrier: skip the destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
