"""Output vocabularies: mergekit 0.1.5's ``tokenizer_source`` (``base``, ``union``, a model),
its ``tokenizer:`` block (``source``, ``tokens``, ``pad_to_multiple_of``) and ``chat_template``.

Works on the models' ``tokenizer.json`` (and ``tokenizer_config.json``) as JSON, with no
tokenizer library: a vocabulary is the tokenizer model's vocabulary plus its added tokens, as
``get_vocab()`` gives it, and a token added to a tokenizer gets its id by the rule of the
``tokenizers`` library (the id it already has, else one past the last id). The semantics follow
mergekit/tokenizer/build.py and mergekit/merge.py (``_set_chat_template``); the embedding rows
are built in ``tritonmerge/vocab_rows.py``. No torch here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import CheckpointError, ConfigError

# mergekit/_data/chat_templates/<name>.jinja, read from an installed mergekit only when named
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from when it is missing (or forced): ``model`` (that
    model's row of the same token), ``model_token`` (that model's row of ``token``/``token_id``),
    ``zero``, or ``none`` (no source given)."""

    kind: str
    model: Path | None = None
    model_name: str = ""
    token_id: int | None = None
    token: str | None = None

    def to_raw(self) -> Any:
        if self.kind == "zero":
            return {"kind": "zero"}
        if self.kind == "model":
            return _ref(self.model)
        if self.kind == "model_token":
            d: dict[str, Any] = {"kind": "model_token", "model": _ref(self.model)}
            d.update({"token_id": self.token_id} if self.token_id is not None else {"token": self.token})
            return d
        return None


def _ref(path: Path | None) -> str:
    """A model's reference: its folder, ``+`` its LoRA adapter where it has one."""
    lora = getattr(path, "lora", None)
    return f"{path}+{lora}" if lora is not None else str(path)


@dataclass
class TokenizerSpec:
    """The tokenizer settings of a config. ``source`` is ``"base"``, ``"union"``, a model folder,
    or None (only ``chat_template`` given: the donor's tokenizer is kept)."""

    source: str | Path | None
    source_name: str = ""
    tokens: dict[str, tuple[TokenSource, bool]] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None
    block: bool = False  # given as a `tokenizer:` block (else `tokenizer_source`)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        src = _ref(self.source) if isinstance(self.source, Path) else self.source
        if self.block:
            b: dict[str, Any] = {"source": src}
            if self.tokens:
                b["tokens"] = {t: {"source": s.to_raw(), "force": f} for t, (s, f) in self.tokens.items()}
            if self.pad_to_multiple_of:
                b["pad_to_multiple_of"] = self.pad_to_multiple_of
            d["tokenizer"] = b
        elif src is not None:
            d["tokenizer_source"] = src
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template
        return d


def parse_tokenizer(raw: Mapping[str, Any], resolve: Callable[[Any, str], tuple[str, Path]]) -> TokenizerSpec | None:
    """The tokenizer settings of a raw config (None: none given, the base's files are copied).
    ``resolve(ref, what)`` gives (name, folder) of a model reference."""
    src_raw = raw.get("tokenizer_source")
    block = raw.get("tokenizer")
    chat = raw.get("chat_template")
    if src_raw is not None and block is not None:
        raise ConfigError("give either tokenizer_source or a tokenizer: block, not both (as mergekit requires)")
    if chat is not None and (not isinstance(chat, str) or not chat.strip()):
        raise ConfigError(f"chat_template: expected a template name ({', '.join(CHAT_TEMPLATE_NAMES)}, auto) or a Jinja template string, got {chat!r}")
    if chat is not None:
        _check_template(chat)
    if block is None and src_raw is None and chat is None:
        return None
    tokens: dict[str, tuple[TokenSource, bool]] = {}
    pad = None
    if block is not None:
        if not isinstance(block, dict):
            raise ConfigError("tokenizer: expected a mapping with `source`, `tokens`, `pad_to_multiple_of`")
        extra = set(block) - {"source", "tokens", "pad_to_multiple_of"}
        if extra:
            raise ConfigError(f"tokenizer: unknown key(s) {sorted(extra)}; allowed: source, tokens, pad_to_multiple_of")
        src_raw = block.get("source", "union")  # mergekit's default for the block
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
        toks = block.get("tokens") or {}
        if not isinstance(toks, dict):
            raise ConfigError("tokenizer.tokens: expected a mapping of token -> {source, force}")
        for tok, tcfg in toks.items():
            where = f"tokenizer.tokens[{tok!r}]"
            tcfg = tcfg or {}
            if not isinstance(tcfg, dict) or set(tcfg) - {"source", "force"}:
                raise ConfigError(f"{where}: expected a mapping with `source` and/or `force`, got {tcfg!r}")
            force = tcfg.get("force", False)
            if not isinstance(force, bool):
                raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
            tokens[str(tok)] = (_token_source(tcfg.get("source"), resolve, where), force)
    source: str | Path | None
    name = ""
    if src_raw is None:
        source = None
    elif src_raw in ("base", "union"):
        source = src_raw
    else:
        name, source = resolve(src_raw, "tokenizer_source" if block is None else "tokenizer.source")
    return TokenizerSpec(source, name, tokens, pad, chat, block is not None)


def _token_source(src: Any, resolve, where: str) -> TokenSource:
    if src is None:
        return TokenSource("none")
    if isinstance(src, dict) and "kind" in src:
        kind = src.get("kind")
        if kind == "zero":
            if set(src) != {"kind"}:
                raise ConfigError(f"{where}.source: a zero source takes no other keys, got {src!r}")
            return TokenSource("zero")
        if kind == "model_token":
            if set(src) - {"kind", "model", "token_id", "token"} or "model" not in src:
                raise ConfigError(f"{where}.source: expected {{kind: model_token, model: PATH, token_id: N | token: TEXT}}, got {src!r}")
            tid, tok = src.get("token_id"), src.get("token")
            if (tid is None) == (tok is None):
                raise ConfigError(f"{where}.source: give exactly one of token_id or token (as mergekit requires)")
            if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool)):
                raise ConfigError(f"{where}.source.token_id: expected an integer, got {tid!r}")
            name, path = resolve(src["model"], f"{where}.source.model")
            return TokenSource("model_token", path, name, tid, None if tok is None else str(tok))
        raise ConfigError(f"{where}.source: unknown kind {kind!r}; mergekit's kinds are model_token and zero")
    name, path = resolve(src, f"{where}.source")
    return TokenSource("model", path, name)


def _is_name(chat: str) -> bool:
    return len(chat) < 256 and "\n" not in chat and "{" not in chat


def _check_template(chat: str) -> None:
    """mergekit's rule: ``auto``, the name of a bundled template, or Jinja text of at least 20
    characters with a ``{``; a bundled name is looked up now, so a missing one is refused before
    any tensor is merged."""
    if chat == "auto":
        return
    if _is_name(chat):
        bundled_template(chat)
        return
    if len(chat) < 20 or "{" not in chat:
        raise ConfigError(
            f"chat_template: {chat[:40]!r} is neither a template name ({', '.join(CHAT_TEMPLATE_NAMES)}, auto) nor a "
            f"Jinja template (mergekit's rule: at least 20 characters with a '{{')"
        )


# ------------------------------------------------------------------------------------------------
# vocabularies


@dataclass
class Vocab:
    """One model's tokenizer as mergekit sees it: ``vocab`` is ``get_vocab()`` (token -> id),
    ``added`` its added tokens (content -> entry of tokenizer.json), ``size`` the number of
    embedding rows its config declares (``vocab_size``, else the vocabulary's length)."""

    folder: Path
    label: str
    data: dict[str, Any]
    vocab: dict[str, int]
    added: dict[str, dict[str, Any]]
    size: int
    config: dict[str, Any]

    @property
    def model_vocab(self) -> dict[str, int]:
        return _model_vocab(self.data, self.label)


def _model_vocab(data: Mapping[str, Any], label: str) -> dict[str, int]:
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return {str(k): int(v) for k, v in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return {str(p[0]): i for i, p in enumerate(vocab)}
    raise CheckpointError(f"{label}: tokenizer.json has no vocabulary tritonmerge can read (model type {model.get('type')!r})")


def _read_json(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: cannot read {path}: {exc}") from None


def load_vocab(folder: Path | None, label: str, strip: bool = False) -> Vocab:
    """A model's vocabulary; ``strip``: drop tokens past its embedding rows, as mergekit does for
    the base (BPE only, as there)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        where = folder if folder is not None else "a lone weights file"
        raise CheckpointError(
            f"{label}: {where} has no tokenizer.json; building an output vocabulary needs every model's fast "
            f"tokenizer (tokenizer.json; a tokenizer.model alone is not read)"
        )
    data = _read_json(folder / "tokenizer.json", label)
    config = _read_json(folder / "config.json", label) if (folder / "config.json").is_file() else {}
    vocab = dict(_model_vocab(data, label))
    added: dict[str, dict[str, Any]] = {}
    for entry in sorted(data.get("added_tokens") or [], key=lambda e: e["id"]):
        added[entry["content"]] = entry
        vocab[entry["content"]] = int(entry["id"])
    size = config.get("vocab_size")
    if not isinstance(size, int) and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    if not isinstance(size, int):
        size = len(vocab)
    v = Vocab(folder, label, data, vocab, added, size, config)
    unused = [t for t, i in vocab.items() if i >= size]
    if strip and unused:
        if (data.get("model") or {}).get("type") != "BPE":
            raise ConfigError(
                f"{label}: its tokenizer has {len(unused)} token(s) past its {size} embedding rows and is not BPE; "
                f"mergekit strips such tokens for BPE only"
            )
        data = copy.deepcopy(data)
        gone = set(unused)
        data["added_tokens"] = [e for e in data.get("added_tokens") or [] if e["id"] < size]
        for t in unused:
            data["model"]["vocab"].pop(t, None)

        def keep(m: Any) -> bool:
            toks = m.split(" ") if isinstance(m, str) else list(m)
            return not any(t in gone for t in toks)

        data["model"]["merges"] = [m for m in data["model"].get("merges") or [] if keep(m)]
        return load_vocab_data(v, data)
    return v


def load_vocab_data(v: Vocab, data: dict[str, Any]) -> Vocab:
    vocab = dict(_model_vocab(data, v.label))
    added = {}
    for entry in sorted(data.get("added_tokens") or [], key=lambda e: e["id"]):
        added[entry["content"]] = entry
        vocab[entry["content"]] = int(entry["id"])
    return Vocab(v.folder, v.label, data, vocab, added, v.size, v.config)


class OutTokenizer:
    """A tokenizer.json being extended with ``add`` by the ``tokenizers`` library's rule: a token
    already added is left as it is; one in the model's vocabulary becomes an added token at its
    id; any other gets the id one past the last (at least the model's vocabulary size)."""

    def __init__(self, v: Vocab) -> None:
        self.source = v
        self.data = copy.deepcopy(v.data)
        self.model_vocab = _model_vocab(self.data, v.label)
        self.added: dict[str, dict[str, Any]] = {k: dict(e) for k, e in v.added.items()}
        self.vocab = dict(v.vocab)

    def add(self, entry: Mapping[str, Any] | str) -> None:
        if isinstance(entry, str):
            entry = {"content": entry, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
        content = entry["content"]
        if not content or content in self.added:
            return
        if content in self.model_vocab:
            new_id = self.model_vocab[content]
        else:
            n = len(self.model_vocab)
            top = max((e["id"] for e in self.added.values()), default=None)
            new_id = n if top is None or (top < n and n > 0) else top + 1
        out = {"id": new_id, "content": content}
        for k in ("single_word", "lstrip", "rstrip", "normalized", "special"):
            out[k] = bool(entry.get(k, False))
        self.added[content] = out
        self.vocab[content] = new_id

    def to_json(self) -> dict[str, Any]:
        data = copy.deepcopy(self.data)
        data["added_tokens"] = sorted(self.added.values(), key=lambda e: e["id"])
        return data


@dataclass
class VocabPlan:
    """The output vocabulary and, for each merge input (by folder), the old row of each new id
    (-1: the model lacks the token)."""

    spec: TokenizerSpec
    out: OutTokenizer
    vocab: dict[str, int]
    n_rows: int  # padded
    perms: dict[Path, list[int]]
    original: dict[Path, dict[str, int]]
    rows: dict[Path, int]  # each input's embedding rows (config vocab_size)

    def fingerprint(self) -> str:
        return json.dumps([sorted(self.vocab.items()), self.n_rows], sort_keys=True)


def build_vocab(spec: TokenizerSpec, base: Path, base_name: str, inputs: Sequence[tuple[str, Path]]) -> VocabPlan:
    """mergekit's ``build_tokenizer`` + permutations: ``base`` is the config's base model (else the
    first model), ``inputs`` every merge input in config order (name, folder)."""
    base_v = load_vocab(base, f"base model {base_name!r}", strip=True)
    vocabs: dict[Path, Vocab] = {base: base_v}
    for name, path in inputs:
        if path not in vocabs:
            vocabs[path] = load_vocab(path, f"model {name!r}")
    if isinstance(spec.source, Path):
        # loaded as it is (mergekit strips the base's own tokenizer only, not a named source)
        donor = vocabs.get(spec.source) if spec.source != base else None
        donor = donor or load_vocab(spec.source, f"tokenizer_source {spec.source_name!r}")
        out = OutTokenizer(donor)
    elif spec.source == "union":
        out = _union(base_v, list(vocabs.values()))
    else:
        out = OutTokenizer(base_v)
    for tok in spec.tokens:
        if tok not in out.vocab:
            out.add(tok)
    vocab = out.vocab
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ConfigError("the output vocabulary's ids are not 0..n-1 without gaps; mergekit's embedding rows assume they are")
    n = len(vocab)
    if spec.pad_to_multiple_of and n % spec.pad_to_multiple_of:
        n = (n // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    perms: dict[Path, list[int]] = {}
    for name, path in inputs:
        if path in perms:
            continue
        v = vocabs[path]
        p = [-1] * len(vocab)
        for tok, new in vocab.items():
            old = v.vocab.get(tok, -1)
            if old >= v.size:
                raise ConfigError(
                    f"model {name!r}: token {tok!r} has id {old}, past its {v.size} embedding rows; mergekit cannot "
                    f"place that token's row either"
                )
            p[new] = old
        perms[path] = p
    for tok, (src, _) in spec.tokens.items():
        if src.model is not None and src.model not in perms:
            raise ConfigError(
                f"tokenizer.tokens[{tok!r}]: model {src.model_name!r} is not one of the merged models; its rows "
                f"cannot be read"
            )
        if src.kind == "model_token" and src.token is not None and src.token not in vocabs[src.model].vocab:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: token {src.token!r} is not in model {src.model_name!r}'s vocabulary")
        if src.kind == "model_token" and src.token_id is not None and not 0 <= src.token_id < vocabs[src.model].size:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: token_id {src.token_id} is out of range for model {src.model_name!r}")
    return VocabPlan(spec, out, vocab, n, perms, {p: v.vocab for p, v in vocabs.items()}, {p: v.size for p, v in vocabs.items()})


def _union(base: Vocab, vocabs: Sequence[Vocab]) -> OutTokenizer:
    """mergekit's ``build_union_tokenizer``: every model's tokens below its embedding rows,
    the base's first; the others' plain tokens, then their added tokens (the first settings of
    a token win), added to the base's tokenizer. Order: the config's (base, then the models);
    mergekit iterates a set there, so its order of new ids can differ from run to run."""
    plain: dict[str, None] = {}
    added: dict[str, dict[str, Any]] = {}
    for v in vocabs:
        for tok, idx in sorted(v.vocab.items(), key=lambda kv: kv[1]):
            if idx >= v.size or tok in v.added:
                continue
            plain.setdefault(tok, None)
        for tok, entry in v.added.items():
            if entry["id"] < v.size and tok not in added:
                added[tok] = entry
    out = OutTokenizer(base)
    for tok in plain:
        if tok not in added and tok not in base.vocab:
            out.add(tok)
    for entry in added.values():
        out.add(entry)
    return out


# ------------------------------------------------------------------------------------------------
# output files


def resolve_chat_template(spec: TokenizerSpec | None, folders: Sequence[Path | None]) -> str | None:
    """The template text for ``chat_template`` (mergekit's ``_set_chat_template``): ``auto`` the
    most common template among the models, a name one of mergekit's bundled templates, else the
    literal Jinja text."""
    chat = spec.chat_template if spec is not None else None
    if chat is None:
        return None
    if chat == "auto":
        found = [t.strip() for t in (read_chat_template(f) for f in folders if f is not None) if t]
        if not found:
            return None
        counts: dict[str, int] = {}
        for t in found:
            counts[t] = counts.get(t, 0) + 1
        return max(counts, key=lambda t: counts[t])  # first of the most common, as Counter.most_common
    if _is_name(chat):
        return bundled_template(chat)
    return chat


def bundled_template(name: str) -> str:
    """mergekit's bundled template ``name`` (mergekit/_data/chat_templates/<name>.jinja), from the
    folder named by TRITONMERGE_CHAT_TEMPLATES, else from an installed mergekit package; their
    text is mergekit's and is not shipped with tritonmerge."""
    import importlib.util
    import os

    folders = []
    if os.environ.get("TRITONMERGE_CHAT_TEMPLATES"):
        folders.append(Path(os.environ["TRITONMERGE_CHAT_TEMPLATES"]))
    try:
        found = importlib.util.find_spec("mergekit")
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        folders.append(Path(list(found.submodule_search_locations)[0]) / "_data" / "chat_templates")
    if not folders:
        raise ConfigError(
            f"chat_template: {name!r} would name one of mergekit's bundled templates ({', '.join(CHAT_TEMPLATE_NAMES)}), "
            f"which are read from an installed mergekit or the folder TRITONMERGE_CHAT_TEMPLATES names (neither is "
            f"there); give the Jinja template text instead"
        )
    for folder in folders:
        if (folder / f"{name}.jinja").is_file():
            return (folder / f"{name}.jinja").read_text(encoding="utf-8")
    raise ConfigError(
        f"chat_template: {name!r} is not a template mergekit bundles (looked in {', '.join(str(f) for f in folders)}) "
        f"nor Jinja text; give one of {', '.join(CHAT_TEMPLATE_NAMES)}, auto, or the template itself"
    )


def read_chat_template(folder: Path) -> str | None:
    """A model's chat template: chat_template.jinja, else tokenizer_config.json's (its
    ``default`` entry where it is a list of named templates)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    p = folder / "tokenizer_config.json"
    if not p.is_file():
        return None
    try:
        t = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) else None


def write_tokenizer(out: Path, donor: Path | None, plan: VocabPlan | None, template: str | None) -> None:
    """Write the output's tokenizer files over those copied from ``donor``: tokenizer.json of the
    output vocabulary, tokenizer_config.json with its ``added_tokens_decoder`` (where the donor
    has one) and without ``chat_template``, which goes to chat_template.jinja as mergekit's
    transformers writes it."""
    if plan is not None:
        (out / "tokenizer.json").write_text(json.dumps(plan.out.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        for stale in ("added_tokens.json",):
            (out / stale).unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError:
            cfg = {}
    if template is None and donor is not None:
        template = read_chat_template(donor)
    if plan is not None and "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {
            str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for e in sorted(plan.out.added.values(), key=lambda e: e["id"])
        }
    cfg.pop("chat_template", None)
    if template is not None:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        (out / "chat_template.json").unlink(missing_ok=True)
    if cfg or cfg_path.is_file():
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
