"""Hugging Face configs: fields that change the cost are modeled (Qwen2's q/k/v biases) or
refused in one line (sliding windows, other biases); RoPE scaling is kept and said."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import run_plan, write_plan

from cost_models.flops import layer_matmul_params
from cost_models.specs import SpecError, resolve_model
from runtime.model import Transformer

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "hidden_act": "silu", "rope_theta": 10000.0}


def _config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **fields}))
    return path


def test_qwen2_qkv_biases_are_counted_like_torch_counts_them(tmp_path):
    spec = resolve_model(str(_config(tmp_path, model_type="qwen2", use_sliding_window=False, sliding_window=4096)))
    assert spec.qkv_bias
    # By hand: q 64 + k 32 + v 32 bias elements per block (head_dim 16, 4 q heads, 2 kv heads).
    assert spec.bias_params_per_layer == 64 + 2 * 32
    plain = resolve_model(str(_config(tmp_path, model_type="llama")))
    assert spec.num_params - plain.num_params == 2 * 128
    # Biases are adds, not matmul work.
    assert layer_matmul_params(spec) == layer_matmul_params(plain)
    # The runtime builds the same parameters (torch's own count, an independent reference).
    assert sum(p.numel() for p in Transformer(spec).parameters()) == spec.num_params
    assert sum(p.numel() for p in Transformer(plain).parameters()) == plain.num_params


@pytest.mark.parametrize("fields, named", [
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias=true"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias=true"),
    ({"model_type": "llama", "rope_scaling": "yarn"}, "rope_scaling="),
])
def test_unmodeled_fields_are_refused_in_one_line(tmp_path, fields, named):
    with pytest.raises(SpecError, match=named):
        resolve_model(str(_config(tmp_path, **fields)))
    cli = subprocess.run([sys.executable, "-m", "autoplan", "--model", str(_config(tmp_path, **fields)),
                          "--gpus", "8", "--gpu", "h100"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and named in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_mistral_without_a_window_and_llama31_rope_scaling_plan(tmp_path):
    assert not resolve_model(str(_config(tmp_path, model_type="mistral", sliding_window=None))).qkv_bias
    scaled = _config(tmp_path, model_type="llama",
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    assert resolve_model(str(scaled)).rope_scaling == "llama3"
    cli = subprocess.run([sys.executable, "-m", "autoplan", "--model", str(scaled), "--gpus", "8", "--gpu", "h100",
                          "--target-seqlen", "8k", "--format", "json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["model"]["rope_scaling"] == "llama3"


@pytest.mark.timeout(300)
def test_qkv_biases_train_under_tensor_parallel_like_one_process(tmp_path):
    """TP shards the biases with their weights: 2 TP ranks match one process (fp32, gloo)."""
    spec = resolve_model(str(_config(tmp_path, model_type="qwen2")))
    single = write_plan(tmp_path / "single.yaml", {}, seq_len=32, local_batch_size=2, model=spec)
    tp2 = write_plan(tmp_path / "tp2.yaml", {"tp": 2}, seq_len=32, local_batch_size=2, model=spec)
    rc1, reference, err1 = run_plan(single, 1, 6, tmp_path)
    rc2, losses, err2 = run_plan(tp2, 2, 6, tmp_path)
    assert rc1 == 0 and rc2 == 0, err1[-2000:] + err2[-2000:]
    assert len(reference) == len(losses) == 6
    assert max(abs(a - b) for a, b in zip(reference, losses)) <= 1e-4
    assert torch.tensor(reference).isfinite().all()


@pytest.mark.parametrize("config, published", [
    # Parameter totals as published with the weights (safetensors index total_size / 2 bytes, bf16).
    ("llama3.1-8b.json", 8_030_261_248),
    ("qwen2-7b.json", 7_615_616_512),  # includes its q/k/v biases
])
def test_example_configs_count_the_published_parameters(config, published):
    spec = resolve_model(str(Path(__file__).resolve().parents[1] / "examples" / "configs" / config))
    assert spec.num_params == published
