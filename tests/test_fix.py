"""--fix parsing: values against hand-written dicts, every bad input a one-line UsageError."""

import pytest

from autoplan.errors import UsageError
from autoplan.fix import KNOBS, parse_fix


def test_the_full_example_from_the_design():
    text = ("dp_shard=8,cp=2,tp=1,local_batch_size=1,cp_impl=ring-allgather,ac=full,"
            "mesh_order=dp_replicate/dp_shard/cp/tp,seq_len=64k")
    assert parse_fix(text) == {
        "dp_shard": 8, "cp": 2, "tp": 1, "local_batch_size": 1, "cp_impl": "ring-allgather", "ac": "full",
        "mesh_order": ("dp_replicate", "dp_shard", "cp", "tp"), "seq_len": 65536,
    }


def test_each_knob_alone():
    assert parse_fix("dp_replicate=2") == {"dp_replicate": 2}
    assert parse_fix("grad_accum_steps=4") == {"grad_accum_steps": 4}
    assert parse_fix("cp_impl=allgather-kv") == {"cp_impl": "allgather-kv"}
    assert parse_fix("ac=selective") == {"ac": "selective"}
    assert parse_fix("seq_len=1M") == {"seq_len": 1048576}
    assert parse_fix("seq_len=262144") == {"seq_len": 262144}
    assert parse_fix("mesh_order=cp>tp>dp_shard>dp_replicate") == {
        "mesh_order": ("cp", "tp", "dp_shard", "dp_replicate")}


def test_whitespace_empty_items_and_pp_one():
    assert parse_fix(" tp = 4 , ,cp=2, ") == {"tp": 4, "cp": 2}
    assert parse_fix("pp=1,tp=2") == {"pp": 1, "tp": 2}  # pp=1 is kept: it rules pipelines out
    assert parse_fix("") == {}


def test_integers_are_ints():
    fixed = parse_fix("tp=08,local_batch_size=3")
    assert fixed == {"tp": 8, "local_batch_size": 3} and all(type(v) is int for v in fixed.values())


@pytest.mark.parametrize("bad, message", [
    ("tp", r"^--fix 'tp': expected knob=value"),
    ("foo=1", r"^--fix 'foo': unknown knob; use one of dp_replicate, dp_shard, cp, tp, pp, local_batch_size"),
    ("TP=2", r"^--fix 'TP': unknown knob"),
    ("tp=x", r"^--fix tp='x': must be a positive integer$"),
    ("tp=0", r"^--fix tp='0': must be a positive integer$"),
    ("cp=-2", r"^--fix cp='-2': must be a positive integer$"),
    ("dp_shard=2.5", r"^--fix dp_shard='2.5': must be a positive integer$"),
    ("local_batch_size=", r"^--fix local_batch_size='': must be a positive integer$"),
    ("tp=\u0663", r"must be a positive integer"),  # a non-ASCII digit
    ("pp=1,schedule=1f1b", r"^--fix pp=1 with pp_schedule: pipeline knobs need pp > 1$"),
    ("pp=4,microbatches=2", r"^--fix pp_microbatches=2 with pp=4: use at least pp micro-batches$"),
    ("schedule=zb", r"^--fix pp_schedule='zb': use one of 1f1b, gpipe, interleaved-1f1b$"),
    ("pp=4,schedule=1f1b,virtual=2", r"^--fix pp_schedule=1f1b,pp_virtual_stages=2: use virtual >= 2 with"),
    ("pp=2,microbatches=4,local_batch_size=6", r"^--fix pp_microbatches=4: must divide local_batch_size=6$"),
    ("cp_impl=ring", r"^--fix cp_impl='ring': use one of none, allgather-kv, ring-allgather, ring-alltoall$"),
    ("ac=auto", r"^--fix ac='auto': use one of none, selective, full$"),
    ("ac=FULL", r"^--fix ac='FULL': use one of"),
    ("mesh_order=tp/cp", r"^--fix mesh_order='tp/cp': name each of dp_replicate, dp_shard, cp, tp once"),
    ("mesh_order=tp/cp/dp_shard/dp_shard", r"^--fix mesh_order="),
    ("mesh_order=tp/cp/dp_shard/dp_replicate/pp", r"^--fix mesh_order="),
    ("seq_len=abc", r"^--fix seq_len 'abc': expected a size like 256k, 1M or 262144$"),
    ("tp=2,tp=4", r"^--fix tp: given twice"),
    ("cp=4,cp_impl=none", r"^--fix cp=4 with cp_impl=none: pick one of allgather-kv, ring-allgather, ring-alltoall$"),
    ("cp=4,seq_len=100", r"^--fix seq_len=100 with cp=4: seq_len must be divisible by 2 x cp = 8"),
])
def test_bad_input_names_the_knob_and_the_allowed_values(bad, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_fix(bad)
    assert "\n" not in str(info.value)


def test_consistent_cross_knob_pins_pass():
    assert parse_fix("cp=1,cp_impl=none") == {"cp": 1, "cp_impl": "none"}
    assert parse_fix("cp=4,seq_len=8k") == {"cp": 4, "seq_len": 8192}


def test_every_knob_is_a_plan_field_or_degree():
    from autoplan.plan import ParallelismDoc, Plan
    fields = set(Plan.model_fields) | set(ParallelismDoc.model_fields) | {"ac"}
    assert set(KNOBS) <= fields


def test_pipeline_pins_at_their_boundaries_are_accepted():
    # "interleaved" is short for interleaved-1f1b; micro-batches == pp and a divisor of the
    # local batch are allowed; a schedule or a virtual count alone checks nothing else.
    assert parse_fix("pp=4,schedule=interleaved,virtual=2") == {
        "pp": 4, "pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 2}
    assert parse_fix("pp=4,microbatches=4") == {"pp": 4, "pp_microbatches": 4}
    assert parse_fix("pp=2,microbatches=4,local_batch_size=8") == {
        "pp": 2, "pp_microbatches": 4, "local_batch_size": 8}
    assert parse_fix("pp=4,schedule=1f1b,virtual=1") == {"pp": 4, "pp_schedule": "1f1b", "pp_virtual_stages": 1}
    assert parse_fix("schedule=gpipe") == {"pp_schedule": "gpipe"}
    assert parse_fix("virtual=2") == {"pp_virtual_stages": 2}


@pytest.mark.parametrize("text, message", [
    ("pp=1,microbatches=4", "--fix pp=1 with pp_microbatches: pipeline knobs need pp > 1"),
    ("pp=1,virtual=2", "--fix pp=1 with pp_virtual_stages: pipeline knobs need pp > 1"),
    ("pp=1,schedule=gpipe,microbatches=2",
     "--fix pp=1 with pp_schedule,pp_microbatches: pipeline knobs need pp > 1"),
    ("pp=4,schedule=interleaved-1f1b,virtual=1",
     "--fix pp_schedule=interleaved-1f1b,pp_virtual_stages=1: use virtual >= 2 with interleaved-1f1b and 1 otherwise"),
    ("pp=4,schedule=1f1b,virtual=2",
     "--fix pp_schedule=1f1b,pp_virtual_stages=2: use virtual >= 2 with interleaved-1f1b and 1 otherwise"),
    ("pp=4,microbatches=3", "--fix pp_microbatches=3 with pp=4: use at least pp micro-batches"),
])
def test_pipeline_pin_conflicts_say_exactly_what_to_change(text, message):
    with pytest.raises(UsageError) as error:
        parse_fix(text)
    assert str(error.value) == message
