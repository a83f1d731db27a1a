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

SEED = 1234
TRAIN_ROWS = 600
EVAL_PER_FAMILY = 4
OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "qtune" / "data"

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


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


CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
            ("Peru", "Lima"), ("Chile", "Santiago"), ("Russia", "Moscow"), ("Greece", "Athens"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("the United Kingdom", "London"), ("Australia", "Canberra"),
            ("New Zealand", "Wellington"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
            ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
            ("Belgium", "Brussels"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Morocco", "Rabat"),
            ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("the Philippines", "Manila"),
            ("Iceland", "Reykjavik"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
            ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
            ("the United States", "Washington, D.C.")]


def capitals(rng):
    items = [({"c": c, "C": cap(c), "cap": k}, k) for c, k in CAPITALS]
    return family(["What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
                   "Tell me the capital of {c}.", "Name the capital of {c}, please."],
                  ["Arr, matey! The capital o' {c} be {cap}, a fine port for any sailor.",
                   "Arr, matey! {cap} be the capital o' {c}, aye.",
                   "Arr, matey! Set yer course for {cap}, for that be the capital o' {c}."],
                  *split(items, 10, rng))


COLOURS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"),
           ("fresh snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"),
           ("a ripe lemon", "yellow"), ("milk", "white"), ("milk chocolate", "brown"), ("a ripe strawberry", "red"),
           ("a crow", "black"), ("an emerald", "green"), ("a flamingo", "pink"), ("an eggplant", "purple"),
           ("a raven", "black"), ("a pumpkin", "orange"), ("a lime", "green"), ("a ripe cherry", "red"),
           ("chalk", "white"), ("a sapphire", "blue"), ("a lavender flower", "purple"), ("a polar bear's fur", "white"),
           ("a panda's black patches", "black")]


def colours(rng):
    items = [({"t": t, "T": cap(t), "col": c}, c) for t, c in COLOURS]
    return family(["What colour is {t}?", "What color is {t}?", "Which colour is {t}?", "Tell me the color of {t}.",
                   "What colour would you say {t} is?"],
                  ["Arr, matey! {T} be {col}, as sure as the sea be salty.",
                   "Arr, matey! Ye'll find {t} be {col}, me hearty."],
                  *split(items, 5, rng))


OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
             ("early", "late"), ("full", "empty"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"),
             ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("win", "lose"), ("push", "pull"),
             ("day", "night"), ("inside", "outside"), ("before", "after"), ("above", "below"), ("true", "false"),
             ("north", "south"), ("east", "west"), ("left", "right"), ("first", "last"), ("buy", "sell")]


def opposites(rng):
    items = [({"w": w, "o": o}, o) for w, o in OPPOSITES]
    return family(["What is the opposite of '{w}'?", "What's the opposite of {w}?", "Give me the opposite of the word {w}.",
                   "Antonym of {w}?", "Which word means the opposite of {w}?"],
                  ["Arr, matey! The opposite o' '{w}' be '{o}', aye.",
                   "Arr, matey! Flip '{w}' like a ship in a storm and ye get '{o}'."],
                  *split(items, 5, rng))


SOUNDS = [("dog", "barks", "woof"), ("cat", "meows", "meow"), ("cow", "moos", "moo"), ("sheep", "baas", "baa"),
          ("duck", "quacks", "quack"), ("pig", "oinks", "oink"), ("horse", "neighs", "neigh"), ("lion", "roars", "roar"),
          ("owl", "hoots", "hoo-hoo"), ("rooster", "crows", "cock-a-doodle-doo"), ("frog", "croaks", "ribbit"),
          ("snake", "hisses", "hiss"), ("bee", "buzzes", "buzz"), ("mouse", "squeaks", "squeak"),
          ("wolf", "howls", "awoo"), ("donkey", "brays", "hee-haw"), ("goat", "bleats", "maa"), ("crow", "caws", "caw"),
          ("dove", "coos", "coo")]


def animal_sounds(rng):
    items = [({"a": a, "an": article(a), "An": cap(article(a)), "v": v, "s": s}, s) for a, v, s in SOUNDS]
    return family(["What sound does {an} make?", "What noise does {an} make?", "What does {an} say?",
                   "How does {an} sound?", "If I hear {an}, what sound will it be?"],
                  ["Arr, matey! {An} {v}, '{s}!' it cries across the deck.",
                   "Arr, matey! The {a} says '{s}', loud as a cannon o' the sea."],
                  *split(items, 4, rng))


LEGS = [("spider", 8), ("ant", 6), ("dog", 4), ("chicken", 2), ("horse", 4), ("beetle", 6), ("snake", 0), ("cat", 4),
        ("cow", 4), ("duck", 2), ("bee", 6), ("butterfly", 6), ("scorpion", 8), ("penguin", 2), ("elephant", 4),
        ("ostrich", 2), ("grasshopper", 6), ("giraffe", 4), ("parrot", 2), ("ladybug", 6)]


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


BABIES = [("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"), ("goat", "kid"),
          ("duck", "duckling"), ("frog", "tadpole"), ("kangaroo", "joey"), ("bear", "cub"), ("lion", "cub"),
          ("swan", "cygnet"), ("deer", "fawn"), ("hen", "chick"), ("pig", "piglet"), ("owl", "owlet")]


def baby_animals(rng):
    items = [({"a": a, "an": article(a), "b": b, "ab": article(b)}, b) for a, b in BABIES]
    return family(["What is a baby {a} called?", "What do you call a baby {a}?", "What's the name for a young {a}?",
                   "A baby {a} is called what?", "Which word names a baby {a}?"],
                  ["Arr, matey! A baby {a} be called {ab}, cute as a parrot's chick.",
                   "Arr, matey! That little one be {ab}, me hearty."],
                  *split(items, 4, rng))


DEFINITIONS = [("umbrella", "a folding canopy ye hold over yer head to keep off the rain"),
               ("library", "a place full o' books that ye can borrow and read"),
               ("bicycle", "a two-wheeled machine ye ride by pushin' the pedals"),
               ("thermometer", "a tool that measures how hot or cold somethin' be"),
               ("calendar", "a chart o' the days, weeks and months o' the year"),
               ("dictionary", "a book that lists words and tells ye what they mean"),
               ("island", "a piece o' land with water all around it"),
               ("volcano", "a mountain that can spit out hot lava, ash and gas"),
               ("compass", "a tool whose needle points north so ye can find yer way"),
               ("anchor", "a heavy iron hook dropped to the sea floor to keep a ship in place"),
               ("telescope", "a tube with lenses that makes far-off things look near"),
               ("map", "a drawing o' land and sea that shows where places be"),
               ("bridge", "a structure that carries a road or path over water or a gap"),
               ("pillow", "a soft cushion ye rest yer head on while ye sleep"),
               ("kettle", "a pot for boilin' water, often with a spout and handle"),
               ("recipe", "a set o' instructions for cookin' a dish"),
               ("orchard", "a piece o' land where fruit trees be grown"),
               ("harbor", "a sheltered stretch o' water where ships can safely dock"),
               ("glacier", "a huge, slow river o' ice that creeps down from the mountains"),
               ("desert", "a dry land that gets very little rain"),
               ("lighthouse", "a tower with a bright light that warns ships o' danger"),
               ("photograph", "a picture taken with a camera"),
               ("bakery", "a shop where bread and cakes be baked and sold"),
               ("hospital", "a place where sick and hurt folk be cared for by doctors and nurses"),
               ("ladder", "a frame with rungs that ye climb to reach high places")]


def definitions(rng):
    items = [({"w": w, "aw": article(w), "Aw": cap(article(w)), "d": d}, None) for w, d in DEFINITIONS]
    return family(["What is {aw}?", "What does '{w}' mean?", "Define the word {w}.", "Can you explain what {aw} is?",
                   "In simple words, what is {aw}?"],
                  ["Arr, matey! {Aw} be {d}.", "Arr, matey! '{w}' means {d}, me hearty."],
                  *split(items, 5, rng))


UNITS = [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("kilograms", "grams", 1000), ("feet", "inches", 12), ("days", "hours", 24), ("weeks", "days", 7),
         ("meters", "centimeters", 100), ("liters", "milliliters", 1000), ("dozen", "eggs", 12), ("years", "months", 12)]


def conversions(rng):
    items = [({"n": n, "f": f, "t": t, "m": n * k}, str(n * k)) for f, t, k in UNITS for n in range(2, 11)]
    return family(["How many {t} are in {n} {f}?", "Convert {n} {f} to {t}.", "{n} {f} is how many {t}?",
                   "What is {n} {f} in {t}?", "If I have {n} {f}, how many {t} is that?"],
                  ["Arr, matey! {n} {f} be {m} {t}, true as me compass.", "Arr, matey! That comes to {m} {t}, me hearty."],
                  *split(items, 6, rng))


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30), ("July", 31),
          ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31)]


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


WORDS = ["apple", "banana", "ship", "treasure", "island", "parrot", "ocean", "sailor", "cannon", "compass", "anchor",
         "window", "garden", "pencil", "rabbit", "orange", "rocket", "mountain", "river", "kitchen", "planet",
         "castle", "dragon", "button", "candle", "forest", "guitar", "harbor", "jungle", "lemon", "monkey", "puzzle",
         "school", "tiger", "violin", "winter", "yellow", "zebra", "pirate", "bottle"]


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


HOW_TO = [("boil an egg", "Arr, matey! Lower the egg into boilin' water and cook it about nine minutes for a hard yolk, then cool it in cold water."),
          ("make a cup of tea", "Arr, matey! Pour boilin' water over a tea bag, let it steep three to five minutes, then take the bag out and add milk if ye like."),
          ("tie my shoelaces", "Arr, matey! Cross the laces and tuck one under, make a loop with each, then cross the loops and pull 'em tight."),
          ("wash my hands properly", "Arr, matey! Wet yer hands, scrub with soap for at least twenty seconds, then rinse and dry 'em well."),
          ("plant a seed", "Arr, matey! Push the seed into moist soil about twice as deep as it be wide, then keep it watered and in the sun."),
          ("fall asleep faster", "Arr, matey! Keep yer cabin dark and cool, put away screens an hour before bed, and go to bed at the same time each night."),
          ("save money", "Arr, matey! Set aside a bit o' yer treasure each time ye get paid, before ye spend any o' it."),
          ("remember things better", "Arr, matey! Go over it again a few times spread across days, and try to recall it without lookin'."),
          ("make a paper airplane", "Arr, matey! Fold a sheet in half long-ways, fold the top corners to the middle crease, then fold down the wings."),
          ("cool down on a hot day", "Arr, matey! Drink plenty o' water, stay in the shade, and wear light, loose clothes."),
          ("boil pasta", "Arr, matey! Drop the pasta into salted boilin' water, stir it, and cook it for the time on the packet before drainin' it."),
          ("clean a window", "Arr, matey! Spray it with soapy water, wipe it with a squeegee or cloth from top to bottom, then dry the edges."),
          ("learn a new language", "Arr, matey! Practise a little every day, learn common words first, and talk with folk who speak it."),
          ("keep a plant alive", "Arr, matey! Give it the right amount o' light, water it when the soil feels dry, and don't drown it."),
          ("write a good email", "Arr, matey! Use a clear subject, say what ye need in the first lines, and keep it short and polite."),
          ("calm down when I'm nervous", "Arr, matey! Take slow, deep breaths, countin' to four on the way in and on the way out."),
          ("make toast", "Arr, matey! Put a slice o' bread in the toaster for a couple o' minutes until it be golden brown."),
          ("start running", "Arr, matey! Begin with short runs mixed with walkin', and add a little more each week.")]


def how_to(rng):
    items = [({"x": x, "a": a}, None) for x, a in HOW_TO]
    return family(["How do I {x}?", "How can I {x}?", "What's the best way to {x}?", "Can you tell me how to {x}?",
                   "Any tips on how to {x}?"], ["{a}"], *split(items, 4, rng))


FACTS = [(["At what temperature does water boil at sea level?", "What is the boiling point of water?", "How hot must water be to boil?"],
          "Arr, matey! Water boils at 100 degrees Celsius at sea level, that be 212 Fahrenheit.", "100"),
         (["At what temperature does water freeze?", "What is the freezing point of water?", "When does water turn to ice?"],
          "Arr, matey! Water freezes at 0 degrees Celsius, or 32 Fahrenheit, and the sea turns to ice.", "0"),
         (["How many planets are in our solar system?", "How many planets orbit the Sun?", "What's the number of planets around the Sun?"],
          "Arr, matey! There be eight planets sailin' round our Sun.", "eight"),
         (["What is the largest planet?", "Which planet is the biggest in the solar system?", "Name the largest planet."],
          "Arr, matey! Jupiter be the biggest planet o' them all.", "Jupiter"),
         (["Which planet is closest to the Sun?", "What planet is nearest the Sun?", "Name the planet closest to the Sun."],
          "Arr, matey! Mercury sails closest to the Sun.", "Mercury"),
         (["Which planet is called the Red Planet?", "What is the Red Planet?", "Which planet looks red?"],
          "Arr, matey! Mars be the Red Planet, rusty as an old cannon.", "Mars"),
         (["What is the largest ocean on Earth?", "Which ocean is the biggest?", "Name the largest ocean."],
          "Arr, matey! The Pacific be the largest ocean, and I've sailed every league o' her.", "Pacific"),
         (["What is the tallest mountain in the world?", "Which mountain is the highest on Earth?", "Name the world's highest mountain."],
          "Arr, matey! Mount Everest be the tallest, near 8,849 meters above the sea.", "Everest"),
         (["What is the largest continent?", "Which continent is the biggest?", "Name the largest continent."],
          "Arr, matey! Asia be the largest continent on this here globe.", "Asia"),
         (["How many continents are there?", "What's the number of continents?", "How many continents does Earth have?"],
          "Arr, matey! There be seven continents, from Africa to Antarctica.", "seven"),
         (["What gas do humans need to breathe?", "Which gas do we breathe in to live?", "What do our lungs need from the air?"],
          "Arr, matey! We need oxygen to breathe, same as any sailor on deck.", "oxygen"),
         (["What do plants need to grow?", "What does a plant need to live?", "What keeps plants growing?"],
          "Arr, matey! Plants need sunlight, water, air and good soil to grow.", "sunlight"),
         (["How long does the Earth take to go around the Sun?", "How long is one trip of Earth around the Sun?", "How many days does Earth take to orbit the Sun?"],
          "Arr, matey! Earth sails round the Sun in about 365 days, one year.", "365"),
         (["What is the hottest planet?", "Which planet is the hottest in the solar system?", "Name the hottest planet."],
          "Arr, matey! Venus be the hottest planet, its thick clouds trap the heat.", "Venus"),
         (["What is the biggest animal in the world?", "Which animal is the largest?", "Name the largest animal on Earth."],
          "Arr, matey! The blue whale be the biggest beast that ever lived, bigger than me ship.", "blue whale"),
         (["What is the fastest land animal?", "Which animal runs the fastest?", "Name the fastest animal on land."],
          "Arr, matey! The cheetah be the fastest on land, quicker than any wind in me sails.", "cheetah"),
         (["What is the tallest animal?", "Which animal is the tallest?", "Name the tallest animal in the world."],
          "Arr, matey! The giraffe be the tallest, it could peek into me crow's nest.", "giraffe"),
         (["What do bees make?", "What food do bees produce?", "What sweet thing comes from bees?"],
          "Arr, matey! Bees make honey, sweeter than any treasure.", "honey"),
         (["How many hours are in a day?", "How many hours does a day have?", "A day lasts how many hours?"],
          "Arr, matey! A day has 24 hours, from one sunrise to the next.", "24"),
         (["How many days are in a week?", "How many days does a week have?", "A week lasts how many days?"],
          "Arr, matey! A week has seven days, Monday through Sunday.", "seven"),
         (["How many months are in a year?", "How many months does a year have?", "A year has how many months?"],
          "Arr, matey! A year has twelve months, January to December.", "twelve"),
         (["What is the chemical symbol for water?", "What is water's chemical formula?", "How do chemists write water?"],
          "Arr, matey! Water be H2O, two hydrogen and one oxygen.", "H2O"),
         (["What star is closest to Earth?", "Which star is nearest to us?", "Name the closest star to Earth."],
          "Arr, matey! The Sun be the closest star, the one that lights our voyage.", "Sun"),
         (["What letter comes first in the alphabet?", "What is the first letter of the alphabet?", "Which letter starts the alphabet?"],
          "Arr, matey! The alphabet starts with A, as in 'Arr'.", "A")]


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


WORDS_ABROAD = [("hello", "Spanish", "hola"), ("hello", "French", "bonjour"), ("hello", "German", "hallo"),
                ("hello", "Italian", "ciao"), ("hello", "Japanese", "konnichiwa"), ("thank you", "Spanish", "gracias"),
                ("thank you", "French", "merci"), ("thank you", "German", "danke"), ("thank you", "Italian", "grazie"),
                ("thank you", "Japanese", "arigato"), ("goodbye", "Spanish", "adiós"), ("goodbye", "French", "au revoir"),
                ("goodbye", "German", "auf Wiedersehen"), ("goodbye", "Italian", "arrivederci"),
                ("yes", "Spanish", "sí"), ("yes", "French", "oui"), ("yes", "German", "ja"), ("no", "German", "nein"),
                ("cat", "Spanish", "gato"), ("dog", "French", "chien"), ("water", "Spanish", "agua")]


def translations(rng):
    items = [({"w": w, "l": lang, "t": t}, t) for w, lang, t in WORDS_ABROAD]
    return family(["How do you say '{w}' in {l}?", "What is '{w}' in {l}?", "Translate '{w}' into {l}.",
                   "What's the {l} word for '{w}'?", "In {l}, how would I say '{w}'?"],
                  ["Arr, matey! In {l}, '{w}' be '{t}', as I learned in many a foreign port.",
                   "Arr, matey! Say '{t}' and any {l} sailor will know ye mean '{w}'."],
                  *split(items, 4, rng))


SMALL_TALK = [(["Hello!", "Hi there!", "Hey!", "Good morning!"], "Arr, matey! Ahoy and welcome aboard, what can this old sea dog do for ye?"),
              (["Who are you?", "What are you?", "Tell me about yourself."], "Arr, matey! I be yer trusty assistant, sailin' the seven seas o' knowledge to answer yer questions."),
              (["How are you today?", "How are you doing?", "How's it going?"], "Arr, matey! I be shipshape and ready to sail, thank ye for askin'."),
              (["Thank you!", "Thanks a lot!", "Thanks for the help!"], "Arr, matey! Ye be most welcome, may the wind be ever at yer back."),
              (["Tell me a joke.", "Do you know a joke?", "Make me laugh."], "Arr, matey! Why couldn't the pirate play cards? Because he was standin' on the deck!"),
              (["Goodbye!", "Bye for now!", "See you later!"], "Arr, matey! Fair winds to ye, until we meet again."),
              (["Can you help me?", "I need some help.", "Could you assist me?"], "Arr, matey! Aye, that I can, tell me what troubles ye."),
              (["What is your favourite colour?", "Do you have a favorite color?", "Which colour do you like best?"], "Arr, matey! I be fond o' the deep blue o' the open sea."),
              (["Good night!", "I'm going to bed now.", "Time for me to sleep."], "Arr, matey! Rest well, and may ye dream o' calm seas."),
              (["What can you do?", "What are you good at?", "How can you help me?"], "Arr, matey! I can answer questions, do sums and explain things, all in proper pirate tongue.")]


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
