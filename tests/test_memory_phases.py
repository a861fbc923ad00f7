"""The closed-form peak the ILP uses equals a walk over every layer's backward phase."""

from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.config import ACPolicy, Parallelism, TrainConfig
from cost_models.memory import estimate_memory, memory_terms
from cost_models.specs import MODEL_PRESETS

MODELS = [m for n, m in MODEL_PRESETS.items() if n != "debug"]


@settings(max_examples=80, deadline=None)
@given(model=st.sampled_from(MODELS), data=st.data(), cp=st.sampled_from([1, 2, 8]), tp=st.sampled_from([1, 2, 8]),
       seq_k=st.sampled_from([4, 32, 256]), executor=st.sampled_from(["autoplan", "torchtitan"]))
def test_closed_form_peak_equals_layer_walk(model, data, cp, tp, seq_k, executor):
    n_full = data.draw(st.integers(0, model.n_layers))
    n_sel = data.draw(st.integers(0, model.n_layers - n_full))
    cfg = TrainConfig(Parallelism(dp_shard=8, cp=cp, tp=tp), seq_k * 1024,
                      ac=ACPolicy.mix(model.n_layers, n_full, n_sel))
    walk = estimate_memory(model, cfg, executor)
    closed = memory_terms(model, cfg, executor).peak_tensor_bytes_for_counts(
        n_full, n_sel, model.n_layers - n_full - n_sel)
    assert abs(closed - walk.tensor_peak_bytes) <= 1e-9 * walk.tensor_peak_bytes
