"""``autoplan calibrate RECORDS``: fit the cost model's efficiencies to measured runs."""

from __future__ import annotations

import argparse

from cost_models.specs import SpecError


def _holdout_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from ..calibration import DEFAULT_PARAMS, fit_calibration, load_records, record_errors, split_holdout
    from ..report.rows import error_table

    records = load_records(args.records)
    skipped = [r for r in records if (r.device_name or "").lower() == "cpu"]
    records = [r for r in records if r not in skipped]
    if skipped:
        print(f"note: skipped {len(skipped)} record(s) measured on cpu (timings do not calibrate a GPU)")
    if not records:
        raise SpecError("calibrate: no GPU-measured records left to fit")
    synthetic = [r for r in records if r.source.lower().startswith("synthetic")]
    if synthetic and not args.allow_synthetic:
        raise SpecError(f"calibrate: {len(synthetic)} of {len(records)} record(s) are synthetic, not measurements "
                        f"(source {synthetic[0].source[:60]!r}); a fit to them calibrates nothing real "
                        "(pass --allow-synthetic to fit them anyway, e.g. to test the fit)")
    if synthetic:
        print(f"WARNING: fitting {len(synthetic)} synthetic record(s): the result describes the generator, "
              "not a GPU; do not plan with it")
    params = tuple(p.strip() for p in args.params.split(",") if p.strip()) if args.params else DEFAULT_PARAMS
    fit_records, held_out = split_holdout(records, args.holdout, args.seed)
    result = fit_calibration(fit_records, params)
    print(f"fitted {result.records} record(s) for {result.gpu} ({result.executor}): "
          f"rms log-error {result.rms_error_before:.3f} -> {result.rms_error_after:.3f}")
    for name in params:
        scale, unit = (2**20, " MiB") if name == "cuda_context_bytes" else (1, "")
        if name in result.fitted:
            print(f"  {name:<27}{result.prior[name] / scale:9.3f} -> {result.fitted[name] / scale:8.3f}"
                  f" +- {result.std_errors[name] / scale:.3f}{unit}")
        else:
            print(f"  {name:<27}{result.prior[name] / scale:9.3f}{unit}    kept: not identifiable from these "
                  f"records ({result.not_identifiable[name]})")
    if result.rms_error_after > 0.1:
        print(f"warning: after the fit the model still misses these records by {result.rms_error_after:.0%} (rms); "
              "check the records (right plan, steady-state steps, GPU) before trusting the calibration")
    if args.verbose:
        print("fit records (relative error, predicted / measured - 1):")
        print(error_table(result.per_record))
    if held_out:
        print(f"held-out records ({len(held_out)}, seed {args.seed}): relative error, predicted / measured - 1")
        print(error_table(record_errors(held_out, result.prior, result.values)))
    if args.out:
        result.save(args.out)
        print(f"wrote {args.out}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    from ..calibration import DEFAULT_PARAMS

    parser.description = ("Fit the cost model's efficiencies (and allocator fragmentation) to measured runs. "
                          "RECORDS are JSON-lines files (or JSON lists) written by `autoplan run --record`.")
    parser.add_argument("records", nargs="+", metavar="RECORDS")
    parser.add_argument("--out", default="calibration.yaml", help="calibration file to write (default calibration.yaml)")
    parser.add_argument("--holdout", type=_holdout_fraction, default=0.0,
                        help="fraction of records held out of the fit and used to check it, e.g. 0.25")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--params", default=None,
                        help=f"comma-separated parameters to fit (default {','.join(DEFAULT_PARAMS)}; "
                             "also cuda_context_bytes)")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print the per-record errors of the fit set")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="fit records whose source says they are synthetic (testing the fit, not calibrating)")
