"""The Hugging Face extractive-QA pipeline: features, span post-processing and SQuAD metrics.

Same semantics as the ``run_qa.py`` example of transformers, as library functions:

* :func:`prepare_train_features` / :func:`prepare_eval_features` are ``Dataset.map(batched=True)``
  functions that split long contexts into overlapping windows (``doc_stride`` tokens of overlap)
  and label each window with the answer's token span, or with the CLS index when the answer is
  not fully inside the window.
* :func:`postprocess_predictions` turns per-window start/end logits back into one answer string
  per example (best-scoring valid span over all windows of the example).
* :func:`postprocess_qa_predictions` does the same with the n-best list of every example and,
  for SQuAD v2, the null ("no answer") decision with ``null_score_diff_threshold``, as the
  example writes them to ``predictions.json`` / ``nbest_predictions.json`` / ``null_odds.json``.
* :func:`squad_metrics` is the official SQuAD v1.1 exact match / F1 (0-100);
  :func:`squad_v2_metrics` the official SQuAD v2.0 one (overall, HasAns and NoAns scores).

Tokenizers that pad on the left get the context first and the question second (truncating the
first sequence), as in the HF example; all positions are found through ``sequence_ids`` so the
padding side never shifts them. A fast tokenizer (offset mappings) is required.

Three deliberate refinements over the example: answer labels ignore surrounding whitespace in the
answer text; an answer whose first token is the window's last context token is labelled
correctly (the example's offset scan can run past the context there); and the n-best search
ranks only context tokens, so a window whose top logits sit on question tokens still yields its
best valid span.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "prepare_train_features", "prepare_eval_features", "postprocess_predictions",
    "postprocess_qa_predictions", "QAPredictions", "squad_metrics", "squad_v2_metrics",
    "normalize_answer",
]


# ----------------------------------------------------------------------------- features
def _tokenize(examples: Mapping[str, Sequence], tokenizer, max_length: int, doc_stride: int,
              pad_to_max_length: bool):
    """Tokenize question/context pairs into overflowing windows; returns (encoding, context id)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("QA features need a fast tokenizer (offset mappings); "
                         f"{type(tokenizer).__name__} is not one")
    if not 0 <= doc_stride < max_length:
        raise ValueError(f"doc_stride ({doc_stride}) must be >= 0 and < max_length ({max_length})")
    for col in ("question", "context"):
        if col not in examples:
            raise KeyError(f"examples have no {col!r} column")
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]  # leading spaces waste window tokens
    contexts = list(examples["context"])
    pair = (questions, contexts) if pad_on_right else (contexts, questions)
    try:
        enc = tokenizer(*pair, truncation="only_second" if pad_on_right else "only_first",
                        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True,
                        padding="max_length" if pad_to_max_length else False)
    except Exception as e:
        if "truncat" not in str(e).lower():
            raise
        longest = max(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions)
        raise ValueError(f"max_length={max_length} leaves no room for the context after the question "
                         f"(longest question: {longest} tokens) with doc_stride={doc_stride}; "
                         "raise max_length or lower doc_stride") from e
    return enc, 1 if pad_on_right else 0


def _context_span(enc, i: int, context_id: int) -> np.ndarray:
    """Token indices of feature ``i`` that belong to the context."""
    seq = enc.sequence_ids(i)
    return np.fromiter((j for j, s in enumerate(seq) if s == context_id), dtype=np.int64)


def _cls_index(input_ids: list[int], tokenizer) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def _answer_chars(answers: Mapping[str, list]) -> tuple[int, int] | None:
    """(start, end) character span of the first answer, whitespace trimmed; None if no answer."""
    if not answers["answer_start"]:
        return None
    text = answers["text"][0]
    start = answers["answer_start"][0] + len(text) - len(text.lstrip())
    return start, start + len(text.strip())


def _token_span(offsets, ctx: np.ndarray, span: tuple[int, int] | None, cls: int) -> tuple[int, int]:
    """A feature's label: first/last answer token, or (cls, cls) if the answer is not inside."""
    if span is None or ctx.size == 0:
        return cls, cls
    offs = np.asarray(offsets, dtype=np.int64)[ctx]
    a, b = span
    if offs[0, 0] > a or offs[-1, 1] < b:
        return cls, cls
    # last context token starting at/before the answer, first one ending at/after it
    return int(ctx[np.flatnonzero(offs[:, 0] <= a)[-1]]), int(ctx[np.flatnonzero(offs[:, 1] >= b)[0]])


def prepare_train_features(examples, tokenizer, max_length: int = 384, doc_stride: int = 128,
                           pad_to_max_length: bool = True) -> dict[str, list]:
    """Tokenize a batch of SQuAD examples into training features (``Dataset.map(batched=True)``).

    ``examples`` is a batch dict with ``question``, ``context`` and ``answers``
    ({"text": [...], "answer_start": [...]}; the first answer is the label). A context longer than
    the window yields several features that overlap by ``doc_stride`` tokens. Each feature gets
    ``start_positions``/``end_positions``: the first/last token of the answer when the whole answer
    lies inside the window's context, else the CLS index (also for unanswerable examples).
    Without ``pad_to_max_length`` features are unpadded (use a padding collator).
    """
    if "answers" not in examples:
        raise KeyError("examples have no 'answers' column")
    enc, context_id = _tokenize(examples, tokenizer, max_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, sample in enumerate(sample_map):
        s, e = _token_span(offsets_all[i], _context_span(enc, i, context_id),
                           _answer_chars(examples["answers"][sample]),
                           _cls_index(enc["input_ids"][i], tokenizer))
        starts.append(s)
        ends.append(e)
    out = dict(enc)
    out["start_positions"], out["end_positions"] = starts, ends
    return out


def prepare_eval_features(examples, tokenizer, max_length: int = 384, doc_stride: int = 128,
                          pad_to_max_length: bool = True) -> dict[str, list]:
    """Tokenize a batch of SQuAD examples into evaluation features (``Dataset.map(batched=True)``).

    Windows as in :func:`prepare_train_features`. Each feature keeps ``example_id`` (the
    example's ``id``), ``offset_mapping`` with ``None`` for every token that is not part of the
    context, which is what :func:`postprocess_predictions` needs to map spans back to text, and
    ``cls_index`` (the token whose start/end logits score "no answer" in SQuAD v2).
    """
    if "id" not in examples:
        raise KeyError("examples have no 'id' column")
    enc, context_id = _tokenize(examples, tokenizer, max_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    example_ids, offsets, cls = [], [], []
    for i, sample in enumerate(sample_map):
        example_ids.append(examples["id"][sample])
        seq = enc.sequence_ids(i)
        offsets.append([tuple(o) if s == context_id else None
                        for o, s in zip(enc["offset_mapping"][i], seq)])
        cls.append(_cls_index(enc["input_ids"][i], tokenizer))
    out = dict(enc)
    out["example_id"], out["offset_mapping"], out["cls_index"] = example_ids, offsets, cls
    return out


# ----------------------------------------------------------------------------- post-processing
def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _offset_arrays(offset_mapping: Sequence, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(F, L) character starts/ends of context tokens (-1 elsewhere, incl. logit padding)."""
    starts = np.full((len(offset_mapping), length), -1, dtype=np.int64)
    ends = starts.copy()
    for f, offs in enumerate(offset_mapping):
        offs = offs[:length]
        keep = [j for j, o in enumerate(offs) if o is not None]
        if keep:
            arr = np.asarray([offs[j] for j in keep], dtype=np.int64)
            starts[f, keep], ends[f, keep] = arr[:, 0], arr[:, 1]
    return starts, ends


def _top_spans(start: np.ndarray, end: np.ndarray, valid: np.ndarray, n_best: int,
               max_answer_length: int, top: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``top`` best (score, start, end) per feature, best first, among the ``n_best`` best
    starts x ends; vectorised. Returns three (features, top) arrays.

    Only context tokens are candidates; a span needs ``start <= end`` and at most
    ``max_answer_length`` tokens. Slots without a valid span get score -inf.
    """
    n_feat, length = start.shape
    k = max(1, min(n_best, length))
    ms, me = np.where(valid, start, -np.inf), np.where(valid, end, -np.inf)
    si = np.argpartition(-ms, k - 1, axis=1)[:, :k] if k < length else np.tile(np.arange(length), (n_feat, 1))
    ei = np.argpartition(-me, k - 1, axis=1)[:, :k] if k < length else si.copy()
    scores = np.take_along_axis(ms, si, 1)[:, :, None] + np.take_along_axis(me, ei, 1)[:, None, :]
    span_len = ei[:, None, :] - si[:, :, None] + 1
    scores = np.where((span_len >= 1) & (span_len <= max_answer_length), scores, -np.inf)
    flat = scores.reshape(n_feat, -1)
    if top <= 1:
        order = flat.argmax(1)[:, None]
    else:
        order = np.argsort(-flat, axis=1, kind="stable")[:, :top]
    return (np.take_along_axis(flat, order, 1), np.take_along_axis(si, order // k, 1),
            np.take_along_axis(ei, order % k, 1))


def _logit_arrays(start_logits, end_logits) -> tuple[np.ndarray, np.ndarray]:
    if end_logits is None:  # a (start, end, ...) tuple, e.g. Trainer.predict(...).predictions
        start_logits, end_logits = start_logits[0], start_logits[1]
    start, end = _as_numpy(start_logits), _as_numpy(end_logits)
    if start.ndim != 2 or start.shape != end.shape:
        raise ValueError(f"start/end logits must be two (features, seq_len) arrays of one shape, "
                         f"got {start.shape} and {end.shape}")
    return start, end


def _feature_columns(features, n_rows: int) -> tuple[list, list]:
    """(example ids, offset mappings) of ``features``, checked against the logits' row count."""
    columns = getattr(features, "column_names", None) or list(features)
    for col in ("example_id", "offset_mapping"):
        if col not in columns:
            raise KeyError(f"features have no {col!r} column (use prepare_eval_features)")
    feature_ids = list(features["example_id"])
    if len(feature_ids) != n_rows:
        raise ValueError(f"{len(feature_ids)} features but {n_rows} rows of logits")
    return feature_ids, list(features["offset_mapping"])


def postprocess_predictions(examples, features, start_logits, end_logits=None, n_best_size: int = 20,
                            max_answer_length: int = 30) -> dict[str, str]:
    """Map per-feature start/end logits back to one answer string per example.

    ``examples``: rows with ``id`` and ``context``; ``features``: the output of
    :func:`prepare_eval_features` (``example_id``, ``offset_mapping``), in the same order as the
    logits, which are (num_features, seq_len) arrays or tensors (a ``(start, end)`` tuple may be
    passed as ``start_logits``, e.g. ``Trainer.predict(...).predictions``; rows padded with -100
    by the Trainer are fine). For each example, the span with the highest ``start + end`` logit
    over all its features, among the ``n_best_size`` best start and end context tokens, with
    ``start <= end`` and at most ``max_answer_length`` tokens, is returned as
    ``context[char_start:char_end]``; "" if no valid span exists. Returns ``{example_id: text}``.
    """
    start, end = _logit_arrays(start_logits, end_logits)
    feature_ids, offsets = _feature_columns(features, start.shape[0])
    char_start, char_end = _offset_arrays(offsets, start.shape[1])
    scores, s_idx, e_idx = (a[:, 0] for a in _top_spans(start, end, char_start >= 0, n_best_size,
                                                        max_answer_length))

    contexts = dict(zip(examples["id"], examples["context"]))
    best: dict[str, tuple[float, int]] = {}  # example id -> (score, feature)
    for f, ex_id in enumerate(feature_ids):
        if ex_id not in contexts:
            raise KeyError(f"feature {f} refers to unknown example id {ex_id!r}")
        if np.isfinite(scores[f]) and (ex_id not in best or scores[f] > best[ex_id][0]):
            best[ex_id] = (float(scores[f]), f)
    out = {}
    for ex_id, context in contexts.items():
        if ex_id in best:
            f = best[ex_id][1]
            out[ex_id] = context[char_start[f, s_idx[f]]:char_end[f, e_idx[f]]]
        else:
            out[ex_id] = ""
    return out


@dataclass
class QAPredictions:
    """What :func:`postprocess_qa_predictions` returns (the files of transformers' example).

    ``predictions``: ``{example id: answer text}`` ("" = no answer); ``nbest``: ``{example id:
    [{"text", "probability", "start_logit", "end_logit"}, ...]}`` best first (SQuAD v2 lists
    include the null answer ``""``); ``null_odds`` (SQuAD v2 only): ``{example id: null score -
    best span score}`` (None where the example has no valid span).
    """

    predictions: dict[str, str]
    nbest: dict[str, list[dict]]
    null_odds: Optional[dict[str, Optional[float]]] = None


def _nbest_entry(text: str, start_logit: float, end_logit: float) -> dict:
    return {"text": text, "start_logit": float(start_logit), "end_logit": float(end_logit)}


def _with_probabilities(entries: list[dict]) -> list[dict]:
    """Softmax of ``start_logit + end_logit`` over the n-best entries, as ``probability``."""
    if entries:
        scores = np.array([e["start_logit"] + e["end_logit"] for e in entries])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for e, p in zip(entries, probs):
            e["probability"] = float(p)
    return entries


def postprocess_qa_predictions(examples, features, start_logits, end_logits=None,
                               n_best_size: int = 20, max_answer_length: int = 30,
                               version_2_with_negative: bool = False,
                               null_score_diff_threshold: float = 0.0) -> QAPredictions:
    """Answers, n-best lists and (SQuAD v2) null decisions from per-feature start/end logits.

    Inputs and span rules as for :func:`postprocess_predictions` (whose answers this returns for
    SQuAD v1). Each example's n-best list holds its ``n_best_size`` best valid spans over all its
    features, with a softmax ``probability`` over the list.

    With ``version_2_with_negative``, the null answer scores ``start + end`` logit at the
    feature's ``cls_index`` (column of :func:`prepare_eval_features`; index 0 without it), its
    lowest value over the example's features; it joins the n-best list, and the example is
    answered "" when ``null score - best span score > null_score_diff_threshold`` (the rule of
    transformers' example; that difference is ``null_odds[id]``).
    """
    start, end = _logit_arrays(start_logits, end_logits)
    feature_ids, offsets = _feature_columns(features, start.shape[0])
    char_start, char_end = _offset_arrays(offsets, start.shape[1])
    top = max(1, n_best_size)
    scores, s_idx, e_idx = _top_spans(start, end, char_start >= 0, n_best_size, max_answer_length, top)
    columns = getattr(features, "column_names", None) or list(features)
    cls = np.asarray(features["cls_index"] if "cls_index" in columns else np.zeros(len(feature_ids)),
                     dtype=np.int64)
    rows = np.arange(start.shape[0])
    null_start, null_end = start[rows, cls], end[rows, cls]

    by_example: dict[str, list[int]] = collections.defaultdict(list)
    contexts = dict(zip(examples["id"], examples["context"]))
    for f, ex_id in enumerate(feature_ids):
        if ex_id not in contexts:
            raise KeyError(f"feature {f} refers to unknown example id {ex_id!r}")
        by_example[ex_id].append(f)

    predictions, nbest = {}, {}
    null_odds: Optional[dict] = {} if version_2_with_negative else None
    for ex_id, context in contexts.items():
        feats = by_example.get(ex_id, [])
        cands = sorted(((scores[f, j], f, j) for f in feats for j in range(scores.shape[1])
                        if np.isfinite(scores[f, j])), key=lambda c: -c[0])[:top]
        spans = [_nbest_entry(context[char_start[f, s_idx[f, j]]:char_end[f, e_idx[f, j]]],
                              start[f, s_idx[f, j]], end[f, e_idx[f, j]]) for _, f, j in cands]
        entries, answer = list(spans), spans[0]["text"] if spans else ""
        if version_2_with_negative and feats:
            f0 = min(feats, key=lambda f: null_start[f] + null_end[f])
            null = _nbest_entry("", null_start[f0], null_end[f0])
            null_score = null["start_logit"] + null["end_logit"]
            entries = sorted(spans + [null], key=lambda e: -(e["start_logit"] + e["end_logit"]))
            entries = entries[:top] + ([] if any(e is null for e in entries[:top]) else [null])
            if spans:
                diff = null_score - (spans[0]["start_logit"] + spans[0]["end_logit"])
                null_odds[ex_id] = float(diff)
                answer = "" if diff > null_score_diff_threshold else answer
            else:
                null_odds[ex_id] = None
        predictions[ex_id] = answer
        nbest[ex_id] = _with_probabilities(entries)
    return QAPredictions(predictions=predictions, nbest=nbest, null_odds=null_odds)


# ----------------------------------------------------------------------------- metrics
_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Official SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD v2 rule for empty answers
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(answers: Any) -> list[str]:
    if isinstance(answers, Mapping):
        answers = answers["text"]
    if isinstance(answers, str):
        answers = [answers]
    return list(answers) or [""]  # an unanswerable question expects the empty answer


def _as_references(references) -> dict[str, list[str]]:
    if isinstance(references, Mapping):
        return {k: _gold_texts(v) for k, v in references.items()}
    refs = {}
    for row in references:
        if not isinstance(row, Mapping) or "id" not in row or "answers" not in row:
            raise ValueError("references must be {id: answers} or rows with 'id' and 'answers'")
        refs[row["id"]] = _gold_texts(row["answers"])
    return refs


def _as_predictions(predictions) -> dict[str, str]:
    if isinstance(predictions, Mapping):
        return dict(predictions)
    return {row["id"]: row["prediction_text"] for row in predictions}


def squad_metrics(predictions, references) -> dict[str, float]:
    """Official SQuAD v1.1 exact match and F1, on a 0-100 scale, averaged over the references.

    ``predictions``: ``{id: text}`` or rows ``{"id", "prediction_text"}``. ``references``:
    ``{id: [gold texts]}`` / ``{id: {"text": [...]}}`` or rows with ``id`` and ``answers`` (e.g. a
    SQuAD ``datasets.Dataset``). Each question scores its best match over its gold answers; a
    question without a prediction scores 0 (as in the official script).
    """
    refs, preds = _as_references(references), _as_predictions(predictions)
    if not refs:
        raise ValueError("no references to score")
    em = f1 = 0.0
    for qid, golds in refs.items():
        if qid not in preds:
            continue
        pred = preds[qid]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(_f1(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / len(refs), "f1": 100.0 * f1 / len(refs)}


def _raw_gold_texts(answers: Any) -> list[str]:
    if isinstance(answers, Mapping):
        answers = answers["text"]
    return [answers] if isinstance(answers, str) else list(answers)


def squad_v2_metrics(predictions, references) -> dict[str, float]:
    """Official SQuAD v2.0 exact match and F1 (0-100), overall and split by answerability.

    Inputs as for :func:`squad_metrics`; a reference with no answer text is unanswerable and
    expects the empty prediction "". As in the official script, gold answers that normalise to
    nothing are dropped (an answerable question keeping none expects "") and a question without
    a prediction scores 0. Returns ``exact_match``, ``f1``, ``total`` and, for each non-empty
    subset, ``HasAns_exact``/``HasAns_f1``/``HasAns_total`` and ``NoAns_exact``/``NoAns_f1``/
    ``NoAns_total``. On answerable questions only it equals :func:`squad_metrics`.
    """
    if isinstance(references, Mapping):
        raw = {k: _raw_gold_texts(v) for k, v in references.items()}
    else:
        raw = {}
        for row in references:
            if not isinstance(row, Mapping) or "id" not in row or "answers" not in row:
                raise ValueError("references must be {id: answers} or rows with 'id' and 'answers'")
            raw[row["id"]] = _raw_gold_texts(row["answers"])
    if not raw:
        raise ValueError("no references to score")
    preds = _as_predictions(predictions)
    scores: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for qid, golds in raw.items():
        kept = [g for g in golds if normalize_answer(g)] or [""]
        if qid in preds:
            pred = preds[qid]
            em = max(float(normalize_answer(pred) == normalize_answer(g)) for g in kept)
            f1 = max(_f1(pred, g) for g in kept)
        else:
            em = f1 = 0.0
        scores[bool(golds)].append((em, f1))

    def block(rows, prefix=""):
        return {f"{prefix}exact" if prefix else "exact_match": 100.0 * sum(r[0] for r in rows) / len(rows),
                f"{prefix}f1": 100.0 * sum(r[1] for r in rows) / len(rows),
                f"{prefix}total": float(len(rows))}

    out = block(scores[True] + scores[False])
    for has, prefix in ((True, "HasAns_"), (False, "NoAns_")):
        if scores[has]:
            out.update(block(scores[has], prefix))
    return out
