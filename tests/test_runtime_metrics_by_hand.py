"""runtime.metrics by hand: the exact printed lines and tables for hand-computed cases, the
JSONL file a run writes (trimmed on resume), the steady-state summary, and the GPU peak
lookups with a stand-in CUDA device (torch.device("cuda") needs no GPU to exist)."""

import json
import resource
import sys
from types import SimpleNamespace

import pytest
import torch
from runtime_helpers import write_plan

from autoplan.plan import Plan, PredictedDoc
from runtime import metrics as M

GiB = 2**30
CUDA = torch.device("cuda")


def _plan(tmp_path, **update) -> Plan:
    plan = Plan.load(write_plan(tmp_path / "plan.yaml", {"dp_shard": 2}, seq_len=32, local_batch_size=2))
    return plan.model_copy(update=update)


def _predicted(**values) -> PredictedDoc:
    return PredictedDoc(memory_breakdown_bytes={}, memory_capacity_bytes=80 * GiB, flops_per_token=1.0,
                        time_breakdown_s={}, **values)


def _fake_gpu(monkeypatch, name: str, memory: int, seen: list | None = None):
    def properties(device):
        if seen is not None:
            seen.append(device)
        return SimpleNamespace(name=name, total_memory=memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)


# ------------------------------------------------------------------ peak FLOP/s and device name


def test_peak_flops_none_on_cpu_and_the_plans_number_on_cuda(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", 40 * GiB)  # must not be consulted
    with_peak = _plan(tmp_path, hardware={"gpu": {"name": "x", "bf16_flops_per_s": 123}})
    assert M.peak_flops_per_s(with_peak, torch.device("cpu")) is None
    peak = M.peak_flops_per_s(with_peak, CUDA)
    assert peak == 123.0 and type(peak) is float


def test_peak_flops_from_the_cuda_device_name_when_the_plan_has_none(tmp_path, monkeypatch):
    seen = []
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", 40 * GiB, seen)
    # NVIDIA's A100 datasheet: 312 TFLOP/s dense bf16 (the plan's gpu lacks a peak, or has 0)
    for hardware in ({}, {"gpu": None}, {"gpu": {"name": "a100"}}, {"gpu": {"bf16_flops_per_s": 0}}):
        assert M.peak_flops_per_s(_plan(tmp_path, hardware=hardware), CUDA) == 312e12
    assert seen == [CUDA] * 4
    # An unknown name takes the preset closest in MEASURED memory: 40 GiB is the A100 40GB
    # (312 TFLOP/s), not the default preset an unmeasured unknown card would get (H100, 989).
    _fake_gpu(monkeypatch, "Mystery Accelerator", 40 * GiB)
    assert M.peak_flops_per_s(_plan(tmp_path), CUDA) == 312e12


def test_peak_flops_unknown_when_the_device_cannot_be_read(tmp_path, monkeypatch):
    def broken(device):
        raise RuntimeError("no driver")
    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    assert M.peak_flops_per_s(_plan(tmp_path), CUDA) is None


def test_run_device_name(monkeypatch):
    assert M.run_device_name(torch.device("cpu")) == "cpu"
    assert M.run_device_name(torch.device("meta")) == "meta"
    seen = []
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 80 * GiB, seen)
    assert M.run_device_name(CUDA) == "h100-sxm-80gb" and seen == [CUDA]
    _fake_gpu(monkeypatch, "Mystery Accelerator", 40 * GiB)  # measured memory: a slug of its name
    assert M.run_device_name(CUDA) == "mystery-accelerator"
    import autoplan.probe

    def broken(name, memory):
        raise ValueError("unreadable")
    monkeypatch.setattr(autoplan.probe, "spec_for_nvml_name", broken)
    assert M.run_device_name(CUDA) == "Mystery Accelerator"


# ------------------------------------------------------------------ the metrics file


def test_trim_metrics_keeps_steps_up_to_the_resume_point(tmp_path):
    path = tmp_path / "m.jsonl"
    M.trim_metrics(path, 3)
    assert not path.exists()  # nothing to trim: no file is made
    lines = ['{"step": 1, "loss": 5.0}', '{"step": 2}', '{"loss": 1.0}', '{"step": null}', '{"step": "x"}',
             '{"step": 3}', '{"step": 4}', '{"step": 2, "again": true}', '{"step": 5, "lo']
    path.write_text("\n".join(lines) + "\n")
    M.trim_metrics(path, 3)
    assert path.read_text() == '{"step": 1, "loss": 5.0}\n{"step": 2}\n{"step": 3}\n{"step": 2, "again": true}\n'
    M.trim_metrics(path, 0)
    assert path.read_text() == ""


def test_step_metrics_write_trims_appends_flushes_and_prints(tmp_path, capsys):
    plan = _plan(tmp_path)
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    log = M.StepMetrics(plan, torch.device("cpu"), 2, str(path), write=True, start_step=1, log_every=2, last_step=5)
    assert path.read_text() == '{"step": 1}\n'  # trimmed to the resume point before appending
    raw = {"loss": torch.tensor(4.5), "lr": 0.001, "grad_norm": torch.tensor(0.25, dtype=torch.float64)}
    first = log.record(2, raw, step_time_s=0.5)
    # plan: 32 tokens x 2 sequences x 2 dp = 128 tokens per step; 2 GPUs; 0.5 s
    assert first == {"step": 2, "loss": 4.5, "lr": 0.001, "grad_norm": 0.25, "tokens_per_second_per_gpu": 128.0,
                     "mfu": None, "peak_memory_bytes": None, "peak_memory_reserved_bytes": None, "step_time_s": 0.5}
    assert all(type(first[key]) is float for key in ("loss", "lr", "grad_norm"))
    # flushed: on disk before close
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, first]
    for step in (3, 4, 5):
        log.record(step, raw, step_time_s=1.0)
    log.close()
    assert log.file.closed and len(path.read_text().splitlines()) == 5 and len(log.records) == 4
    printed = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == ["step 2/5", "step 4/5", "step 5/5"]  # every 2nd step and the last


def test_step_metrics_without_write_touch_no_file_and_print_nothing(tmp_path, capsys):
    plan = _plan(tmp_path)
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 7}\n')
    log = M.StepMetrics(plan, torch.device("cpu"), 4, str(path), write=False, start_step=1, log_every=1, last_step=2)
    log.record(1, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0}, step_time_s=2.0)
    log.record(2, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0}, step_time_s=2.0)
    log.close()
    assert path.read_text() == '{"step": 7}\n' and log.file is None
    assert capsys.readouterr().out == ""
    assert log.records[0]["tokens_per_second_per_gpu"] == 128 / 4 / 2.0
    # A writer without a path writes nothing either; by default it prints nothing.
    silent = M.StepMetrics(plan, torch.device("cpu"), 4, None, write=True)
    silent.record(1, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0}, step_time_s=2.0)
    silent.close()
    assert silent.file is None and capsys.readouterr().out == ""


def test_a_fresh_run_starts_the_metrics_file_over(tmp_path):
    plan = _plan(tmp_path)
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')  # left by an earlier run
    M.StepMetrics(plan, torch.device("cpu"), 4, str(path), write=True).close()  # start_step defaults to 0
    assert path.read_text() == ""


def test_progress_lines_are_flushed_as_printed(tmp_path, monkeypatch):
    events = []

    class Stdout:  # torchrun pipes stdout: an unflushed line would show up only at exit
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush",))
    plan = _plan(tmp_path)
    log = M.StepMetrics(plan, torch.device("cpu"), 4, None, write=True, log_every=1)
    monkeypatch.setattr(sys, "stdout", Stdout())
    log.record(1, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0, "peak_memory_bytes": None}, step_time_s=2.0)
    monkeypatch.undo()
    assert events[-1] == ("flush",) and events[0][1].startswith("step 1  loss 1.0000")


def test_step_metrics_on_cuda_reads_allocated_and_reserved_peaks(tmp_path, monkeypatch):
    plan = _plan(tmp_path, hardware={"gpu": {"name": "x", "bf16_flops_per_s": 1e9}})
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: asked.append(device) or 5 * GiB)
    log = M.StepMetrics(plan, CUDA, 2, None, write=False)
    assert log.peak == 1e9
    # TINY: 6 N + 12 L H hd S with N = 46320 non-embedding parameters (tests/test_seeded_runtime.py)
    flops_per_token = 6 * 46320 + 12 * 2 * 6 * 8 * 32
    out = log.record(1, {"loss": 2.0, "lr": 0.5, "grad_norm": 1.0}, step_time_s=0.25)
    assert out["tokens_per_second_per_gpu"] == 256.0
    assert out["mfu"] == pytest.approx(flops_per_token * 256.0 / 1e9)
    assert out["peak_memory_bytes"] == 3 * GiB and out["peak_memory_reserved_bytes"] == 5 * GiB
    assert asked == [CUDA, CUDA]


# ------------------------------------------------------------------ progress line


def test_progress_line_on_gpu_is_exact():
    metrics = {"step": 10, "loss": 4.81234, "tokens_per_second_per_gpu": 1234567.4, "peak_memory_bytes": 1.5 * GiB}
    assert M.progress_line(metrics, 100) == "step 10/100  loss 4.8123  tokens/s/GPU 1,234,567  memory 1.50 GiB (allocated)"
    assert M.progress_line(metrics) == "step 10  loss 4.8123  tokens/s/GPU 1,234,567  memory 1.50 GiB (allocated)"
    assert M.progress_line(metrics, 0) == "step 10  loss 4.8123  tokens/s/GPU 1,234,567  memory 1.50 GiB (allocated)"


def test_progress_line_on_cpu_reports_the_process_rss(monkeypatch):
    asked, sizes = [], [20 * 2**20, 3 * 2**29]  # 20 GiB as KiB (Linux), then 1.5 GiB as bytes (macOS)

    def usage(who):
        asked.append(who)
        return SimpleNamespace(ru_maxrss=sizes[len(asked) - 1])
    monkeypatch.setattr(resource, "getrusage", usage)
    metrics = {"step": 3, "loss": 0.5, "tokens_per_second_per_gpu": 999.5, "peak_memory_bytes": None}
    monkeypatch.setattr(sys, "platform", "linux")
    assert M.progress_line(metrics, 4) == "step 3/4  loss 0.5000  tokens/s/GPU 1,000  memory 20.00 GiB (process RSS)"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert M.progress_line(metrics, 4) == "step 3/4  loss 0.5000  tokens/s/GPU 1,000  memory 1.50 GiB (process RSS)"
    assert asked == [resource.RUSAGE_SELF] * 2


# ------------------------------------------------------------------ summary


def _record(step, time_s, tps, mfu, peak, reserved, loss):
    return {"step": step, "step_time_s": time_s, "tokens_per_second_per_gpu": tps, "mfu": mfu,
            "peak_memory_bytes": peak, "peak_memory_reserved_bytes": reserved, "loss": loss}


def test_summarize_run_drops_the_warm_up_step_from_means_not_from_peaks(tmp_path):
    plan = _plan(tmp_path)
    assert M.summarize_run(plan, []) == {"steps": 0}
    records = [_record(1, 10.0, 1.0, 0.9, 500, 900, 5.0),
               _record(2, 2.0, 100.0, 0.2, 100, None, 4.0),
               _record(3, 4.0, 50.0, None, None, 300, 3.0)]
    assert M.summarize_run(plan, records) == {
        "steps": 3, "final_loss": 3.0, "step_time_s": 3.0, "tokens_per_second_per_gpu": 75.0, "mfu": 0.2,
        "peak_memory_bytes": 500, "peak_memory_kind": "allocated", "peak_memory_reserved_bytes": 900}
    # one step: it is its own steady state; missing or null values give None, not 0
    only = {"step": 1, "step_time_s": 2.5, "tokens_per_second_per_gpu": 8.0, "loss": 1.5, "mfu": None}
    assert M.summarize_run(plan, [only]) == {
        "steps": 1, "final_loss": 1.5, "step_time_s": 2.5, "tokens_per_second_per_gpu": 8.0, "mfu": None,
        "peak_memory_bytes": None, "peak_memory_kind": "allocated", "peak_memory_reserved_bytes": None}


# ------------------------------------------------------------------ measured-vs-predicted table


def test_format_summary_table_on_the_planned_gpu(tmp_path):
    plan = _plan(tmp_path, hardware={"gpu": {"name": "h100-sxm-80gb"}},
                 predicted=_predicted(peak_memory_bytes=2 * GiB, step_time_s=0.5, tokens_per_second_per_gpu=4000.0,
                                      mfu=0.0))
    summary = {"peak_memory_bytes": 3 * GiB, "step_time_s": 1.0, "tokens_per_second_per_gpu": None, "mfu": 0.25}
    assert M.format_summary(plan, summary, "h100-sxm-80gb").split("\n") == [
        "                          measured     predicted   ratio",
        "peak memory (GiB)            3.000         2.000    1.50",
        "step time (s)               1.0000        0.5000    2.00",
        "tokens/s/GPU                   n/a         4,000        ",   # nothing measured: no ratio
        "MFU                          25.0%          0.0%        ",   # predicted 0: no ratio
    ]


def test_format_summary_table_elsewhere_has_no_predictions(tmp_path):
    predicted = _predicted(peak_memory_bytes=2 * GiB, step_time_s=0.5, tokens_per_second_per_gpu=4000.0, mfu=0.5)
    summary = {"peak_memory_bytes": None, "step_time_s": 0.12345, "tokens_per_second_per_gpu": 1234567.8,
               "mfu": 0.4567}
    body = ["                          measured",
            "peak memory (GiB)              n/a",
            "step time (s)               0.1235",
            "tokens/s/GPU             1,234,568",
            "MFU                          45.7%"]
    h100 = {"gpu": {"name": "h100-sxm-80gb"}}
    cases = [
        (h100, predicted, "cpu", "(the plan predicts h100-sxm-80gb; this run is on cpu)"),
        (h100, None, "h100-sxm-80gb", "(the plan predicts h100-sxm-80gb, without predictions; this run is on h100-sxm-80gb)"),
        ({}, None, "cpu", "(the plan predicts no GPU, without predictions; this run is on cpu)"),
        ({"gpu": None}, predicted, "a100-40gb", "(the plan predicts no GPU; this run is on a100-40gb)"),
    ]
    for hardware, doc, device, note in cases:
        plan = _plan(tmp_path, hardware=hardware, predicted=doc)
        assert M.format_summary(plan, summary, device).split("\n") == body + ["predicted: nothing to compare " + note]
