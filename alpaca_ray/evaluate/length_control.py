"""AlpacaEval 2's length-controlled win rate (``metrics/glm_winrate.py``, GLM ``length_controlled_v1``).

The model: ``P(A preferred) = sigmoid(w_len * tanh(std_delta_len) + w_diff * instruction_difficulty + w_A)``
(the formula ``np.tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline.astype(float) - 1``:
no intercept, ``not_gamed_baseline`` is 1 on the model's own rows), where ``std_delta_len`` is the baseline's
answer length minus the model's, in characters, divided by its standard deviation. It is fitted as AlpacaEval
fits it: continuous preferences (each row twice, labels 1 and 0 weighted by ``p`` and ``1 - p``), L1-penalised
logistic regression (liblinear, no intercept; sklearn >= 1.8 spells AlpacaEval's ``penalty="l1"`` as
``l1_ratio=1``) with the strength chosen among ten by 5-fold grouped cross-validation on the continuous log
loss (``LogisticRegressionCV``, ``random_state=123``). The length-controlled win rate is the mean predicted
preference with the length difference set to zero.

``instruction_difficulty`` is a per-instruction number AlpacaEval fitted once across its whole leaderboard
(``instruction_difficulty.csv`` in its Hugging Face dataset). Given that file, it is used as is
(``form: "alpaca_eval"``). Without it the documented fallback (``form: "length_only"``) drops the term: the
same GLM with the length feature and the model's own weight only. A stand-in computed from the two models'
answers (model B's answer length, say) would carry length back into the model and undo the control, which
is why none is used. AlpacaEval's pull towards its "gamed" baselines (``regularize_to_baseline_lambda: 0.2``: the baseline's own
verbose and concise answers, fitted beside the model's at weight 0.1 each) needs its ``df_gamed.csv``; given
it (:func:`read_gamed_annotations`), it is applied as AlpacaEval applies it, and its difficulties are used
when no difficulty file is given. The report says which form was used and whether that pull was applied.

The fit can only pin the win rate at zero length difference down where the data has pairs near it: a judge
that decides by length alone and never sees equal lengths makes the data separable, the weights run off and
the rate at zero difference is arbitrary (the benchmark shows by how much).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alpaca_ray.config import UserError

FORMULA = "np.tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline.astype(float) - 1"
FORMS = {
    "alpaca_eval": "AlpacaEval's length_controlled_v1 GLM with its instruction difficulties (from the file given)",
    "length_only": "AlpacaEval's length_controlled_v1 GLM without the instruction-difficulty term (no "
                   "--instruction-difficulty file given)",
}
N_SPLITS = 5
RANDOM_STATE = 123
#: AlpacaEval's ``regularize_to_baseline_lambda``: the gamed rows weigh lambda / 2 each (there are two gamed
#: baselines), the model's own rows 1.
REGULARIZE_TO_BASELINE_LAMBDA = 0.2
MAX_ITER = 10_000


def read_instruction_difficulty(path: str) -> dict[object, float]:
    """AlpacaEval's ``instruction_difficulty.csv``: a first column keying each instruction and a column
    ``instruction_difficulty`` (or else the last column). Keys are integer positions in the evaluation set
    (AlpacaEval's own file: ``index``) or instruction texts. Returns {int position or str instruction: value}.
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (expected AlpacaEval's instruction_difficulty.csv)")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise UserError(f"{path}: expected a header and rows of (key, instruction_difficulty)")
    header = rows[0]
    column = header.index("instruction_difficulty") if "instruction_difficulty" in header else len(header) - 1
    out: dict[object, float] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            value = float(row[column])
        except (ValueError, IndexError):
            raise UserError(f"{path}, line {line}: field {header[column]!r}: not a number: "
                            f"{row[column] if column < len(row) else ''!r}") from None
        key: object = row[0]
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        out[key] = value
    return out


def difficulty_for(instructions: Sequence[str], table: dict[object, float], source: str) -> np.ndarray:
    """Each instruction's difficulty from a :func:`read_instruction_difficulty` table: by text when the file
    is keyed by instruction, else by position (AlpacaEval's file indexes its 805-item set in order)."""
    by_text = any(isinstance(k, str) for k in table)
    values, missing = [], []
    for position, instruction in enumerate(instructions):
        value = table.get(instruction.strip() if by_text else position)
        if value is None and by_text:
            value = table.get(instruction)
        if value is None:
            missing.append(position)
            value = math.nan
        values.append(value)
    if missing:
        what = "instruction" if by_text else "position"
        raise UserError(f"{source}: no instruction difficulty for {len(missing)} of {len(instructions)} items (by "
                        f"{what}; first missing item {missing[0]}); the file must cover the evaluation set")
    return np.asarray(values, dtype=float)


def _continuous_log_loss(y_true, y_pred, true_prob, true_sample_weight=None) -> float:
    """AlpacaEval's ``logloss_continuous``: rows carry label 1 or 0 and the probability that label holds."""
    target = np.where(y_true == 1, true_prob, 1 - true_prob)
    y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
    loss = target * np.log(y_pred) + (1 - target) * np.log(1 - y_pred)
    if true_sample_weight is not None:
        loss = loss * true_sample_weight
    return float(-np.mean(loss))


def _fit(features: np.ndarray, preferences: np.ndarray, weights: np.ndarray | None = None):
    """AlpacaEval's ``fit_LogisticRegressionCV(..., is_ytrue_proba=True, n_splits=5, sample_weight=weights)``."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    n = len(preferences)
    rows = np.concatenate([features, features])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    prob = np.concatenate([preferences, 1 - preferences])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    true_weight = None if weights is None else np.concatenate([weights, weights])
    with sklearn.config_context(enable_metadata_routing=True):
        scorer = make_scorer(_continuous_log_loss, response_method="predict_proba", greater_is_better=False
                             ).set_score_request(true_sample_weight=True, true_prob=True)
        model = LogisticRegressionCV(cv=GroupKFold(n_splits=min(N_SPLITS, n)), scoring=scorer,
                                     random_state=RANDOM_STATE, dual=False, l1_ratios=(1.0,), solver="liblinear",
                                     fit_intercept=False, use_legacy_attributes=False, max_iter=MAX_ITER)
        model.set_fit_request(sample_weight=True)
        model.fit(rows, labels, sample_weight=prob if true_weight is None else prob * true_weight, groups=groups,
                  true_sample_weight=true_weight, true_prob=prob)
    return model


def _refit_fixed_c(features: np.ndarray, preferences: np.ndarray, c: float, weights: np.ndarray | None = None
                   ) -> np.ndarray:
    """One L1 fit at a fixed strength (the bootstrap's refits); returns the coefficients."""
    from sklearn.linear_model import LogisticRegression

    prob = np.concatenate([preferences, 1 - preferences])
    if weights is not None:
        prob = prob * np.concatenate([weights, weights])
    model = LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=RANDOM_STATE,
                               max_iter=MAX_ITER)
    model.fit(np.concatenate([features, features]), np.concatenate([np.ones(len(preferences)),
                                                                    np.zeros(len(preferences))]), sample_weight=prob)
    return np.ravel(model.coef_)


@dataclass(frozen=True)
class GamedAnnotations:
    """AlpacaEval's ``df_gamed.csv``: annotations of the baseline's own verbose and concise answers against it,
    already featurised (``index`` the instruction's position, ``preference`` in 0..1, ``std_delta_len``
    standardised, ``instruction_difficulty``, ``not_gamed_baseline`` false on these rows)."""

    index: np.ndarray
    preference: np.ndarray
    std_delta_len: np.ndarray
    instruction_difficulty: np.ndarray
    not_gamed_baseline: np.ndarray

    def difficulty_by_position(self) -> dict[int, float]:
        """AlpacaEval's own difficulty table: the first row of each instruction."""
        table: dict[int, float] = {}
        for index, value in zip(self.index.tolist(), self.instruction_difficulty.tolist()):
            table.setdefault(int(index), float(value))
        return table


def read_gamed_annotations(path: str) -> GamedAnnotations:
    """Read AlpacaEval's ``df_gamed.csv`` (columns ``index``, ``preference``, ``std_delta_len``,
    ``instruction_difficulty``, ``not_gamed_baseline``; others such as ``model`` are ignored)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (expected AlpacaEval's df_gamed.csv)")
    needed = ("index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; AlpacaEval's df_gamed.csv has "
                            f"{', '.join(needed)}")
        columns: dict[str, list[float]] = {c: [] for c in needed}
        for line, row in enumerate(reader, start=2):
            for name in needed:
                text = (row[name] or "").strip()
                try:
                    value = float(text == "True") if name == "not_gamed_baseline" and text in ("True", "False") \
                        else float(text)
                except ValueError:
                    raise UserError(f"{path}, line {line}: field {name!r}: not a number: {text!r}") from None
                columns[name].append(value)
    return GamedAnnotations(np.asarray(columns["index"], dtype=int), np.asarray(columns["preference"]),
                            np.asarray(columns["std_delta_len"]), np.asarray(columns["instruction_difficulty"]),
                            np.asarray(columns["not_gamed_baseline"]) > 0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -z))


def length_controlled_win_rate(scores: Sequence[float], answers_a: Sequence[str], answers_b: Sequence[str],
                               difficulty: Sequence[float] | None = None, bootstrap_samples: int = 200,
                               seed: int = 0, gamed: GamedAnnotations | None = None) -> dict:
    """Model A's length-controlled win rate against model B (A = AlpacaEval's model, B = its baseline).

    ``scores`` are A's scores in 0..1 (AlpacaEval's ``preference - 1``; NaN rows are left out of the fit, as
    AlpacaEval leaves out null preferences). ``difficulty``: AlpacaEval's per-instruction difficulty, or None
    for the fallback (the GLM without that term; with ``gamed``, AlpacaEval's difficulties come from it).
    ``gamed``: AlpacaEval's ``df_gamed.csv`` rows, fitted beside the model's at weight lambda / 2 (its
    regularisation towards the baseline). Returns the rate (0..1), the form used, the weights, and a bootstrap
    interval and standard error (refits at the cross-validated strength over ``bootstrap_samples`` resamples
    of the model's items; the gamed rows stay as they are).
    """
    y = np.asarray(scores, dtype=float)
    len_a = np.array([len(a) for a in answers_a], dtype=float)
    len_b = np.array([len(b) for b in answers_b], dtype=float)
    empty = {"win_rate": math.nan, "form": None, "formula": FORMULA, "weights": {}, "ci_low": math.nan,
             "ci_high": math.nan, "standard_error": math.nan}
    if y.size == 0:
        return empty
    if difficulty is None and gamed is not None:
        difficulty = difficulty_for([""] * y.size, gamed.difficulty_by_position(), "df_gamed.csv")
    gamma = None if difficulty is None else np.asarray(difficulty, dtype=float)
    form = "length_only" if gamma is None else "alpaca_eval"
    delta = len_b - len_a  # AlpacaEval: len(output_1) - len(output_2), output_1 being the baseline
    spread = delta.std(ddof=1) if delta.size > 1 else 0.0
    std_delta = delta / spread if spread > 0 else np.zeros_like(delta)
    columns = [np.tanh(std_delta)] + ([gamma] if gamma is not None else []) + [np.ones_like(y)]
    names = ["np.tanh(std_delta_len)"] + (["instruction_difficulty"] if gamma is not None else []) + \
        ["not_gamed_baseline.astype(float)"]
    features = np.stack(columns, axis=1)
    keep = ~np.isnan(y)
    if keep.sum() < 2 or np.all(y[keep] == y[keep][0]):
        # Nothing to fit (one item, or every preference the same): the win rate is the plain mean.
        rate = float(np.nanmean(y))
        return {**empty, "win_rate": rate, "form": form, "ci_low": rate, "ci_high": rate, "standard_error": 0.0,
                "note": "every preference equal (or too few): no model fitted"}
    extra_x, extra_y, extra_w = np.empty((0, features.shape[1])), np.empty(0), np.empty(0)
    if gamed is not None:
        extra_x = np.stack([np.tanh(gamed.std_delta_len), gamed.instruction_difficulty,
                            gamed.not_gamed_baseline.astype(float)], axis=1)
        extra_y = gamed.preference
        extra_w = np.where(gamed.not_gamed_baseline, 1.0, REGULARIZE_TO_BASELINE_LAMBDA / 2)

    def fit_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        x, target = np.concatenate([features[rows], extra_x]), np.concatenate([y[rows], extra_y])
        return x, target, (np.concatenate([np.ones(rows.size), extra_w]) if gamed is not None else None)

    rows = np.flatnonzero(keep)
    model = _fit(*fit_rows(rows))
    test = features.copy()
    test[:, 0] = 0.0  # no length difference
    rate = float(model.predict_proba(test)[:, 1].mean())
    weights = dict(zip(names, map(float, np.ravel(model.coef_))))

    rng = np.random.default_rng(seed)
    c = float(np.ravel(model.C_)[0])
    rates = []
    for _ in range(bootstrap_samples):
        pick = rows[rng.integers(0, rows.size, size=rows.size)]
        x, target, sample_weight = fit_rows(pick)
        coef = _refit_fixed_c(x, target, c, sample_weight)
        rates.append(float(_sigmoid(test[pick] @ coef).mean()))
    low, high = (np.quantile(rates, [0.025, 0.975]) if rates else (math.nan, math.nan))
    out = {"win_rate": rate, "form": form, "description": FORMS[form], "formula": FORMULA, "weights": weights,
           "C": c, "regularized_to_baseline": gamed is not None, "ci_low": float(low), "ci_high": float(high),
           "standard_error": float(np.std(rates, ddof=1)) if len(rates) > 1 else math.nan,
           "bootstrap_samples": bootstrap_samples}
    if not any(weights.values()):
        out["note"] = ("cross-validation chose the strongest penalty, so every weight is zero and the rate is 50%: "
                       "too few pairs (or too noisy) for the length control to say anything")
    return out
