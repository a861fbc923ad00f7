"""Pipeline parallelism: whole layers per stage, PyTorch's schedules, the loss on the last stage.

The Transformer is cut between layers (the embedding goes with the first stage, the final
norm, output projection and loss with the last); each stage is then parallelized like a
whole model (TP, CP, AC, FSDP over dp_shard x cp) and wrapped in a ``PipelineStage`` on
the mesh's "pp" group. With ``v`` virtual stages (interleaved schedule) pp rank ``r``
holds stages ``r, r + pp, ..., r + (v - 1) pp``.

Loss scaling: each micro-batch's loss is its token-loss sum divided by ALL the tokens
this rank sees in the optimizer step (micro-batches x grad-accumulation steps), and the
schedule does not rescale gradients (``scale_grads=False``). PyTorch's default -- a
per-micro-batch mean and ``scale_grads=True`` -- divides every gradient present at the
end of a schedule step, so with gradient accumulation the earlier micro-steps' gradients
are divided again; ``schedule_scales_grads=True`` keeps that mistake reachable for the
negative-control test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cost_models.pipeline import stage_layers as priced_stage_layers

from .loss import chunked_cross_entropy_sum, parallel_cross_entropy_sum
from .mesh import LayoutError, ParallelDims
from .model import Transformer, rope_cos_sin


def stage_layers(n_layers: int, stages: int) -> list[list[int]]:
    """Layer indices of each stage, in order. When they do not divide evenly the earlier
    stages take one more layer: the last stage also carries the output projection and loss.
    One split for the runtime and the cost model that prices it (``cost_models.pipeline``)."""
    if n_layers < stages:
        raise LayoutError(f"{n_layers} layers cannot fill pp x pp_virtual_stages = {stages} pipeline stages "
                          "(each needs a whole layer): lower pp or pp_virtual_stages")
    return priced_stage_layers(n_layers, stages)


def stages_of_rank(rank: int, pp: int, virtual: int) -> list[int]:
    """Stage indices pp rank ``rank`` holds: ``rank, rank + pp, ...`` (the looped placement
    PyTorch's interleaved schedules expect; one stage per rank when ``virtual == 1``)."""
    return [rank + v * pp for v in range(virtual)]


class Stage(nn.Module):
    """One stage of a ``Transformer``: its own submodules under their original names, so
    ``init_weights`` (seeded per parameter name), the TP plan and checkpoints see the
    names they see in the whole model.

    RoPE positions are the same for every micro-batch (they index the sequence, which the
    schedule does not split), so they are set once per step in ``positions`` instead of
    being passed through the schedule, which would split them like a batch.
    """

    def __init__(self, model: Transformer, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.spec = model.spec
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.positions: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        assert self.positions is not None, "set Stage.positions before running the schedule"
        cos, sin = rope_cos_sin(self.positions, self.spec.head_dim, self.spec.rope_theta, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.norm(h) if self.norm is not None else h


class LocalStages(nn.Module):
    """This rank's stages seen as one model with the whole model's parameter names
    (``layers.5.attention.wq.weight``, ...), for the optimizer, init and checkpoints.
    The stages themselves are kept in a plain list, so they add no name prefix."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.spec = stages[0].spec
        self.stages = list(stages)
        self.tok_embeddings = stages[0].tok_embeddings
        self.layers = nn.ModuleDict({name: layer for stage in stages for name, layer in stage.layers.items()})
        self.norm = stages[-1].norm
        self.output = stages[-1].output


@dataclass
class Pipeline:
    """This rank's part of the pipeline and the schedule that runs it."""

    stages: list[Stage]
    stage_ids: list[int]
    n_stages: int
    group: dist.ProcessGroup
    schedule_name: str
    microbatches: int
    schedule: object | None = None
    scale_grads: bool = False  # PyTorch's default; True only for the negative control

    @property
    def has_first(self) -> bool:
        return self.stage_ids[0] == 0

    @property
    def has_last(self) -> bool:
        return self.stage_ids[-1] == self.n_stages - 1


def split_model(model: Transformer, mesh, dims: ParallelDims, virtual: int, schedule: str,
                microbatches: int) -> Pipeline:
    """Cut ``model`` (on meta) into this pp rank's stages; parallelize them afterwards."""
    if model.spec.tie_embeddings:
        raise LayoutError("pipeline parallelism with tie_embeddings: the embedding (first stage) and the output "
                          "projection (last stage) would live on different ranks; use pp=1")
    n_stages = dims.pp * virtual
    split = stage_layers(model.spec.n_layers, n_stages)
    ids = stages_of_rank(mesh["pp"].get_local_rank(), dims.pp, virtual)
    stages = [Stage(model, split[i], i == 0, i == n_stages - 1) for i in ids]
    return Pipeline(stages, ids, n_stages, mesh["pp"].get_group(), schedule, microbatches)


def pipeline_loss_fn(last: Stage, tp: int, chunk_tokens: int | None, tokens: int):
    """The last stage's loss for one micro-batch: its token-loss sum over ``tokens`` (this
    rank's tokens in the whole optimizer step; one micro-batch's for the negative control)."""
    cross_entropy_sum = parallel_cross_entropy_sum if tp > 1 else chunked_cross_entropy_sum

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert last.output is not None
        total = cross_entropy_sum(hidden, last.output, labels, chunk_tokens)
        return total / tokens
    return loss_fn


def static_stage_args(pipe: Pipeline, microbatch: int, local_seq: int, tp: int, dtype: torch.dtype
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) examples of each of this rank's stages on the meta device, for
    ``PipelineStage``'s static shapes: token ids ``[mb, S]`` into stage 0, hidden states
    ``[mb, S / tp, d]`` (sequence-parallel under TP: the blocks' local output) between
    stages, the final norm's output out of the last."""
    d = pipe.stages[0].spec.dim
    ids = torch.empty(microbatch, local_seq, dtype=torch.long, device="meta")
    hidden = torch.empty(microbatch, local_seq // tp, d, dtype=dtype, device="meta", requires_grad=True)
    return [(ids if i == 0 else hidden, hidden) for i in pipe.stage_ids]


def build_schedule(pipe: Pipeline, device: torch.device, loss_fn,
                   static_args: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """PipelineStages on the pp group and the schedule. Shapes are inferred on the first
    step (P2P metadata exchange), or given by ``static_args`` (``static_stage_args``)."""
    scale_grads = pipe.scale_grads
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    shapes = static_args or [(None, None)] * len(pipe.stages)
    stages = [PipelineStage(module, i, pipe.n_stages, device, input_args=inputs, output_args=outputs,
                            group=pipe.group)
              for module, i, (inputs, outputs) in zip(pipe.stages, pipe.stage_ids, shapes)]
    try:
        if pipe.schedule_name == "interleaved-1f1b":
            pipe.schedule = ScheduleInterleaved1F1B(stages, n_microbatches=pipe.microbatches, loss_fn=loss_fn,
                                                    scale_grads=scale_grads)
        else:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[pipe.schedule_name]
            pipe.schedule = cls(stages[0], n_microbatches=pipe.microbatches, loss_fn=loss_fn,
                                scale_grads=scale_grads)
    except ValueError as error:
        raise LayoutError(f"pp_schedule {pipe.schedule_name!r} with pp_microbatches={pipe.microbatches}: "
                          f"{error}") from None


def forward_backward(pipe: Pipeline, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
                     ) -> torch.Tensor:
    """Run one local batch through the schedule; returns the sum of the micro-batch losses
    on the rank holding the last stage (zero elsewhere)."""
    for stage in pipe.stages:
        stage.positions = positions
    losses: list[torch.Tensor] = []
    args = (inputs,) if pipe.has_first else ()
    extra = {"target": labels, "losses": losses} if pipe.has_last else {}
    assert pipe.schedule is not None, "build_schedule first"
    # return_outputs=False: the losses are all we read; by default the last stage keeps every
    # micro-batch's output (the final norm's, tokens x d each) until the next step and
    # concatenates them at the end of this one (torch 2.13 schedules.py, output_chunks).
    pipe.schedule.step(*args, return_outputs=False, **extra)  # type: ignore[attr-defined]
    total = torch.zeros((), device=inputs.device)
    for loss in losses:
        loss = loss.detach()
        total += loss.full_tensor() if hasattr(loss, "full_tensor") else loss
    return total / pipe.microbatches if pipe.scale_grads else total


def clip_grad_norm_(pipe: Pipeline, parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over the whole model: each rank holds only its stages'
    gradients, so the squared norms are summed over the pp group first."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    norm = norm.pow(2)
    dist.all_reduce(norm, op=dist.ReduceOp.SUM, group=pipe.group)
    norm = norm.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grad.mul_(coef)
    return norm


def broadcast_from_last(pipe: Pipeline, value: torch.Tensor) -> torch.Tensor:
    """Every rank reports the loss the last stage computed (the metrics contract: one value,
    identical on every rank); pp rank pp-1 holds the last stage in every schedule here."""
    dist.broadcast(value, group=pipe.group, group_src=dist.get_world_size(pipe.group) - 1)
    return value
