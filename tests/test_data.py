"""Tests of the extractive-QA data layer: synthetic SQuAD generator, SQuAD JSON I/O, QA features,
span post-processing, SQuAD metrics, and a short real fine-tuning run of MiniLM-L6."""

from __future__ import annotations

import collections
import json
import os
import re
import time

import numpy as np
import pytest
import torch

from geta_hf.examples.data import (
    SquadFormatError, entity_pools, generate_squad, load_squad_json, normalize_answer,
    postprocess_predictions, postprocess_qa_predictions, prepare_eval_features,
    prepare_train_features, split_by_article, squad_metrics, squad_v2_metrics, write_squad_json,
)

SLICE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "squad-v2-dev-slice.json")
SLICE = os.path.normpath(SLICE if os.path.exists(SLICE) else "/work/shared/data/squad-v2-dev-slice.json")
NAMED = ("person", "place", "org", "river", "mountain", "object")
YEAR = re.compile(r"(?<![\d,])1[6-9]\d\d(?!\d|,\d)")  # not part of "1,722"


def _qas(d):
    """(title, context, qa) for every question of a SQuAD dict."""
    return [(a["title"], p["context"], qa) for a in d["data"] for p in a["paragraphs"] for qa in p["qas"]]


def _entity_regex(names):
    alternation = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)")


@pytest.fixture(scope="module")
def synthetic():
    return generate_squad(seed=0)


@pytest.fixture(scope="module")
def squad_slice():
    if not os.path.exists(SLICE):
        pytest.fail(f"the real SQuAD slice is missing: {SLICE}")
    return load_squad_json(SLICE)


# ----------------------------------------------------------------------------- generator
def test_generator_sizes_and_determinism(synthetic):
    train, ev = synthetic
    assert len(_qas(train)) == 2000 and len(_qas(ev)) == 500
    assert train["version"] == ev["version"] == "1.1"
    again = generate_squad(seed=0)
    assert json.dumps(again, sort_keys=True) == json.dumps(synthetic, sort_keys=True)
    other = generate_squad(seed=1)
    assert json.dumps(other[0], sort_keys=True) != json.dumps(train, sort_keys=True)
    small = generate_squad(num_train=37, num_eval=11, seed=3)
    assert (len(_qas(small[0])), len(_qas(small[1]))) == (37, 11)
    ids = [qa["id"] for d in synthetic for _, _, qa in _qas(d)]
    assert len(set(ids)) == len(ids)
    with pytest.raises(ValueError, match="num_train"):
        generate_squad(num_train=-1)


def test_generator_is_deterministic_across_processes(synthetic):
    """No dependence on hash randomisation: another interpreter produces the same bytes."""
    import hashlib
    import subprocess
    import sys

    import geta_hf.examples.data.synthetic_squad as mod

    # load the module file alone (stdlib only), so the child does not import torch
    code = ("import hashlib, importlib.util, json, sys; "
            "spec = importlib.util.spec_from_file_location('g', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(hashlib.sha256(json.dumps(m.generate_squad(seed=0)).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, mod.__file__], env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert out == hashlib.sha256(json.dumps(synthetic).encode()).hexdigest()


def test_generator_answers_are_exact_substrings(synthetic):
    for d in synthetic:
        for _, context, qa in _qas(d):
            assert set(qa) == {"id", "question", "answers", "is_impossible"}
            assert qa["is_impossible"] is False and len(qa["answers"]) == 1
            a = qa["answers"][0]
            assert a["text"] and context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
            assert a["text"] == a["text"].strip()


def test_generator_splits_share_no_paragraph_or_entity(synthetic):
    train, ev = synthetic
    train_ctx = {c for _, c, _ in _qas(train)}
    eval_ctx = {c for _, c, _ in _qas(ev)}
    assert not train_ctx & eval_ctx
    assert not {t for t, _, _ in _qas(train)} & {t for t, _, _ in _qas(ev)}
    pools = entity_pools(0)
    for kind in NAMED:
        assert pools["train"][kind] and pools["eval"][kind]
        assert not set(pools["train"][kind]) & set(pools["eval"][kind]), kind
    surnames = {split: {n.split()[-1] for n in pools[split]["person"]} for split in pools}
    assert not surnames["train"] & surnames["eval"]
    # every named entity mentioned in an eval paragraph comes from the eval pools
    train_names = _entity_regex({n for k in NAMED for n in pools["train"][k]})
    assert not [c for c in eval_ctx if train_names.search(c)]


def test_generator_paragraphs_hold_same_type_distractors(synthetic):
    train, _ = synthetic
    pools = entity_pools(0)["train"]
    regex = {k: _entity_regex(pools[k]) for k in NAMED}
    kind_of = {n: k for k in NAMED for n in pools[k]}
    typed = with_distractor = 0
    for _, context, qa in _qas(train):
        answer = qa["answers"][0]["text"]
        if answer in kind_of:
            mentions = set(regex[kind_of[answer]].findall(context))
        elif YEAR.fullmatch(answer):
            mentions = set(YEAR.findall(context))
        else:  # measures, counts, dates, professions
            continue
        assert answer in mentions
        typed += 1
        with_distractor += len(mentions) >= 2
    assert typed >= 0.6 * 2000
    assert with_distractor >= 0.9 * typed, (with_distractor, typed)


def test_generator_question_templates_are_varied(synthetic):
    train, _ = synthetic
    pools = entity_pools(0)["train"]
    names = _entity_regex({n for k in NAMED for n in pools[k]})
    shapes = collections.Counter(re.sub(r"\d[\d,]*", "<N>", names.sub("<E>", qa["question"]))
                                 for _, _, qa in _qas(train))
    assert len(shapes) >= 50, len(shapes)
    assert shapes.most_common(1)[0][1] <= 0.05 * 2000
    answers = collections.Counter(qa["answers"][0]["text"] for _, _, qa in _qas(train))
    assert answers.most_common(1)[0][1] <= 0.02 * 2000  # no degenerate "always the same answer"


def test_synthetic_json_round_trip(synthetic, tmp_path):
    _, ev = synthetic
    path = write_squad_json(ev, tmp_path / "sub" / "eval.json")
    ds = load_squad_json(path)
    assert len(ds) == 500
    assert ds.column_names == ["id", "title", "context", "question", "answers"]
    row = ds[0]
    first = ev["data"][0]["paragraphs"][0]
    assert row["context"] == first["context"]
    assert row["answers"] == {"text": [first["qas"][0]["answers"][0]["text"]],
                              "answer_start": [first["qas"][0]["answers"][0]["answer_start"]]}
    assert len(load_squad_json(ev)) == 500  # a parsed dict works too
    empty = load_squad_json(generate_squad(num_train=0, num_eval=0)[0])
    assert len(empty) == 0 and empty.features == ds.features


# ----------------------------------------------------------------------------- SQuAD JSON I/O
def test_load_real_squad_v2_slice(squad_slice):
    ds = squad_slice
    assert len(ds) == 328
    assert set(ds["title"]) == {"Normans", "Sky_(United_Kingdom)", "Victoria_(Australia)"}
    assert all(r["answers"]["text"] for r in ds)
    for r in ds.select(range(0, 328, 7)):
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start:start + len(text)] == text
    full = load_squad_json(SLICE, answerable_only=False)
    assert len(full) == 665
    assert sum(not r["text"] for r in full["answers"]) == 665 - 328


def test_split_by_article(squad_slice, tmp_path):
    train, ev = split_by_article(squad_slice, eval_titles=["Normans"])
    assert set(ev["title"]) == {"Normans"} and "Normans" not in set(train["title"])
    assert len(train) + len(ev) == 328
    assert not set(train["context"]) & set(ev["context"])
    tr2, ev2 = split_by_article(squad_slice, eval_fraction=0.34, seed=0)
    assert len(set(tr2["title"])) == 2 and len(set(ev2["title"])) == 1
    assert split_by_article(squad_slice, eval_fraction=0.34, seed=0)[1]["id"] == ev2["id"]
    # the same on the raw JSON: two SQuAD dicts that load back as disjoint datasets
    jtrain, jeval = split_by_article(SLICE, eval_titles=["Sky_(United_Kingdom)"])
    assert [a["title"] for a in jeval["data"]] == ["Sky_(United_Kingdom)"]
    loaded = load_squad_json(write_squad_json(jtrain, tmp_path / "train.json"))
    assert len(loaded) + len(load_squad_json(jeval)) == 328
    with pytest.raises(ValueError, match="not in the data"):
        split_by_article(squad_slice, eval_titles=["Paris"])
    with pytest.raises(ValueError, match="without articles"):
        split_by_article(squad_slice, eval_titles=sorted(set(squad_slice["title"])))


def test_bad_squad_json_names_the_missing_field(tmp_path):
    with pytest.raises(SquadFormatError, match="'data'"):
        load_squad_json({"version": "1.1"})
    with pytest.raises(SquadFormatError, match=r"data\[0\].*'paragraphs'"):
        load_squad_json({"data": [{"title": "t"}]})
    bad_qa = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "1"}]}]}]}
    with pytest.raises(SquadFormatError, match=r"qas\[0\].*'question'"):
        load_squad_json(bad_qa)
    bad_start = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "c", "answer_start": "0"}]}]}]}]}
    with pytest.raises(SquadFormatError, match="answer_start"):
        load_squad_json(bad_start)
    path = tmp_path / "x.json"
    path.write_text("not json")
    with pytest.raises(SquadFormatError, match="not JSON"):
        load_squad_json(path)


# ----------------------------------------------------------------------------- QA features
def _features(ds, tok, side, max_length=128, stride=32):
    tok.padding_side = side
    try:
        train = ds.map(lambda b: prepare_train_features(b, tok, max_length, stride), batched=True,
                       remove_columns=ds.column_names)
        ev = ds.map(lambda b: prepare_eval_features(b, tok, max_length, stride), batched=True,
                    remove_columns=ds.column_names)
    finally:
        tok.padding_side = "right"
    return train, ev


@pytest.fixture(scope="module", params=["right", "left"])
def slice_features(request, squad_slice, minilm):
    _, tok = minilm
    train, ev = _features(squad_slice, tok, request.param)
    return request.param, train, ev


def test_train_features_label_the_gold_span(slice_features, squad_slice, minilm):
    side, train, ev = slice_features
    _, tok = minilm
    assert len(train) == len(ev) > 1.5 * len(squad_slice)  # contexts overflow into several windows
    assert set(train.column_names) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}
    examples = {r["id"]: r for r in squad_slice}
    exact = inside = 0
    found = set()
    for i in range(len(train)):
        f, t = ev[i], train[i]
        assert f["input_ids"] == t["input_ids"] and len(f["input_ids"]) == 128
        ex = examples[f["example_id"]]
        cls = f["input_ids"].index(tok.cls_token_id)
        # right padding: question then context; left padding: context then question
        assert (f["offset_mapping"][cls + 1] is None) == (side == "right")
        ctx = [o for o in f["offset_mapping"] if o is not None]
        a0 = ex["answers"]["answer_start"][0]
        a1 = a0 + len(ex["answers"]["text"][0])
        s, e = t["start_positions"], t["end_positions"]
        if not (ctx[0][0] <= a0 and a1 <= ctx[-1][1]):
            assert s == e == cls
            continue
        inside += 1
        found.add(f["example_id"])
        offs = f["offset_mapping"]
        assert s != cls and s <= e and offs[s] is not None and offs[e] is not None
        text = ex["context"][offs[s][0]:offs[e][1]]
        exact += normalize_answer(text) == normalize_answer(ex["answers"]["text"][0])
        assert ex["answers"]["text"][0].strip() in text  # span never cuts the answer
        assert len(text) <= len(ex["answers"]["text"][0]) + 12
    assert found == set(examples)  # every answer fits in at least one window
    assert exact >= 0.99 * inside
    if side == "left":
        assert any(f[0] == tok.pad_token_id for f in train["input_ids"])  # padding was on the left


def _oracle_logits(train, cls_id, shift=0):
    """Logits that put all mass on the gold token span (CLS for windows without the answer);
    ``shift`` moves every gold span right by that many tokens."""
    start = np.zeros((len(train), 128))
    end = np.zeros((len(train), 128))
    for i, (ids, s, e) in enumerate(zip(train["input_ids"], train["start_positions"],
                                        train["end_positions"])):
        if s == e and ids[s] == cls_id:  # no answer in this window
            start[i, s] = end[i, e] = 5.0
        else:
            start[i, min(s + shift, 127)] = end[i, min(e + shift, 127)] = 10.0
    return start, end


def test_oracle_round_trip_scores_100(slice_features, squad_slice, minilm):
    side, train, ev = slice_features
    cls_id = minilm[1].cls_token_id
    preds = postprocess_predictions(squad_slice, ev, *_oracle_logits(train, cls_id))
    assert set(preds) == set(squad_slice["id"])
    assert squad_metrics(preds, squad_slice) == {"exact_match": 100.0, "f1": 100.0}
    # torch tensors and a (start, end) tuple, as Trainer.predict returns them
    s, e = _oracle_logits(train, cls_id)
    assert postprocess_predictions(squad_slice, ev, (torch.tensor(s), torch.tensor(e))) == preds


def test_shifted_or_wrong_predictions_score_lower(slice_features, squad_slice, minilm):
    side, train, ev = slice_features
    logits = _oracle_logits(train, minilm[1].cls_token_id, shift=1)
    shifted = squad_metrics(postprocess_predictions(squad_slice, ev, *logits), squad_slice)
    assert shifted["exact_match"] < 40 and 10 < shifted["f1"] < 90
    assert shifted["f1"] > shifted["exact_match"]
    ids = squad_slice["id"]
    gold = [a["text"][0] for a in squad_slice["answers"]]
    wrong = {i: gold[(k + 1) % len(ids)] for k, i in enumerate(ids)}  # the next question's answer
    assert squad_metrics(wrong, squad_slice)["exact_match"] < 5


def test_feature_errors_are_clear(minilm):
    _, tok = minilm
    batch = {"id": ["1"], "question": ["Who? " * 40], "context": ["a b c"],
             "answers": [{"text": ["a"], "answer_start": [0]}]}
    with pytest.raises(ValueError, match="max_length"):
        prepare_train_features(batch, tok, max_length=32, doc_stride=8)
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_eval_features(batch, tok, max_length=32, doc_stride=32)
    with pytest.raises(KeyError, match="answers"):
        prepare_train_features({"question": ["q"], "context": ["c"]}, tok)


def test_unanswerable_and_unpadded_features(minilm):
    _, tok = minilm
    batch = {"id": ["a", "b", "c"], "question": ["  Who won?", "Where?", "Who?"],
             "context": ["Ann won.", "Nowhere.", "The winner was Bob Li"],
             "answers": [{"text": ["Ann"], "answer_start": [0]}, {"text": [], "answer_start": []},
                         {"text": [" Bob Li "], "answer_start": [14]}]}
    out = prepare_train_features(batch, tok, max_length=32, doc_stride=8, pad_to_max_length=False)
    assert [len(x) for x in out["input_ids"]] == [9, 7, 10]  # [CLS] who won ? [SEP] ann won . [SEP]
    # "Ann"; no answer -> CLS; an answer ending the context (whitespace in the label ignored)
    assert out["start_positions"] == [5, 0, 7] and out["end_positions"] == [5, 0, 8]


# ----------------------------------------------------------------------------- post-processing
def _toy_features():
    # one example, two windows; "offset_mapping" None marks question/special tokens
    context = "alpha beta gamma delta epsilon"
    offs = [None, None, (0, 5), (6, 10), (11, 16), (17, 22), (23, 30), None]
    return ({"id": ["x"], "context": [context]},
            {"example_id": ["x", "x"], "offset_mapping": [offs, offs[:6] + [None, None]]})


def test_postprocess_span_rules():
    examples, features = _toy_features()
    start = np.full((2, 8), -10.0)
    end = np.full((2, 8), -10.0)
    start[0, 0] = end[0, 0] = 100.0  # CLS/question tokens are never answers
    start[0, 2], start[0, 5] = 3.0, 9.0
    end[0, 3], end[0, 4], end[0, 5] = 9.0, 3.0, -9.0
    # (5, 3) scores 18 but ends before it starts; the best valid span is (2, 3)
    assert postprocess_predictions(examples, features, start, end)["x"] == "alpha beta"
    # one token at most: (5, 5) scores 0 > (3, 3) = -1
    assert postprocess_predictions(examples, features, start, end, max_answer_length=1)["x"] == "delta"
    start[1, 4], end[1, 5] = 20.0, 20.0  # a better span in the second window
    assert postprocess_predictions(examples, features, start, end)["x"] == "gamma delta"
    start[1, 6] = end[1, 6] = 50.0  # beyond window 2's context: ignored
    assert postprocess_predictions(examples, features, start, end)["x"] == "gamma delta"
    # n_best_size=1 in window 1 alone: only (5, 3) is searched, which is invalid -> no answer
    window1 = {"example_id": ["x"], "offset_mapping": features["offset_mapping"][:1]}
    assert postprocess_predictions(examples, window1, start[:1], end[:1], n_best_size=1)["x"] == ""
    assert postprocess_predictions(examples, window1, start[:1], end[:1], n_best_size=2)["x"] == "alpha beta"
    # logits padded wider than the features (Trainer pads with -100)
    wide_s = np.full((2, 12), -100.0)
    wide_e = wide_s.copy()
    wide_s[:, :8], wide_e[:, :8] = start, end
    assert postprocess_predictions(examples, features, wide_s, wide_e)["x"] == "gamma delta"
    with pytest.raises(ValueError, match="rows of logits"):
        postprocess_predictions(examples, features, start[:1], end[:1])


def test_postprocess_n_best_search_matches_brute_force():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    context = " ".join(words)
    offs, pos = [None, None, None], 0
    for w in words:
        offs.append((pos, pos + len(w)))
        pos += len(w) + 1
    offs.append(None)
    n = len(offs)
    start, end = rng.normal(size=(1, n)), rng.normal(size=(1, n))
    pred = postprocess_predictions({"id": ["q"], "context": [context]},
                                   {"example_id": ["q"], "offset_mapping": [offs]}, start, end,
                                   n_best_size=n, max_answer_length=5)["q"]
    best = max((start[0, i] + end[0, j], i, j)
               for i in range(3, n - 1) for j in range(i, min(i + 5, n - 1)))
    assert pred == context[offs[best[1]][0]:offs[best[2]][1]]


def test_postprocess_nbest_matches_best_span_and_is_ranked():
    rng = np.random.default_rng(3)
    examples, features = _toy_features()
    for _ in range(20):
        start, end = rng.normal(size=(2, 8)), rng.normal(size=(2, 8))
        out = postprocess_qa_predictions(examples, features, start, end, n_best_size=4)
        assert out.predictions == postprocess_predictions(examples, features, start, end, n_best_size=4)
        nb = out.nbest["x"]
        assert 1 <= len(nb) <= 4 and nb[0]["text"] == out.predictions["x"] and out.null_odds is None
        scores = [e["start_logit"] + e["end_logit"] for e in nb]
        assert scores == sorted(scores, reverse=True)
        assert sum(e["probability"] for e in nb) == pytest.approx(1.0)
        assert all(e["text"] for e in nb)  # v1: no null answer in the list


def test_postprocess_v2_null_answer_and_threshold():
    examples, features = _toy_features()
    features = dict(features, cls_index=[0, 0])
    start, end = np.zeros((2, 8)), np.zeros((2, 8))
    start[0, 2] = end[0, 3] = 2.0  # best span "alpha beta": 4.0
    start[:, 0] = end[:, 0] = 3.0  # null scores 6.0 in both windows ...
    start[1, 0] = 1.0  # ... except window 2: 4.0, and the lowest null score counts
    out = postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=True)
    assert out.null_odds["x"] == pytest.approx(0.0) and out.predictions["x"] == "alpha beta"
    start[1, 0] = 2.5  # null 5.5 > 4.0: no answer
    out = postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=True)
    assert out.null_odds["x"] == pytest.approx(1.5) and out.predictions["x"] == ""
    assert out.nbest["x"][0]["text"] == "" and sum(e["probability"] for e in out.nbest["x"]) == pytest.approx(1)
    out = postprocess_qa_predictions(examples, features, start, end, version_2_with_negative=True,
                                     null_score_diff_threshold=2.0)
    assert out.predictions["x"] == "alpha beta"  # 1.5 <= threshold: answer
    # the null answer stays in a full n-best list even when it ranks below it
    start[:, 0] = end[:, 0] = -50.0
    out = postprocess_qa_predictions(examples, features, start, end, n_best_size=2,
                                     version_2_with_negative=True)
    assert [e["text"] for e in out.nbest["x"]][-1] == "" and len(out.nbest["x"]) == 3


# ----------------------------------------------------------------------------- metrics
def test_squad_metrics_hand_computed():
    assert squad_metrics({"q": "The Eiffel Tower!"}, {"q": ["eiffel tower"]}) == \
        {"exact_match": 100.0, "f1": 100.0}
    m = squad_metrics({"q": "Norman conquest of England"}, {"q": ["the conquest of England"]})
    assert m["exact_match"] == 0 and m["f1"] == pytest.approx(100 * 6 / 7)
    m = squad_metrics({"q": "x x y"}, {"q": ["x y y"]})
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert squad_metrics({"q": "Paris"}, {"q": ["London", "paris."]})["exact_match"] == 100
    assert squad_metrics({"a": "1"}, {"a": ["1"], "b": ["2"]}) == {"exact_match": 50.0, "f1": 50.0}
    assert squad_metrics([{"id": "a", "prediction_text": "an apple"}],
                         [{"id": "a", "answers": {"text": ["apple"], "answer_start": [0]}}])["f1"] == 100
    assert normalize_answer("  The  U.S.  (army) ") == "us army"


def test_squad_metrics_agree_with_torchmetrics(squad_slice):
    tm = pytest.importorskip("torchmetrics.functional.text")
    rng = np.random.default_rng(1)
    preds = {}
    for r in squad_slice:
        words = r["context"].split()
        k = int(rng.integers(0, len(words) - 3))
        choice = rng.integers(0, 3)
        preds[r["id"]] = (r["answers"]["text"][0] if choice == 0 else
                          r["answers"]["text"][-1] + " " + words[k] if choice == 1 else
                          " ".join(words[k:k + 3]))
    ours = squad_metrics(preds, squad_slice)
    theirs = tm.squad([{"id": i, "prediction_text": t} for i, t in preds.items()],
                      [{"id": r["id"], "answers": r["answers"]} for r in squad_slice])
    assert ours["exact_match"] == pytest.approx(float(theirs["exact_match"]), abs=1e-3)
    assert ours["f1"] == pytest.approx(float(theirs["f1"]), abs=1e-3)
    assert 20 < ours["f1"] < 80


def test_squad_v2_metrics_hand_computed():
    refs = {"a": ["Paris"], "b": [], "c": ["the Alps", "Alps"], "d": []}
    m = squad_v2_metrics({"a": "paris", "b": "", "c": "Alps mountains", "d": "something"}, refs)
    assert m["HasAns_total"] == 2 and m["NoAns_total"] == 2 and m["total"] == 4
    assert m["HasAns_exact"] == 50 and m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["NoAns_exact"] == m["NoAns_f1"] == 50
    assert m["exact_match"] == 50 and m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4)
    assert "NoAns_f1" not in squad_v2_metrics({"a": "Paris"}, {"a": ["Paris"]})
    assert squad_v2_metrics({}, {"b": []})["exact_match"] == 0  # a missing prediction scores 0


def test_squad_v2_metrics_on_answerable_data_agree_with_torchmetrics(squad_slice):
    from geta_hf.examples.tasks import squad_scores

    rng = np.random.default_rng(2)
    preds = {r["id"]: (r["answers"]["text"][-1] if rng.random() < 0.4 else
                       " ".join(r["context"].split()[:int(rng.integers(1, 6))])) for r in squad_slice}
    v1 = squad_scores(preds, squad_slice)  # torchmetrics
    v2 = squad_v2_metrics(preds, squad_slice)
    assert v2["exact_match"] == pytest.approx(v1["exact_match"], abs=1e-4)
    assert v2["f1"] == pytest.approx(v1["f1"], abs=1e-4) and 20 < v1["f1"] < 80
    assert v2["HasAns_f1"] == v2["f1"] and "NoAns_total" not in v2
    with pytest.raises(ValueError, match="version_2_with_negative"):
        squad_scores({"q": ""}, [{"id": "q", "answers": {"text": [], "answer_start": []}}])


# ----------------------------------------------------------------------------- fine-tuning
# Measured (2 threads, seed 0): F1 ~4 untrained; 44 / 92 / 96 after 40 / 60 / 80 steps. Other
# seeds cross over later (seed 1: 30 / 49 / 67), hence 80 steps and a threshold of 40.
FT_STEPS = 80
FT_LR = 2e-4


def test_minilm_learns_the_synthetic_task(minilm, tmp_path):
    """Plain transformers.Trainer (no GETA): a short fine-tune lifts F1 far above the untrained head.

    Dropout is off: on 80 steps it roughly halves the steps the model needs to start using the
    question (with dropout 0.1 seed 0 reaches only F1 53 at step 80).
    """
    import transformers
    from tiny_models import minilm_dir

    _, tok = minilm
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(0)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(
        minilm_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    train_json, eval_json = generate_squad(num_train=FT_STEPS * 16, num_eval=150, seed=0)
    train, ev = load_squad_json(train_json), load_squad_json(eval_json)
    kw = dict(max_length=128, doc_stride=32, pad_to_max_length=False)
    train_f = train.map(lambda b: prepare_train_features(b, tok, **kw), batched=True,
                        remove_columns=train.column_names)
    eval_f = ev.map(lambda b: prepare_eval_features(b, tok, **kw), batched=True,
                    remove_columns=ev.column_names)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=64,
        max_steps=FT_STEPS, learning_rate=FT_LR, lr_scheduler_type="constant_with_warmup",
        warmup_steps=0.1, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_f, processing_class=tok)

    def f1():
        out = trainer.predict(eval_f.remove_columns(["example_id", "offset_mapping"]))
        return squad_metrics(postprocess_predictions(ev, eval_f, out.predictions), ev)["f1"]

    before = f1()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = f1()
    msg = (f"MiniLM-L6 synthetic SQuAD: F1 {before:.1f} -> {after:.1f} after {FT_STEPS} steps "
           f"({seconds:.0f} s wall, {cpu:.0f} s CPU)")
    print(msg)
    assert before < 15, msg
    assert after > 40, msg
