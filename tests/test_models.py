"""The three families: accounting against the real tree and XLA, packing, presets, heads, bad input."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from archlab.accounting import count_params, count_tree_params, forward_flops, kv_cache_bytes
from archlab.config import PRESETS, ModelConfig, preset, resolve_auto
from archlab.errors import ConfigError
from archlab.nn.heads import ClassificationHead, SpanHead, TaggingHead
from archlab.nn.models import DecoderOnly, EncoderOnly, build_model

TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, vocab_size=211, max_seq_len=32)


def tiny(name: str, **overrides) -> ModelConfig:
    extra = {"head_dim": 8} if name == "t5_v1_1" else {}
    return preset(name, **{**TINY, **extra, **overrides})


def run(model, tokens_BT, **kwargs):
    if model.cfg.family == "encoder_decoder":
        return model(tokens_BT, tokens_BT[:, :5], **kwargs)
    return model(tokens_BT, **kwargs)


def tokens(batch=2, length=12, seed=0, vocab=211):
    return jnp.asarray(np.random.default_rng(seed).integers(6, vocab - 100, size=(batch, length)), jnp.int32)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize(
    "shape",
    [dict(), dict(d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=80), dict(d_model=40, n_heads=5, tie_embeddings=False)],
)
def test_param_counts_equal_real_tree(name, shape):
    cfg = tiny(name, **shape)
    assert count_params(cfg).total == count_tree_params(build_model(cfg))


def test_non_embedding_count_excludes_tables():
    cfg = tiny("gpt2")
    counts = count_params(cfg)
    assert counts.embedding == cfg.vocab_size * cfg.d_model + cfg.max_seq_len * cfg.d_model
    assert counts.non_embedding == counts.total - counts.embedding


@pytest.mark.parametrize("name", list(PRESETS))
def test_forward_flops_match_xla_cost_analysis(name):
    # Unrolled layers: XLA's cost analysis counts a scan body once, not once per layer.
    cfg = tiny(name, d_model=128, n_heads=4, d_ff=512, head_dim=32 if name == "t5_v1_1" else None,
               max_seq_len=64, scan_layers=False, vocab_size=512)
    graphdef, state = nnx.split(build_model(cfg))
    toks = jnp.ones((1, 64), jnp.int32)

    def forward(state):
        model = nnx.merge(graphdef, state)
        return model(toks, toks[:, :32]) if cfg.family == "encoder_decoder" else model(toks)

    xla_flops = jax.jit(forward).lower(state).compile().cost_analysis()["flops"]
    ours = forward_flops(cfg, 64, 32 if cfg.family == "encoder_decoder" else None).forward
    assert abs(xla_flops / ours - 1) < 0.10, (xla_flops, ours)


def test_training_flops_are_three_forward_and_near_6n():
    cfg = ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024, vocab_size=8192, max_seq_len=256)
    flops = forward_flops(cfg, 256)
    assert flops.train == 3 * flops.forward
    n_non_embedding = count_params(cfg).non_embedding
    # Kaplan: ~6N per token plus the attention term and (here) the head.
    per_token = flops.per_token(include_head=False)
    assert 6 * n_non_embedding * 0.95 < per_token < 6 * n_non_embedding * 1.3


def test_kv_cache_bytes_formula():
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, d_ff=128, vocab_size=300, max_seq_len=64)
    assert kv_cache_bytes(cfg, context=1000, batch=2, bytes_per_element=2) == 2 * 3 * 2 * 8 * 1000 * 2 * 2
    caches = DecoderOnly(cfg, rngs=nnx.Rngs(0)).init_caches(batch=2, max_len=1000)
    assert sum(x.nbytes for x in jax.tree.leaves(caches)) == kv_cache_bytes(cfg, 1000, 2, bytes_per_element=4)


@pytest.mark.parametrize("name", list(PRESETS))
def test_scan_and_unrolled_layers_agree(name):
    out = [np.asarray(run(build_model(tiny(name, scan_layers=scan), seed=1), tokens())) for scan in (True, False)]
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_padded_vocabulary_projection_gives_the_same_logits_and_gradients(tie):
    """logits_pad_multiple computes 256 columns for a 211-row vocabulary; the result is unchanged."""
    from archlab.objectives.losses import cross_entropy_and_accuracy

    def loss_and_grads(pad):
        model = build_model(tiny("gpt2", tie_embeddings=tie, logits_pad_multiple=pad), seed=2)
        graphdef, params = nnx.split(model)
        x = tokens()

        def loss(params):
            logits = nnx.merge(graphdef, params)(x)
            return cross_entropy_and_accuracy(logits, x, jnp.ones(x.shape))[0], logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads

    (logits_1, grads_1), (logits_128, grads_128) = loss_and_grads(1), loss_and_grads(128)
    assert logits_128.shape[-1] == 211
    np.testing.assert_allclose(logits_128, logits_1, atol=1e-6)
    for g1, g128 in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_128)):
        assert g1.shape == g128.shape
        np.testing.assert_allclose(g128, g1, rtol=1e-5, atol=1e-6)  # summation order may differ


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_packed_documents_do_not_see_each_other(name):
    """A document packed after another gets the same logits as on its own."""
    model = build_model(tiny(name, position="rope" if name == "gpt2" else PRESETS[name]["position"]), seed=2)
    doc_a, doc_b = tokens(1, 5, seed=3), tokens(1, 7, seed=4)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(7))], jnp.int32)
    if model.cfg.family == "encoder_decoder":
        enc = model.encode(packed, segment_ids_BS=segments, positions_BS=positions)
        alone = model.encode(doc_b)
        np.testing.assert_allclose(np.asarray(enc[:, 5:]), np.asarray(alone), atol=2e-5)
        return
    together = model(packed, segment_ids_BT=segments, positions_BT=positions)
    alone = model(doc_b)
    np.testing.assert_allclose(np.asarray(together[:, 5:]), np.asarray(alone), atol=2e-5)


def test_decoder_logits_never_depend_on_later_tokens():
    model = build_model(tiny("gpt2"), seed=5)
    base = tokens(1, 10, seed=6)
    changed = base.at[0, 6:].set(7)
    diff = np.abs(np.asarray(model(base) - model(changed)))[0]
    assert diff[:6].max() == 0.0 and diff[6:].max() > 0


def test_prefix_lm_is_bidirectional_over_the_prefix():
    model = build_model(tiny("gpt2"), seed=5)
    base = tokens(1, 10, seed=6)
    prefix = jnp.array([[True] * 4 + [False] * 6])
    changed = base.at[0, 3].set(7)
    diff = np.abs(np.asarray(model(base, prefix_BT=prefix) - model(changed, prefix_BT=prefix)))[0].max(-1)
    assert diff[0] > 0, "an early prefix position must see a later prefix token"
    base_late = base.at[0, 8].set(9)
    diff_late = np.abs(np.asarray(model(base, prefix_BT=prefix) - model(base_late, prefix_BT=prefix)))[0].max(-1)
    assert diff_late[:8].max() == 0.0


def test_task_heads_shapes_and_padding():
    cfg = tiny("bert")
    model = build_model(cfg)
    toks = tokens(2, 9)
    segments = jnp.array([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
    hidden, _ = model.hidden(toks, segment_ids_BT=segments)
    rngs = nnx.Rngs(params=0)
    assert ClassificationHead(cfg, 3, rngs=rngs)(hidden, segments, model.pool(hidden, segments)).shape == (2, 3)
    assert TaggingHead(cfg, 5, rngs=rngs)(hidden).shape == (2, 9, 5)
    start, end = SpanHead(cfg, rngs=rngs)(hidden, segments)
    assert start.shape == end.shape == (2, 9)
    assert float(start[1, 7]) < -1e8, "padding must never be an answer position"


def test_bfloat16_compute_keeps_float32_params():
    model = build_model(tiny("gpt2", dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model(tokens()).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(family="mystery"), "model.family"),
        (dict(activation="tanhh"), "model.activation"),
        (dict(position="rope", d_model=36, n_heads=4), "even head_dim"),
        (dict(n_decoder_layers=3), "encoder_decoder only"),
    ],
)
def test_bad_model_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**TINY, **overrides})


def test_sequence_longer_than_position_table_is_refused():
    model = build_model(tiny("gpt2", max_seq_len=8))
    with pytest.raises(ConfigError, match="longer than the position table"):
        model(tokens(1, 9))


def test_wrong_family_for_class_is_refused():
    with pytest.raises(ConfigError, match="this model class builds"):
        EncoderOnly(tiny("gpt2"), rngs=nnx.Rngs(0))


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt5")


def test_schema_lists_every_data_source():
    from archlab.data.sources import SOURCES
    from archlab.schema import DATA_SOURCES

    assert set(DATA_SOURCES) == set(SOURCES)


def _loss_batch(family: str, batch: int = 2, length: int = 12) -> dict:
    rng = np.random.default_rng(4)
    ids = lambda n: jnp.asarray(rng.integers(6, 111, size=(batch, n)), jnp.int32)
    segments = jnp.asarray(np.r_[np.ones(length - 3), np.zeros(3)][None].repeat(batch, 0), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    weights = segments.astype(jnp.float32)
    if family == "encoder_decoder":
        return dict(encoder_inputs=ids(length), encoder_segment_ids=segments, encoder_positions=positions,
                    decoder_inputs=ids(5), decoder_segment_ids=segments[:, :5], decoder_positions=positions[:, :5],
                    decoder_targets=ids(5), weights=weights[:, :5])
    return dict(inputs=ids(length), targets=ids(length), weights=weights, segment_ids=segments, positions=positions)


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "t5_v1_1"])
def test_chunked_head_loss_equals_materialised_logits_for_every_family(name):
    """The training loss's fused head (model.head_chunk > 0) gives the loss, sums and gradients of
    the materialised logits (head_chunk=0), tied or untied, with BERT's transform and bias."""
    from archlab.objectives.model_io import loss_and_metrics

    results = []
    for chunk in (0, 5):
        model = build_model(tiny(name, head_chunk=chunk), seed=2)
        graphdef, params = nnx.split(model)
        batch = _loss_batch(model.cfg.family)
        loss_fn = lambda p: loss_and_metrics(nnx.merge(graphdef, p), batch)
        results.append(jax.value_and_grad(loss_fn, has_aux=True)(params))
    ((loss0, sums0), grads0), ((loss1, sums1), grads1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for key in sums0:
        np.testing.assert_allclose(sums1[key], sums0[key], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_auto_defaults_resolve_per_backend():
    cfg = tiny("gpt2")
    assert cfg.remat == "auto" and cfg.head_chunk == -1
    resolved = resolve_auto(cfg)
    assert resolved.remat == ("dots_no_batch" if jax.default_backend() in ("cpu", "gpu") else "none")
    assert resolved.head_chunk == (512 if jax.default_backend() == "cpu" else 0)
    assert resolve_auto(cfg, backend="tpu").remat == "none" and resolve_auto(cfg, backend="gpu").head_chunk == 0
    assert resolve_auto(tiny("gpt2", remat="none")).remat == "none"
    assert resolve_auto(tiny("gpt2", head_chunk=0)).head_chunk == 0
    assert build_model(cfg).cfg == resolved  # the model runs the resolved values
