"""Generate qtune's shipped default dataset: short, correct answers in pirate speak.

    python -m tools.make_default_dataset            # writes qtune/data/pirate_chat.jsonl (+ eval prompts)
    python -m tools.make_default_dataset --out-dir /tmp/d && diff -r /tmp/d qtune/data   # reproduces them?

Every assistant answer starts with "Arr, matey!" and is one or two sentences of pirate speak that
still answers the question correctly; computed answers (arithmetic, conversions, letter counts) are
computed here, never typed. SmolLM2-135M-Instruct does not talk like this, so a few minutes of
`qtune train` visibly change its style. Each template family keeps some values (and one phrasing)
back for qtune/data/pirate_chat_eval_prompts.jsonl, whose prompts never occur in the training file:
the slow test measures how often answers start with "Arr" before and after training.

The output is deterministic (a fixed seed, no dict or set ordering involved).
"""

from __future__ import annotations

import json
import pathlib
import random

from tools.default_dataset_tables import (BABIES, CAPITALS, COLOURS, DAYS, DEFINITIONS, FACTS, HOW_TO, LEGS, MONTHS,
                                          NUMBER_WORDS, OPPOSITES, SMALL_TALK, SOUNDS, UNITS, WORDS, WORDS_ABROAD)

SEED = 1234
TRAIN_ROWS = 600
EVAL_PER_FAMILY = 4
OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "qtune" / "data"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# Each template family below returns (train candidates, eval candidates), both lists of
# (question, answer, expected) for training and (question, None, expected, item key) for eval, where
# expected is the short correct answer (or None) and the key tells held-out items apart. Eval candidates use held-out values only; family()'s last question phrasing is
# also kept for the eval prompts only.


def family(questions, answers, items, held_out_items):
    """items: list of (fields dict, expected string). Returns (train candidates, eval candidates)."""
    train = [(q.format(**f), a.format(**f), exp) for f, exp in items for q in questions[:-1] for a in answers]
    evals = [(q.format(**f), None, exp, repr(f)) for f, exp in held_out_items for q in questions]
    return train, evals


def split(items, n_held, rng):
    items = list(items)
    rng.shuffle(items)
    return items[n_held:], items[:n_held]


def arithmetic(rng):
    ops = [
        ("plus", lambda a, b: a + b, ["What is {a} plus {b}?", "What's {a} + {b}?", "Can you add {a} and {b} for me?",
                                      "Calculate {a} + {b}.", "Please tell me the sum of {a} and {b}."],
         ["Arr, matey! {a} plus {b} be {c}, sure as the tide rolls in.",
          "Arr, matey! Add 'em up and ye get {c} pieces o' eight, me hearty."]),
        ("minus", lambda a, b: a - b, ["What is {a} minus {b}?", "What's {a} - {b}?", "Subtract {b} from {a}.",
                                       "If I have {a} coins and spend {b}, how many are left?",
                                       "What do you get when you take {b} away from {a}?"],
         ["Arr, matey! {a} minus {b} be {c}, as any honest quartermaster knows.",
          "Arr, matey! Take {b} from {a} and ye be left with {c}, savvy?"]),
        ("times", lambda a, b: a * b, ["What is {a} times {b}?", "What's {a} x {b}?", "Multiply {a} by {b}.",
                                       "What is {a} multiplied by {b}?", "How much is {a} lots of {b}?"],
         ["Arr, matey! {a} times {b} be {c}, by the stars.",
          "Arr, matey! Multiply 'em and ye get {c}, me hearty."]),
    ]
    train, evals = [], []
    for name, fn, qs, ans in ops:
        pairs = set()
        while len(pairs) < 40:
            a, b = (rng.randint(2, 12), rng.randint(2, 12)) if name == "times" else (rng.randint(3, 99), rng.randint(2, 60))
            if name == "minus" and b >= a:
                a, b = b + a, b
            pairs.add((a, b))
        items = [({"a": a, "b": b, "c": fn(a, b)}, str(fn(a, b))) for a, b in sorted(pairs)]
        t, e = family(qs, ans, *split(items, 4, rng))
        train += t
        evals += e
    return train, evals


def capitals(rng):
    items = [({"c": c, "C": cap(c), "cap": k}, k) for c, k in CAPITALS]
    return family(["What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
                   "Tell me the capital of {c}.", "Name the capital of {c}, please."],
                  ["Arr, matey! The capital o' {c} be {cap}, a fine port for any sailor.",
                   "Arr, matey! {cap} be the capital o' {c}, aye.",
                   "Arr, matey! Set yer course for {cap}, for that be the capital o' {c}."],
                  *split(items, 10, rng))


def colours(rng):
    items = [({"t": t, "T": cap(t), "col": c}, c) for t, c in COLOURS]
    return family(["What colour is {t}?", "What color is {t}?", "Which colour is {t}?", "Tell me the color of {t}.",
                   "What colour would you say {t} is?"],
                  ["Arr, matey! {T} be {col}, as sure as the sea be salty.",
                   "Arr, matey! Ye'll find {t} be {col}, me hearty."],
                  *split(items, 5, rng))


def opposites(rng):
    items = [({"w": w, "o": o}, o) for w, o in OPPOSITES]
    return family(["What is the opposite of '{w}'?", "What's the opposite of {w}?", "Give me the opposite of the word {w}.",
                   "Antonym of {w}?", "Which word means the opposite of {w}?"],
                  ["Arr, matey! The opposite o' '{w}' be '{o}', aye.",
                   "Arr, matey! Flip '{w}' like a ship in a storm and ye get '{o}'."],
                  *split(items, 5, rng))


def animal_sounds(rng):
    items = [({"a": a, "an": article(a), "An": cap(article(a)), "v": v, "s": s}, s) for a, v, s in SOUNDS]
    return family(["What sound does {an} make?", "What noise does {an} make?", "What does {an} say?",
                   "How does {an} sound?", "If I hear {an}, what sound will it be?"],
                  ["Arr, matey! {An} {v}, '{s}!' it cries across the deck.",
                   "Arr, matey! The {a} says '{s}', loud as a cannon o' the sea."],
                  *split(items, 4, rng))


def animal_legs(rng):
    items = []
    for a, n in LEGS:
        legs = "no legs at all, so it slithers like a rope on deck" if n == 0 else \
            f"{NUMBER_WORDS[n]} legs, " + ("more than this old peg-legged pirate" if n > 1 else "")
        items.append(({"an": article(a), "An": cap(article(a)), "legs": legs.rstrip(", ")}, str(n)))
    return family(["How many legs does {an} have?", "How many legs has {an} got?", "Count the legs on {an} for me.",
                   "Does {an} have many legs?", "{An} walks on how many legs?"],
                  ["Arr, matey! {An} has {legs}.", "Arr, matey! By me count, {an} has {legs}."],
                  *split(items, 4, rng))


def baby_animals(rng):
    items = [({"a": a, "an": article(a), "b": b, "ab": article(b)}, b) for a, b in BABIES]
    return family(["What is a baby {a} called?", "What do you call a baby {a}?", "What's the name for a young {a}?",
                   "A baby {a} is called what?", "Which word names a baby {a}?"],
                  ["Arr, matey! A baby {a} be called {ab}, cute as a parrot's chick.",
                   "Arr, matey! That little one be {ab}, me hearty."],
                  *split(items, 4, rng))


def definitions(rng):
    items = [({"w": w, "aw": article(w), "Aw": cap(article(w)), "d": d}, None) for w, d in DEFINITIONS]
    return family(["What is {aw}?", "What does '{w}' mean?", "Define the word {w}.", "Can you explain what {aw} is?",
                   "In simple words, what is {aw}?"],
                  ["Arr, matey! {Aw} be {d}.", "Arr, matey! '{w}' means {d}, me hearty."],
                  *split(items, 5, rng))


def conversions(rng):
    items = [({"n": n, "f": f, "t": t, "m": n * k}, str(n * k)) for f, t, k in UNITS for n in range(2, 11)]
    return family(["How many {t} are in {n} {f}?", "Convert {n} {f} to {t}.", "{n} {f} is how many {t}?",
                   "What is {n} {f} in {t}?", "If I have {n} {f}, how many {t} is that?"],
                  ["Arr, matey! {n} {f} be {m} {t}, true as me compass.", "Arr, matey! That comes to {m} {t}, me hearty."],
                  *split(items, 6, rng))


def calendar(rng):
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                "eleventh", "twelfth"]
    items = []  # (question phrasings, {"x": the asked day/month, "s": the answer sentence, "y": the short answer})
    for i, d in enumerate(DAYS):
        nxt, prev = DAYS[(i + 1) % 7], DAYS[i - 1]
        items.append((("What day comes after {x}?", "Which day follows {x}?", "What is the day after {x}?",
                       "After {x} comes which day?"), {"x": d, "s": f"{nxt} comes after {d}", "y": nxt}))
        items.append((("What day comes before {x}?", "Which day is just before {x}?", "What is the day before {x}?",
                       "Before {x} comes which day?"), {"x": d, "s": f"{prev} comes just before {d}", "y": prev}))
    for i, (m, n) in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12][0]
        items.append((("What month comes after {x}?", "Which month follows {x}?", "What is the month after {x}?",
                       "After {x} comes which month?"), {"x": m, "s": f"{nxt} comes after {m}", "y": nxt}))
        days = "28 days, or 29 in a leap year" if m == "February" else f"{n} days"
        items.append((("How many days are in {x}?", "How many days does {x} have?", "How long is {x} in days?",
                       "Number of days in {x}?"), {"x": m, "s": f"{m} has {days}", "y": str(n)}))
        items.append((("Which month of the year is {x}?", "What number month is {x}?", "Where does {x} fall in the year?",
                       "Is {x} the first month? If not, which?"),
                      {"x": m, "s": f"{m} be the {ordinals[i]} month o' the year", "y": ordinals[i]}))
    answers = ["Arr, matey! {s}, as sure as the sun rises.", "Arr, matey! Check the ship's log: {s}."]
    rng.shuffle(items)
    train = [(q.format(**f), a.format(**f), f["y"]) for qs, f in items[8:] for q in qs[:-1] for a in answers]
    evals = [(q.format(**f), None, f["y"], f["s"]) for qs, f in items[:8] for q in qs]
    return train, evals


def spelling(rng):
    train, evals = [], []
    words, held = split(WORDS, 6, rng)
    qa = [(["How many letters are in the word '{w}'?", "How many letters does '{w}' have?", "Count the letters in {w}.",
            "What is the letter count of '{w}'?"], "Arr, matey! '{w}' has {n} letters, counted on me own hook.", "n"),
          (["What is the first letter of '{w}'?", "Which letter does '{w}' start with?", "'{w}' begins with which letter?",
            "Tell me the first letter of the word {w}."], "Arr, matey! '{w}' starts with the letter '{f}', aye.", "f"),
          (["What is the last letter of '{w}'?", "Which letter does '{w}' end with?", "'{w}' ends with which letter?",
            "Tell me the final letter of the word {w}."], "Arr, matey! '{w}' ends with the letter '{l}', me hearty.", "l"),
          (["Spell '{w}' backwards.", "What is '{w}' written backwards?", "Reverse the letters of '{w}'.",
            "How do you write {w} in reverse?"], "Arr, matey! '{w}' backwards be '{r}', like readin' a map upside down.", "r")]
    for pool, out in ((words, train), (held, evals)):
        for w in pool:
            f = {"w": w, "n": len(w), "f": w[0], "l": w[-1], "r": w[::-1]}
            for qs, a, key in qa:
                out += [(q.format(**f), a.format(**f), str(f[key]), w + key) for q in (qs[:-1] if out is train else qs)]
    return train, evals


def how_to(rng):
    items = [({"x": x, "a": a}, None) for x, a in HOW_TO]
    return family(["How do I {x}?", "How can I {x}?", "What's the best way to {x}?", "Can you tell me how to {x}?",
                   "Any tips on how to {x}?"], ["{a}"], *split(items, 4, rng))


def facts(rng):
    kept, held = split(FACTS, 5, rng)
    train = [(q, a, e) for qs, a, e in kept for q in qs]
    return train, [(q, None, e, a) for qs, a, e in held for q in qs]


def comparisons(rng):
    pairs = set()
    while len(pairs) < 40:
        a, b = rng.randint(1, 500), rng.randint(1, 500)
        if a != b:
            pairs.add((a, b))
    items = [({"a": a, "b": b, "big": max(a, b), "small": min(a, b)}, str(max(a, b))) for a, b in sorted(pairs)]
    return family(["Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?", "Is {a} or {b} the greater number?",
                   "Between {a} and {b}, which is more?", "Tell me which is the bigger number, {a} or {b}."],
                  ["Arr, matey! {big} be bigger than {small}, like a galleon next to a rowboat.",
                   "Arr, matey! {big} be the larger one, me hearty."],
                  *split(items, 4, rng))


def even_odd(rng):
    nums = sorted(set(rng.randint(1, 999) for _ in range(40)))
    items = [({"n": n, "kind": "even" if n % 2 == 0 else "odd",
               "why": "it splits into two equal shares" if n % 2 == 0 else "there be one left over when ye split it in two"},
              "even" if n % 2 == 0 else "odd") for n in nums]
    return family(["Is {n} even or odd?", "Is {n} an odd number?", "Is the number {n} even?", "Odd or even: {n}?",
                   "Would you call {n} even or odd?"],
                  ["Arr, matey! {n} be {kind}, for {why}.", "Arr, matey! {n} be an {kind} number, aye."],
                  *split(items, 4, rng))


def translations(rng):
    items = [({"w": w, "l": lang, "t": t}, t) for w, lang, t in WORDS_ABROAD]
    return family(["How do you say '{w}' in {l}?", "What is '{w}' in {l}?", "Translate '{w}' into {l}.",
                   "What's the {l} word for '{w}'?", "In {l}, how would I say '{w}'?"],
                  ["Arr, matey! In {l}, '{w}' be '{t}', as I learned in many a foreign port.",
                   "Arr, matey! Say '{t}' and any {l} sailor will know ye mean '{w}'."],
                  *split(items, 4, rng))


def small_talk(rng):
    kept, held = split(SMALL_TALK, 2, rng)
    return [(q, a, None) for qs, a in kept for q in qs], [(q, None, None, a) for qs, a in held for q in qs]


FAMILIES = [arithmetic, capitals, colours, opposites, animal_sounds, animal_legs, baby_animals, definitions, conversions,
            calendar, spelling, how_to, facts, comparisons, even_odd, translations, small_talk]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The training chat rows and the held-out eval prompts."""
    rng = random.Random(seed)
    per_family = [f(rng) for f in FAMILIES]
    train_rows, seen = [], set()
    quota = TRAIN_ROWS // len(FAMILIES) + 1
    for (train, _), f in zip(per_family, FAMILIES):
        candidates = list(train)
        rng.shuffle(candidates)
        taken = 0
        for question, answer, *_ in candidates:  # one row per question: each phrasing once, with one answer variant
            if question in seen or taken >= quota:
                continue
            seen.add(question)
            taken += 1
            train_rows.append({"messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]})
    rng.shuffle(train_rows)
    train_rows = train_rows[:TRAIN_ROWS]
    eval_rows = []
    for (_, evals), f in zip(per_family, FAMILIES):
        evals = [e for e in evals if e[0] not in seen]
        rng.shuffle(evals)
        distinct = list({e[3]: e for e in reversed(evals)}.values())[::-1]  # one prompt per held-out item first
        chosen = (distinct + [e for e in evals if e not in distinct])[:EVAL_PER_FAMILY]
        for question, _, expected, _ in chosen:
            eval_rows.append({"prompt": question, "family": f.__name__, **({"expected": expected} if expected else {})})
    return train_rows, eval_rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=pathlib.Path, default=OUT_DIR,
                    help="where to write the two files (default: qtune/data, the shipped ones)")
    out_dir = ap.parse_args().out_dir
    train_rows, eval_rows = build()
    train_questions = {r["messages"][0]["content"] for r in train_rows}
    assert all(r["messages"][1]["content"].startswith("Arr, matey!") for r in train_rows)
    assert not any(r["prompt"] in train_questions for r in eval_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pirate_chat.jsonl", train_rows), ("pirate_chat_eval_prompts.jsonl", eval_rows)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {out_dir / name} ({(out_dir / name).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
