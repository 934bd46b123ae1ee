"""An offline SQuAD-format dataset generator, and SQuAD JSON reading/writing/splitting.

``generate_squad`` writes short encyclopaedia-style paragraphs from templated facts (births,
foundings, inventions, rivers, mountains, towns, treaties) and asks templated questions about them.
Every paragraph states at least two facts of each relation it uses, so the paragraph always holds
other entities of the answer's type (another person, town or year): the question must be read to
find the answer. Train and eval draw their named entities from disjoint pools, so no entity and no
paragraph is shared between the splits. Numbers, years, dates and professions are common vocabulary.

The JSON follows SQuAD v1.1; ``load_squad_json`` reads it (or real SQuAD v1.1/v2 files) into a
``datasets.Dataset`` with the columns the Hugging Face QA examples use.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from typing import Any, Iterable, Mapping

__all__ = [
    "generate_squad", "entity_pools", "write_squad_json", "load_squad_json", "split_by_article",
    "SquadFormatError",
]

# ----------------------------------------------------------------------------- vocabulary
_FIRST = (
    "Ada Alma Anton Arne Beatrix Bruno Cara Cyril Dalia Dario Edith Elias Esme Felix Freya Gideon "
    "Greta Hana Hugo Ilse Ivan Jonas Juno Kasimir Klara Leon Lena Lorenzo Magda Malik Mara Milo "
    "Nadia Nils Odile Oskar Petra Pilar Quentin Rafael Rosa Rufus Selma Silas Sofia Tamsin Teodor "
    "Ulla Umar Vera Viktor Wanda Wendell Xenia Yara Yusuf Zelda Zoran Agnes Basil Celia Dmitri"
).split()
_LAST = (
    "Abernathy Albrecht Ambrose Arkwright Bellamy Blackwood Brandt Castellano Crane Dagenais "
    "Delacroix Drummond Eberhardt Ellery Fairweather Falk Fenwick Garrow Gillespie Greaves Halloran "
    "Hartmann Holloway Ibsen Ingram Jansky Jorgensen Kalman Kettering Kowalczyk Lachance Lindqvist "
    "Lowell Macready Marchetti Merriweather Nakamura Navarro Nightingale Oakes Okonkwo Olander "
    "Pembroke Petrakis Pryce Quennell Quigley Radcliffe Rasmussen Rourke Salazar Sandoval Sorensen "
    "Tallis Thornbury Trevelyan Underhill Urquhart Valdivia Vance Vasquez Whitlock Winterbourne "
    "Wolfe Yardley Yates Zabini Zeller Achterberg Bergstrom Corrigan Dunmore Esterhazy Fitzroy "
    "Grimaldi Haverford Iveson Kincaid Lockhart Moncrieff Northcott Ostrowski Prendergast"
).split()
_PLACE_HEAD = (
    "Ash Bran Cal Dun Eld Fen Gar Hol Kes Lin Mor Nor Ost Pel Quar Rav Sel Tarn Ul Vel Wex Yar Zen "
    "Brock Cray Elm"
).split()
_PLACE_TAIL = "ford mere wick holm dale ton bury stead port haven gate moor field by".split()
_RIVER_HEAD = "Av Bel Cor Dov Ers Gal Isk Lud Mar Nev Ols Rin Sav Tev Urm Wen Yst Ard".split()
_RIVER_TAIL = "ander ey ith ora elle une ast imo".split()
_PEAK_HEAD = "Kar Tor Bal Sor Hel Gran Mal Ves Dor Ark Bren Cul Fal Ler".split()
_PEAK_TAIL = "horn anda ecke oros ulm itan vard".split()
_ORG_ADJ = ("Royal Northern Golden Silver Eastern Western Grand Free United Old New Crimson "
            "Imperial Southern Amber Iron").split()
_ORG_NOUN = ("Harbour Lantern Anchor Oak Falcon Meridian Harmonic Compass Beacon Thistle Heron "
             "Summit").split()
_ORG_KIND = ("Rowing Club|Botanical Society|Academy of Music|Trading Company|Observatory|"
             "Football Club|Printing House|Railway Company|Chess Club|Museum of Science|"
             "Orchestra|Mapmakers' Guild").split("|")
_OBJ_ADJ = ("rotary folding brass pneumatic electric portable hydraulic magnetic clockwork steam "
            "glass copper").split()
_OBJ_NOUN = ("loom press telescope lantern pump compass typewriter barometer kiln microscope "
             "sextant harp bicycle camera").split()
_JOBS = ("architect botanist cartographer chemist engineer glassblower historian lawyer "
         "mathematician physician sculptor surveyor teacher watchmaker astronomer printer").split()
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_LINKS = ("", "", "", "Later, ", "Meanwhile, ", "By contrast, ", "Records show that ",
          "According to local records, ")

# ----------------------------------------------------------------------------- templates
# A relation is a set of slots (with their entity types) rendered by sentence templates; each
# question template names the slot it asks about. "{x.num}" in an answer spec means the leading
# number of a measure such as "340 kilometres". Sentences may leave out optional slots (job,
# place); a question is only asked when every slot it mentions appears in the sentence.
RELATIONS: dict[str, dict[str, Any]] = {
    "birth": {
        "slots": {"person": "person", "place": "place", "year": "year", "job": "job"},
        "sentences": [
            "{person} was born in {place} in {year}.",
            "Born in {place} in {year}, {person} later worked as a {job}.",
            "{person} was born in {year} in the town of {place} and trained as a {job}.",
            "In {year}, {person} was born in {place}.",
            "The {job} {person} was born in {place} in {year}.",
        ],
        "questions": [
            ("Where was {person} born?", "place"),
            ("In which town was {person} born?", "place"),
            ("What is the birthplace of {person}?", "place"),
            ("{person} was born in which town?", "place"),
            ("Which town was the birthplace of {person}?", "place"),
            ("When was {person} born?", "year"),
            ("In what year was {person} born?", "year"),
            ("What year was {person} born in?", "year"),
            ("{person} was born in which year?", "year"),
            ("What was the profession of {person}?", "job"),
            ("What did {person} work as?", "job"),
            ("What job did {person} have?", "job"),
            ("Who was born in {place} in {year}?", "person"),
        ],
    },
    "founding": {
        "slots": {"org": "org", "year": "year", "person": "person", "place": "place",
                  "members": "count"},
        "sentences": [
            "The {org} was founded in {year} by {person}.",
            "{person} founded the {org} in {year}.",
            "In {year}, {person} established the {org}, which is based in {place}.",
            "The {org}, based in {place}, was founded by {person} in {year}.",
            "Founded by {person} in {year}, the {org} now has {members} members.",
            "The {org} has its headquarters in {place} and was set up in {year} by {person}.",
        ],
        "questions": [
            ("Who founded the {org}?", "person"),
            ("Who established the {org}?", "person"),
            ("The {org} was founded by whom?", "person"),
            ("Who was the founder of the {org}?", "person"),
            ("When was the {org} founded?", "year"),
            ("In what year was the {org} established?", "year"),
            ("What year did {person} found the {org}?", "year"),
            ("Where is the {org} based?", "place"),
            ("In which town is the {org} headquartered?", "place"),
            ("How many members does the {org} have?", "members"),
            ("What organisation did {person} found?", "org"),
        ],
    },
    "invention": {
        "slots": {"object": "object", "person": "person", "year": "year"},
        "sentences": [
            "The {object} was invented by {person} in {year}.",
            "{person} invented the {object} in {year}.",
            "In {year}, {person} built the first {object}.",
            "The first {object} was made in {year} by {person}.",
        ],
        "questions": [
            ("Who invented the {object}?", "person"),
            ("Who built the first {object}?", "person"),
            ("Who is credited with inventing the {object}?", "person"),
            ("When was the {object} invented?", "year"),
            ("In what year did {person} invent the {object}?", "year"),
            ("In which year was the first {object} made?", "year"),
            ("What did {person} invent?", "object"),
            ("Which device did {person} create in {year}?", "object"),
        ],
    },
    "river": {
        "slots": {"river": "river", "length": "km", "place": "place"},
        "sentences": [
            "The {river} is {length} long and reaches the sea at {place}.",
            "Flowing for {length}, the {river} enters the sea near {place}.",
            "The {river}, which is {length} long, flows into the sea at {place}.",
            "The {river} runs for {length} before meeting the sea at {place}.",
        ],
        "questions": [
            ("How long is the {river}?", "length"),
            ("What is the length of the {river}?", "length"),
            ("How many kilometres long is the {river}?", "length.num"),
            ("Where does the {river} reach the sea?", "place"),
            ("At which town does the {river} flow into the sea?", "place"),
            ("Which river reaches the sea at {place}?", "river"),
        ],
    },
    "mountain": {
        "slots": {"mountain": "mountain", "height": "m", "person": "person", "year": "year"},
        "sentences": [
            "{mountain} rises to {height} and was first climbed by {person} in {year}.",
            "At {height}, {mountain} was first climbed in {year} by {person}.",
            "{person} made the first ascent of {mountain}, which is {height} high, in {year}.",
        ],
        "questions": [
            ("How high is {mountain}?", "height"),
            ("What is the height of {mountain}?", "height"),
            ("What is the elevation of {mountain}?", "height"),
            ("How many metres high is {mountain}?", "height.num"),
            ("Who first climbed {mountain}?", "person"),
            ("Who made the first ascent of {mountain}?", "person"),
            ("When was {mountain} first climbed?", "year"),
            ("In what year did {person} first climb {mountain}?", "year"),
            ("Which mountain did {person} climb first?", "mountain"),
        ],
    },
    "town": {
        "slots": {"place": "place", "population": "count", "river": "river"},
        "sentences": [
            "{place} has a population of {population} and lies on the {river}.",
            "The town of {place}, on the banks of the {river}, is home to {population} people.",
            "About {population} people live in {place}, a town on the {river}.",
        ],
        "questions": [
            ("What is the population of {place}?", "population"),
            ("How many people live in {place}?", "population"),
            ("How many inhabitants does {place} have?", "population"),
            ("What is the number of people living in {place}?", "population"),
            ("On which river does {place} lie?", "river"),
            ("Which river flows through {place}?", "river"),
        ],
    },
    "treaty": {
        "slots": {"place": "place", "date": "date", "person": "person"},
        "sentences": [
            "The Treaty of {place} was signed on {date} by {person}.",
            "On {date}, {person} signed the Treaty of {place}.",
            "{person} put an end to the war by signing the Treaty of {place} on {date}.",
        ],
        "questions": [
            ("When was the Treaty of {place} signed?", "date"),
            ("On what date was the Treaty of {place} signed?", "date"),
            ("Who signed the Treaty of {place}?", "person"),
            ("Who put their name to the Treaty of {place}?", "person"),
            ("Who was the signatory of the Treaty of {place}?", "person"),
        ],
    },
}


class SquadFormatError(ValueError):
    """A file or dict is not valid SQuAD JSON (the message names the missing or bad field)."""


# ----------------------------------------------------------------------------- entity pools
def entity_pools(seed: int = 0, eval_share: float = 0.3) -> dict[str, dict[str, list[str]]]:
    """The disjoint named-entity pools of the two splits: ``{"train"|"eval": {type: names}}``.

    Types: person, place, org, river, mountain, object. Each type's full name list is shuffled
    with ``seed`` and cut so that about ``eval_share`` of the names go to eval. Persons are split
    by surname, so no family name appears in both splits.
    """
    rng = random.Random(f"geta-hf-pools-{seed}")
    full = {
        "place": [h + t for h in _PLACE_HEAD for t in _PLACE_TAIL],
        "org": [f"{a} {n} {k}" for a in _ORG_ADJ for n in _ORG_NOUN for k in _ORG_KIND],
        "river": [f"{h}{t} River" for h in _RIVER_HEAD for t in _RIVER_TAIL],
        "mountain": ["Mount " + h + t for h in _PEAK_HEAD for t in _PEAK_TAIL],
        "object": [f"{a} {n}" for a in _OBJ_ADJ for n in _OBJ_NOUN],
    }
    pools: dict[str, dict[str, list[str]]] = {"train": {}, "eval": {}}
    surnames = list(_LAST)
    rng.shuffle(surnames)
    cut = round(len(surnames) * eval_share)
    for split, names in (("eval", surnames[:cut]), ("train", surnames[cut:])):
        pools[split]["person"] = [f"{f} {s}" for s in names for f in _FIRST]
    for kind, names in full.items():
        rng.shuffle(names)
        cut = round(len(names) * eval_share)
        pools["eval"][kind], pools["train"][kind] = names[:cut], names[cut:]
    return pools


# ----------------------------------------------------------------------------- generation
class _Paragraph:
    """Builds one context string while recording where each fact's slot values start."""

    def __init__(self):
        self.text = ""
        self.facts: list[tuple[str, dict[str, tuple[str, int]]]] = []

    def add(self, relation: str, template: str, values: Mapping[str, str], link: str):
        if self.text:
            self.text += " "
        if link and template.startswith("The "):
            template = link + "t" + template[1:]
        elif link and template.startswith("{"):
            template = link + template
        spans: dict[str, tuple[str, int]] = {}
        for literal, field, _, _ in string.Formatter().parse(template):
            if field is not None and literal.endswith(" a ") and values[field][0] in "aeiou":
                literal = literal[:-1] + "n "  # "a architect" -> "an architect"
            self.text += literal
            if field is not None:
                spans[field] = (values[field], len(self.text))
                self.text += values[field]
        self.facts.append((relation, spans))


def _value(kind: str, pool: Mapping[str, list[str]], rng: random.Random, used: set[str]) -> str:
    """A fresh value of an entity type, distinct from everything already in the paragraph."""
    for _ in range(1000):
        if kind in pool:
            v = rng.choice(pool[kind])
        elif kind == "year":
            v = str(rng.randint(1650, 1999))
        elif kind == "job":
            v = rng.choice(_JOBS)
        elif kind == "count":
            v = f"{rng.randint(120, 990_000):,}" if rng.random() < 0.6 else str(rng.randint(12, 999))
        elif kind == "km":
            v = f"{rng.randint(40, 2900):,} kilometres"
        elif kind == "m":
            v = f"{rng.randint(900, 4800):,} metres"
        elif kind == "date":
            v = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1650, 1950)}"
        else:  # pragma: no cover - guarded by the RELATIONS table
            raise KeyError(kind)
        # names must not contain each other either ("Ada Vance" / "Ada Vance Museum")
        clash = v in used or (kind in pool and any(v in u or u in v for u in used))
        if not clash:
            used.add(v)
            return v
    raise RuntimeError(f"entity pool for {kind!r} is too small")  # pragma: no cover


def _paragraph(pool, rng: random.Random) -> _Paragraph:
    """Two relations stated twice each with different entities (plus, in one paragraph out of
    three, a fifth fact of a third relation), in shuffled order."""
    rels = rng.sample(sorted(RELATIONS), 3)
    plan = [rels[0], rels[0], rels[1], rels[1]] + ([rels[2]] if rng.random() < 1 / 3 else [])
    facts = []
    used: set[str] = set()
    for rel in plan:
        template = rng.choice(RELATIONS[rel]["sentences"])
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        values = {s: _value(k, pool, rng, used)
                  for s, k in RELATIONS[rel]["slots"].items() if s in fields}
        facts.append((rel, template, values))
    rng.shuffle(facts)
    para = _Paragraph()
    for i, (rel, template, values) in enumerate(facts):
        para.add(rel, template, values, rng.choice(_LINKS) if i else "")
    return para


def _questions(para: _Paragraph, rng: random.Random) -> list[tuple[str, str, int]]:
    """One question per fact, (question, answer_text, answer_start), in a varied template."""
    out = []
    for rel, spans in para.facts:
        options = []
        for q, ans in RELATIONS[rel]["questions"]:
            fields = {f for _, f, _, _ in string.Formatter().parse(q) if f}
            if ans.split(".")[0] in spans and fields <= spans.keys() and ans.split(".")[0] not in fields:
                options.append((q, ans))
        q, ans = rng.choice(options)
        text, start = spans[ans.split(".")[0]]
        if ans.endswith(".num"):
            text = text.split(" ")[0]
        question = q.format(**{k: v for k, (v, _) in spans.items()})
        out.append((question[0].upper() + question[1:], text, start))
    return out


def _split(name: str, n_questions: int, pool, seed: int) -> dict:
    """A SQuAD v1.1 dict with exactly ``n_questions`` questions, 4 paragraphs per article."""
    rng = random.Random(f"geta-hf-squad-{name}-{seed}")
    articles: list[dict] = []
    seen: set[str] = set()
    count = 0
    while count < n_questions:
        if not articles or len(articles[-1]["paragraphs"]) == 4:
            articles.append({"title": f"{rng.choice(pool['place'])} chronicle {len(articles) + 1}",
                             "paragraphs": []})
        para = _paragraph(pool, rng)
        if para.text in seen:  # pragma: no cover - astronomically unlikely
            continue
        seen.add(para.text)
        qas = []
        for question, text, start in _questions(para, rng)[: n_questions - count]:
            qas.append({"id": f"syn-{name}-{seed}-{count:06d}", "question": question,
                        "answers": [{"text": text, "answer_start": start}], "is_impossible": False})
            count += 1
        articles[-1]["paragraphs"].append({"context": para.text, "qas": qas})
    return {"version": "1.1", "data": articles}


def generate_squad(num_train: int = 2000, num_eval: int = 500, seed: int = 0) -> tuple[dict, dict]:
    """Generate a synthetic extractive-QA dataset as two SQuAD v1.1 JSON dicts (train, eval).

    Deterministic: the same ``seed`` gives identical JSON, another seed a different dataset.
    Each paragraph states 4-5 templated facts (two relations stated twice each, sometimes one
    more fact of a third) drawn from births, foundings, inventions, rivers, mountains, towns and
    treaties, and asks one question per fact, so questions have same-type distractors in their
    paragraph. Question and sentence phrasings are
    drawn from several templates per relation. Every answer is the exact substring at
    ``answer_start``. Train and eval use disjoint entity pools (see :func:`entity_pools`).
    """
    for name, n in (("num_train", num_train), ("num_eval", num_eval)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    pools = entity_pools(seed)
    return _split("train", num_train, pools["train"], seed), _split("eval", num_eval, pools["eval"], seed)


# ----------------------------------------------------------------------------- JSON I/O
def write_squad_json(d: Mapping, path: str | os.PathLike) -> str:
    """Write a SQuAD JSON dict to ``path`` (parent folders are created). Returns the path."""
    _validate(d)
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, ensure_ascii=False)
    return path


def _read(source) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    try:
        with open(os.fspath(source), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SquadFormatError(f"{source}: not JSON ({e})") from e


def _field(obj: Any, key: str, where: str, kind: type | tuple[type, ...]):
    if not isinstance(obj, Mapping):
        raise SquadFormatError(f"SQuAD JSON: {where} should be an object, got {type(obj).__name__}")
    if key not in obj:
        raise SquadFormatError(f"SQuAD JSON: {where} is missing the field {key!r}")
    if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
        raise SquadFormatError(f"SQuAD JSON: {where}.{key} has type {type(obj[key]).__name__}")
    return obj[key]


def _validate(d: Any) -> None:
    """Raise :class:`SquadFormatError` naming the first missing/bad field."""
    for i, article in enumerate(_field(d, "data", "top level", list)):
        where = f"data[{i}]"
        _field(article, "title", where, str)
        for j, para in enumerate(_field(article, "paragraphs", where, list)):
            pw = f"{where}.paragraphs[{j}]"
            _field(para, "context", pw, str)
            for k, qa in enumerate(_field(para, "qas", pw, list)):
                qw = f"{pw}.qas[{k}]"
                _field(qa, "id", qw, str)
                _field(qa, "question", qw, str)
                for m, ans in enumerate(_field(qa, "answers", qw, list)):
                    _field(ans, "text", f"{qw}.answers[{m}]", str)
                    _field(ans, "answer_start", f"{qw}.answers[{m}]", int)


def _rows(d: Mapping, answerable_only: bool) -> Iterable[dict]:
    for article in d["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = qa["answers"]
                if qa.get("is_impossible", False):
                    answers = []  # v2 keeps plausible answers apart; an impossible one has none
                if answerable_only and not answers:
                    continue
                yield {"id": qa["id"], "title": article["title"], "context": para["context"],
                       "question": qa["question"],
                       "answers": {"text": [a["text"] for a in answers],
                                   "answer_start": [a["answer_start"] for a in answers]}}


def _features():
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                     "question": Value("string"),
                     "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))}})


def load_squad_json(path, answerable_only: bool = True):
    """Read SQuAD v1.1 or v2 JSON (a path or an already-parsed dict) into a ``datasets.Dataset``.

    Columns: id, title, context, question, answers = {"text": [...], "answer_start": [...]}.
    With ``answerable_only`` (default) v2 questions marked ``is_impossible`` (and any question
    without answers) are dropped; otherwise they are kept with empty answer lists.
    Raises :class:`SquadFormatError` naming the missing field for malformed input.
    """
    from datasets import Dataset

    d = _read(path)
    _validate(d)
    features = _features()
    columns: dict[str, list] = {name: [] for name in features}
    for row in _rows(d, answerable_only):
        for name in columns:
            columns[name].append(row[name])
    if len(set(columns["id"])) != len(columns["id"]):
        raise SquadFormatError("SQuAD JSON: question ids are not unique")
    return Dataset.from_dict(columns, features=features)


# ----------------------------------------------------------------------------- splitting
def _pick_eval_titles(titles: list[str], eval_fraction, eval_titles, seed: int) -> set[str]:
    if eval_titles is not None:
        chosen = set(eval_titles)
        missing = chosen - set(titles)
        if missing:
            raise ValueError(f"eval_titles not in the data: {sorted(missing)}")
    else:
        if len(titles) < 2:
            raise ValueError(f"cannot split {len(titles)} article(s) into train and eval")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        n_eval = min(len(titles) - 1, max(1, math.floor(eval_fraction * len(titles) + 0.5)))
        order = sorted(titles)
        random.Random(seed).shuffle(order)
        chosen = set(order[:n_eval])
    if not chosen or chosen == set(titles):
        raise ValueError("the split leaves train or eval without articles")
    return chosen


def split_by_article(dataset_or_json, eval_fraction: float = 0.2, eval_titles=None, seed: int = 0):
    """Split SQuAD data into (train, eval) by article title, so no article (or context) is shared.

    ``dataset_or_json``: a ``datasets.Dataset`` with a ``title`` column (returns two Datasets),
    or a SQuAD JSON dict / path to one (returns two SQuAD JSON dicts). Either name the eval
    articles with ``eval_titles`` or give ``eval_fraction`` of the articles (at least one, and
    at least one left for train), chosen with ``seed``.
    """
    from datasets import Dataset

    if isinstance(dataset_or_json, Dataset):
        ds = dataset_or_json
        if "title" not in ds.column_names:
            raise SquadFormatError("dataset has no 'title' column to split by")
        titles = list(dict.fromkeys(ds["title"]))
        chosen = _pick_eval_titles(titles, eval_fraction, eval_titles, seed)
        is_eval = [t in chosen for t in ds["title"]]
        return (ds.select([i for i, e in enumerate(is_eval) if not e]),
                ds.select([i for i, e in enumerate(is_eval) if e]))
    d = _read(dataset_or_json)
    _validate(d)
    titles = list(dict.fromkeys(a["title"] for a in d["data"]))
    chosen = _pick_eval_titles(titles, eval_fraction, eval_titles, seed)
    version = d.get("version", "1.1")
    return ({"version": version, "data": [a for a in d["data"] if a["title"] not in chosen]},
            {"version": version, "data": [a for a in d["data"] if a["title"] in chosen]})
