"""CP-degree charts for Llama 3 8B on H100s: FSDP degree 8, CP 1, 2, 4, 8.

Run: python examples/cp_sweep.py   (needs the plot extra: pip install -e '.[plot]')
Writes examples/cp_sweep_llama3_8b_h100.png (longest sequence, tokens/s/GPU and MFU at
64k vs CP degree) and examples/frontier_llama3_8b_64xh100.png (seq_len vs tokens/s per
layout family on 64 GPUs).
"""

from pathlib import Path

from autoplan.sweep import SweepSetup, format_table, frontier, plot, sweep
from cost_models.specs import resolve_gpu, resolve_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    model, gpu = resolve_model("llama3-8b"), resolve_gpu("h100")
    setup = SweepSetup(model, gpu, gpus=64, gpus_per_node=8, fixed={"dp_shard": 8, "tp": 1},
                       target_seq_len=64 * 1024)
    rows = sweep(setup, "cp", [1, 2, 4, 8])
    print(format_table(rows))
    plot(rows, str(HERE / "cp_sweep_llama3_8b_h100.png"),
         "llama3-8b, FSDP 8 x CP on H100 80GB (predicted; tokens/s and MFU at 64k)")
    seqs = [2**k for k in range(13, 22)]  # 8k .. 2M
    front = frontier(SweepSetup(model, gpu, gpus=64, gpus_per_node=8, fixed={}, target_seq_len=None), seqs)
    print(format_table(front))
    plot(front, str(HERE / "frontier_llama3_8b_64xh100.png"),
         "llama3-8b on 64 x H100: best tokens/s per layout family (predicted)")


if __name__ == "__main__":
    main()
