"""The synthetic language kubemoe-tiny-chat learns: generated here, from a fixed seed, so the
model repeats nothing written elsewhere.

The language has four kinds of documents, drawn with these weights:
- stories (0.35): 4-8 sentences about a person and an animal of a small fixed world (each of
  16 animals has one colour, home, food and size; each of 10 people one job and one place),
  from sentence templates filled with the world's facts, so the facts stay consistent;
- dialogues (0.35): one to three chat turns in the model's chat template (`<｜User｜>` …
  `<｜Assistant｜>` … end of sentence): questions about the world's facts, sums, greetings,
  requests for a story or a small program, each answered from the facts;
- arithmetic (0.15): lines `a + b = c`, `a - b = c` (a ≥ b) and `a * b = c`, operands up to
  50 (products up to 12 × 12), as worksheets;
- code (0.15): small programs in a made-up language (`let`, `fn`, `print`, `for`) whose
  `print` lines carry the value they print as a comment, computed here.

Every document is wrapped as `<｜begin▁of▁sentence｜>` + text + `<｜end▁of▁sentence｜>` and the
documents are concatenated into one token stream.
"""

import random

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT]

ANIMALS = ["fox", "owl", "cat", "dog", "bear", "rabbit", "horse", "wolf", "duck", "frog", "deer",
           "mouse", "goat", "crow", "otter", "bee"]
COLORS = ["red", "brown", "grey", "black", "white", "golden", "green", "orange"]
HOMES = ["forest", "river", "hill", "barn", "cave", "meadow", "lake", "garden"]
FOODS = ["berries", "fish", "seeds", "grass", "honey", "mice", "apples", "bugs"]
SIZES = ["tiny", "small", "big", "large"]
PEOPLE = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon"]
JOBS = ["baker", "teacher", "painter", "farmer", "doctor", "builder", "singer", "sailor"]
PLACES = ["market", "school", "library", "park", "station", "harbour"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
TIMES = ["Every morning", "In the evening", "At noon", "On Sundays", "After the rain"]
VARS = ["x", "y", "z", "total", "count", "n", "sum", "size"]


def at(home):
    """`home` with its preposition: on the hill, in the forest."""
    return ("on the " if home == "hill" else "in the ") + home


def an(word):
    """The indefinite article and `word`."""
    return ("an " if word[0] in "aeiou" else "a ") + word


class World:
    """The facts every document agrees with, fixed by `seed`."""

    def __init__(self, seed=7):
        r = random.Random(seed)
        self.animal = {a: {"color": r.choice(COLORS), "home": r.choice(HOMES),
                           "food": r.choice(FOODS), "size": r.choice(SIZES)} for a in ANIMALS}
        self.person = {p: {"job": r.choice(JOBS), "place": r.choice(PLACES),
                           "pet": r.choice(ANIMALS)} for p in PEOPLE}


def story(w, r, a=None):
    p = r.choice(PEOPLE)
    a = a or r.choice(ANIMALS)
    fa, fp = w.animal[a], w.person[p]
    lines = [
        f"It was a {r.choice(WEATHER)} day.",
        f"{p} the {fp['job']} walked to the {fp['place']}.",
        f"On the way, {p} met the {fa['color']} {a}.",
        f"\"Hello, {a}!\" said {p}. \"Where are you going?\"",
        f"\"I am going home to the {fa['home']},\" said the {a}.",
    ]
    extra = [
        f"The {a} lives {at(fa['home'])} and eats {fa['food']}.",
        f"{r.choice(TIMES)} the {a} looks for {fa['food']}.",
        f"The {a} is {fa['size']} and {fa['color']}.",
        f"{p} gave the {a} some {fa['food']}, and the {a} was happy.",
        f"They walked together to the {fa['home']}.",
    ]
    if fp["pet"] != a:
        extra.append(f"{p} has {an(w.animal[fp['pet']]['color'])} {fp['pet']} at home.")
    r.shuffle(extra)
    lines += extra[: r.randint(1, 3)]
    lines.append(r.choice(["Then they said goodbye.", "The end.", f"{p} went back to the {fp['place']}."]))
    return " ".join(lines)


def program(r, a=None, b=None):
    a = r.randint(1, 20) if a is None else a
    b = r.randint(1, 20) if b is None else b
    u, v = r.sample(VARS, 2)
    kind = r.randint(0, 2)
    if kind == 0:
        return (f"fn add(a, b) {{\n    return a + b;\n}}\nlet {u} = add({a}, {b});\n"
                f"print({u}); // {a + b}")
    if kind == 1:
        k = r.randint(2, 9)
        return f"let {u} = {a};\nlet {v} = {u} * {k};\nprint({v}); // {a * k}"
    n = r.randint(2, 5)
    return (f"let {u} = 0;\nfor i in 0..{n} {{\n    {u} = {u} + {a};\n}}\n"
            f"print({u}); // {a * n}")


def sum_line(r):
    op = r.choice("+-*")
    if op == "*":
        a, b = r.randint(0, 12), r.randint(0, 12)
        return f"{a} * {b} = {a * b}"
    a, b = r.randint(0, 50), r.randint(0, 50)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    return f"{a} + {b} = {a + b}"


def turn(w, r):
    """One question and its answer."""
    a = r.choice(ANIMALS)
    f = w.animal[a]
    p = r.choice(PEOPLE)
    kind = r.randint(0, 10)
    if kind == 0:
        return f"What does the {a} eat?", f"The {a} eats {f['food']}."
    if kind == 1:
        return f"Where does the {a} live?", f"The {a} lives {at(f['home'])}."
    if kind == 2:
        return f"What color is the {a}?", f"The {a} is {f['color']}."
    if kind == 3:
        big = f["size"] in ("big", "large")
        return (f"Is the {a} big?",
                f"Yes, the {a} is {f['size']}." if big else f"No, the {a} is {f['size']}.")
    if kind == 4:
        line = sum_line(r)
        return f"What is {line.split(' = ')[0]}?", f"{line}."
    if kind == 5:
        return (r.choice(["Hello!", "Hi!", "Good morning!", "Hello, who are you?"]),
                "Hello! I am kubemoe-tiny-chat, a small model made of experts. How can I help you today?")
    if kind == 6:
        return f"Tell me a story about the {a}.", story(w, r, a)
    if kind == 7:
        x, y = r.randint(1, 20), r.randint(1, 20)
        return f"Write a program that adds {x} and {y}.", program_adding(r, x, y)
    if kind == 8:
        fp = w.person[p]
        return (f"Who is {p}?",
                f"{p} is {an(fp['job'])} who works at the {fp['place']} and has {an(fp['pet'])}.")
    if kind == 9:
        return r.choice(["Thank you!", "Thanks!"]), "You are welcome!"
    return f"Tell me about the {a}.", (f"The {a} is {an(f['size'])} {f['color']} animal. "
                                       f"It lives {at(f['home'])} and eats {f['food']}.")


def program_adding(r, x, y):
    u = r.choice(VARS)
    return f"let {u} = {x} + {y};\nprint({u}); // {x + y}"


def dialogue(w, r):
    out = ""
    for _ in range(r.choice([1, 1, 2, 3])):
        q, a = turn(w, r)
        out += f"{USER}{q}{ASSISTANT}{a}{EOS}"
    return out


def document(w, r):
    """One document, with its special tokens."""
    k = r.random()
    if k < 0.35:
        return BOS + story(w, r) + EOS
    if k < 0.70:
        # The chat template puts the end of sentence after each answer already.
        return BOS + dialogue(w, r)
    if k < 0.85:
        return BOS + "\n".join(sum_line(r) for _ in range(r.randint(3, 8))) + EOS
    return BOS + "\n".join(program(r) for _ in range(r.randint(1, 2))) + EOS


def documents(seed, world_seed=7):
    """An endless stream of documents, the same for the same seeds."""
    w, r = World(world_seed), random.Random(seed)
    while True:
        yield document(w, r)
