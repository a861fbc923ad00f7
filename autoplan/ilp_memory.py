"""The ILP's memory constraints: every phase of a candidate's step within its tensor budget,
linear in the per-mode layer counts (layers ordered full, selective, none from block 0).

Split from ``autoplan/ilp.py`` (which builds and solves the problem) because the
constraints carry their own argument: which blocks of a run can hold its peak, and
when a single-block run needs a binary. tests/test_ilp_memory.py and
tests/test_ilp_memory_binding.py check them against the phase walk of every split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pulp

if TYPE_CHECKING:
    from .ilp import PricedCandidate


def add_memory_constraints(prob: pulp.LpProblem, p: PricedCandidate, x, n: dict, u: dict, tag: int) -> None:
    """Peak tensor bytes of every phase <= budget, for layers ordered full, selective, none."""
    mt = p.memory
    gib = 1.0 / 2**30  # solve in GiB: byte-sized coefficients upset the solver's tolerances
    A = {m: v * gib for m, v in mt.layer.saved.items()}
    W = {m: v * gib for m, v in mt.layer.working.items()}
    g = mt.sharded_grad_bytes_per_layer * gib
    L = p.n_layers
    budget = p.tensor_budget_bytes * gib
    zero = 0
    nf, ns, nn = n.get("full", zero), n.get("selective", zero), n.get("none", zero)
    uf, us, un = u.get("full", zero), u.get("selective", zero), u.get("none", zero)
    loss_base = (mt.static_bytes + mt.root_unsharded_bytes + mt.forward_block_bytes + mt.root_activation_bytes
                 + mt.loss_working_bytes) * gib
    _at_most(prob, [(x, loss_base - budget), (nf, A["full"]), (ns, A["selective"]), (nn, A["none"])], 0.0,
             f"mem_loss_{tag}")
    base = (mt.static_bytes + mt.root_unsharded_bytes + mt.backward_block_bytes + mt.root_grad_bytes
            + mt.input_bytes) * gib
    big = max(0.0, base + L * (max(A.values()) + g) + max(W.values()) - budget)
    # (phase bytes) <= budget whenever the mode's block is non-empty (big-M otherwise).
    # ``base`` and ``W`` are a middle block's (two blocks gathered, the reduce-scatter input
    # of the block above held). The top block holds no such input (``Wt``, ``delta`` less)
    # and block 0 gathers one block fewer (``save0`` less). Inside a run the phase changes
    # by ``A - g`` per block upward, so a run's maximum is on its top side when ``A >= g``
    # (the top, or the block below it: ``top_step``) and on its bottom side otherwise
    # (the bottom, or the block above block 0: ``bottom_step``); only that side is
    # constrained. A run that is a single block at the far end is then priced as a middle
    # block, which never refuses a split that fits: its neighbour in the next run has a
    # heavier working set by exactly the saved bytes it lacks (``W`` differs by ``A``), so
    # its own, exact constraint is the tighter one - except with two blocks in all, where
    # that neighbour is itself an end block: there both sides are constrained, and
    # ``alone_top`` / ``alone_bottom`` (1 only for a single-block run at that end, from the
    # binary ``several``: two blocks or more) take the middle block's extra back out.
    Wt = {m: v * gib for m, v in mt.top_layer_working.items()} or W
    delta = {m: W[m] - Wt[m] for m in W}
    save0 = mt.first_layer_block_saving_bytes * gib
    if L > 2:
        top_side = {m: A[m] >= g for m in W}
        bottom_side = {m: not top_side[m] for m in W}
        top_step = {m: max(0.0, min(delta[m], g + delta[m] - A[m])) for m in W}
        bottom_step = {m: max(0.0, min(save0, save0 + A[m] - g)) for m in W}
    else:  # two blocks or fewer: a run's ends are all its blocks; both are constrained
        top_side = bottom_side = {m: True for m in W}
        top_step = bottom_step = {m: 0.0 for m in W}
    order = [m for m in ("full", "selective", "none") if m in n]
    alone_top: dict = {m: zero for m in order}
    alone_bottom: dict = {m: zero for m in order}
    if L == 2:
        for i, m in enumerate(order):
            several = prob.add_variable(f"several_{m}_{tag}", cat="Binary")
            prob += n[m] >= 2 * several
            prob += n[m] <= 1 + L * several
            alone_top[m] = prob.add_variable(f"alone_top_{m}_{tag}", lowBound=0, upBound=1)
            prob += alone_top[m] <= u[m] - several
            for above in order[i + 1:]:
                prob += alone_top[m] <= 1 - u[above]
            alone_bottom[m] = prob.add_variable(f"alone_bottom_{m}_{tag}", lowBound=0, upBound=1)
            prob += alone_bottom[m] <= u[m] - several
            for below in order[:i]:
                prob += alone_bottom[m] <= 1 - u[below]
    # Each constraint: sum(coefficient x variable) - big <= 0, where the big-M relaxation
    # ``budget x + big (1 - u)`` is folded in (``u`` gains ``big``, ``x`` loses ``budget``).
    bx = base - budget
    if "none" in n:
        if top_side["none"]:
            _at_most(prob, [(x, bx), (nf, A["full"]), (ns, A["selective"]), (nn, A["none"]),
                            (un, Wt["none"] + top_step["none"] + big), (alone_bottom["none"], -save0)], big,
                     f"mem_none_top_{tag}")
        if bottom_side["none"]:
            for below in [u[m] for m in ("full", "selective") if m in u] or [zero]:
                _at_most(prob, [(x, bx), (nf, A["full"]), (ns, A["selective"]), (nn, g),
                                (un, A["none"] - g + W["none"] - (save0 - bottom_step["none"]) + big),
                                (below, save0 - bottom_step["none"]), (alone_top["none"], -delta["none"])], big)
    if "selective" in n:
        if top_side["selective"]:
            _at_most(prob, [(x, bx), (nf, A["full"]), (ns, A["selective"]), (nn, g),
                            (us, Wt["selective"] + top_step["selective"] + big),
                            (un, delta["selective"] - top_step["selective"]), (alone_bottom["selective"], -save0)],
                     big, f"mem_sel_top_{tag}")
        if bottom_side["selective"]:
            _at_most(prob, [(x, bx), (nf, A["full"]), (nn, g), (ns, g),
                            (us, A["selective"] - g + W["selective"] - (save0 - bottom_step["selective"]) + big),
                            (uf, save0 - bottom_step["selective"]), (alone_top["selective"], -delta["selective"])],
                     big, f"mem_sel_bottom_{tag}")
    if "full" in n:
        if top_side["full"]:
            for above in [u[m] for m in ("none", "selective") if m in u] or [zero]:
                _at_most(prob, [(x, bx), (nf, A["full"]), (nn, g), (ns, g), (uf, Wt["full"] + top_step["full"] + big),
                                (above, delta["full"] - top_step["full"]), (alone_bottom["full"], -save0)], big)
        if bottom_side["full"]:
            _at_most(prob, [(x, bx + g * L), (uf, A["full"] - g + W["full"] - (save0 - bottom_step["full"]) + big),
                            (alone_top["full"], -delta["full"])], big, f"mem_full_bottom_{tag}")


def _at_most(prob: pulp.LpProblem, terms: list, constant: float, name: str | None = None) -> None:
    """Add ``sum(coefficient x variable) <= constant``; a term whose variable is the plain
    number 0 (a mode not allowed) drops out. One affine expression built from a dict:
    pulp's operator overloading builds a new expression per ``+`` (most of the ILP's
    set-up time on large searches)."""
    coefficients: dict = {}
    for variable, coefficient in terms:
        if isinstance(variable, (int, float)):
            constant -= variable * coefficient
            continue
        coefficients[variable] = coefficients.get(variable, 0.0) + coefficient
    prob.addConstraint(pulp.LpAffineExpression(coefficients) <= constant, name)
