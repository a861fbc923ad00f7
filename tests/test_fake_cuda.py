"""The fake CUDA device traces what a CUDA build would run: the same tensor bytes as the
CPU program where the two programs are the same (FSDP2, no CP), with the fused SDPA ops."""

import json
import subprocess
import sys
import textwrap

import pytest
from runtime_helpers import write_plan

from cost_models.specs import ModelSpec

pytestmark = pytest.mark.timeout(300)
# Wide enough that SwiGLU's temporaries show: a decomposed silu_backward adds ~3 x T x f bytes.
MODEL = ModelSpec("wide", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=2048,
                  rope_theta=1e4)


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cuda_build_dispatch_is_restored_and_sdpa_runs_flash():
    found = _run("""
        import json, os
        from runtime import fake_cuda
        fake_cuda.load("flash")
        import torch
        fake_cuda.stub_torch_cuda()
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._python_dispatch import TorchDispatchMode
        seen = []
        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(str(func))
                return func(*args, **(kwargs or {}))
        with FakeTensorMode():
            q = torch.empty(1, 4, 64, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.empty(1, 2, 64, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            x = torch.empty(8, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            with Ops():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
                (out.float().sum() + torch.nn.functional.silu(x).float().sum()).backward()
        print(json.dumps({"has_cuda_silu_backward": torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::silu_backward", "CUDA"), "ops": seen}))
        os._exit(0)
    """)
    assert found["has_cuda_silu_backward"]
    ops = found["ops"]
    assert "aten._scaled_dot_product_flash_attention.default" in ops
    assert "aten._scaled_dot_product_flash_attention_backward.default" in ops
    assert "aten.silu_backward.default" in ops and "aten.sigmoid.default" not in ops
    assert not any("bmm" in op or "_softmax" in op for op in ops)  # not the math path


def test_cuda_and_cpu_programs_agree_where_they_are_the_same(tmp_path):
    """FSDP2 over 4 ranks, no AC, no CP: the CPU trace is the independent reference."""
    plan = write_plan(tmp_path / "plan.yaml", {"dp_shard": 4}, seq_len=2048, local_batch_size=1, model=MODEL,
                      loss_chunk_tokens=1024)
    text = plan.read_text().replace("param_dtype: float32", "param_dtype: bfloat16")
    plan.write_text(text)
    out = tmp_path / "cuda.json"
    done = subprocess.run([sys.executable, "-m", "runtime.cuda_trace", str(plan), "--json", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    cuda = json.loads(out.read_text())
    cpu = _run(f"""
        import json
        from autoplan.plan import Plan
        from runtime.trace import trace_plan_memory
        r = trace_plan_memory(Plan.load({str(plan)!r}))
        print(json.dumps({{"peak_bytes": r.peak_bytes}}))
    """)
    assert cuda["peak_bytes"] == pytest.approx(cpu["peak_bytes"], rel=0.01)
