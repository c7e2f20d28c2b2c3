"""Foreign tokenizers (GPT-2's, BERT's, T5's, any ``tokenizer.json``) renumbered into archlab's layout.

archlab fixes its special ids ([PAD] [CLS] [SEP] [MASK] [BOS] [EOS] at 0..5, sentinel i at
``vocab_size - 1 - i``: ``archlab/tokens.py``) so every component agrees without passing a
tokenizer around. A tokenizer made elsewhere keeps its own ids, so it is *renumbered*: each role
is given a token of its vocabulary (``data.special_tokens.<role>=<token>``, else the tokenizer's own
``special_tokens_map.json`` beside the file, else a well-known name such as ``<|endoftext|>`` for
eos), that token moves to the role's id, the sentinels move to the top, every other token keeps
its order, and the text -> tokens mapping is unchanged. The renumbered ``tokenizer.json`` is what
the run saves and reads from then on.

A role the objective trains with (``NEEDED_ROLES``: eos for clm and prefix_lm, mask for mlm, eos
and the 100 sentinels for span corruption) must be a token of the tokenizer: refused in one line
when it is missing. The other roles, which nothing trains on (pad is a filler behind the segment
mask; cls, sep and bos are unused by archlab's objectives), are added as new tokens when missing.

``new_to_old`` says, for every renumbered id, which id it had (-1: added), so weights trained
with the foreign ids (``model.init_from`` a Hugging Face directory) are permuted to match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tokenizers

from archlab.data.cache import atomic_write, cache_root, text_id
from archlab.data.tokenizer import check_layout, read_backend
from archlab.errors import ConfigError, DataError
from archlab.tokens import N_SENTINELS, SPECIAL_TOKEN_NAMES, sentinel_name

ROLES = ("pad", "cls", "sep", "mask", "bos", "eos")  # archlab's order: role i has id i
NEEDED_ROLES = {
    "clm": ("eos",),
    "prefix_lm": ("eos",),
    "mlm": ("mask",),
    "span_corruption": ("eos", "sentinels"),
}
# Names other tokenizers give the roles, in order of preference.
KNOWN_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "bos": ("[BOS]", "<s>", "<|startoftext|>", "<bos>"),
    "eos": ("[EOS]", "</s>", "<|endoftext|>", "<eos>"),
}
_RECIPE = "foreign1"  # bump when the renumbering changes


def follows_layout(backend: tokenizers.Tokenizer) -> bool:
    try:
        check_layout(backend)
    except DataError:
        return False
    return True


def _declared_roles(path: Path) -> dict[str, str]:
    """Roles named by a ``special_tokens_map.json`` beside the file (a Hugging Face directory)."""
    special_map = path.with_name("special_tokens_map.json")
    if not special_map.is_file():
        return {}
    try:
        declared = json.loads(special_map.read_text())
    except ValueError:
        return {}
    roles = {}
    for role in ROLES:
        value = declared.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            roles[role] = value
    return roles


def assign_roles(vocab: Mapping[str, int], given: Mapping[str, str], declared: Mapping[str, str]) -> dict[str, str | None]:
    """The token each role gets (None: to be added); one token plays one role at most."""
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ConfigError(f"data.special_tokens.{unknown[0]} is not a role; the roles are {', '.join(ROLES)}")
    for role, token in given.items():
        if token not in vocab:
            raise ConfigError(f"data.special_tokens.{role}={token!r} is not a token of the tokenizer")
    taken = {}
    for role, token in given.items():
        if token in taken:
            raise ConfigError(f"data.special_tokens gives {token!r} to both {taken[token]} and {role}; one role per token")
        taken[token] = role
    roles: dict[str, str | None] = dict(given)
    # The tokenizer's own declarations, then well-known names; a token already playing a role is not reused
    # (GPT-2 declares <|endoftext|> as bos, eos and unk: it becomes eos, the others are added).
    for role in sorted(ROLES, key=lambda r: r != "eos"):
        if role in roles:
            continue
        for candidate in (declared.get(role), *KNOWN_NAMES[role]):
            if candidate is not None and candidate in vocab and candidate not in taken:
                roles[role], taken[candidate] = candidate, role
                break
        else:
            roles[role] = None
    return roles


def renumbered(backend: tokenizers.Tokenizer, roles: Mapping[str, str | None]) -> tuple[str, np.ndarray]:
    """The renumbered tokenizer (as ``tokenizer.json`` text) and ``new_to_old`` (-1: an added token).

    A role's token takes archlab's name for the role ("<|endoftext|>" becomes "[EOS]"), which is how
    the layout is read back; so it must be a special token (never produced from ordinary text).
    """
    data = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    old_size = backend.get_vocab_size(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(old_size)):
        raise DataError("the tokenizer's ids are not 0..N-1 without gaps; archlab cannot renumber it")
    added = {entry["content"]: entry for entry in data.get("added_tokens", [])}
    rename = {}
    for role, archlab_name in zip(ROLES, SPECIAL_TOKEN_NAMES):
        token = roles[role]
        if token is not None and token != archlab_name:
            if not added.get(token, {}).get("special", False):
                raise ConfigError(f"{token!r} is an ordinary token of the tokenizer (text encodes to it), so it "
                                  f"cannot be the {role} token; give a special token")
            rename[token] = archlab_name
    role_tokens = [roles[role] for role in ROLES]
    sentinels = [sentinel_name(i) for i in range(N_SENTINELS)]
    fixed = {t for t in role_tokens if t is not None} | {s for s in sentinels if s in vocab}
    middle = [old for old in range(old_size) if backend.id_to_token(old) not in fixed]
    low = [vocab[t] if t is not None else -1 for t in role_tokens]
    high = [vocab.get(s, -1) for s in reversed(sentinels)]  # sentinel 0 on the last id
    new_to_old = np.array([*low, *middle, *high], np.int64)
    names = [*SPECIAL_TOKEN_NAMES, *[backend.id_to_token(old) for old in middle], *reversed(sentinels)]
    new_id = {name: i for i, name in enumerate(names)}
    if len(new_id) != len(names):
        raise DataError("the renumbered tokenizer would hold one token text twice (a role's archlab name, "
                        "e.g. [PAD], is already an ordinary token); name the roles with data.special_tokens")
    _renumber_model(data["model"], new_id, rename)
    kept = {rename.get(name, name): entry for name, entry in added.items()}
    for i, name in enumerate(names):
        if new_to_old[i] == -1 or name in kept:
            entry = kept.get(name, {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False})
            kept[name] = {**entry, "content": name, "id": i, "special": True}
    data["added_tokens"] = sorted(kept.values(), key=lambda entry: entry["id"])
    # archlab encodes without a template (add_special_tokens=False): its ids for the template's tokens moved.
    data["post_processor"] = None
    return json.dumps(data, ensure_ascii=False), new_to_old


def _renumber_model(model: dict, new_id: Mapping[str, int], rename: Mapping[str, str]) -> None:
    kind = model.get("type")
    if kind in ("BPE", "WordPiece", "WordLevel"):
        if kind == "BPE":
            merges = model.get("merges", [])
            produced = {"".join(m) if isinstance(m, list) else m.replace(" ", "", 1) for m in merges}
            if produced & set(rename):
                raise ConfigError(f"{sorted(produced & set(rename))[0]!r} is produced by the tokenizer's merges, so "
                                  "it cannot play a special role")
        # Every token, the added ones too, is an entry of the model's vocabulary: tokenizers gives a token
        # that is only an added token the next id after the model's, wherever its JSON says it sits.
        # No merge or word produces the added entries, so text still encodes as it did.
        model["vocab"] = dict(new_id)
        if model.get("unk_token") in rename:
            model["unk_token"] = rename[model["unk_token"]]
    elif kind == "Unigram":
        unk = model.get("unk_id")
        unk_token = model["vocab"][unk][0] if unk is not None else None
        pieces = {rename.get(piece[0], piece[0]): [rename.get(piece[0], piece[0]), piece[1]] for piece in model["vocab"]}
        # Pieces hold ids 0..N-1 (see above); a token that was no piece becomes one that text never takes.
        model["vocab"] = [pieces.get(t, [t, -1e9]) for t in sorted(new_id, key=new_id.get)]
        if unk_token is not None:
            model["unk_id"] = new_id[rename.get(unk_token, unk_token)]
    else:
        raise DataError(f"archlab cannot renumber a tokenizer of model type {kind!r}")


def adapted_tokenizer_file(
    path: str | os.PathLike, *, objective: str, special_tokens: Mapping[str, str],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path, np.ndarray | None]:
    """``(path, None)`` when it follows archlab's layout, else ``(its renumbered copy in the cache,
    new_to_old)``; refuses a tokenizer without a role the objective needs."""
    path = Path(path).expanduser()
    backend = read_backend(path)
    if follows_layout(backend) and not special_tokens:
        return path, None
    vocab = backend.get_vocab(with_added_tokens=True)
    roles = assign_roles(vocab, dict(special_tokens), _declared_roles(path))
    where = f"the tokenizer {path}"
    for role in NEEDED_ROLES.get(objective, ()):
        if role == "sentinels":
            missing = [s for s in (sentinel_name(i) for i in range(N_SENTINELS)) if s not in vocab]
            if missing:
                raise ConfigError(f"{where} has no {missing[0]} ({len(missing)} of the {N_SENTINELS} sentinels "
                                  f"missing), which objective {objective} needs")
        elif roles[role] is None:
            raise ConfigError(f"{where} has no {role} token, which objective {objective} needs; name one of its "
                              f"special tokens with data.special_tokens.{role}=<token>")
    text, new_to_old = renumbered(backend, roles)
    out = cache_root(cache_dir) / "tokenizers" / f"{_RECIPE}-{text_id(text)}.json"
    if not out.is_file():
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return out, new_to_old
