"""archlab.data: sources, tokenizer, packing, grain pipeline, corpus cache. Offline; caches in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import numpy as np
import pytest

from archlab.data import (
    SHAKESPEARE_VALIDATION_PLAYS,
    PackedRows,
    Tokenizer,
    batch_at,
    batch_rng,
    build_iterator,
    load_documents,
    load_or_train_tokenizer,
    pack_documents,
    positions_from_segments,
    prepare_corpus,
    shakespeare_plays,
    train_tokenizer,
    unpack_tokens,
)
from archlab.data import corpus as corpus_module
from archlab.data import files as files_module
from archlab.data import tokenizer as tokenizer_module
from archlab.data.sources import shakespeare_dir
from archlab.errors import ConfigError, DataError
from archlab.tokens import SPECIAL, SPECIAL_TOKEN_NAMES, sentinel_name

SMALL_VOCAB = 512


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Nothing a test does may land in the user's ~/.cache/archlab.
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "archlab-cache"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any test that tries to reach the internet (libraries swallow the error, so record it)."""
    attempts = []
    getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_lookup(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1"):
            attempts.append(host)
            raise socket.gaierror("network access is blocked in archlab's data tests")
        return getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            attempts.append(address)
            raise OSError("network access is blocked in archlab's data tests")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def few_plays() -> list[str]:
    return load_documents("shakespeare", "train")[:3]


@pytest.fixture(scope="module")
def small_tokenizer(few_plays) -> Tokenizer:
    return train_tokenizer(few_plays, SMALL_VOCAB)


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    """A cache dir holding the full Shakespeare corpus prepared once (tokenizer + packed rows)."""
    cache = tmp_path_factory.mktemp("shakespeare-cache")
    corpus = prepare_corpus("shakespeare", vocab_size=SMALL_VOCAB, row_length=128, cache_dir=cache)
    return cache, corpus


# ---------------------------------------------------------------- sources: shakespeare


def test_shakespeare_split_is_fixed_and_disjoint_by_play():
    train, validation = shakespeare_plays("train"), shakespeare_plays("validation")
    assert validation == sorted(SHAKESPEARE_VALIDATION_PLAYS)
    assert not set(train) & set(validation)
    assert len(train) + len(validation) == 38
    assert len({p.split("/")[0] for p in validation}) == len(validation)  # one genre each
    assert shakespeare_plays("train") == train  # deterministic

    docs = load_documents("shakespeare", "validation")
    root = shakespeare_dir()
    assert docs == [(root / f"{p}.md").read_text(encoding="utf-8") for p in validation]  # markdown as shipped
    assert load_documents("shakespeare", "validation") == docs


def test_source_registry_refuses_bad_requests():
    with pytest.raises(ConfigError, match="unknown data source"):
        load_documents("nope", "train")
    with pytest.raises(ConfigError, match="no_such_option"):
        load_documents("shakespeare", "train", no_such_option=1)
    with pytest.raises(DataError, match="unknown split"):
        load_documents("shakespeare", "test")
    with pytest.raises(DataError, match="unknown validation play"):
        load_documents("shakespeare", "train", validation_plays=["tragedies/nope"])


# ---------------------------------------------------------------- sources: files


def _write_parquet(path, column: str, values: list[str | None]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: values, "other": list(range(len(values)))}), path)


def test_files_reads_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("sécond doc 🙂\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(
        "\n".join(json.dumps({"body": t}) for t in ["j one", "", "j two"]) + "\n", encoding="utf-8"
    )
    _write_parquet(tmp_path / "d.parquet", "text", ["p one", None, "p two"])

    txt = load_documents("files", "train", train=str(tmp_path / "*.txt"), validation=str(tmp_path / "b.txt"))
    assert txt == ["first doc\nline two\n", "sécond doc 🙂\n"]  # one document per file, text kept
    jsonl = load_documents("files", "train", train=str(tmp_path / "c.jsonl"), validation=[], text_field="body")
    assert jsonl == ["j one", "j two"]  # empty rows dropped
    parquet = load_documents("files", "validation", train="unused", validation=str(tmp_path / "*.parquet"))
    assert parquet == ["p one", "p two"]

    with pytest.raises(DataError, match="no field 'text'"):
        load_documents("files", "train", train=str(tmp_path / "c.jsonl"), validation=[])


def test_files_validation_fraction_is_deterministic_and_disjoint(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n", encoding="utf-8")
    pattern = str(tmp_path / "*.txt")
    train = load_documents("files", "train", train=pattern, validation_fraction=0.2)
    validation = load_documents("files", "validation", train=pattern, validation_fraction=0.2)
    assert len(validation) == 4 and len(train) == 16
    assert not set(train) & set(validation)
    # held-out documents depend on their text, not on the order files are listed in
    reordered = [str(tmp_path / f"doc{i:02d}.txt") for i in reversed(range(20))]
    assert set(load_documents("files", "validation", train=reordered, validation_fraction=0.2)) == set(validation)


def test_files_non_utf8_names_file_and_offset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo ".encode("utf-8") + b"\xff rest")  # é is 2 bytes, so 0xff sits at offset 7
    with pytest.raises(DataError) as info:
        load_documents("files", "train", train=str(tmp_path / "*.txt"), validation=[])
    assert str(bad) in str(info.value) and "offset 7" in str(info.value) and "0xff" in str(info.value)

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*offset 25"):
        load_documents("files", "train", train=str(bad_jsonl), validation=[])


def test_files_skip_mode_warns_once_and_continues(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("kept\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\x80 latin junk")
    with caplog.at_level(logging.WARNING):
        docs = load_documents(
            "files", "train", train=str(tmp_path / "*.txt"), validation=[], on_decode_error="skip"
        )
    assert docs == ["kept\n"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "b.txt" in warnings[0].getMessage() and "offset 0" in warnings[0].getMessage()


def test_first_bad_utf8_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(files_module, "_CHUNK_BYTES", 3)
    path = tmp_path / "x.txt"
    path.write_bytes("aé€🙂".encode("utf-8"))  # multi-byte characters cut by every chunk boundary
    assert files_module.first_bad_utf8(path) is None
    path.write_bytes("aé€".encode("utf-8") + b"b\xe2\x82")  # truncated 3-byte character at the end
    assert files_module.first_bad_utf8(path) == (7, 0xE2)
    path.write_bytes("aé€".encode("utf-8") + b"\xc3\x28")
    assert files_module.first_bad_utf8(path) == (6, 0xC3)


def test_files_missing_or_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        load_documents("files", "train", train=str(tmp_path / "nothing-*.txt"))
    (tmp_path / "e1.txt").write_text("", encoding="utf-8")
    (tmp_path / "e2.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="corpus is empty"):
        load_documents("files", "train", train=str(tmp_path / "e*.txt"))
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_documents("files", "train", train=str(tmp_path / "x.csv"), validation=[])
    (tmp_path / "one.txt").write_text("only one\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot split 1 document"):
        load_documents("files", "train", train=str(tmp_path / "one.txt"))


def test_hf_unknown_dataset_fails_fast_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'no-such-owner/no-such-dataset'"):
        load_documents("hf", "train", name="no-such-owner/no-such-dataset")


# ---------------------------------------------------------------- tokenizer


def _check_layout(tok: Tokenizer) -> None:
    for i, name in enumerate(SPECIAL_TOKEN_NAMES):
        assert tok.backend.token_to_id(name) == i
    for i in range(SPECIAL.n_sentinels):
        assert tok.backend.token_to_id(sentinel_name(i)) == SPECIAL.sentinel_id(i, tok.vocab_size)
    assert tok.backend.token_to_id(sentinel_name(0)) == tok.vocab_size - 1


def test_tokenizer_special_and_sentinel_ids(small_tokenizer):
    assert small_tokenizer.vocab_size == SMALL_VOCAB
    _check_layout(small_tokenizer)
    assert small_tokenizer.decode([SPECIAL.bos, SPECIAL.eos, SMALL_VOCAB - 1]) == "[BOS][EOS]<extra_id_0>"


def test_tokenizer_smaller_than_asked_keeps_layout():
    tok = train_tokenizer(["tiny corpus, tiny corpus"], 2048)
    assert tok.vocab_size < 2048
    _check_layout(tok)


@pytest.mark.parametrize("vocab_size", [50, 300])
def test_tokenizer_vocab_too_small(vocab_size):
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(["some text"], vocab_size)


def test_tokenizer_round_trips_text_exactly(small_tokenizer):
    texts = [
        "To be, or not to be: that is the question.\n",
        "  leading spaces\ttabs\r\nCRLF and trailing  \n\n",
        "Ünïcödé — “quotes” 日本語 🙂👍🏽 \x00 nul",
        "literal [MASK] and <extra_id_0> and [PAD] stay text",
        "",
    ]
    for text in texts:
        ids = small_tokenizer.encode(text)
        assert small_tokenizer.decode(ids) == text
    ids = small_tokenizer.encode(texts[3])
    assert not SPECIAL.is_special(np.array(ids), small_tokenizer.vocab_size).any()
    assert small_tokenizer.encode_batch(texts) == [small_tokenizer.encode(t) for t in texts]


def test_training_pieces_cut_only_runs_longer_than_max_run():
    from tokenizers import pre_tokenizers

    ordinary = "To be, or not to be:\n\n  that is the question. " * 200
    assert list(tokenizer_module.training_pieces(ordinary)) == [ordinary]
    run = tokenizer_module.MAX_RUN
    # \x1c is whitespace to Python but punctuation to the pre-tokenizer: "\x1c!" * run is one pre-token
    text = "x " + "a" * (2 * run + 5) + " " * (run + 1) + "\x1c!" * run + " tail"
    pieces = list(tokenizer_module.training_pieces(text))
    assert "".join(pieces) == text and len(pieces) == 5
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    longest = max(len(token) for piece in pieces for token, _ in pre_tokenizer.pre_tokenize_str(piece))
    assert longest <= run + 1  # a word's leading space joins it


def test_tokenizer_trains_in_seconds_on_a_long_line_without_whitespace():
    # one 5 MB pre-token kept the BPE trainer busy for over 10 minutes (quadratic in its length),
    # even for the 16 merges asked for here; cut into runs, it takes about 2 s
    line = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, 5_000_000, dtype=np.uint8).tobytes().decode()
    vocab_size = tokenizer_module.MIN_VOCAB_SIZE + 16
    start = time.perf_counter()
    tok = train_tokenizer([line, "and an ordinary line"], vocab_size)
    assert time.perf_counter() - start < 60
    assert tok.vocab_size == vocab_size
    # encoding never sees the cut; a 1 MB pre-token round-trips in a second, all 5 MB would take 7
    prefix = line[:1_000_000]
    assert tok.decode(tok.encode(prefix)) == prefix


def test_tokenizer_file_round_trip_and_bad_files(small_tokenizer, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    small_tokenizer.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.id == small_tokenizer.id and loaded.vocab_size == small_tokenizer.vocab_size
    text = "Shall I compare thee to a summer's day?"
    assert loaded.encode(text) == small_tokenizer.encode(text)

    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable tokenizer"):
        Tokenizer.from_file(tmp_path / "junk.json")
    import tokenizers

    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())
    foreign.add_special_tokens(["<|endoftext|>"])
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(DataError, match=r"special-token layout: \[PAD\]"):
        Tokenizer.from_file(tmp_path / "foreign.json")


def test_tokenizer_cache_hit_skips_training(few_plays, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_or_train_tokenizer(few_plays, SMALL_VOCAB, cache_dir=cache)
    (path,) = (cache / "tokenizers").glob("*.json")
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained despite a cache entry")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    second = load_or_train_tokenizer(few_plays, SMALL_VOCAB, cache_dir=cache)
    assert second.id == first.id and path.stat().st_mtime_ns == mtime
    # ARCHLAB_CACHE is the default root
    monkeypatch.setenv("ARCHLAB_CACHE", str(cache))
    assert load_or_train_tokenizer(few_plays, SMALL_VOCAB).id == first.id
    # another corpus or another size is another entry, never a stale hit
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_tokenizer(few_plays[:2], SMALL_VOCAB, cache_dir=cache)


# ---------------------------------------------------------------- packing


def test_packing_layout_by_hand():
    eos, pad = SPECIAL.eos, SPECIAL.pad
    # the second document spans three rows; the last (empty) one is a lone [EOS]
    docs = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30], []]
    rows = pack_documents(docs, 5, n_bytes=99)
    np.testing.assert_array_equal(
        rows.tokens, [[10, 11, 12, eos, 20], [21, 22, 23, 24, 25], [26, eos, 30, eos, eos]]
    )
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 2], [1, 1, 1, 1, 1], [1, 1, 2, 2, 3]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 0, 1, 0]])
    assert rows.tokens.dtype == rows.segment_ids.dtype == rows.positions.dtype == np.int32
    assert rows.n_tokens == 15 and rows.bytes_per_token == pytest.approx(99 / 15)

    padded = pack_documents([[7, 8, 9], [10]], 4)
    np.testing.assert_array_equal(padded.tokens, [[7, 8, 9, eos], [10, eos, pad, pad]])
    np.testing.assert_array_equal(padded.segment_ids, [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(padded.positions, [[0, 1, 2, 3], [0, 1, 0, 0]])


def test_packing_keeps_every_token_and_pads_only_at_the_end():
    rng = np.random.default_rng(0)
    docs = [rng.integers(6, 500, size=n).tolist() for n in rng.integers(0, 300, size=200)]
    rows = pack_documents(docs, 64)
    expected = np.concatenate([np.append(np.asarray(d, np.int32), SPECIAL.eos) for d in docs])
    np.testing.assert_array_equal(unpack_tokens(rows), expected)
    flat_segments = rows.segment_ids.ravel()
    n_real = expected.size
    assert (flat_segments[:n_real] > 0).all() and (flat_segments[n_real:] == 0).all()
    assert (rows.tokens.ravel()[n_real:] == SPECIAL.pad).all()
    np.testing.assert_array_equal(rows.positions, positions_from_segments(rows.segment_ids))
    # segment ids start at 1 in every row and count up by at most one along a full row
    assert (rows.segment_ids[:, 0] == 1).all()
    steps = np.diff(rows.segment_ids[:-1], axis=1)
    assert set(np.unique(steps)) <= {0, 1}
    # a document starts where its [EOS]-terminated predecessor ended
    new_doc = np.roll(rows.tokens.ravel() == SPECIAL.eos, 1)[:n_real]
    new_doc[0] = True
    starts = rows.positions.ravel()[:n_real] == 0
    assert (starts >= new_doc).all()  # every document start has position 0 (row starts may add more)


def test_positions_from_segments():
    segment_ids = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 3]])
    np.testing.assert_array_equal(
        positions_from_segments(segment_ids), [[0, 1, 0, 1, 2, 0, 0], [0, 0, 0, 1, 2, 3, 4]]
    )


def test_packing_errors_and_save_load(tmp_path):
    with pytest.raises(DataError, match="at least 2"):
        pack_documents([[7, 8]], 1)
    with pytest.raises(DataError, match="no tokens"):
        pack_documents([[], []], 8)
    rows = pack_documents([[7, 8, 9], [10]], 4, n_bytes=12)
    rows.save(tmp_path / "rows.npz")
    back = PackedRows.load(tmp_path / "rows.npz")
    for name, array in rows.as_dict().items():
        np.testing.assert_array_equal(getattr(back, name), array)
    assert back.n_bytes == 12


# ---------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def toy_rows() -> PackedRows:
    docs = [list(range(6 + i, 6 + i + 5 + (i % 7))) for i in range(60)]
    return pack_documents(docs, 8)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_pipeline_same_seed_same_batches_different_seed_different(toy_rows):
    a = _take(build_iterator(toy_rows, batch_size=4, seed=1), 12)
    b = _take(build_iterator(toy_rows, batch_size=4, seed=1), 12)
    c = _take(build_iterator(toy_rows, batch_size=4, seed=2), 12)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))
    assert a[0]["tokens"].shape == (4, 8) and a[0]["tokens"].dtype == np.int32
    unshuffled = next(build_iterator(toy_rows, batch_size=4, seed=1, shuffle=False))
    np.testing.assert_array_equal(unshuffled["tokens"], toy_rows.tokens[:4])


def test_pipeline_epochs_are_different_permutations(toy_rows):
    n = toy_rows.n_rows
    batches = list(build_iterator(toy_rows, batch_size=1, seed=3, num_epochs=2, prefetch=0))
    assert len(batches) == 2 * n
    row_of = {r.tobytes(): i for i, r in enumerate(toy_rows.tokens)}
    order = [row_of[b["tokens"][0].tobytes()] for b in batches]
    assert sorted(order[:n]) == list(range(n)) == sorted(order[n:])
    assert order[:n] != order[n:]
    with pytest.raises(ConfigError, match="no full batch"):
        build_iterator(toy_rows, batch_size=n + 1, seed=0, num_epochs=1)


def test_pipeline_resumes_exactly_from_state(toy_rows):
    def transform(batch, rng):
        return {**batch, "noise": rng.integers(0, 1000, size=batch["tokens"].shape)}

    kwargs = dict(batch_size=4, seed=5, transform=transform)
    straight = _take(build_iterator(toy_rows, **kwargs), 10)

    it = build_iterator(toy_rows, **kwargs)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    resumed = build_iterator(toy_rows, **kwargs)
    resumed.set_state(state)
    assert all(_same(x, y) for x, y in zip(straight[4:], _take(resumed, 6)))


def test_transform_gets_a_deterministic_rng_per_batch(toy_rows):
    seen = []

    def transform(batch, rng):
        draw = rng.integers(0, 2**31, size=4)
        seen.append(draw)
        return {**batch, "draw": draw}

    batches = _take(build_iterator(toy_rows, batch_size=4, seed=9, transform=transform, prefetch=0), 15)
    for step, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["draw"], batch_rng(9, step).integers(0, 2**31, size=4))
        assert _same(batch, batch_at(toy_rows, step, batch_size=4, seed=9, transform=transform))


# ---------------------------------------------------------------- corpus


def test_prepare_corpus_shakespeare(shakespeare_cache):
    _, corpus = shakespeare_cache
    assert corpus.tokenizer.vocab_size == SMALL_VOCAB
    for rows in (corpus.train, corpus.validation):
        assert rows.row_length == 128 and rows.tokens.dtype == np.int32
        assert 1.5 < rows.bytes_per_token < 4.0
    assert corpus.n_tokens > 10 * corpus.validation.n_tokens > 0
    assert 0 < corpus.unigram_entropy_bits < np.log2(SMALL_VOCAB)
    assert corpus.unigram_entropy_bits == pytest.approx(corpus.unigram_entropy_nats / np.log(2))
    first_play = load_documents("shakespeare", "train")[0]
    assert first_play.startswith(corpus.tokenizer.decode(corpus.train.tokens[0]))


def test_prepare_corpus_second_run_reads_the_cache(shakespeare_cache, monkeypatch):
    cache, first = shakespeare_cache
    files_before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: work was redone")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", boom)
    monkeypatch.setattr(corpus_module, "pack_documents", boom)
    again = prepare_corpus("shakespeare", vocab_size=SMALL_VOCAB, row_length=128, cache_dir=cache)
    assert again.tokenizer.id == first.tokenizer.id
    np.testing.assert_array_equal(again.train.tokens, first.train.tokens)
    np.testing.assert_array_equal(again.validation.positions, first.validation.positions)
    assert again.train.n_bytes == first.train.n_bytes
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files_before


def test_prepare_corpus_files_with_tokenizer_file(small_tokenizer, few_plays, tmp_path):
    for i, play in enumerate(few_plays):
        (tmp_path / f"play{i}.txt").write_text(play[:20_000], encoding="utf-8")
    small_tokenizer.save(tmp_path / "tokenizer.json")
    corpus = prepare_corpus(
        "files",
        {"train": str(tmp_path / "play[01].txt"), "validation": str(tmp_path / "play2.txt")},
        row_length=64,
        cache_dir=tmp_path / "cache",
        tokenizer_file=tmp_path / "tokenizer.json",
    )
    assert corpus.tokenizer.id == small_tokenizer.id
    assert corpus.train.n_bytes == len((few_plays[0][:20_000] + few_plays[1][:20_000]).encode("utf-8"))
    with pytest.raises(DataError, match="at least 2"):
        prepare_corpus("files", {"train": str(tmp_path / "*.txt")}, row_length=1, cache_dir=tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")  # refused before anything was written


def test_validation_rows_spread_over_the_split_whatever_the_batch_size(toy_rows):
    from archlab.train.setup import validation_batches

    def rows_seen(batch_size: int, eval_rows: int | None, n_batches: int = 2) -> np.ndarray:
        batches = validation_batches(toy_rows, None, batch_size=batch_size, n_batches=n_batches, seed=0,
                                     eval_rows=eval_rows)
        return np.concatenate([b["tokens"] for b in batches])

    first = rows_seen(4, None)
    np.testing.assert_array_equal(first, toy_rows.tokens[:8])  # the default: the first rows, in order
    spread = rows_seen(4, 8)
    index = np.linspace(0, toy_rows.n_rows - 1, 8).round().astype(int)
    np.testing.assert_array_equal(spread, toy_rows.tokens[index])  # first and last row of the split included
    np.testing.assert_array_equal(rows_seen(2, 8), spread)  # the same rows at another batch size
    assert rows_seen(3, 8).shape[0] == 9  # rounded up to whole batches
    assert rows_seen(4, 10_000).shape[0] == (toy_rows.n_rows // 4) * 4  # at most the split
