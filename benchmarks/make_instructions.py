"""A realistic, deterministic self-instruct-like workload: English instructions with planted near-duplicates.

Instructions are built from task templates (write, explain, classify, rewrite, list, compare, code...),
multi-word topics drawn from a Zipf-like distribution over a few thousand adjective+noun phrases, and
optional clauses, so lengths run from 4 to ~80 tokens and common words ("a", "the", "of") are as frequent
as in Alpaca's data. A fraction of instructions are edits of an earlier one (a word substituted, inserted,
dropped or swapped, a clause added or removed), as a teacher model repeats itself; some of those edits stay
above the 0.7 ROUGE-L threshold and some fall below, which is the realistic mix.

    python benchmarks/make_instructions.py --count 52000 --seed 0 --output /tmp/instructions.json
"""

from __future__ import annotations

import argparse
import json
import random

VERBS_OBJECTS = [
    "Write a short poem about {T}.", "Write a story about {t}{c}.", "Explain {t} to {a}.",
    "Explain how {t} affects {u}.", "Describe {t} in {n} sentences.", "Give three tips for {g}.",
    "Give an example of {T}.", "List {n} facts about {t}.", "List the main causes of {T}.",
    "Summarize this article about {T}.", "Classify these {T} as {x} or {y}.",
    "Compare {t} and {u}.", "What is the difference between {t} and {u}?", "Generate a title for {T}.",
    "Suggest {n} names for a shop selling {T}.", "Rewrite this sentence about {T} {style}.",
    "Translate this sentence about {T} into {lang}.", "Identify the main idea about {T}.",
    "Create questions to ask {a} about {T}.", "Design a lesson that teaches {a} about {T}.",
    "Write a {code} function that {task} of {t}.", "Fix the {code} code that {task} for {t}.",
    "Propose a plan for {g}{c}.", "Brainstorm ways to improve {T}.", "Write a review of {T}.",
    "Edit this paragraph about {T} {style}.", "Is {T} a good idea for {a}?",
    "How can {a} reduce {T}?", "Tell me a joke about {T}.", "Describe the process of {g}.",
    "Write an email to {a} about {T}.", "Evaluate the argument that {t} causes {u}.",
    "Convert this recipe for {T} to metric units.", "Name {n} people associated with {T}.",
    "Predict how {T} will change by {year}.", "Write a dialogue between {a} and {a2} about {T}.",
    "Generate a tweet announcing {T}.", "Outline the steps of {g}.", "Why is {t} important for {u}?",
]
STYLES = ["to make it more concise", "in passive voice", "to sound friendlier", "for a formal letter",
          "as a headline", "without jargon", "in the future tense", "with more vivid verbs", "for a ten-year-old",
          "as a question", "in fewer words", "with a persuasive tone"]
CLAUSES = [
    "", "", "", "", " in the style of a news report", " for a children's magazine", " using simple words",
    " in no more than {n} words", " and explain your reasoning", " with a surprising ending",
    " from the point of view of {a}", " set in {place}", " that includes {t}", " for a formal audience",
]
EXTRA_SENTENCES = [
    "Make sure the answer is accurate and easy to follow.", "Use bullet points where it helps.",
    "The answer should be suitable for a general audience and avoid technical jargon.",
    "Include at least one concrete example from everyday life and one from history.",
    "Keep the tone friendly but professional, and do not exceed one paragraph.",
    "Consider both the advantages and the disadvantages before you reach a conclusion.",
]
ADJECTIVES = """renewable ancient digital urban remote quantum tropical medieval organic electric social financial
modern rural local global coastal arctic volcanic solar nuclear public private mobile wireless genetic
chemical musical political economic cultural historical scientific artificial natural mental physical
online offline healthy sustainable traditional industrial agricultural marine spatial linguistic
affordable automated biological colonial competitive creative domestic efficient emotional ethical
experimental fictional foreign frozen futuristic generous hidden imaginary independent invisible
legendary magnetic microscopic mysterious nocturnal optical peaceful portable prehistoric recycled
religious romantic seasonal secret silent simple sleepy spicy strategic tiny underground vintage
volunteer wild wooden youthful collaborative decentralized hybrid interactive minimalist nomadic
open-source orbital polar robotic satirical sonic stormy subtropical theatrical vegan virtual""".split()
NOUNS = """energy forests cities networks computing climates empires gardening vehicles media markets budgets
education transport diets healthcare privacy security storms volcanoes oceans deserts rivers mountains
languages music painting architecture cooking baking fitness sleep meditation recycling pollution
traffic housing tourism farming fishing mining robotics vaccines telescopes satellites batteries
currencies elections museums libraries festivals sports chess photography journalism advertising
airports algorithms apprenticeships aquariums archives asteroids auctions bakeries bees bicycles
birds bridges calendars canals castles cathedrals ceramics charities cheese chocolate circuses
coffee comets compilers contracts coral cybersecurity dances databases dinosaurs drones earthquakes
encryption factories fashion ferries fireworks fungi galaxies glaciers grammar hackathons harbors
hiking hospitals hurricanes insurance inventions islands jazz jungles keyboards kites lakes lanterns
lighthouses loans manuscripts maps marathons microbes migration mirrors monasteries mosaics mushrooms
nutrition observatories orchards origami parks passwords pensions pianos pirates planets poetry
printers puzzles pyramids railways rainforests recipes reefs restaurants rockets sailing salaries
sculptures semiconductors shipwrecks skyscrapers smartphones soil spices spreadsheets startups
submarines subways taxes tea textiles theaters tides tornadoes tournaments trains tunnels typography
universities vineyards violins volunteering wages waterfalls weddings whales windmills wolves yoga""".split()
PEOPLE = """a child|a teenager|a software engineer|a retired teacher|a new employee|a tourist|a nurse|a farmer|
a small business owner|a university student|your manager|a customer|a scientist|a journalist""".replace("\n", "").split("|")
GOALS = """saving money|learning a new language|staying healthy|preparing for a job interview|planting a garden|
reducing stress|writing a resume|training a puppy|starting a podcast|organizing a closet|running a marathon|
studying for exams|hosting a dinner party|moving to a new city|building a website|improving sleep""".replace("\n", "").split("|")
TASKS = """reverses a string|checks whether a number is prime|sorts a list of integers|counts the vowels in a word|
finds the largest element of an array|merges two sorted lists|removes duplicates from a list|
computes the factorial of n|parses a date string|returns the nth Fibonacci number""".replace("\n", "").split("|")
GOAL_VERBS = """learning about|organizing|planning|choosing|maintaining|repairing|investing in|photographing|
teaching|reviewing|funding|promoting|protecting|documenting|cleaning|measuring|visiting|insuring""".replace("\n", "").split("|")
CODE_VERBS = """sorts|reverses|validates|compresses|merges|shuffles|counts|parses|encrypts|searches|flattens|deduplicates|
serializes|caches|paginates|normalizes|tokenizes|rotates""".replace("\n", "").split("|")
CODE_OBJECTS = """a linked list|a binary tree|a CSV file|an email address|a JSON document|a matrix|a date string|
a queue of jobs|a list of users|an HTTP request|a sparse vector|a log file|a phone number|a graph of cities|
a stream of events|a dictionary of scores""".replace("\n", "").split("|")
PLACES = ["Paris", "a small village", "outer space", "the year 2100", "an underwater city", "a busy hospital",
          "Antarctica", "ancient Rome", "a mountain monastery", "Tokyo", "the Sahara", "a floating market"]
LANGS = ["French", "Spanish", "German", "Japanese", "Italian", "Portuguese"]
CODES = ["Python", "JavaScript", "C++", "Java", "Go", "Rust", "SQL"]
LABELS = [("positive", "negative"), ("fact", "opinion"), ("formal", "informal"), ("animal", "plant"), ("safe", "unsafe")]
FILLERS = "very really quite also simply carefully briefly clearly".split()


SYNONYMS = {
    "Write": ["Compose", "Draft", "Create", "Produce", "Pen"], "Explain": ["Clarify", "Discuss", "Illustrate"],
    "Describe": ["Portray", "Characterize", "Depict"], "Give": ["Provide", "Offer", "Share", "Suggest"],
    "List": ["Enumerate", "Name", "Write down"], "Generate": ["Come up with", "Invent", "Produce"],
    "Create": ["Build", "Make", "Design", "Put together"], "Suggest": ["Recommend", "Propose"],
    "Compare": ["Contrast", "Weigh"], "Identify": ["Find", "Point out", "Determine"],
}


def _topic(rng: random.Random) -> str:
    # Mildly Zipf-like adjectives: a few are common, most are rare, as in generated data.
    adjective = ADJECTIVES[min(int(rng.paretovariate(0.6)) - 1, len(ADJECTIVES) - 1)] if rng.random() < 0.3 \
        else rng.choice(ADJECTIVES)
    noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
    return rng.choice([f"{adjective} {noun}", f"the {adjective} {noun}", f"{noun} and {other}",
                       f"the {noun} of {adjective} {other}", f"{adjective} {noun} for {other}",
                       f"{adjective} {noun} in {rng.choice(PLACES)}", f"{rng.choice(ADJECTIVES)} {adjective} {noun}"])


def _long_topic(rng: random.Random) -> str:
    """Topics for templates with long fixed wording, so two instances differ in more than one word."""
    first, second = _topic(rng), _topic(rng)
    return rng.choice([f"{first} and {second}", f"{first} for {second}", f"{first} with {second}", first])


def _instruction(rng: random.Random) -> str:
    template = rng.choice(VERBS_OBJECTS)
    label = rng.choice(LABELS)
    values = dict(t=_topic(rng), u=_topic(rng), T=_long_topic(rng), style=rng.choice(STYLES),
                  year=rng.choice([2030, 2035, 2040, 2050, 2075, 2100]), a=rng.choice(PEOPLE), a2=rng.choice(PEOPLE), g=f"{rng.choice(GOAL_VERBS)} {_topic(rng)}" if rng.random() < 0.8 else rng.choice(GOALS),
                  n=rng.choice([2, 3, 4, 5, 7, 10, 12, 20, 50, 100]), x=label[0], y=label[1], lang=rng.choice(LANGS),
                  code=rng.choice(CODES), task=f"{rng.choice(CODE_VERBS)} {rng.choice(CODE_OBJECTS)}" if rng.random() < 0.8 else rng.choice(TASKS), place=rng.choice(PLACES), c="")
    values["c"] = rng.choice(CLAUSES).format(**values)
    text = template.format(**values)
    first, _, rest = text.partition(" ")
    if first in SYNONYMS and rng.random() < 0.5:
        text = rng.choice(SYNONYMS[first]) + " " + rest
    if rng.random() < 0.08:
        text += " " + rng.choice(EXTRA_SENTENCES)
    if rng.random() < 0.02:  # a few long, paragraph-like instructions
        text += " " + " ".join(rng.sample(EXTRA_SENTENCES, k=rng.randint(2, len(EXTRA_SENTENCES))))
    return text


def _edit(text: str, rng: random.Random) -> str:
    """A teacher repeating itself: one to three small word edits of an earlier instruction."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        i = rng.randrange(len(words))
        if kind < 0.35:
            words[i] = rng.choice(NOUNS + ADJECTIVES + FILLERS)
        elif kind < 0.6:
            words.insert(i, rng.choice(FILLERS + ADJECTIVES))
        elif kind < 0.8 and len(words) > 4:
            del words[i]
        elif len(words) > 2:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    out = " ".join(words)
    return out[0].upper() + out[1:] if out else text


def make_instructions(count: int, seed: int = 0, duplicate_rate: float = 0.15) -> list[str]:
    """``count`` instructions; about ``duplicate_rate`` of them are edits of an earlier one."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(count):
        if out and rng.random() < duplicate_rate:
            # Repeats cluster near recent output (the same request batch) but can reach far back.
            source = out[-rng.randint(1, min(40, len(out)))] if rng.random() < 0.5 else rng.choice(out)
            out.append(_edit(source, rng))
        else:
            out.append(_instruction(rng))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=52_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duplicate-rate", type=float, default=0.15)
    parser.add_argument("--output", required=True, help="Alpaca-format JSON file to write")
    args = parser.parse_args()
    rows = [{"instruction": text, "input": "", "output": ""}
            for text in make_instructions(args.count, args.seed, args.duplicate_rate)]
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1)
    print(f"wrote {len(rows)} instructions to {args.output}")


if __name__ == "__main__":
    main()
