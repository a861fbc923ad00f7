"""The fit: bounded nonlinear least squares (``scipy.optimize.least_squares``) on relative
errors, ``log(predicted / measured)``, of every step time and every measured peak memory,
with forward-difference derivatives through the cost model.

Efficiencies and the fragmentation fraction are bounded to [1e-3, 1]; the optional
reserve bytes to [0, 64 GiB]. A parameter the records cannot pin down keeps its prior and
is reported as "not identifiable from these records": either no record's prediction
depends on it (every record ran inside one node, so the network efficiency never
enters), or its standard error - from the Jacobian at the fit and the residual scatter,
with a 1% floor for timing noise - exceeds ``MAX_RELATIVE_STD_ERROR`` of its value
(it is confounded with another parameter, ran to a bound, or is seen only through a
term too small to measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import yaml

from cost_models.executors import ExecutorProfile, resolve_executor
from cost_models.specs import GPU_PRESETS, GPUSpec, SpecError

from .params import (
    DEFAULT_PARAMS,
    EXECUTOR_PARAMS,
    GPU_PARAMS,
    KNOWN_PARAMS,
    MAX_RELATIVE_STD_ERROR,
    NOISE_FLOOR,
    NOT_SEEN_HINT,
)
from .predict import RecordError, record_errors, residuals
from .records import CalibrationRecord

GiB = 2**30
# Working units: the solver sees values of order one (efficiencies as they are, bytes in GiB).
_SCALE = {"cuda_context_bytes": float(GiB)}
_BOUNDS = {"cuda_context_bytes": (0.0, 64.0)}
_FRACTION_BOUNDS = (1e-3, 1.0)


@dataclass
class Calibration:
    """Fitted parameters for one GPU kind (and one executor's memory terms)."""

    gpu: str
    executor: str
    prior: dict[str, float]
    fitted: dict[str, float]  # only the parameters the records identified
    not_identifiable: dict[str, str]  # parameter -> why it kept its prior
    std_errors: dict[str, float] = field(default_factory=dict)  # of the fitted values
    rms_error_before: float = 0.0  # RMS of log(predicted / measured), all residuals
    rms_error_after: float = 0.0
    records: int = 0
    per_record: list[RecordError] = field(default_factory=list)
    iterations: int = 0
    created: str = ""

    @property
    def values(self) -> dict[str, float]:
        """Every parameter: fitted where identified, else its prior."""
        return {**self.prior, **self.fitted}

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "fitted": {k: float(v) for k, v in self.fitted.items() if k in GPU_PARAMS},
            "executor": {"name": self.executor,
                         **{k: float(v) for k, v in self.fitted.items() if k in EXECUTOR_PARAMS}},
            "prior": {k: float(v) for k, v in self.prior.items()},
            "std_errors": {k: float(v) for k, v in self.std_errors.items()},
            "not_identifiable": dict(self.not_identifiable),
            "records": self.records,
            "rms_error_before": float(self.rms_error_before),
            "rms_error_after": float(self.rms_error_after),
            "created": self.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


def _prior_values(gpu: GPUSpec, executor: ExecutorProfile, params: tuple[str, ...]) -> dict[str, float]:
    preset = GPU_PRESETS.get(gpu.name, gpu)
    return {p: float(getattr(preset if p in GPU_PARAMS else executor, p)) for p in params}


def _rms(values: Iterable[float]) -> float:
    values = list(values)
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def fit_calibration(records: list[CalibrationRecord], params: Iterable[str] = DEFAULT_PARAMS,
                    prior: dict[str, float] | None = None, max_iterations: int = 60) -> Calibration:
    """Least-squares fit of ``params`` to the records, starting from the priors.

    Priors: ``prior`` where given, else the GPU preset of that name (the records' own
    GPU dict for a GPU that is no preset) and the records' executor profile.
    ``max_iterations`` bounds the solver's Jacobian evaluations per refit.
    """
    import numpy as np
    from scipy.optimize import least_squares

    params = tuple(dict.fromkeys(params))
    unknown = [p for p in params if p not in KNOWN_PARAMS]
    if unknown:
        raise SpecError(f"calibrate: unknown parameter {unknown[0]!r}; fit any of {', '.join(KNOWN_PARAMS)}")
    if not records:
        raise SpecError("calibrate: no records to fit")
    gpus = sorted({str(r.gpu.get("name")) for r in records})
    if len(gpus) != 1:
        raise SpecError(f"calibrate: records mix GPUs {gpus}; fit one GPU kind at a time")
    executors = sorted({r.executor for r in records})
    if len(executors) != 1 and any(p in EXECUTOR_PARAMS for p in params):
        raise SpecError(f"calibrate: records mix executors {executors}; memory terms belong to one executor "
                        "(fit them separately)")
    gpu = GPUSpec.from_dict(records[0].gpu)
    executor = resolve_executor(records[0].executor)
    priors = _prior_values(gpu, executor, params)
    for name, value in (prior or {}).items():
        if name in priors:
            priors[name] = float(value)
    scale = {p: _SCALE.get(p, 1.0) for p in params}

    def values_of(active: list[str], x) -> dict[str, float]:
        return {**priors, **{p: float(v) * scale[p] for p, v in zip(active, x)}}

    base = residuals(records, priors)
    rms_before = _rms(base)

    # Parameters no record's prediction depends on (elasticity d log(pred) / d log(value) ~ 0).
    not_identifiable: dict[str, str] = {}
    for name in params:
        shifted = {**priors, name: priors[name] * 1.01 if priors[name] else 1e-3 * scale[name]}
        moved = max((abs(a - b) for a, b in zip(residuals(records, shifted), base)), default=0.0)
        if moved < 1e-9:
            not_identifiable[name] = "no record's prediction depends on it: " + NOT_SEEN_HINT[name]
    active = [p for p in params if p not in not_identifiable]

    # Fit; drop the worst-determined parameter while any is determined worse than
    # MAX_RELATIVE_STD_ERROR, and refit the rest from the priors.
    current, iterations, std_errors, fitted = base, 0, {}, {}
    while active:
        bounds = [_BOUNDS.get(p, _FRACTION_BOUNDS) for p in active]
        x0 = np.array([min(max(priors[p] / scale[p], lo), hi) for p, (lo, hi) in zip(active, bounds)])
        result = least_squares(lambda x: np.array(residuals(records, values_of(active, x))), x0,
                               bounds=(np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])),
                               method="trf", x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12,
                               max_nfev=max_iterations * (len(active) + 1))
        current = list(result.fun)
        iterations = int(result.nfev)
        jacobian = np.asarray(result.jac)
        dof = len(current) - len(active)
        scatter = max(math.sqrt(sum(r * r for r in current) / dof) if dof > 0 else 0.0, NOISE_FLOOR)
        covariance_diagonal = _inverse_diagonal(jacobian.T @ jacobian)
        values = values_of(active, result.x)
        relative = {}
        for k, name in enumerate(active):
            se = scatter * math.sqrt(max(covariance_diagonal[k], 0.0)) * scale[name]
            std_errors[name] = se
            relative[name] = se / values[name] if values[name] > 0 else math.inf
        at_bound = {name for name, mask in zip(active, result.active_mask) if mask != 0}
        worst = max(active, key=lambda p: (p in at_bound, relative[p], active.index(p)))
        if worst not in at_bound and relative[worst] <= MAX_RELATIVE_STD_ERROR:
            fitted = {p: values[p] for p in active}
            break
        partner = _most_collinear(jacobian, active, worst)
        detail = f"; confounded with {partner}" if partner is not None else ""
        if worst in at_bound:
            reason = f"ran to its bound ({values[worst]:.2g}): the records and the model disagree about it"
        elif relative[worst] > 10:
            reason = "these records do not determine it"
        else:
            reason = f"determined only to +-{relative[worst] * 100:.0f}% by these records"
        not_identifiable[worst] = reason + detail
        std_errors.pop(worst, None)
        active.remove(worst)
    if not active:
        current = base
    per_record = record_errors(records, priors, {**priors, **fitted})
    return Calibration(gpu=gpu.name, executor=executor.name, prior=priors, fitted=fitted,
                       not_identifiable={p: not_identifiable[p] for p in params if p in not_identifiable},
                       std_errors={p: std_errors[p] for p in fitted}, rms_error_before=rms_before,
                       rms_error_after=_rms(current), records=len(records), per_record=per_record,
                       iterations=iterations, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _inverse_diagonal(jtj) -> list[float]:
    """Diagonal of (J^T J)^-1 on the unit-diagonal scaling (a tiny ridge keeps it finite);
    a zero column (a parameter nothing depends on) has an infinite variance."""
    import numpy as np

    diagonal = np.diag(jtj).astype(float)
    out = [math.inf] * len(diagonal)
    live = [i for i, d in enumerate(diagonal) if d > 0]
    if not live:
        return out
    norms = np.sqrt(diagonal[live])
    correlation = jtj[np.ix_(live, live)] / np.outer(norms, norms) + 1e-12 * np.eye(len(live))
    try:
        inverse = np.linalg.inv(correlation)
    except np.linalg.LinAlgError:
        return out
    for k, i in enumerate(live):
        out[i] = float(inverse[k, k] / diagonal[i])
    return out


def _most_collinear(jacobian, active: list[str], target: str) -> str | None:
    """The parameter whose Jacobian column is most parallel to ``target``'s (|cos| > 0.5)."""
    import numpy as np

    k = active.index(target)
    column = jacobian[:, k]
    best, best_cos = None, 0.5
    for m, name in enumerate(active):
        if m == k:
            continue
        other = jacobian[:, m]
        denominator = float(np.linalg.norm(column) * np.linalg.norm(other)) or 1e-300
        cos = abs(float(column @ other)) / denominator
        if cos > best_cos:
            best, best_cos = name, cos
    return best
