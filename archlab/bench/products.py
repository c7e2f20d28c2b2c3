"""The matrix products of a traced step: every ``dot_general`` of a jaxpr (scan bodies counted as
often as they run), its FLOPs, and its einsum spelling, so each can be timed alone."""

from __future__ import annotations

from collections import Counter

import jax.numpy as jnp
import numpy as np

DotKey = tuple  # (lhs shape, rhs shape, dtype name, dimension numbers, preferred element type name)


def collect_dots(jaxpr, multiplier: int = 1, counts: Counter | None = None) -> Counter:
    """Every ``dot_general`` of ``jaxpr`` and its sub-jaxprs, counted as often as it executes."""
    counts = Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            preferred = eqn.params.get("preferred_element_type")
            key = (tuple(lhs.shape), tuple(rhs.shape), lhs.dtype.name, eqn.params["dimension_numbers"],
                   None if preferred is None else jnp.dtype(preferred).name)
            counts[key] += multiplier
            continue
        if eqn.primitive.name == "while":
            raise SystemExit("error: the step has a while loop whose trip count this walk cannot know")
        inner = multiplier * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    collect_dots(sub, inner, counts)
    return counts


def dot_flops(key: DotKey) -> float:
    lhs_shape, rhs_shape, _, ((lhs_contract, rhs_contract), (_, rhs_batch)), _ = key
    contracted = np.prod([lhs_shape[d] for d in lhs_contract])
    # The output: the lhs's batch and free dimensions, then the rhs's free ones.
    out = np.prod([n for d, n in enumerate(lhs_shape) if d not in lhs_contract])
    out *= np.prod([n for d, n in enumerate(rhs_shape) if d not in rhs_contract and d not in rhs_batch])
    return 2.0 * float(out) * float(contracted)


def einsum_spec(key: DotKey) -> str:
    """The ``dot_general`` as an einsum string (batch, lhs free, rhs free: dot_general's output order)."""
    lhs_shape, rhs_shape, _, ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), _ = key
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs, rhs = [None] * len(lhs_shape), [None] * len(rhs_shape)
    for lhs_dim, rhs_dim in (*zip(lhs_batch, rhs_batch), *zip(lhs_contract, rhs_contract)):
        lhs[lhs_dim] = rhs[rhs_dim] = next(letters)
    lhs = [d or next(letters) for d in lhs]
    rhs = [d or next(letters) for d in rhs]
    out = [lhs[d] for d in lhs_batch]
    out += [x for d, x in enumerate(lhs) if d not in lhs_batch and d not in lhs_contract]
    out += [x for d, x in enumerate(rhs) if d not in rhs_batch and d not in rhs_contract]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
