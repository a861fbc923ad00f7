"""``python -m cost_models``: print the predicted breakdown of one configuration."""

from __future__ import annotations

import argparse
import sys

from .config import ACPolicy, Parallelism, TrainConfig
from .executors import resolve_executor
from .report import format_report
from .specs import ClusterSpec, SpecError, resolve_gpu, resolve_model
from .step import estimate_step


def _seq(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 8k, 1M or 8192, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cost_models", description=__doc__)
    parser.add_argument("--model", default=None, help="preset name or config.json (default llama3-8b)")
    parser.add_argument("--gpu", default=None, help="GPU preset (default h100-sxm-80gb)")
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--dp-shard", type=int, default=8)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--seq-len", type=_seq, default=8192)
    parser.add_argument("--local-batch-size", type=int, default=1)
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    parser.add_argument("--cp-impl", default="allgather-kv")
    parser.add_argument("--executor", default="autoplan")
    args = parser.parse_args(argv)
    try:
        model = resolve_model(args.model)
        parallelism = Parallelism(args.dp_replicate, args.dp_shard, args.cp, args.tp)
        cluster = ClusterSpec(resolve_gpu(args.gpu), parallelism.world_size, args.gpus_per_node)
        cfg = TrainConfig(parallelism, args.seq_len, args.local_batch_size, args.grad_accum_steps,
                          ACPolicy.uniform(args.ac, model.n_layers),
                          cp_impl=args.cp_impl if args.cp > 1 else "none")
        executor = resolve_executor(args.executor)
        estimate = estimate_step(model, cluster, cfg, executor)
    except (SpecError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(model, cluster, cfg, estimate, executor.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
