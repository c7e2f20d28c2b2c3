"""archlab/bench/products.py (what experiments/throughput/matmul_floor.py times): the products it finds
in a step, their counts and FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def floor_module():
    from archlab.bench import products

    return products


def _step(x_TD, w_LDD, q_BNTH):
    """A scan of 3 layers, each one ``[T,D] @ [D,D]``, then one batched ``q k^T``, under a gradient."""

    def loss(x_TD, w_LDD):
        def layer(h_TD, w_DD):
            return jnp.tanh(h_TD @ w_DD), None

        h_TD, _ = jax.lax.scan(layer, x_TD, w_LDD)
        scores_BNTT = jnp.einsum("bnth,bnsh->bnts", q_BNTH, q_BNTH)
        return h_TD.sum() + scores_BNTT.sum()

    return jax.grad(loss, argnums=1)(x_TD, w_LDD)


def test_collects_every_product_with_its_scan_count_and_flops(floor_module):
    x_TD, w_LDD, q_BNTH = jnp.ones((16, 8)), jnp.ones((3, 8, 8)), jnp.ones((2, 4, 16, 8))
    counts = floor_module.collect_dots(jax.make_jaxpr(_step)(x_TD, w_LDD, q_BNTH).jaxpr)
    by_spec = {}
    for key, n in counts.items():
        by_spec.setdefault(floor_module.einsum_spec(key), []).append((key, n))
    # Forward x@w (3 layers) and the weight gradient x^T@dy (3 layers); the input gradient of the
    # first layer's input is not asked for, but the scan still computes it for the carry: 3 more.
    total_layer_products = sum(n for key, n in counts.items() if key[0][0] == 16 or key[1][0] == 16)
    assert total_layer_products == 9
    # The batched einsum: forward only (q is not differentiated), 2*B*N*T*T*H FLOPs.
    batched = [(key, n) for key, n in counts.items() if len(key[0]) == 4]
    assert len(batched) == 1 and batched[0][1] == 1
    assert floor_module.dot_flops(batched[0][0]) == 2 * 2 * 4 * 16 * 16 * 8
    assert sum(n * floor_module.dot_flops(key) for key, n in counts.items()) == 9 * 2 * 16 * 8 * 8 + 2 * 2 * 4 * 16 * 16 * 8


def test_einsum_spec_reproduces_dot_general(floor_module):
    rng = np.random.default_rng(0)
    lhs, rhs = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 6, 4))
    dimension_numbers = (((3,), (3,)), ((0, 1), (0, 1)))
    key = (lhs.shape, rhs.shape, "float64", dimension_numbers, None)
    expected = jax.lax.dot_general(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), dimension_numbers)
    np.testing.assert_allclose(np.einsum(floor_module.einsum_spec(key), lhs, rhs), expected, rtol=1e-5, atol=1e-5)
    key_tn = ((7, 5), (7, 6), "float32", (((0,), (0,)), ((), ())), None)
    assert floor_module.einsum_spec(key_tn) == "ab,ac->bc"
    assert floor_module.dot_flops(key_tn) == 2 * 5 * 6 * 7


def test_a_while_loop_is_refused(floor_module):
    def loop(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]

    with pytest.raises(SystemExit, match="while loop"):
        floor_module.collect_dots(jax.make_jaxpr(loop)(jnp.ones((4, 4))).jaxpr)
