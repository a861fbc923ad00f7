"""CP-degree charts for Llama 3 8B on H100s: FSDP degree 8 (dp_shard=8), CP 1, 2, 4, 8
(8, 16, 32, 64 GPUs), and the seq_len vs tokens/s frontier of each layout family on 64.

Run: python examples/cp_sweep.py   (needs the plot extra: pip install -e '.[plot]')
Writes, next to this file:
- cp_sweep_llama3_8b_h100.png: the longest sequence that fits, and tokens/s/GPU and MFU
  at 64k, against the CP degree;
- frontier_llama3_8b_64xh100.png: the fastest plan of each layout family (FSDP, FSDP+CP,
  FSDP+TP, FSDP+TP+CP) at 8k .. 2M tokens on 64 GPUs.
All numbers are the cost model's predictions, not measurements.

The same from the command line:
  autoplan sweep --knob cp --values 1,2,4,8 --fix dp_shard=8,tp=1 --target-seqlen 64k --plot cp.png
  autoplan sweep --frontier --gpus 64 --plot frontier.png
"""

from pathlib import Path

from autoplan.report.plots import plot
from autoplan.report.rows import format_sweep_table
from autoplan.sweep import SweepSetup, default_frontier_seq_lens, frontier, sweep
from cost_models.specs import resolve_gpu, resolve_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    model, gpu = resolve_model("llama3-8b"), resolve_gpu("h100")
    # GPU count left open: it follows the pins, 8 x cp
    setup = SweepSetup(model, gpu, gpus_per_node=8, fixed={"dp_shard": 8, "tp": 1}, target_seq_len=64 * 1024)
    rows = sweep(setup, "cp", [1, 2, 4, 8])
    print(format_sweep_table(rows))
    cp_png = HERE / "cp_sweep_llama3_8b_h100.png"
    plot(rows, str(cp_png), "llama3-8b on H100 80GB: FSDP degree 8 x CP degree (predicted; tokens/s and MFU at 64k)")
    print(f"wrote {cp_png}\n")

    front = frontier(SweepSetup(model, gpu, gpus=64, gpus_per_node=8), default_frontier_seq_lens())
    print(format_sweep_table(front))
    frontier_png = HERE / "frontier_llama3_8b_64xh100.png"
    plot(front, str(frontier_png), "llama3-8b on 64 x H100 80GB: fastest plan of each layout family (predicted)")
    print(f"wrote {frontier_png}")


if __name__ == "__main__":
    main()
