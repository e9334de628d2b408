"""The evaluation report: ``report.json`` (everything), ``report.md`` (for people), ``report.png`` (bars).

All numbers come from :mod:`alpaca_ray.evaluate.stats`; this module only arranges them.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alpaca_ray.evaluate import alpaca_eval, length_control, stats
from alpaca_ray.evaluate.eval_sets import EvalItem
from alpaca_ray.evaluate.judge import PairOutcome
from alpaca_ray.evaluate.ratings import Rating

WIN_RATE_NOTE = ("win rate = model A's mean score against model B (a win 1, a tie 0.5, a loss 0, a probability-"
                 "weighted preference in between; AlpacaEval's win_rate); discrete win rate = the same with each "
                 "pair rounded to a win, a loss or a tie; 95% percentile bootstrap interval over items")
MAX_CHART_CATEGORIES = 15


@dataclass
class ItemResult:
    item: EvalItem
    answer_a: str
    answer_b: str
    judged: PairOutcome | None = None
    raw_ab: str = ""
    raw_ba: str = ""

    @property
    def words_a(self) -> int:
        return len(self.answer_a.split())

    @property
    def words_b(self) -> int:
        return len(self.answer_b.split())


def llm_judge_section(results: Sequence[ItemResult], samples: int, seed: int, difficulty: np.ndarray | None = None,
                      lc_samples: int = 200, gamed: length_control.GamedAnnotations | None = None) -> dict:
    judged = [r for r in results if r.judged is not None]
    # A pair with no score at all (an AlpacaEval annotation with a null preference) is left out, as AlpacaEval
    # leaves it out; our own unparseable pairs score 0.5 (a tie) and stay in.
    scored = [r for r in judged if not math.isnan(r.judged.score)]
    scores = [r.judged.score for r in scored]
    lengths_a, lengths_b = [r.words_a for r in scored], [r.words_b for r in scored]
    section = stats.summarize(scores, samples=samples, seed=seed)
    section["unparseable"] = sum(r.judged.unparseable for r in judged)
    section["inconsistent"] = sum(r.judged.inconsistent for r in judged)
    section["by_category"] = stats.by_group(scores, [r.item.category for r in scored], samples=samples, seed=seed)
    buckets = [stats.length_bucket(a, b) for a, b in zip(lengths_a, lengths_b)]
    by_length = stats.by_group(scores, buckets, samples=samples, seed=seed)
    section["by_length"] = {b: by_length[b] for b in stats.LENGTH_BUCKETS if b in by_length}
    section["longer_answer_wins"] = stats.longer_answer_win_rate(scores, lengths_a, lengths_b)
    all_scores = [r.judged.score for r in judged]
    keep = [i for i, r in enumerate(results) if r.judged is not None]
    section["length_controlled"] = length_control.length_controlled_win_rate(
        all_scores, [r.answer_a for r in judged], [r.answer_b for r in judged],
        difficulty=None if difficulty is None else np.asarray(difficulty)[keep], bootstrap_samples=lc_samples,
        seed=seed, gamed=gamed)
    # The same numbers as AlpacaEval prints them (percent; A is its model, B its baseline), for comparison with
    # its leaderboards.
    lc = section["length_controlled"]
    section["alpaca_eval"] = {**alpaca_eval.head2head([1.0 + s for s in all_scores]),
                              "length_controlled_winrate": 100 * lc["win_rate"],
                              "lc_standard_error": 100 * lc["standard_error"]}
    section["mean_words_a"] = sum(lengths_a) / len(scored) if scored else math.nan
    section["mean_words_b"] = sum(lengths_b) / len(scored) if scored else math.nan
    return section


def human_section(ratings: Sequence[Rating], judge_outcomes: dict[str, str], samples: int, seed: int) -> dict:
    """Human win rate (per-item majority), agreement between raters and with the LLM judge."""
    per_item: dict[str, list[str]] = defaultdict(list)
    per_rater: dict[str, dict[str, str]] = defaultdict(dict)
    for rating in ratings:
        per_item[rating.item_id].append(rating.choice)
        per_rater[rating.rater_id][rating.item_id] = rating.choice
    majorities = {item_id: stats.majority(choices) for item_id, choices in per_item.items()}
    section = stats.summarize(list(majorities.values()), samples=samples, seed=seed)
    section.update(ratings=len(ratings), raters=sorted(per_rater), items_rated=len(per_item))

    multi = [choices for choices in per_item.values() if len(choices) >= 2]
    raters = sorted(per_rater)
    pair_kappas = []
    for i, first in enumerate(raters):
        for second in raters[i + 1:]:
            common = sorted(set(per_rater[first]) & set(per_rater[second]))
            if len(common) >= 2:
                kappa = stats.cohens_kappa([per_rater[first][k] for k in common], [per_rater[second][k] for k in common])
                pair_kappas.append({"raters": [first, second], "items": len(common), "kappa": kappa})
    finite = [p["kappa"] for p in pair_kappas if not math.isnan(p["kappa"])]
    section["inter_rater"] = {
        "items_with_several_raters": len(multi),
        **stats.pairwise_agreement(multi),
        "fleiss_kappa": stats.fleiss_kappa(multi),
        "cohens_kappa_pairs": pair_kappas,
        "mean_cohens_kappa": sum(finite) / len(finite) if finite else math.nan,
    }
    both = sorted(k for k in majorities if k in judge_outcomes)
    humans = [majorities[k] for k in both]
    judge = [judge_outcomes[k] for k in both]
    section["agreement_with_judge"] = {
        "items": len(both),
        "agreement": sum(h == j for h, j in zip(humans, judge)) / len(both) if both else math.nan,
        "cohens_kappa": stats.cohens_kappa(humans, judge) if both else math.nan,
        # every single rating against the judge, not only the per-item majority
        "rating_agreement": (sum(r.choice == judge_outcomes[r.item_id] for r in ratings if r.item_id in judge_outcomes)
                             / max(1, sum(r.item_id in judge_outcomes for r in ratings))),
    }
    return section


def build_report(results: Sequence[ItemResult], meta: dict, ratings: Sequence[Rating] = (),
                 samples: int = 2000, seed: int = 0, difficulty: np.ndarray | None = None,
                 lc_samples: int = 200, gamed: length_control.GamedAnnotations | None = None) -> dict:
    """The whole report as a JSON-safe dict (NaN becomes null when written).

    ``difficulty``: AlpacaEval's instruction difficulty per result (None: the length control's fallback);
    ``lc_samples``: bootstrap refits for the length-controlled win rate's interval; ``gamed``: AlpacaEval's
    df_gamed.csv rows for its regularisation towards the baseline.
    """
    judged = [r for r in results if r.judged is not None]
    judge_outcomes = {r.item.id: r.judged.outcome for r in judged}
    human_by_item: dict[str, list[dict]] = defaultdict(list)
    for rating in ratings:
        human_by_item[rating.item_id].append({"rater": rating.rater_id, "choice": rating.choice})
    items = []
    for r in results:
        row = {**r.item.to_dict(), "words_a": r.words_a, "words_b": r.words_b,
               "answer_a": r.answer_a, "answer_b": r.answer_b}
        if r.judged is not None:
            row.update(outcome=r.judged.outcome, score=r.judged.score, preference_a_first=r.judged.preference_ab,
                       preference_b_first=r.judged.preference_ba, unparseable=r.judged.unparseable,
                       inconsistent=r.judged.inconsistent, judge_raw_a_first=r.raw_ab, judge_raw_b_first=r.raw_ba)
        if human_by_item.get(r.item.id):
            row["human"] = human_by_item[r.item.id]
        items.append(row)
    return {
        **meta,
        "n_items": len(results),
        "note": WIN_RATE_NOTE,
        "llm_judge": llm_judge_section(results, samples, seed, difficulty, lc_samples, gamed) if judged else None,
        "human": human_section(ratings, judge_outcomes, samples, seed) if ratings else None,
        "items": items,
    }


def _clean(value: object) -> object:
    """NaN/inf -> None, recursively, so report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


JUDGE_MODES = {
    "verdict": "each pair shown in both orders; a preference counts only when the same in both, otherwise it is a tie",
    "logprobs": "AlpacaEval 2's protocol: one token, m or M, preference from the two tokens' probabilities; each "
                "pair shown in both orders and A's probabilities averaged",
    "annotations": "preferences read from an AlpacaEval annotations file; no judge was asked",
}


def _summary_table(rows: dict[str, dict], header: str) -> list[str]:
    lines = [f"| {header} | n | A wins | B wins | ties | A win rate | 95% CI |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['n']} | {s['wins']} | {s['losses']} | {s['ties']} | {_pct(s['win_rate'])} | "
                     f"{_pct(s['ci_low'])} – {_pct(s['ci_high'])} |")
    return lines


def _preference(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def report_markdown(report: dict) -> str:
    a, b = report["model_a"], report["model_b"]
    lines = [f"# Pairwise evaluation: {a} (A) vs {b} (B)", "",
             f"- evaluation set: `{report.get('eval_set', '')}` ({report['n_items']} items)",
             f"- judge: `{report.get('judge') or 'none'}` ({JUDGE_MODES.get(report.get('judge_mode') or 'verdict', '')})",
             f"- {report['note']}", ""]
    judge = report.get("llm_judge")
    if judge:
        lc = judge["length_controlled"]
        longer = judge["longer_answer_wins"]
        ae = judge["alpaca_eval"]
        flips = "averaged" if report.get("judge_mode") == "logprobs" else "counted as ties"
        lines += ["## LLM judge", "",
                  f"**A win rate {_pct(judge['win_rate'])}** (95% CI {_pct(judge['ci_low'])} – "
                  f"{_pct(judge['ci_high'])}; standard error {_pct(judge['standard_error'])}; discrete win rate "
                  f"{_pct(judge['discrete_win_rate'])}): A won {judge['wins']}, B won {judge['losses']}, "
                  f"{judge['ties']} ties, over {judge['n']} pairs.", "",
                  f"- length-controlled win rate: **{_pct(lc['win_rate'])}** (95% CI {_pct(lc['ci_low'])} – "
                  f"{_pct(lc['ci_high'])}); form `{lc['form']}`: {lc.get('description', '')}; weights "
                  + ", ".join(f"`{k}` {_num(v)}" for k, v in lc.get("weights", {}).items())
                  + ("; regularised towards the baseline with AlpacaEval's df_gamed.csv"
                     if lc.get("regularized_to_baseline") else "; no df_gamed.csv, so no pull towards the baseline")
                  + (f" ({lc['note']})" if lc.get("note") else ""),
                  f"- as AlpacaEval reports it (A = its model, B = its baseline): win_rate {_num(ae['win_rate'])}, "
                  f"standard_error {_num(ae['standard_error'])}, discrete_win_rate {_num(ae['discrete_win_rate'])}, "
                  f"length_controlled_winrate {_num(ae['length_controlled_winrate'])}, n_wins {ae['n_wins']}, "
                  f"n_wins_base {ae['n_wins_base']}, n_draws {ae['n_draws']}, n_total {ae['n_total']}",
                  f"- the longer answer won {longer['longer_won']} of {longer['decided_pairs']} decided pairs "
                  f"({_pct(longer['rate'])}); mean length A {_num(judge['mean_words_a'], 1)} words, "
                  f"B {_num(judge['mean_words_b'], 1)} words",
                  f"- inconsistent across the two orders (position bias; {flips}): {judge['inconsistent']}",
                  f"- unparseable judge answers (no winner named; counted as ties): {judge['unparseable']}", "",
                  "### By answer length", "", *_summary_table(judge["by_length"], "length"), "",
                  "### By category", "", *_summary_table(judge["by_category"], "category"), ""]
    human = report.get("human")
    if human:
        inter, vs_judge = human["inter_rater"], human["agreement_with_judge"]
        lines += ["## Human raters", "",
                  f"{human['ratings']} ratings by {len(human['raters'])} rater(s) on {human['items_rated']} items "
                  "(per item, the raters' majority; a split is a tie).", "",
                  f"**A win rate {_pct(human['win_rate'])}** (95% CI {_pct(human['ci_low'])} – "
                  f"{_pct(human['ci_high'])}): A won {human['wins']}, B won {human['losses']}, {human['ties']} ties.", "",
                  f"- agreement between raters: {_pct(inter['agreement'])} of {inter['pairs']} rater pairs on "
                  f"{inter['items_with_several_raters']} items; Fleiss' kappa {_num(inter['fleiss_kappa'])}, "
                  f"mean Cohen's kappa {_num(inter['mean_cohens_kappa'])}",
                  f"- agreement with the LLM judge: {_pct(vs_judge['agreement'])} of {vs_judge['items']} items "
                  f"(Cohen's kappa {_num(vs_judge['cohens_kappa'])}); single ratings "
                  f"{_pct(vs_judge['rating_agreement'])}", ""]
    lines += ["## Items", "", "| id | category | instruction | words A | words B | judge A first | judge B first | "
              "outcome | human |", "|---|---|---|---:|---:|---|---|---|---|"]
    for row in report["items"]:
        human_cell = ", ".join(f"{h['rater']}: {h['choice']}" for h in row.get("human", []))
        outcome = row.get("outcome", "")
        if row.get("unparseable"):
            outcome += " (unparseable)"
        elif row.get("inconsistent"):
            outcome += " (inconsistent)"
        lines.append(f"| {_cell(row['id'], 30)} | {_cell(row['category'], 25)} | {_cell(row['instruction'])} | "
                     f"{row['words_a']} | {row['words_b']} | {_preference(row.get('preference_a_first'))} | "
                     f"{_preference(row.get('preference_b_first'))} | {outcome} | {_cell(human_cell, 40)} |")
    return "\n".join(lines) + "\n"


def _chart_rows(report: dict) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    judge, human = report.get("llm_judge"), report.get("human")
    if judge:
        rows.append(("LLM judge: all", judge))
        rows += [(f"length: {name}", s) for name, s in judge["by_length"].items()]
        categories = list(judge["by_category"].items())
        rows += [(f"{name}", s) for name, s in categories[:MAX_CHART_CATEGORIES]]
    if human:
        rows.append(("human raters: all", human))
    return rows


def write_chart(report: dict, path: str) -> None:
    """Stacked horizontal bars: A wins / ties / B wins per row, the win rate and its CI marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _chart_rows(report)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.38 * max(1, len(rows))))
    for y, (_name, s) in enumerate(rows):
        n = max(1, s["n"])
        win, tie, loss = s["wins"] / n, s["ties"] / n, s["losses"] / n
        ax.barh(y, win, color="#2b8cbe", label="A wins" if y == 0 else None)
        ax.barh(y, tie, left=win, color="#bdbdbd", label="ties" if y == 0 else None)
        ax.barh(y, loss, left=win + tie, color="#e34a33", label="B wins" if y == 0 else None)
        if s["win_rate"] is not None and not math.isnan(s["win_rate"]):
            ax.errorbar(s["win_rate"], y, xerr=[[s["win_rate"] - s["ci_low"]], [s["ci_high"] - s["win_rate"]]],
                        fmt="o", color="black", markersize=3, capsize=3)
    ax.set_yticks(range(len(rows)), [f"{_cell(name, 32)} (n={s['n']})" for name, s in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="black", linewidth=0.5, linestyle=":")
    ax.set_xlabel("share of pairs (dot: A win rate, ties half; bars: 95% CI)")
    ax.set_title(f"{report['model_a']} (A) vs {report['model_b']} (B)")
    if rows:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no verdicts or ratings yet", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, output: str) -> dict[str, str]:
    """Write report.json, report.md and report.png into ``output``; returns their paths."""
    os.makedirs(output, exist_ok=True)
    paths = {name: os.path.join(output, f"report.{name}") for name in ("json", "md", "png")}
    clean = _clean(report)
    with open(paths["json"] + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(clean, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(paths["json"] + ".tmp", paths["json"])
    with open(paths["md"], "w", encoding="utf-8") as handle:
        handle.write(report_markdown(clean))
    write_chart(clean, paths["png"])
    return paths


def write_alpaca_eval_files(results: Sequence[ItemResult], label_a: str, label_b: str, annotator: str,
                            output: str) -> dict[str, str]:
    """``model_outputs.json`` (model A), ``reference_outputs.json`` (model B) and ``annotations.json`` in
    AlpacaEval's format, so a run can be submitted or recomputed with AlpacaEval itself (A is its model,
    ``generator_2``; B its baseline, ``generator_1``; preference ``1 + A's score``)."""
    def instruction(r: ItemResult) -> str:  # AlpacaEval folds an input into the instruction this way
        return r.item.instruction + ("\n\n" + r.item.input if r.item.input.strip() else "")

    instructions = [instruction(r) for r in results]
    categories = [r.item.category for r in results]
    paths = {name: os.path.join(output, f"{name}.json") for name in ("model_outputs", "reference_outputs",
                                                                     "annotations")}
    alpaca_eval.write_json(paths["model_outputs"], alpaca_eval.model_outputs(
        instructions, [r.answer_a for r in results], label_a, categories))
    alpaca_eval.write_json(paths["reference_outputs"], alpaca_eval.model_outputs(
        instructions, [r.answer_b for r in results], label_b, categories))
    rows = []
    for r, text, category in zip(results, instructions, categories):
        score = r.judged.score if r.judged is not None else math.nan
        rows.append({"instruction": text, "output_1": r.answer_b, "generator_1": label_b, "output_2": r.answer_a,
                     "generator_2": label_a, "dataset": category, "annotator": annotator,
                     "preference": None if math.isnan(score) else 1.0 + score})
    alpaca_eval.write_json(paths["annotations"], rows)
    return paths
