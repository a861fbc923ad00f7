"""Model shapes: a ``ModelSpec`` is the shape of a Llama-family decoder, from a preset or a
Hugging Face ``config.json``. Plain data, no torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import SpecError


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU FFN)."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    tie_embeddings: bool = False
    norm: str = "rmsnorm"
    activation: str = "swiglu"
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Biases on the q, k, v projections (Qwen2's attention); no other biases are modeled.
    qkv_bias: bool = False
    # A config's RoPE scaling (e.g. Llama 3.1's "llama3"): it changes the rotary
    # frequencies, not FLOPs or memory; kept so the plan says what it planned.
    rope_scaling: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SpecError(f"model field {name}={value!r} must be a positive integer")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise SpecError(
                    f"model dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise SpecError(
                f"model n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.norm != "rmsnorm" or self.activation != "swiglu":
            raise SpecError(
                f"model norm={self.norm!r}/activation={self.activation!r}: only rmsnorm + swiglu "
                "(Llama family) are supported"
            )

    # Derived sizes ------------------------------------------------------------------
    @cached_property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim_resolved

    @cached_property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim_resolved

    @property
    def head_dim_resolved(self) -> int:
        """``head_dim`` as an ``int`` (``__post_init__`` sets it from dim / heads when absent)."""
        assert self.head_dim is not None
        return self.head_dim

    @cached_property
    def params_per_layer(self) -> int:
        """wq, wk, wv, wo + w1, w2, w3 + two RMSNorm weights (+ q, k, v biases)."""
        attention = self.dim * self.q_dim + 2 * self.dim * self.kv_dim + self.q_dim * self.dim
        ffn = 3 * self.dim * self.ffn_dim
        return attention + ffn + 2 * self.dim + self.bias_params_per_layer

    @cached_property
    def bias_params_per_layer(self) -> int:
        """q, k and v biases (``qkv_bias``): element-wise adds, no matmul work."""
        return self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0

    @cached_property
    def embedding_params(self) -> int:
        return self.vocab_size * self.dim

    @cached_property
    def output_params(self) -> int:
        """The output projection; zero extra when tied to the embedding."""
        return 0 if self.tie_embeddings else self.vocab_size * self.dim

    @cached_property
    def root_params(self) -> int:
        """Parameters outside the blocks: embedding, final norm, output projection."""
        return self.embedding_params + self.output_params + self.dim

    @cached_property
    def num_params(self) -> int:
        return self.n_layers * self.params_per_layer + self.root_params

    @cached_property
    def non_embedding_params(self) -> int:
        """Parameters that do matmul work per token: blocks + output projection.

        This is torchtitan's ``num_params - embedding`` convention for MFU: the input
        embedding is a lookup, the output projection is a real matmul. With tied
        weights the shared matrix still does the output matmul, so count it once.
        """
        return self.n_layers * self.params_per_layer + self.dim + self.vocab_size * self.dim

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_params"] = self.num_params
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# Shapes from the models' published config.json files (meta-llama on the HF hub) and the
# Llama 3 paper (arXiv:2407.21783, Table 3).
MODEL_PRESETS: dict[str, ModelSpec] = {
    # Tiny model for tests: runs a training step on CPU in milliseconds.
    "debug": ModelSpec("debug", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_dim=128, rope_theta=10000.0),
    "llama3.2-1b": ModelSpec("llama3.2-1b", vocab_size=128256, dim=2048, n_layers=16,
                             n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True),
    "llama3.2-3b": ModelSpec("llama3.2-3b", vocab_size=128256, dim=3072, n_layers=28,
                             n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True),
    "llama3-8b": ModelSpec("llama3-8b", vocab_size=128256, dim=4096, n_layers=32,
                           n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama3-70b": ModelSpec("llama3-70b", vocab_size=128256, dim=8192, n_layers=80,
                            n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama3.1-405b": ModelSpec("llama3.1-405b", vocab_size=128256, dim=16384, n_layers=126,
                               n_heads=128, n_kv_heads=8, ffn_dim=53248),
    # Llama 2 13B: meta-llama/Llama-2-13b-hf config.json (vocab 32000, hidden 5120, 40 layers,
    # 40 heads, no GQA, intermediate 13824, rope_theta 10000) = Touvron et al. 2023,
    # arXiv:2307.09288, Table 1; torchtitan's April-2024 A100 table trains it.
    "llama2-13b": ModelSpec("llama2-13b", vocab_size=32000, dim=5120, n_layers=40,
                            n_heads=40, n_kv_heads=40, ffn_dim=13824, rope_theta=10000.0),
}
DEFAULT_MODEL = "llama3-8b"
MODEL_ALIASES = {
    "llama3.1-8b": "llama3-8b", "llama3.1-70b": "llama3-70b", "405b": "llama3.1-405b",
    "8b": "llama3-8b", "70b": "llama3-70b", "1b": "llama3.2-1b", "3b": "llama3.2-3b",
    "llama-2-13b": "llama2-13b", "13b": "llama2-13b",
}

_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "vocab_size")
_HF_SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}
# Qwen2's attention always has q, k, v biases (transformers' Qwen2Attention: bias=True on
# q_proj, k_proj, v_proj, none on o_proj); Llama and Mistral have none unless a flag says so.
_HF_QKV_BIAS_TYPES = {"qwen2"}


def _hf_refuse_unmodeled(config: dict, path: Path) -> None:
    """One line for a config field that would change the cost but is not modeled, instead
    of planning another model than the one described."""
    where = f"--model {path}"
    if config.get("attention_bias"):
        raise SpecError(f"{where}: attention_bias=true (biases on q, k, v and o_proj) is not modeled; "
                        "only Qwen2-style q/k/v biases are: set it to false to plan without biases")
    if config.get("mlp_bias"):
        raise SpecError(f"{where}: mlp_bias=true (biases on the MLP projections) is not modeled; "
                        "set it to false to plan without them")
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", config.get("model_type") != "qwen2")
    if window is not None and uses_window:
        raise SpecError(f"{where}: sliding_window={window} (sliding-window attention) is not modeled: the planner "
                        "would price full causal attention; set it to null to plan full attention")


def model_from_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json`` of a Llama-family decoder."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"--model {path}: file not found") from None
    except json.JSONDecodeError as error:
        raise SpecError(f"--model {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise SpecError(f"--model {path}: expected a JSON object")
    model_type = config.get("model_type", "llama")
    if model_type not in _HF_SUPPORTED_TYPES:
        raise SpecError(
            f"--model {path}: model_type={model_type!r} is not a Llama-family decoder "
            f"(supported: {', '.join(sorted(_HF_SUPPORTED_TYPES))})"
        )
    for key in _HF_REQUIRED:
        if key not in config:
            raise SpecError(f"--model {path}: config.json lacks the field {key!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise SpecError(f"--model {path}: hidden_act={config['hidden_act']!r}; only silu (SwiGLU) is supported")
    _hf_refuse_unmodeled(config, path)
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise SpecError(f"--model {path}: rope_scaling={scaling!r} must be an object or null")
    n_heads = config["num_attention_heads"]
    return ModelSpec(
        name=config.get("_name_or_path") or path.parent.name or path.stem,
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        ffn_dim=config["intermediate_size"],
        head_dim=config.get("head_dim"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        qkv_bias=model_type in _HF_QKV_BIAS_TYPES,
        rope_scaling=str(scaling.get("rope_type") or scaling.get("type") or "unnamed") if scaling else None,
    )


def resolve_model(name_or_path: str | None) -> ModelSpec:
    """A preset name (or alias) or a path to a Hugging Face config.json."""
    key = (name_or_path or DEFAULT_MODEL).strip()
    lowered = key.lower()
    lowered = MODEL_ALIASES.get(lowered, lowered)
    if lowered in MODEL_PRESETS:
        return MODEL_PRESETS[lowered]
    if key.endswith(".json") or Path(key).is_file():
        return model_from_hf_config(key)
    raise SpecError(
        f"--model {key!r}: unknown model; use one of {', '.join(MODEL_PRESETS)} "
        "or a path to a Hugging Face config.json"
    )
