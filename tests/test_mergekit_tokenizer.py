"""Output vocabularies against mergekit 0.1.5 itself: ``tokenizer_source: union``, a model as the
source, explicit ``base`` over models with other vocabularies, the ``tokenizer:`` block (``tokens``
with ``source``/``force``, ``pad_to_multiple_of``) and ``chat_template`` — merged by
``mergekit-yaml`` (its own virtualenv, skipped where absent) and by ``python -m tritonmerge
merge``, every output tensor compared in float32 ulps and the tokenizer files compared (the
vocabulary, the added tokens and their flags, the chat template, the encodings of a few strings).

The models are tiny llamas with a WordLevel tokenizer.json written here: the base has 32 tokens
(3 special), expert 1 adds two special tokens (and has a chat template), expert 2 swaps two words
for two others and adds a special token, with embedding rows to match.

mergekit's union iterates a set of models and a hash map of each vocabulary, so the ids it gives
new tokens change from run to run; there the vocabularies are compared as sets and the rows by
token. Where the ids are determined (one donor, or one model adding tokens) they are compared as
they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tritonmerge.synthetic import make_llama_checkpoints, write_checkpoint

from _checkpoints import load_folder
from _mergekit import MERGEKIT_PYTHON, needs_mergekit, offline_env, run_mergekit, ulp_distance

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 16
SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = SPECIALS + [f"w{i}" for i in range(29)]
STRINGS = ["w1 w2 w27", "<|im_start|> w3 x0 <|im_end|>", "w28 <tool> x1 zz", "<s> w5 <new> w6"]
CHATML_TEST = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _templates_dir() -> Path | None:
    """mergekit's bundled chat templates, in its virtualenv (named templates need them)."""
    found = sorted(MERGEKIT_PYTHON.parent.parent.glob("lib/python*/site-packages/mergekit/_data/chat_templates"))
    return found[0] if found else None


def _tokenizer_json(words: list[str], added: list[tuple[str, bool]]) -> dict[str, Any]:
    entries = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    for i, (t, special) in enumerate(added):
        entries.append(
            {"id": len(words) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": not special, "special": special}
        )
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"},
    }


def _make_models(root: Path) -> dict[str, Path]:
    base, experts = make_llama_checkpoints(
        root, hidden_size=HIDDEN, intermediate_size=24, num_layers=2, vocab_size=len(WORDS), num_experts=3,
        dtype=torch.float32, seed=3, shard_size_bytes=None,
    )
    specs = {
        base: (WORDS, [], None),
        experts[0]: (WORDS, [("<|im_start|>", True), ("<|im_end|>", True)], CHATML_TEST),
        experts[1]: (WORDS[:30] + ["x0", "x1"], [("<tool>", True), ("<|im_end|>", True)], None),
        experts[2]: (WORDS, [], None),
    }
    g = torch.Generator().manual_seed(11)
    for folder, (words, added, template) in specs.items():
        (folder / "tokenizer.json").write_text(json.dumps(_tokenizer_json(words, added)), encoding="utf-8")
        n = len(words) + len(added)
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cfg["vocab_size"] = n
        (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        tensors = load_folder(folder)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if n > tensors[k].shape[0]:
                tensors[k] = torch.cat([tensors[k], torch.randn(n - tensors[k].shape[0], HIDDEN, generator=g)])
        for f in folder.glob("*.safetensors"):
            f.unlink()
        write_checkpoint(folder, tensors, None)
        if template is not None:
            tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            tc["chat_template"] = template
            (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    # expert 3 without tokenizer files, for the refusal
    (experts[2] / "tokenizer.json").unlink()
    return {"base": base, "e1": experts[0], "e2": experts[1], "e3": experts[2]}


def _configs(m: dict[str, Path]) -> dict[str, tuple[dict[str, Any], bool]]:
    """case -> (config, whether the output ids are determined)."""
    ties = lambda *names: {  # noqa: E731
        "merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
        "models": [{"model": str(m[n]), "parameters": {"weight": 0.6 - 0.2 * i, "density": 0.5 + 0.2 * i}} for i, n in enumerate(names)],
    }
    return {
        "union": ({**ties("e1", "e2"), "tokenizer_source": "union"}, False),
        "union_one_donor_chatml": ({**ties("e1"), "tokenizer_source": "union", "chat_template": "chatml"}, True),
        "model_source": ({**ties("e1", "e2"), "tokenizer_source": str(m["e2"]), "chat_template": CHATML_TEST + "{# literal #}"}, True),
        "base_explicit": ({**ties("e1", "e2"), "tokenizer_source": "base"}, True),
        # the same vocabulary (expert 3 has no tokenizer files): the base's tokenizer, a template set
        "template_only": ({**ties("e3"), "chat_template": "chatml"}, True),
        "block": (
            {
                **ties("e1", "e2"),
                "chat_template": "auto",
                "tokenizer": {
                    # a model: mergekit 0.1.5 fails (KeyError) on `source: base` with new tokens,
                    # as it adds them to the base's own tokenizer (see test_block_base_source)
                    "source": str(m["e1"]),
                    "pad_to_multiple_of": 8,
                    "tokens": {
                        "<|im_start|>": {"source": str(m["e1"])},
                        "<|im_end|>": {"source": {"kind": "model_token", "model": str(m["e2"]), "token": "<tool>"}},
                        "<new>": {"source": {"kind": "zero"}},
                        "w5": {"source": {"kind": "model_token", "model": str(m["base"]), "token_id": 9}, "force": True},
                    },
                },
            },
            True,
        ),
        "block_union": (
            {**ties("e1", "e2"), "tokenizer": {"source": "union", "tokens": {"<tool>": {"source": str(m["e2"]), "force": True}}}},
            False,
        ),
    }


_ENCODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tokenizers, transformers
    folders, strings = json.loads(sys.argv[1])
    out = {}
    for f in folders:
        t = tokenizers.Tokenizer.from_file(f + "/tokenizer.json")
        auto = transformers.AutoTokenizer.from_pretrained(f)
        out[f] = {
            "tokens": [t.encode(s).tokens for s in strings],
            "auto_tokens": [auto.convert_ids_to_tokens(auto.encode(s, add_special_tokens=False)) for s in strings],
            "vocab": auto.get_vocab(),
            "chat_template": auto.chat_template,
        }
    print("ENC " + json.dumps(out))
    """
)


def _ours(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "passive"}
    if _templates_dir() is not None:
        env["TRITONMERGE_CHAT_TEMPLATES"] = str(_templates_dir())
    return subprocess.run(
        [sys.executable, "-m", "tritonmerge", "merge", str(config), str(out), "--quiet", *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=config.parent,
    )


def _vocab(folder: Path) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    added = {}
    for e in data["added_tokens"]:
        vocab[e["content"]] = e["id"]
        added[e["content"]] = {k: v for k, v in e.items() if k != "id"}
    return vocab, added


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tok")
    models = _make_models(root / "models")
    inputs_before = _digest(root / "models")
    jobs = []
    for case, (cfg, _) in _configs(models).items():
        path = root / f"{case}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        jobs.append((case, path, root / f"mergekit_{case}", root / f"ours_{case}"))
    status = run_mergekit([(p, m) for _, p, m, _ in jobs], cwd=root, timeout=600)
    out: dict[str, Any] = {"models": models, "root": root}
    for case, path, mk, ours in jobs:
        res = _ours(path, ours)
        out[case] = (mk if status.get(str(mk)) == "ok" else status.get(str(mk), "not run"), ours if res.returncode == 0 else res.stderr.strip())
    folders = [str(p) for case, _, mk, ours in jobs for p in (mk, ours) if (p / "tokenizer.json").is_file()]
    enc = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", _ENCODE_SCRIPT, json.dumps([folders, STRINGS])],
        capture_output=True, text=True, timeout=300, env=offline_env(), cwd=root,
    )
    lines = [line for line in enc.stdout.splitlines() if line.startswith("ENC ")]
    assert lines, f"encoding failed:\n{enc.stderr[-4000:]}"
    out["encodings"] = json.loads(lines[-1][4:])
    out["inputs_unchanged"] = _digest(root / "models") == inputs_before
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@needs_mergekit
@pytest.mark.parametrize("case", list(_configs({k: Path(k) for k in ("base", "e1", "e2", "e3")})))
def test_tokenizer_merges_match_mergekit(merged, case):
    theirs, ours = merged[case]
    assert not isinstance(theirs, str), f"mergekit failed on {case}: {theirs}"
    assert not isinstance(ours, str), f"tritonmerge failed on {case}: {ours}"
    _, determined = _configs(merged["models"])[case]
    tv, tadded = _vocab(theirs)
    ov, oadded = _vocab(ours)
    assert set(tv) == set(ov), f"vocabularies differ: {sorted(set(tv) ^ set(ov))}"
    if determined:
        assert tv == ov, "token ids differ"
    assert tadded == oadded, "added tokens or their flags differ"
    a, b = load_folder(theirs), load_folder(ours)
    assert set(a) == set(b)
    order = [ov[t] for t in sorted(tv, key=tv.get)]  # our row of each of mergekit's ids
    worst = {}
    for name in sorted(a):
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype == torch.float32, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            y = torch.cat([y[order], y[len(order):]])
        worst[name] = ulp_distance(x, y)
    print(f"{case}: max {max(worst.values())} ulp over {len(worst)} tensors, {len(tv)} tokens, {a['lm_head.weight'].shape[0]} rows")
    assert not {n: d for n, d in worst.items() if d}, f"{case}: tensors differ from mergekit's: {worst}"
    cfg_t = json.loads((theirs / "config.json").read_text())
    cfg_o = json.loads((ours / "config.json").read_text())
    assert cfg_t["vocab_size"] == cfg_o["vocab_size"] == a["lm_head.weight"].shape[0]
    # templates: the same file, and what transformers loads
    tt = (theirs / "chat_template.jinja").read_text() if (theirs / "chat_template.jinja").is_file() else None
    to = (ours / "chat_template.jinja").read_text() if (ours / "chat_template.jinja").is_file() else None
    assert tt == to
    enc = merged["encodings"]
    et, eo = enc[str(theirs)], enc[str(ours)]
    assert et["tokens"] == eo["tokens"] == eo["auto_tokens"], "encodings differ"
    assert et["vocab"] == tv and eo["vocab"] == ov
    assert et["chat_template"] == eo["chat_template"] == tt
    # nothing materialised is left behind, and the inputs are untouched
    assert not any(p.name.startswith(".tokenizer") for p in ours.rglob("*"))
    assert merged["inputs_unchanged"]


@needs_mergekit
def test_block_fills_rows_by_the_rules(merged):
    """The tokenizer block case, checked against the inputs themselves: forced, zero, donor rows
    and the padding mean."""
    theirs, ours = merged["block"]
    assert not isinstance(ours, str), ours
    m = merged["models"]
    out = load_folder(ours)["model.embed_tokens.weight"]
    base, e1, e2 = (load_folder(m[k])["model.embed_tokens.weight"] for k in ("base", "e1", "e2"))
    ov, _ = _vocab(ours)
    assert out.shape[0] % 8 == 0 and out.shape[0] > len(ov)
    assert torch.equal(out[ov["<new>"]], torch.zeros(HIDDEN))  # zero in every model: merges to zero
    assert torch.equal(out[ov["w5"]], base[9])  # forced: every model gives the base's row of id 9


def _write(tmp: Path, cfg: dict[str, Any]) -> Path:
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return _make_models(tmp_path_factory.mktemp("tokmodels"))


def _base_cfg(m: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
            "models": [{"model": str(m["e1"]), "parameters": {"weight": 0.5}}], **extra}


@pytest.mark.parametrize(
    "extra,pattern",
    [
        ({"tokenizer_source": "/nonexistent/tok"}, r"tokenizer_source.*does not exist"),
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, r"either tokenizer_source or a tokenizer"),
        ({"chat_template": "nosuchtemplate"}, r"chat_template"),
        ({"chat_template": "{{ x }}"}, r"chat_template.*20 characters"),
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": {"kind": "magic"}}}}}, r"unknown kind 'magic'"),
        ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, r"pad_to_multiple_of"),
        ({"tokenizer": {"source": "union", "bogus": 1}}, r"unknown key"),
    ],
)
def test_config_refusals(models, tmp_path, extra, pattern):
    from tritonmerge.config import load_config
    from tritonmerge.errors import ConfigError

    with pytest.raises(ConfigError, match=pattern):
        load_config(_base_cfg(models, **extra))


def test_refusals_before_merging(models, tmp_path):
    """A model without tokenizer.json, a token source outside the merge, different vocabularies
    without tokenizer_source: one line each, nothing written."""
    m = models
    cases = [
        (_base_cfg(m, tokenizer_source="union", models=[{"model": str(m["e3"]), "parameters": {"weight": 1.0}}]), "has no tokenizer.json"),
        (_base_cfg(m, tokenizer={"source": "union", "tokens": {"<y>": {"source": str(m["e2"])}}}), "not one of the merged models"),
        (_base_cfg(m), "vocabulary size mismatch"),
    ]
    for i, (cfg, pattern) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = _ours(_write(tmp_path, cfg), out)
        assert res.returncode != 0 and pattern in res.stderr, res.stderr
        assert not out.exists() and not any(p.name.startswith(f".out{i}") for p in tmp_path.iterdir())


def test_resume_fingerprint_includes_tokenizer(models, tmp_path):
    from tritonmerge.engine import plan_merge

    a = plan_merge(_base_cfg(models, tokenizer_source="union"), tmp_path / "o")
    b = plan_merge(_base_cfg(models, tokenizer={"source": "union", "pad_to_multiple_of": 8}), tmp_path / "o")
    c = plan_merge(_base_cfg(models, tokenizer_source="union", chat_template=CHATML_TEST), tmp_path / "o")
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.base.tensors["lm_head.weight"].shape[0] == 34
    assert b.base.tensors["lm_head.weight"].shape[0] == 40
    assert not (tmp_path / "o").exists() and not any(tmp_path.iterdir())  # planning writes nothing


def test_union_merge_without_mergekit(models, tmp_path):
    """The feature itself needs no mergekit: union over base + expert 1, rows checked against
    the inputs (the base's tokens keep their ids; the new ones follow)."""
    out = tmp_path / "out"
    res = _ours(_write(tmp_path, {**_base_cfg(models, tokenizer_source="union"), "merge_method": "passthrough",
                                  "base_model": None, "models": [{"model": str(models["e1"])}]}), out)
    assert res.returncode == 0, res.stderr
    v, added = _vocab(out)
    assert v["<|im_start|>"] == 32 and v["<|im_end|>"] == 33 and added["<|im_end|>"]["special"]
    e1 = load_folder(models["e1"])
    got = load_folder(out)
    assert torch.equal(got["lm_head.weight"], e1["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 34
    assert (out / "chat_template.jinja").read_text() == CHATML_TEST
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_block_base_source(models, tmp_path):
    """`tokenizer: {source: base, tokens: ...}` with tokens the base lacks: mergekit 0.1.5 adds them
    to the base's own tokenizer object and then fails with a KeyError; here the base's
    vocabulary gets them as new tokens and their rows come from the sources given."""
    out = tmp_path / "out"
    cfg = _base_cfg(models, tokenizer={"source": "base", "tokens": {"<|im_start|>": {"source": str(models["e1"])}, "<z>": {"source": {"kind": "zero"}}}})
    res = _ours(_write(tmp_path, cfg), out)
    assert res.returncode == 0, res.stderr
    v, added = _vocab(out)
    assert v["<|im_start|>"] == 32 and v["<z>"] == 33 and not added["<z>"]["special"]
    e1 = load_folder(models["e1"])["model.embed_tokens.weight"]
    got = load_folder(out)["model.embed_tokens.weight"]
    assert got.shape[0] == 34
    assert torch.equal(got[32], e1[32])  # every model takes expert 1's row: the merge keeps it
    assert torch.equal(got[33], torch.zeros(HIDDEN))


def test_slices_with_another_tokenizer_refused(models):
    from tritonmerge.config import load_config
    from tritonmerge.errors import ConfigError

    cfg = {"merge_method": "passthrough", "tokenizer_source": "union",
           "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 2]}]}]}
    with pytest.raises(ConfigError, match=r"not supported with `slices`"):
        load_config(cfg)
    cfg["tokenizer_source"] = "base"
    cfg["chat_template"] = CHATML_TEST
    assert load_config(cfg).tokenizer.chat_template == CHATML_TEST  # the base's tokenizer, a template set


def test_resume_sees_the_same_plan(models, tmp_path):
    """The fingerprint is stable across runs (the finished output is recognised) and changes with
    the tokenizer settings (a different vocabulary is not taken for this merge)."""
    out = tmp_path / "out"
    cfg = _base_cfg(models, tokenizer_source="union")
    assert _ours(_write(tmp_path, cfg), out).returncode == 0
    again = _ours(_write(tmp_path, cfg), out, "--resume")
    assert again.returncode == 0, again.stderr
    other = _ours(_write(tmp_path, {**cfg, "tokenizer_source": None, "tokenizer": {"source": "union", "pad_to_multiple_of": 8}}), out, "--resume")
    assert other.returncode != 0 and "not the finished output of this merge" in other.stderr
    assert not any(p.name.startswith(".tokenizer") for p in out.rglob("*"))


@needs_mergekit
def test_union_strips_tokens_past_the_rows(tmp_path):
    """Byte-level BPE tokenizers of 259 tokens over 64 embedding rows (tritonmerge.synthetic):
    mergekit strips the base's tokens past its rows and skips the others'; so do we."""
    base, experts = make_llama_checkpoints(
        tmp_path / "m", hidden_size=HIDDEN, intermediate_size=24, num_layers=2, vocab_size=64, num_experts=1,
        dtype=torch.float32, seed=5, shard_size_bytes=None,
    )
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(experts[0]), "parameters": {"weight": 0.7, "density": 0.6}}]}
    path = _write(tmp_path, cfg)
    mk, ours = tmp_path / "mk", tmp_path / "ours"
    status = run_mergekit([(path, mk)], cwd=tmp_path, timeout=600)
    assert status[str(mk)] == "ok", status
    res = _ours(path, ours)
    assert res.returncode == 0, res.stderr
    tv, tadded = _vocab(mk)
    ov, oadded = _vocab(ours)
    assert tv == ov and len(ov) == 64 and tadded == oadded
    a, b = load_folder(mk), load_folder(ours)
    assert set(a) == set(b) and all(ulp_distance(a[n], b[n]) == 0 for n in a)
