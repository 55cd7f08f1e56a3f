"""Comparison, counting, string and unit tasks for the verifiable suite, each in several phrasings.

As in `task_arithmetic`, a task is drawn as a structure (`Task.operands`: an operation name and its arguments, from
which a test recomputes the answer) and then phrased by one of several templates, so the model learns the skill rather
than one sentence. Worked steps stay within the default recipe's ~40-token budget: words of at most 7 letters (6 where
the steps spell them twice), lists of at most 4 items.
"""

from .task_arithmetic import NAMES, Task

WORDS = ["apple", "river", "planet", "garden", "window", "candle", "silver", "forest", "rocket", "pencil", "tiger",
         "orange", "bridge", "castle", "dragon", "mirror", "summer", "winter", "basket", "button", "cloud", "stone",
         "lemon", "music", "paper", "horse", "bread", "chair", "light", "ocean", "smile", "table", "train", "water",
         "banana", "cat", "dog", "sun", "moon", "tree", "house", "book", "pizza", "yellow", "coffee", "butter",
         "letter", "bottle", "kitten", "puzzle", "balloon", "cherry", "guitar", "island", "jacket", "monkey", "needle",
         "rabbit", "school", "turtle", "violin", "zebra", "hello", "world", "little", "happy", "green", "sheep"]
VOWELS = "aeiou"
UNITS = [("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000), ("days", "hours", 24),
         ("weeks", "days", 7), ("years", "months", 12), ("feet", "inches", 12), ("dollars", "cents", 100)]
ORDINALS = {1: "second", 2: "third"}

COMPARE_TWO = {
    "max": ["Which number is larger: {a} or {b}?", "Which is bigger, {a} or {b}?", "Which is greater: {a} or {b}?",
            "What is the larger of {a} and {b}?", "Pick the bigger number: {a} or {b}.", "Of {a} and {b}, which is more?",
            "{n1} scored {a} points and {n2} scored {b} points. What was the higher score?"],
    "min": ["Which number is smaller: {a} or {b}?", "Which is less, {a} or {b}?", "What is the smaller of {a} and {b}?",
            "Pick the smaller number: {a} or {b}.", "Of {a} and {b}, which is lower?",
            "{n1} is {a} cm tall and {n2} is {b} cm tall. How tall is the shorter one, in cm?"],
}
COMPARE_LIST = {"max": ["What is the largest number in this list: {items}?", "Which is the biggest of {items}?",
                        "Find the greatest number among {items}."],
                "min": ["What is the smallest number in this list: {items}?", "Which is the smallest of {items}?",
                        "Find the lowest number among {items}."]}
COUNTING = {
    "len": ["How many letters are in the word \"{w}\"?", "Count the letters in \"{w}\".",
            "How many letters does \"{w}\" have?", "How long is the word \"{w}\", in letters?"],
    "count": ["How many times does the letter \"{l}\" appear in \"{w}\"?", "Count the letter \"{l}\" in \"{w}\".",
              "How many \"{l}\" letters are in the word \"{w}\"?", "In \"{w}\", how often does \"{l}\" occur?"],
    "vowels": ["How many vowels are in \"{w}\"?", "Count the vowels in the word \"{w}\"."],
    "items": ["How many items are in this list: {items}?", "Count the words in this list: {items}.",
              "{n1} wrote down {items}. How many words did {p} write?"],
}
STRING = {
    "first": ["What is the first letter of \"{w}\"?", "Which letter does \"{w}\" start with?",
              "Give the first letter of the word \"{w}\"."],
    "last": ["What is the last letter of \"{w}\"?", "Which letter does \"{w}\" end with?",
             "Give the last letter of the word \"{w}\"."],
    "nth": ["What is the {nth} letter of \"{w}\"?", "Give the {nth} letter of the word \"{w}\"."],
    "upper": ["Write \"{w}\" in capital letters.", "Convert \"{w}\" to uppercase.", "Spell \"{w}\" in all caps."],
    "reverse": ["Spell \"{w}\" backwards.", "Reverse the word \"{w}\".", "Write \"{w}\" in reverse order."],
    "join": ["Join \"{w}\" and \"{v}\" into one word.", "Put \"{w}\" and \"{v}\" together without a space."],
}
SPELLING = {"spell": ["Spell \"{w}\" letter by letter.", "How do you spell \"{w}\"? Separate the letters with dashes.",
                      "Write the letters of \"{w}\" one by one.", "What letters make up the word \"{w}\"?",
                      "Break \"{w}\" into its letters."]}
UNIT_TEMPLATES = {
    "to_small": ["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.", "{n} {big} is how many {small}?",
                 "Express {n} {big} in {small}.", "{n1} has {n} {big}. How many {small} is that?"],
    "to_big": ["How many {big} are in {m} {small}?", "Convert {m} {small} to {big}.", "{m} {small} is how many {big}?"],
}


def _pick(rng, table: dict, domain: str) -> tuple[str, str, str]:
    """(kind, template, template id) drawn uniformly over the templates of `table`."""
    kind, index = rng.choice([(k, i) for k, templates in table.items() for i in range(len(templates))])
    return kind, table[kind][index], f"{domain}:{kind}:{index}"


def _names(rng) -> dict:
    (n1, p), (n2, _) = rng.sample(NAMES, 2)
    return {"n1": n1, "n2": n2, "p": p}


def _number(rng) -> int:
    return rng.randint(1, rng.choices([20, 100, 1000], weights=[3, 4, 3])[0])


# The steps of two numbers decide where a small model can see it: by the number of digits, else at the first digit
# that differs, each a one-token fact. Steps that opened with the verdict ("144 > 803, so the larger is 144": the pick
# made before any working) left it to the model's sense of magnitude, and after SFT it often wrote the two numbers in
# the question's order instead (65% of comparisons right).
def _versus(a: int, b: int) -> str:
    """Why a and b compare as they do: by digit count ("3 > 2 digits"), or by their first differing digits ("4 > 1"
    for 845 and 812; writing out the equal ones too ran past the token budget)."""
    x, y = str(a), str(b)
    if len(x) != len(y):
        return f"{len(x)} {'>' if len(x) > len(y) else '<'} {len(y)} digits"
    first = next(i for i in range(len(x)) if x[i] != y[i])
    return f"{x[first]} {'>' if x[first] > y[first] else '<'} {y[first]}"


def comparison(rng) -> Task:
    listed = rng.random() < 0.3
    kind, template, name = _pick(rng, COMPARE_LIST if listed else COMPARE_TWO, "comparison")
    numbers = []
    while len(numbers) < (3 if listed else 2):  # three: sorted, they still fit the token budget
        n = _number(rng)
        if n not in numbers:
            numbers.append(n)
    value = max(numbers) if kind == "max" else min(numbers)
    # lists: sorted, then the pick (digit counts and tie-breaks for three numbers ran past the token budget)
    steps = (f"{numbers[0]} vs {numbers[1]}: {_versus(*numbers)}, so the {'larger' if kind == 'max' else 'smaller'} "
             f"is {value}." if not listed
             else f"{', '.join(map(str, sorted(numbers)))}\nThe {'largest' if kind == 'max' else 'smallest'} is {value}.")
    question = template.format(a=numbers[0], b=numbers[-1], items=", ".join(map(str, numbers)), **_names(rng))
    return Task(question, str(value), steps, name, (kind, numbers))


def counting(rng) -> Task:
    kind, template, name = _pick(rng, COUNTING, "counting")
    word = rng.choice([w for w in WORDS if len(w) <= 7])
    spelled = "-".join(word)
    if kind == "items":
        items = rng.sample(WORDS, rng.randint(2, 4))
        question = template.format(items=", ".join(items), **_names(rng))
        steps = ", ".join(f"{i} {w}" for i, w in enumerate(items, 1)) + f"\nThat is {len(items)} words."
        return Task(question, str(len(items)), steps, name, (kind, items))
    if kind == "len":
        return Task(template.format(w=word), str(len(word)), f"{spelled}\nThat is {len(word)} letters.", name,
                    (kind, word))
    if kind == "vowels":
        found = [c for c in word if c in VOWELS]
        steps = f"{spelled}\n{', '.join(found) or 'no vowels'}: {len(found)} vowel{'' if len(found) == 1 else 's'}"
        return Task(template.format(w=word), str(len(found)), steps, name, (kind, word))
    # a letter of the word, or now and then one it lacks: the answer 0 must be learnable too
    letter = rng.choice(sorted(set(word))) if rng.random() < 0.85 else rng.choice(sorted(set("abcdefghijklmnoprstuwy")
                                                                                             - set(word)))
    hits = word.count(letter)
    found = ", ".join(letter * hits) or f"no {letter}"  # the matches copied out first, as the vowels are
    steps = f"{spelled}\n{found}\nThe letter {letter} appears {hits} time{'' if hits == 1 else 's'}."
    return Task(template.format(w=word, l=letter), str(hits), steps, name, ("count", letter, word))


def string(rng) -> Task:
    kind, template, name = _pick(rng, STRING, "string")
    word, other = rng.sample([w for w in WORDS if len(w) <= 6], 2)
    spelled = "-".join(word)
    if kind == "join":
        return Task(template.format(w=word, v=other), word + other, f"{word} + {other} = {word + other}", name,
                    (kind, word, other))
    position = rng.choice(list(ORDINALS)) if kind == "nth" else None
    value = {"first": word[0], "last": word[-1], "nth": word[position or 0], "upper": word.upper(),
             "reverse": word[::-1]}[kind]
    result = {"first": f"The first letter is {value}.", "last": f"The last letter is {value}.",
              "nth": f"The {ORDINALS.get(position)} letter is {value}.", "reverse": "-".join(value)}.get(kind)
    question = template.format(w=word, nth=ORDINALS.get(position))
    steps = "-".join(value) if kind == "upper" else f"{spelled}\n{result}"
    return Task(question, value, steps, name, (kind, word) + ((position,) if position else ()))


def spelling(rng) -> Task:
    """A word of the counting and string tasks spelled out ("s-t-o-n-e"): the step both domains rest on, which a small
    model cannot read off its tokens (a 135M model trained on those tasks alone spelled "stone" as "t-e-r-e-n").
    Training data, mixed into SFT by the default recipe; not one of the held-out domains."""
    kind, template, name = _pick(rng, SPELLING, "spelling")
    word = rng.choice(WORDS)
    spelled = "-".join(word)
    return Task(template.format(w=word), spelled, spelled, name, (kind, word))


def units(rng) -> Task:
    big, small, factor = rng.choice(UNITS)
    kind, template, name = _pick(rng, UNIT_TEMPLATES, "units")
    n = rng.randint(2, 12) if rng.random() < 0.8 else rng.choice([15, 20, 25, 30, 50])
    if kind == "to_small":
        question = template.format(n=n, big=big, small=small, **_names(rng))
        return Task(question, str(n * factor), f"{n} * {factor} = {n * factor}", name, (kind, n, factor))
    question = template.format(m=n * factor, big=big, small=small)
    return Task(question, str(n), f"{n * factor} / {factor} = {n}", name, (kind, n * factor, factor))
