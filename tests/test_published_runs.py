"""The cost model against the published torchtitan runs, and the shipped calibration files."""

import importlib.util
import json
from pathlib import Path

import pytest

from autoplan.calibration import apply_calibration, load_calibration, predict
from cost_models.executors import resolve_executor
from cost_models.specs import resolve_gpu

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("published_runs", ROOT / "benchmarks" / "published_runs.py")
published_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(published_runs)

RUNS = next((p for p in (published_runs.DEFAULT_RUNS, published_runs.FALLBACK_RUNS) if p.exists()), None)
needs_runs = pytest.mark.skipif(RUNS is None, reason="shared/published-runs not present")


@pytest.fixture(scope="module")
def evaluated():
    runs = json.loads(RUNS.read_text())
    return runs, *published_runs.evaluate(runs)


@needs_runs
def test_every_run_maps_to_a_configuration(evaluated):
    runs, rows, _ = evaluated
    assert len(rows) == len(runs) == 10
    layer = published_runs.layer_modes("selective layer (every 2nd layer)", 32)
    assert layer.count("full") == 16 and layer[0] == "none" and layer[1] == "full"


@needs_runs
def test_published_run_errors_stay_within_bounds(evaluated):
    _, rows, _ = evaluated
    logo = sorted(abs(r["err_logo"]) for r in rows)
    fit = sorted(abs(r["err_after"]) for r in rows)
    # Goal of issue 10: median <= 10%, worst <= 15% (held out). Today: ~2% / ~6%.
    assert logo[len(logo) // 2] <= 0.10 and logo[-1] <= 0.15
    assert fit[len(fit) // 2] <= 0.05 and fit[-1] <= 0.10


@needs_runs
def test_fitted_power_cap_clock_is_physical(evaluated):
    # Between P ~ f (V at its floor): 500/700, and P ~ f^3 (V tracking f): (500/700)^(1/3).
    _, _, fits = evaluated
    clock = fits["h100-96gb-500w"].fitted["clock_fraction_at_limit"]
    assert 500 / 700 - 0.03 <= clock <= (500 / 700) ** (1 / 3)


@needs_runs
def test_shipped_calibration_files_are_the_fit(evaluated):
    _, _, fits = evaluated
    for gpu, fit in fits.items():
        path = published_runs.CALIBRATION_DIR / f"{gpu}.yaml"
        shipped = load_calibration(path)
        assert shipped.gpu == gpu
        assert shipped.fitted == pytest.approx(fit.fitted, rel=1e-6)


@pytest.mark.parametrize("gpu", ["h100-96gb-500w", "a100-sxm-80gb"])
def test_calibration_round_trips_and_acts_only_through_named_parameters(gpu, tmp_path):
    shipped = load_calibration(published_runs.CALIBRATION_DIR / f"{gpu}.yaml")
    copy = tmp_path / "c.yaml"
    shipped.save(copy)
    again = load_calibration(copy)
    assert again.fitted == shipped.fitted and again.gpu == shipped.gpu
    base = resolve_gpu(gpu)
    calibrated, executor = apply_calibration(base, resolve_executor("torchtitan"), again)
    assert executor == resolve_executor("torchtitan")
    changed = {k for k, v in calibrated.to_dict().items() if base.to_dict()[k] != v}
    assert changed == set(shipped.fitted)
    # A prediction with the calibrated GPU equals one with just the named values overridden.
    if RUNS is not None:
        run = next(r for r in json.loads(RUNS.read_text()) if published_runs.gpu_preset(r["gpu_type"]) == gpu)
        record = published_runs.record_for(run)
        assert predict(record, dict(shipped.fitted))[0] == pytest.approx(
            predict(record.model_copy(update={"gpu": calibrated.to_dict()}))[0])


def _cost(*args: str) -> dict:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "autoplan", "cost", "--format", "json", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


TITAN_8B = ("--gpu", "h100-96gb-500w", "--executor", "torchtitan", "--dp-shard", "8", "--seq-len", "8192",
            "--local-batch-size", "2", "--ac", "selective")


@needs_runs
def test_default_calibration_is_the_shipped_fit_and_lands_near_the_published_runs():
    """Without --calibration the shipped fit applies: the torchtitan paper's 8B FSDP8 eager
    run (6,258 tokens/s, 81.9 GiB reserved; the repo's 5,762 / 82.4 for the same setup)
    is predicted within the two sources' spread, and the priors are not."""
    default = _cost(*TITAN_8B)
    priors = _cost(*TITAN_8B, "--calibration", "none")
    assert default["calibration"].startswith("default") and priors["calibration"] is None
    published = {6258: 81.9, 5762: 82.4}
    for tokens, reserved_gib in published.items():
        assert abs(default["tokens_per_second_per_gpu"] / tokens - 1) < 0.06
        assert abs(default["peak_memory_reserved_bytes"] / 2**30 / reserved_gib - 1) < 0.03
    assert priors["tokens_per_second_per_gpu"] / 5762 - 1 > 0.10  # what the shipped fit corrects
    # The compiled run: 6,674 / 6,667 tokens/s, 77.0 GiB.
    compiled = _cost(*TITAN_8B, "--compile")
    assert abs(compiled["tokens_per_second_per_gpu"] / 6670 - 1) < 0.05
    assert abs(compiled["peak_memory_reserved_bytes"] / 2**30 / 77.0 - 1) < 0.03


def test_default_calibration_only_for_unmodified_presets(tmp_path):
    # No shipped fit for the 700 W SXM part: priors, and the plan says so (null).
    assert _cost("--gpu", "h100-sxm-80gb")["calibration"] is None
    # A GPU described anew under a preset's name keeps its own values.
    custom = tmp_path / "gpu.yaml"
    custom.write_text("base: h100-96gb-500w\nname: h100-96gb-500w\nhbm_bytes_per_s: 2.0e12\n")
    assert _cost("--gpu", str(custom))["calibration"] is None
    assert _cost("--gpu", "h100-96gb-500w")["calibration"].startswith("default")
