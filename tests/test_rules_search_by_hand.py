"""Layout rules, the search's arithmetic helpers, --fix and size parsing/printing, against
hand-written values and messages (and a brute force for the factorizations)."""

import itertools
import math
from dataclasses import replace

import pytest

from autoplan.errors import UsageError
from autoplan.fix import check_conflicts, parse_fix
from autoplan.search import (
    _grad_accum,
    build_search_space,
    check_pins,
    divisors,
    factorizations,
    layouts,
    power_of_two_grid,
    prime_factors,
)
from autoplan.units import (
    MemoryHeadroom,
    format_bytes_gib,
    format_duration,
    parse_memory_headroom,
    parse_seq_len,
    parse_train_tokens,
)
from cost_models.config import Parallelism, TrainConfig
from cost_models.models import ModelSpec
from cost_models.rules import (
    degree_product_violation,
    degree_violations,
    layout_violations,
    schedule_violation,
    seq_len_divisor,
    seq_len_multiple,
    seq_len_violation,
)
from cost_models.specs import GPU_PRESETS, ClusterSpec, SpecError

H100 = GPU_PRESETS["h100-sxm-80gb"]
# 6 query heads, 2 K/V heads, FFN 10: tp=2 divides all three, tp=3 only n_heads, tp=4 none
ODD = ModelSpec("odd", vocab_size=16, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=10)
EVEN = ModelSpec("even", vocab_size=16, dim=64, n_layers=2, n_heads=16, n_kv_heads=16, ffn_dim=32)


# ----------------------------------------------------------------------------- rules


def test_seq_len_divisor_and_violation():
    assert [seq_len_divisor(cp) for cp in (1, 2, 3, 8)] == [1, 4, 6, 16]
    assert seq_len_violation(7, 1) is None and seq_len_violation(12, 2) is None
    assert seq_len_violation(10, 2) == ("seq_len must be divisible by 2 x cp = 4 (head-tail load balancing); "
                                        "10 is not")


def test_seq_len_multiple_by_hand():
    # tokens per GPU (batch x seq / cp) must split over tp, and seq over 2 cp chunks
    assert seq_len_multiple(Parallelism(cp=2)) == 4
    assert seq_len_multiple(Parallelism(cp=2, tp=4)) == 8  # seq / 2 divisible by 4
    assert seq_len_multiple(Parallelism(cp=2, tp=4), local_batch_size=2) == 4  # 2 seq / 2 = seq: by 4
    assert seq_len_multiple(Parallelism(tp=3)) == 3
    assert seq_len_multiple(Parallelism(tp=3), local_batch_size=3) == 1
    assert seq_len_multiple(Parallelism(cp=3, tp=2), local_batch_size=4) == 6
    assert seq_len_multiple(Parallelism(cp=2, tp=3)) == 12  # lcm(4, 6)
    for par, batch in ((Parallelism(cp=2, tp=4), 1), (Parallelism(cp=3, tp=2), 1), (Parallelism(cp=4, tp=8), 2)):
        step = seq_len_multiple(par, batch)  # brute force: the smallest length that passes both rules
        assert step == next(s for s in itertools.count(1) if s % seq_len_divisor(par.cp) == 0
                            and (batch * s // par.cp) % par.tp == 0 and (batch * s) % par.cp == 0)


def test_degree_violations_name_each_reason():
    assert degree_violations(ODD, Parallelism(dp_shard=4, tp=2)) == []
    assert degree_violations(ODD, Parallelism(tp=4)) == ["tp=4 does not divide n_heads=6",
                                                         "tp=4 does not divide n_kv_heads=2",
                                                         "tp=4 does not divide ffn_dim=10"]
    assert degree_violations(ODD, Parallelism(tp=3)) == ["tp=3 does not divide n_kv_heads=2",
                                                         "tp=3 does not divide ffn_dim=10"]
    assert degree_violations(ModelSpec("f", vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=3),
                             Parallelism(tp=2)) == ["tp=2 does not divide ffn_dim=3"]
    cluster = ClusterSpec(H100, 16, 8)
    assert degree_violations(EVEN, Parallelism(tp=16), cluster) == ["tp=16 spans more than one node (8 GPUs per node)"]
    assert degree_violations(EVEN, Parallelism(dp_shard=2, tp=8), cluster) == []  # a whole node is fine
    assert degree_violations(EVEN, Parallelism(tp=8), cluster) == ["degrees multiply to 8, cluster has 16 GPUs"]
    assert degree_product_violation(Parallelism(dp_shard=2, tp=2), 4) is None


def test_layout_violations_sequence_parallel_tokens():
    cfg = TrainConfig(Parallelism(cp=2, tp=4), 12)  # 6 tokens per GPU over tp=4
    assert layout_violations(EVEN, cfg) == ["tokens per GPU 6 not divisible by tp=4 (sequence parallel)"]
    assert layout_violations(EVEN, TrainConfig(Parallelism(cp=2, tp=4), 16)) == []
    assert layout_violations(EVEN, TrainConfig(Parallelism(cp=2, tp=4), 12, local_batch_size=2)) == []
    assert layout_violations(ODD, TrainConfig(Parallelism(tp=4), 16)) == degree_violations(ODD, Parallelism(tp=4))


# ----------------------------------------------------------------------------- search helpers


def test_prime_factors_and_divisors_by_hand():
    assert prime_factors(1) == {} and prime_factors(2) == {2: 1} and prime_factors(97) == {97: 1}
    assert prime_factors(360) == {2: 3, 3: 2, 5: 1}
    assert prime_factors(9) == {3: 2} and prime_factors(25) == {5: 2} and prime_factors(1024) == {2: 10}
    assert prime_factors(2 * 7 * 7 * 11) == {2: 1, 7: 2, 11: 1}
    assert divisors(1) == [1] and divisors(12) == [1, 2, 3, 4, 6, 12] and divisors(49) == [1, 7, 49]
    for n in (1, 6, 36, 96, 97, 120):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("n", [1, 4, 12, 32])
def test_factorizations_are_every_degree_tuple(n):
    brute = {t for t in itertools.product(range(1, n + 1), repeat=4) if math.prod(t) == n}
    found = list(factorizations(n))
    assert len(found) == len(set(found)) and set(found) == brute


def test_power_of_two_grid_by_hand():
    assert power_of_two_grid(1000, 10000) == [1024, 1536, 2048, 3072, 4096, 6144, 8192]
    assert power_of_two_grid(1536, 3072) == [1536, 2048, 3072]
    assert power_of_two_grid(2048, 2048) == [2048] and power_of_two_grid(100, 1000) == []


def test_grad_accum_by_hand():
    par = Parallelism(dp_replicate=2, dp_shard=2, cp=2)  # dp = 4
    assert _grad_accum(1024, 2, par, None, {}) == 1
    assert _grad_accum(1024, 2, par, None, {"grad_accum_steps": 3}) == 3
    assert _grad_accum(1024, 2, par, 1024 * 2 * 4 * 5, {}) == 5
    assert _grad_accum(1024, 2, par, 1024 * 2 * 4 * 5, {"grad_accum_steps": 5}) == 5
    assert _grad_accum(1024, 2, par, 10000, {}) == ("global batch 10000 tokens is not a multiple of seq_len x "
                                                    "local_batch x dp = 8192")
    assert _grad_accum(1024, 2, par, 8192 * 5, {"grad_accum_steps": 4}) == ("grad_accum_steps=4 but the global "
                                                                            "batch needs 5")


def test_check_pins_messages():
    check_pins(EVEN, 8, {"tp": 2, "cp": 2}, gpus_per_node=8)
    with pytest.raises(SpecError, match=r"^--fix cp=3,tp=2: the pinned degrees multiply to 6, which does not "
                                        r"divide --gpus 8$"):
        check_pins(EVEN, 8, {"tp": 2, "cp": 3})
    with pytest.raises(SpecError, match=r"^--fix tp=4: tp must divide the model's n_heads=6$"):
        check_pins(ODD, 8, {"tp": 4})
    with pytest.raises(SpecError, match=r"^--fix tp=3: tp must divide the model's n_kv_heads=2$"):
        check_pins(ODD, 6, {"tp": 3})
    with pytest.raises(SpecError, match=r"^--fix tp=16: tensor parallel must stay inside a node of 8 GPUs$"):
        check_pins(EVEN, 16, {"tp": 16}, gpus_per_node=8)
    check_pins(EVEN, 16, {"tp": 16})  # no node size given: not checked here


def test_layouts_group_bad_tp_and_refuse_replicas_inside_a_node():
    found, rejections = layouts(ODD, H100, 8, 8)
    # tp = 4 and 8 fail the head rules: one row each, counting the layouts they stand for
    # (dp_rep x dp_shard x cp = 2: 3 ways; = 1: 1 way)
    rows = {r.what: (r.reason, r.count) for r in rejections}
    assert rows["8 GPUs tp=4 (3 layouts)"] == ("; ".join(degree_violations(ODD, Parallelism(dp_shard=2, tp=4),
                                                                           ClusterSpec(H100, 8, 8))), 3)
    assert rows["8 GPUs tp=8 (1 layouts)"][1] == 1
    # one node: every dp_replicate > 1 is refused, with its reason
    replicas = [r for r in rejections if "dp_rep=2" in r.what or "dp_rep=4" in r.what or "dp_rep=8" in r.what]
    assert replicas and all(r.reason == "dp_replicate > number of nodes (replicate across nodes only)"
                            for r in replicas)
    assert {(lay.parallelism.dp_replicate, lay.parallelism.tp) for lay in found} == {(1, 1), (1, 2)}
    assert all(lay.cp_impls == (("allgather-kv", "ring-allgather") if lay.parallelism.cp > 1 else ("none",))
               for lay in found)
    pinned, _ = layouts(ODD, H100, 8, 8, {"dp_replicate": 2, "cp_impl": "ring-alltoall", "local_batch_size": 3})
    assert pinned and all(lay.parallelism.dp_replicate == 2 and lay.batches == (3,) for lay in pinned)
    assert all(lay.cp_impls == ("ring-alltoall",) for lay in pinned if lay.parallelism.cp > 1)
    bad, why = layouts(ODD, H100, 12, 8)
    assert bad == [] and why[0].what == "12 GPUs" and "not a whole number of nodes" in why[0].reason


# ----------------------------------------------------------------------------- --fix


def test_fix_messages_by_hand():
    knobs = ("dp_replicate, dp_shard, cp, tp, pp, local_batch_size, grad_accum_steps, pp_microbatches, "
             "pp_virtual_stages, cp_impl, ac, mesh_order, seq_len, pp_schedule")
    cases = {
        "tp": f"--fix 'tp': expected knob=value, e.g. tp=8 (knobs: {knobs})",
        "xp=2": f"--fix 'xp': unknown knob; use one of {knobs}",
        "tp=2,tp=2": "--fix tp: given twice; pin each knob once",
        "tp=0": "--fix tp='0': must be a positive integer",
        "tp=x": "--fix tp='x': must be a positive integer",
        "tp=\u0663": "--fix tp='\u0663': must be a positive integer",  # an Arabic-Indic digit
        "pp=2,microbatches=x": "--fix pp_microbatches='x': must be a positive integer",
        "cp_impl=ring": "--fix cp_impl='ring': use one of none, allgather-kv, ring-allgather, ring-alltoall",
        "ac=some": "--fix ac='some': use one of none, selective, full",
        "mesh_order=tp/cp": ("--fix mesh_order='tp/cp': name each of dp_replicate, dp_shard, cp, tp once, outermost "
                             "first, separated by / (e.g. dp_replicate/dp_shard/cp/tp)"),
        "cp=2,cp_impl=none": "--fix cp=2 with cp_impl=none: pick one of allgather-kv, ring-allgather, ring-alltoall",
        "cp=2,seq_len=6": ("--fix seq_len=6 with cp=2: seq_len must be divisible by 2 x cp = 4 (head-tail load "
                           "balancing); 6 is not"),
    }
    for text, message in cases.items():
        with pytest.raises(UsageError) as info:
            parse_fix(text)
        assert str(info.value) == message, text
    assert parse_fix(" tp = 2 ,, pp=1, mesh_order = tp>cp>dp_shard>dp_replicate , seq_len=8k,cp=1,cp_impl=none") == {
        "tp": 2, "pp": 1, "mesh_order": ("tp", "cp", "dp_shard", "dp_replicate"), "seq_len": 8192, "cp": 1,
        "cp_impl": "none"}  # pp=1 is kept: it rules pipelines out
    assert parse_fix("cp=2,seq_len=8,ac=full,local_batch_size=12") == {"cp": 2, "seq_len": 8, "ac": "full",
                                                                        "local_batch_size": 12}


def test_fix_conflicts_by_hand():
    check_conflicts({"seq_len": 8192, "ac": "full"}, 8192, "full")
    check_conflicts({"ac": "full"}, None, "auto")
    check_conflicts({}, 4096, "none")
    with pytest.raises(UsageError, match=r"^--fix seq_len=8k and --target-seqlen 16k disagree: give one of them$"):
        check_conflicts({"seq_len": 8192}, 16384)
    with pytest.raises(UsageError, match=r"^--fix ac=full and --ac none disagree: give one of them$"):
        check_conflicts({"ac": "full"}, None, "none")


# ----------------------------------------------------------------------------- units


def test_format_duration_by_hand():
    cases = [(float("inf"), "forever"), (float("-inf"), "-inf"), (float("nan"), "nan"), (0.5, "500 ms"),
             (1e-3, "1 ms"), (0.0005, "500 us"), (0.0, "0.0 s"), (1.0, "1.0 s"), (59.94, "59.9 s"),
             (60.0, "1.0 min"), (3599.0, "60.0 min"), (3600.0, "1.0 h"), (86400.0, "1.0 days"),
             (1.08e6, "12.5 days"), (-5.0, "-5.0 s")]
    assert [format_duration(s) for s, _ in cases] == [text for _, text in cases]


def test_memory_headroom_by_hand():
    assert MemoryHeadroom(fraction=0.1, fixed_bytes=5).bytes_of(100) == 15
    assert str(MemoryHeadroom(fixed_bytes=4 * 2**30)) == "4.0 GiB"
    assert str(MemoryHeadroom(fraction=0.05)) == "5%" and str(MemoryHeadroom(fraction=0.125)) == "12.5%"
    assert str(MemoryHeadroom()) == "0%"
    GiB, MiB = 2**30, 2**20
    good = {"5%": MemoryHeadroom(fraction=0.05), "0%": MemoryHeadroom(), "89.5%": MemoryHeadroom(fraction=0.895),
            "4GiB": MemoryHeadroom(fixed_bytes=4 * GiB), "4 gb": MemoryHeadroom(fixed_bytes=4 * GiB),
            "1.5g": MemoryHeadroom(fixed_bytes=1.5 * GiB), "512MiB": MemoryHeadroom(fixed_bytes=512 * MiB),
            "512mb": MemoryHeadroom(fixed_bytes=512 * MiB), "3m": MemoryHeadroom(fixed_bytes=3 * MiB),
            "0": MemoryHeadroom(), " 2G ": MemoryHeadroom(fixed_bytes=2 * GiB)}
    for text, expected in good.items():
        assert parse_memory_headroom(text) == expected, text
    for bad in ("90%", "-1%", "5", "-4GiB", "inf%", "nanG", "infG", "x", "4TiB", ""):
        with pytest.raises(UsageError) as info:
            parse_memory_headroom(bad)
        assert str(info.value) == (f"--memory-headroom {bad.strip()!r}: expected a share of GPU memory such as 5% "
                                   "(below 90%) or an amount such as 4GiB or 512MiB"), bad
    assert format_bytes_gib(1.5 * GiB, 2) == "1.50 GiB" and format_bytes_gib(GiB / 3) == "0.3 GiB"


def test_size_parsing_edges_by_hand():
    assert parse_seq_len("2.0k") == 2048 and parse_seq_len("1.25k") == 1280 and parse_seq_len(1) == 1
    assert parse_train_tokens("0.5k") == 500
    for bad, message in ((True, "expected a size like 256k, 1M or 262144"), (0, "must be a positive whole number"),
                         ("0.5", "must be a positive whole number"), ("1.5", "must be a positive whole number")):
        with pytest.raises(UsageError) as info:
            parse_seq_len(bad)
        assert str(info.value) == f"--target-seqlen {bad!r}: {message}" + (" of tokens" if "whole" in message else "")


def test_rounding_edges_of_short_durations():
    assert format_duration(0.9994) == "999 ms"  # 999.4 ms rounds down
    assert format_duration(0.0009994995) == "999 us"  # 999.4995 us rounds down


def test_seq_len_grid_is_whole_numbers():
    assert all(type(v) is int for v in power_of_two_grid(1000, 100000))  # TrainConfig takes ints only


def test_fix_value_with_an_equals_sign():
    with pytest.raises(UsageError) as info:
        parse_fix("ac=full=x")
    assert str(info.value) == "--fix ac='full=x': use one of none, selective, full"


def test_size_messages_in_full():
    from autoplan.units import parse_batch_tokens

    with pytest.raises(UsageError) as info:
        parse_batch_tokens("4X")
    assert str(info.value) == "--global-batch-tokens '4X': expected a size like 4M, 512k or 4194304"
    with pytest.raises(UsageError) as info:
        parse_train_tokens("1Q")
    assert str(info.value) == "--train-tokens '1Q': expected a size like 1T, 300B or 1000000000"


def test_search_space_follows_the_global_batch():
    from autoplan.search import build_search_space

    # 8 GPUs, 4096-token sequences, a 4096 x 8 x 4 token batch: accumulation = 4 x 8 / (batch x dp)
    space = build_search_space(EVEN, H100, [8], [4096], gpus_per_node=8, global_batch_tokens=4096 * 8 * 4)
    assert space.candidates
    for c in space.candidates:
        dp = c.parallelism.dp_replicate * c.parallelism.dp_shard
        assert c.grad_accum_steps * 4096 * c.local_batch_size * dp == 4096 * 8 * 4


def test_batches_past_the_token_cap_are_skipped_not_the_rest():
    from autoplan.search import Layout, expand

    layout = Layout(1, Parallelism(), ClusterSpec(H100, 1), ("none",), (8, 1))  # the large batch first
    out = expand(EVEN, layout, 8192, {}, None, [])
    assert [c.local_batch_size for c in out] == [1]  # 8 x 8192 tokens is past the cap; 1 still runs


def test_sequence_parallel_rejection_keeps_its_reason():
    from autoplan.search import Layout, expand

    rejections = []
    layout = Layout(4, Parallelism(tp=4), ClusterSpec(H100, 4), ("none",), (1,))
    assert expand(EVEN, layout, 6, {}, None, rejections) == []
    assert [(r.what, r.reason) for r in rejections] == [
        ("4 GPUs dp_rep=1 dp_shard=1 cp=1 tp=4 seq=6", "tokens per GPU 6 not divisible by tp=4 (sequence parallel)")]


def test_rules_edges_by_hand():
    assert seq_len_multiple(Parallelism(tp=2)) == 2  # 1 x seq split over tp 2
    assert seq_len_multiple(Parallelism(tp=6), local_batch_size=4) == 3  # 4 seq / 6 whole: seq by 3
    cluster = ClusterSpec(H100, 4)
    assert layout_violations(EVEN, TrainConfig(Parallelism(tp=2), 16), cluster) == [
        "degrees multiply to 2, cluster has 4 GPUs"]


def test_candidate_train_config_by_hand():
    from autoplan.search import Candidate

    order = ("dp_replicate", "dp_shard", "cp", "tp")
    bare = Candidate(8, Parallelism(dp_shard=4, cp=2), order, 4096, 2, 3, "ring-alltoall")
    assert bare.train_config() == TrainConfig(Parallelism(dp_shard=4, cp=2), 4096, 2, 3, None, "ring-alltoall", order)
    given = TrainConfig(Parallelism(dp_shard=8), 1024)
    assert Candidate(8, Parallelism(dp_shard=8), order, 1024, 1, 1, "none", given).train_config() is given


def test_pipeline_degree_and_layout_rules_by_hand():
    tied = ModelSpec("tied", vocab_size=16, dim=64, n_layers=2, n_heads=16, n_kv_heads=16, ffn_dim=32,
                     tie_embeddings=True)
    assert degree_violations(tied, Parallelism(dp_shard=2)) == []  # pp = 1: tied is fine
    assert degree_violations(EVEN, Parallelism(pp=2)) == []  # one layer per stage
    assert degree_violations(EVEN, Parallelism(pp=3)) == [
        "pp=3 exceeds n_layers=2 (each stage needs a whole layer)"]
    assert degree_violations(tied, Parallelism(pp=2)) == [
        "pp=2 with tied embeddings: the embedding (first stage) and output projection (last stage) would live on "
        "different ranks"]
    # Stages = pp x virtual stages, each a whole layer.
    assert layout_violations(EVEN, TrainConfig(Parallelism(pp=2), 8, local_batch_size=2, pp_microbatches=2)) == []
    assert layout_violations(EVEN, TrainConfig(Parallelism(pp=2), 8, local_batch_size=4, pp_microbatches=4,
                                               pp_schedule="interleaved-1f1b", pp_virtual_stages=2)) == [
        "pp=2 x pp_virtual_stages=2 = 4 stages exceed n_layers=2 (each stage needs a whole layer)"]
    # Sequence parallel per micro-batch: 2 sequences x 3 = 6 tokens per GPU split over tp = 2,
    # but each micro-batch's 3 tokens do not.
    four = replace(EVEN, n_layers=4)
    assert layout_violations(four, TrainConfig(Parallelism(pp=2, tp=2), 3, local_batch_size=2,
                                               pp_microbatches=2, cp_impl="none")) == [
        "tokens per GPU per micro-batch 3 not divisible by tp=2 (sequence parallel)"]
    assert layout_violations(four, TrainConfig(Parallelism(pp=2, tp=2), 4, local_batch_size=2,
                                               pp_microbatches=2, cp_impl="none")) == []
    # tp = 2 without a pipeline: 7 tokens per GPU do not split.
    assert layout_violations(EVEN, TrainConfig(Parallelism(tp=2), 7)) == [
        "tokens per GPU 7 not divisible by tp=2 (sequence parallel)"]


@pytest.mark.parametrize("pp, schedule, micro, virtual, batch, message", [
    # Accepted, at each rule's boundary.
    (1, "1f1b", 1, 1, 1, None),
    (2, "1f1b", 2, 1, 2, None),  # micro-batches == pp
    (2, "1f1b", 5, 1, 5, None),  # rounds only matter to interleaved-1f1b
    (2, "1f1b", 2, 1, 4, None),  # 2 divides 4
    (2, "interleaved-1f1b", 2, 2, 2, None),
    (2, "interleaved-1f1b", 3, 2, 3, None),  # 3 // 2 = 1 round
    (2, "interleaved-1f1b", 4, 2, 4, None),  # 2 rounds of 2
    # Refused, each with its message in full.
    (2, "zb", 2, 1, 2, "pp_schedule='zb': use one of 1f1b, gpipe, interleaved-1f1b"),
    (2, "1f1b", 0, 1, 2, "pp_microbatches=0 and pp_virtual_stages=1 must be integers >= 1"),
    (2, "1f1b", 2.0, 1, 2, "pp_microbatches=2.0 and pp_virtual_stages=1 must be integers >= 1"),
    (2, "1f1b", 2, 0, 2, "pp_microbatches=2 and pp_virtual_stages=0 must be integers >= 1"),
    (1, "1f1b", 2, 1, 2, "pp_microbatches=2, pp_virtual_stages=1 with pp=1: micro-batches and virtual stages "
                         "belong to pipeline parallelism; leave them at 1 or set pp > 1"),
    (2, "interleaved-1f1b", 2, 1, 2, "pp_virtual_stages=1 with pp_schedule 'interleaved-1f1b': use "
                                     "pp_virtual_stages >= 2 with interleaved-1f1b and 1 otherwise"),
    (2, "gpipe", 2, 2, 2, "pp_virtual_stages=2 with pp_schedule 'gpipe': use pp_virtual_stages >= 2 with "
                          "interleaved-1f1b and 1 otherwise"),
    (4, "1f1b", 2, 1, 2, "pp_microbatches=2 < pp=4: every stage needs a micro-batch in flight (use at least pp "
                         "micro-batches)"),
    (2, "1f1b", 2, 1, 3, "pp_microbatches=2 does not divide local_batch_size=3 (each micro-batch holds whole "
                         "sequences)"),
    (2, "interleaved-1f1b", 5, 2, 5, "pp_microbatches=5 with interleaved-1f1b on pp=2: must be a multiple of 2 "
                                     "rounds (torch's Interleaved1F1B)"),
])
def test_schedule_rules_by_hand(pp, schedule, micro, virtual, batch, message):
    assert schedule_violation(pp, schedule, micro, virtual, batch) == message


def test_ring_context_parallel_is_refused_inside_a_pipeline():
    four = replace(EVEN, n_layers=4)
    ring = TrainConfig(Parallelism(pp=2, cp=2), 8, local_batch_size=2, pp_microbatches=2, cp_impl="ring-allgather")
    assert layout_violations(four, ring) == [
        "cp_impl=ring-allgather with pp=2: the ring runs inside context_parallel() around one model's step, not a "
        "pipeline schedule (runtime); use allgather-kv"]
    assert layout_violations(four, replace(ring, cp_impl="allgather-kv")) == []


def test_search_keeps_the_asked_node_size_batches_and_ffn_message():
    model = replace(EVEN, n_layers=4)
    # 4 GPUs per node: no tensor-parallel group wider than a node, pipelines included.
    space = build_search_space(model, H100, [16], [1024], 4, {"pp": 2})
    assert space.candidates and max(c.parallelism.tp for c in space.candidates) <= 4
    # Only the batch sizes asked for.
    space = build_search_space(model, H100, [8], [1024], 8, {}, batches=(1,))
    assert space.candidates and {c.local_batch_size for c in space.candidates} == {1}
    with pytest.raises(SpecError, match=r"^--fix tp=2: tp must divide the model's ffn_dim=3$"):
        check_pins(ModelSpec("f", vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=3), 2, {"tp": 2})


def test_pipeline_candidates_follow_pins_caps_and_the_global_batch():
    from autoplan.search import MAX_BATCHED_TOKENS_PER_GPU, pipeline_candidates

    model = replace(EVEN, n_layers=8)
    assert pipeline_candidates(model, H100, 8, 4096, 8, {"pp": 1}, None) == ([], [])  # pp = 1 pinned: none
    found, _ = pipeline_candidates(model, H100, 8, 4096, 8, {"pp": 2, "pp_microbatches": 4}, None)
    assert found and {c.pp_microbatches for c in found} == {4}
    found, _ = pipeline_candidates(model, H100, 8, 4096, 8, {"pp": 2, "local_batch_size": 4}, None)
    assert found and {c.local_batch_size for c in found} == {4}
    # A pinned virtual stage count, with or without the schedule: interleaved with that count.
    for pins in ({"pp_schedule": "interleaved-1f1b", "pp_virtual_stages": 4}, {"pp_virtual_stages": 4}):
        found, _ = pipeline_candidates(model, H100, 8, 4096, 8, {"pp": 2, **pins}, None)
        assert found and {(c.pp_schedule, c.pp_virtual_stages) for c in found} == {("interleaved-1f1b", 4)}
    # Sequences per micro-batch: more than one only while a micro-batch stays under the
    # token cap per GPU (16k tokens without CP: 2 sequences fit the 32k cap, 4 do not).
    found, _ = pipeline_candidates(model, H100, 8, 16384, 8, {"pp": 2}, None)
    for c in found:
        per_micro = c.local_batch_size // c.pp_microbatches
        assert per_micro == 1 or per_micro * 16384 // c.parallelism.cp <= MAX_BATCHED_TOKENS_PER_GPU
    assert {c.local_batch_size // c.pp_microbatches for c in found if c.parallelism.cp == 1} == {1, 2}
    found, _ = pipeline_candidates(model, H100, 8, 32768, 8, {"pp": 2, "cp": 1}, None)
    assert found and {c.local_batch_size // c.pp_microbatches for c in found} == {1}  # 2 x 32k > the cap
    # A global batch the layout cannot split is a rejection naming the layout, length and batch.
    found, rejected = pipeline_candidates(model, H100, 8, 4096, 8, {"pp": 2, "dp_shard": 4}, 3 * 4096)
    assert not found and rejected
    assert all(r.what.startswith("8 GPUs ") and " seq=4096 b=" in r.what and r.reason for r in rejected)


def test_mesh_orders_one_per_placement_by_hand():
    from autoplan.search import mesh_orders

    two_nodes = ClusterSpec(H100, 16, 8)
    # dp_shard 2 x cp 8: CP inside a node (the default order) or spread over both nodes.
    assert mesh_orders(two_nodes, Parallelism(dp_shard=2, cp=8)) == [
        ("dp_replicate", "dp_shard", "cp", "tp"), ("dp_replicate", "cp", "dp_shard", "tp")]
    # dp_shard 4 x cp 2 x tp 2: TP and CP inside a node (default), CP across nodes, or TP across.
    assert mesh_orders(two_nodes, Parallelism(dp_shard=4, cp=2, tp=2)) == [
        ("dp_replicate", "dp_shard", "cp", "tp"), ("dp_replicate", "cp", "dp_shard", "tp"),
        ("dp_replicate", "tp", "dp_shard", "cp")]
