"""Arithmetic tasks for the verifiable suite, in many phrasings, so a model learns arithmetic and not one template.

A model trained on "What is 17 + 25?" alone learns that format: on independently written questions (word problems,
"Compute", money, ages, two steps) the gain mostly vanished. So each task is drawn as a structure first (operands and
operations, `Task.operands`), then dressed in one of many phrasings: bare expressions and imperatives, word problems
with names, objects, money, time and ages, and two-step problems. Operands come from mixed ranges (mostly small: a
135M model must still get some right, which is what RL learns from; some two- and three-digit ones).

Worked steps (the thinking rendering) are one equation per operation, computed from the structure, never parsed back
from the text, and short: the default recipe leaves about 40 new tokens for steps and answer.
"""

from collections import namedtuple

Task = namedtuple("Task", "question answer steps template operands")

NAMES = [("Anna", "she"), ("Ben", "he"), ("Carlos", "he"), ("Dana", "she"), ("Emma", "she"), ("Farid", "he"),
         ("Grace", "she"), ("Hiro", "he"), ("Ivy", "she"), ("Jamal", "he"), ("Kate", "she"), ("Liam", "he"),
         ("Maya", "she"), ("Noah", "he"), ("Olivia", "she"), ("Priya", "she"), ("Omar", "he"), ("Sofia", "she"),
         ("Tom", "he"), ("Zoe", "she")]
OBJECTS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "stamps", "shells", "coins",
           "balloons", "eggs", "toys", "flowers", "candies", "oranges", "beads", "crayons"]
CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("basket", "baskets"), ("pack", "packs"), ("jar", "jars"),
              ("tray", "trays")]
TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}

BARE = {
    "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Calculate {a} + {b}.", "{a} + {b} = ?",
          "Add {a} and {b}.", "Find the sum of {a} and {b}.", "What is the sum of {a} and {b}?", "Evaluate {a} + {b}.",
          "Work out {a} + {b}.", "How much is {a} plus {b}?", "What do you get if you add {b} to {a}?",
          "Solve: {a} + {b}", "What is the total of {a} and {b}?", "What number is {b} more than {a}?"],
    "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "Calculate {a} - {b}.", "{a} - {b} = ?", "Evaluate {a} - {b}.",
          "What is {a} minus {b}?", "Subtract {b} from {a}.", "Work out {a} - {b}.", "What is {b} less than {a}?",
          "Take {b} away from {a}. What is left?", "What is the difference between {a} and {b}?",
          "What do you get when you subtract {b} from {a}?", "Solve: {a} - {b}"],
    "*": ["What is {a} * {b}?", "What is {a} × {b}?", "What is {a} times {b}?", "Compute {a} x {b}.",
          "Calculate {a} * {b}.", "Multiply {a} by {b}.", "What is the product of {a} and {b}?", "{a} × {b} = ?",
          "Evaluate {a} times {b}.", "What is {a} multiplied by {b}?"],
    "/": ["What is {a} / {b}?", "What is {a} ÷ {b}?", "Divide {a} by {b}.", "Compute {a} / {b}.",
          "What is {a} divided by {b}?", "Calculate {a} ÷ {b}.", "How many times does {b} go into {a}?"],
}
SIGNED = 5  # the first templates of "-" are symbolic, where a negative result reads naturally

WORD = {
    "+": ["{n1} has {a} {obj}. {P} gets {b} more. How many {obj} does {n1} have now?",
          "{n1} had {a} {obj} and bought {b} more. How many {obj} does {p} have in total?",
          "There are {a} {obj} in a box and {b} {obj} on the table. How many {obj} are there altogether?",
          "{n1} has {a} {obj} and {n2} has {b} {obj}. How many {obj} do they have altogether?",
          "{n1} has {a} {obj}. {n2} has {b} more {obj} than {n1}. How many {obj} does {n2} have?",
          "{n1} collected {a} {obj} on Monday and {b} on Tuesday. How many {obj} did {p} collect in all?",
          "{n1} is {a} years old. {n2} is {b} years older. How old is {n2}?",
          "{n1} is {a} years old. How old will {p} be in {b} years?",
          "{n1} read for {a} minutes in the morning and {b} minutes in the evening. How many minutes did {p} read?",
          "{n1} has ${a} and earns ${b} more. How many dollars does {p} have now?",
          "A book costs ${a} and a pen costs ${b}. What is the total cost in dollars?"],
    "-": ["{n1} had {a} {obj} and gave {b} to {n2}. How many {obj} does {n1} have left?",
          "{n1} had {a} {obj}. {P} lost {b} of them. How many {obj} are left?",
          "{n1} has {a} {obj} and {n2} has {b} {obj}. How many more {obj} does {n1} have than {n2}?",
          "{n1} has {a} {obj}. {n2} has {b} fewer {obj} than {n1}. How many {obj} does {n2} have?",
          "There were {a} {obj} in a jar. {n1} took {b} out. How many {obj} are still in the jar?",
          "{n1} has ${a} and spends ${b}. How many dollars are left?",
          "{n1} pays with a ${a} bill for something that costs ${b}. How much change does {p} get, in dollars?",
          "{n1} is {a} years old. How old was {p} {b} years ago?",
          "A trip takes {a} minutes. After {b} minutes, how many minutes are left?",
          "{n1} is {a} years old and {n2} is {b} years old. How many years older is {n1}?"],
    "*": ["{n1} buys {a} {boxes} with {b} {obj} in each. How many {obj} does {p} buy in total?",
          "There are {a} rows of {b} chairs. How many chairs are there?",
          "Each {box} holds {b} {obj}. How many {obj} are in {a} {boxes}?",
          "{n1} has {b} {obj}. {n2} has {times} as many {obj}. How many {obj} does {n2} have?",
          "One ticket costs ${b}. How much do {a} tickets cost, in dollars?",
          "{n1} walks {b} kilometers every day. How many kilometers does {p} walk in {a} days?",
          "A box has {a} layers with {b} {obj} in each layer. How many {obj} are in the box?"],
    "/": ["{n1} shares {a} {obj} equally among {b} friends. How many {obj} does each friend get?",
          "{a} {obj} are packed into {boxes} of {b}. How many {boxes} are filled?",
          "{n1} puts {a} {obj} into {b} equal groups. How many {obj} are in each group?",
          "{b} friends split a bill of ${a} equally. How many dollars does each friend pay?",
          "{n1} has {a} {obj} and gives half of them to {n2}. How many {obj} does {n2} get?"],
}
TIMES_TEMPLATE = 3  # WORD["*"][3] says "twice"/"three times": its multiplier must be 2-5
HALF_TEMPLATE = 4  # WORD["/"][4] says "half": its divisor must be 2

# Two operations: (template, structure). The structure names the operands a, b, c in evaluation order.
TWO_STEP = [
    ("What is {a} + {b} - {c}?", (("a", "+", "b"), "-", "c")),
    ("Compute {a} * {b} + {c}.", (("a", "*", "b"), "+", "c")),
    ("Calculate ({a} + {b}) * {c}.", (("a", "+", "b"), "*", "c")),
    ("What is {a} - {b} + {c}?", (("a", "-", "b"), "+", "c")),
    ("Evaluate {a} * {b} - {c}.", (("a", "*", "b"), "-", "c")),
    ("{n1} has {a} {obj}, buys {b} more, and then gives {c} to {n2}. How many {obj} does {n1} have now?",
     (("a", "+", "b"), "-", "c")),
    ("{n1} buys {a} {boxes} of {b} {obj} and already had {c}. How many {obj} does {p} have now?",
     (("a", "*", "b"), "+", "c")),
    ("{n1} has {a} {obj}. {n2} has {b} more than {n1}. How many {obj} do they have altogether?",
     ("a", "+", ("a", "+", "b"))),
    ("{n1} buys {a} notebooks at ${b} each and a pen for ${c}. How many dollars does {p} spend?",
     (("a", "*", "b"), "+", "c")),
    ("{n1} has ${c} and buys {a} {obj} at ${b} each. How many dollars are left?", ("c", "-", ("a", "*", "b"))),
    ("{n1} is {a} years old. {n2} is twice as old as {n1}. How old will {n2} be in {c} years?",
     (("a", "*", "b"), "+", "c")),
]
TWICE_AS_OLD = 10  # TWO_STEP[10] says "twice": its b must be 2


def evaluate(expr):
    """Value of a structure of numbers: an int, or (left, op, right) with op in + - * / (exact division)."""
    if isinstance(expr, int):
        return expr
    left, op, right = evaluate(expr[0]), expr[1], evaluate(expr[2])
    if op == "/":
        if right == 0 or left % right:
            raise ValueError(f"inexact division {left} / {right}")
        return left // right
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def steps(expr, top: bool = True) -> list[str]:
    """One equation per operation, innermost first; a lone two-digit + or - goes tens first, then ones."""
    if isinstance(expr, int):
        return []
    lines = steps(expr[0], top=False) + steps(expr[2], top=False)
    left, op, right = evaluate(expr[0]), expr[1], evaluate(expr[2])
    if top and not lines and op in "+-" and 10 < right < 100 and right % 10:
        partial = evaluate((left, op, right // 10 * 10))
        return [f"{left} {op} {right // 10 * 10} = {partial}", f"{partial} {op} {right % 10} = {evaluate(expr)}"]
    return lines + [f"{left} {op} {right} = {evaluate(expr)}"]


def _addends(rng, word: bool) -> tuple[int, int]:
    """Mostly small, some two-digit, a few three-digit operands (word problems stay below 200)."""
    top, low = rng.choices([20, 100, 200 if word else 1000], weights=[5, 4, 1])[0], 2 if word else 1
    return rng.randint(low, top), rng.randint(low, top)  # word problems: no "1 apples"


def _operands(rng, op: str, word: bool) -> tuple[int, int]:
    if op in "+-":
        a, b = _addends(rng, word)
        return (max(a, b), min(a, b)) if op == "-" else (a, b)
    if op == "*":
        return (rng.randint(2, 12), rng.randint(2, 12)) if rng.random() < 0.8 else (rng.randint(2, 9),
                                                                                     rng.randint(11, 30))
    divisor, quotient = rng.randint(2, 10), rng.randint(2, 12)
    return divisor * quotient, divisor


def _context(rng) -> dict:
    (n1, p), (n2, _) = rng.sample(NAMES, 2)
    box, boxes = rng.choice(CONTAINERS)
    return {"n1": n1, "n2": n2, "p": p, "P": p.capitalize(), "obj": rng.choice(OBJECTS), "box": box, "boxes": boxes}


def _task(question: str, expr, template: str) -> Task:
    return Task(question, str(evaluate(expr)), "\n".join(steps(expr)), template, expr)


def one_step(rng, word: bool) -> Task:
    op = rng.choices("+-*/", weights=[3, 3, 2.5, 1.5])[0]
    index = rng.randrange(len((WORD if word else BARE)[op]))
    a, b = _operands(rng, op, word)
    if word and op == "*" and index == TIMES_TEMPLATE:
        a = rng.choice(list(TIMES))
    if word and op == "/" and index == HALF_TEMPLATE:
        a, b = 2 * rng.randint(2, 30), 2
    if not word and op == "-" and index < SIGNED and rng.random() < 0.2:
        a, b = b, a  # e.g. "What is 5 - 12?": -7
    fields = {**_context(rng), "a": a, "b": b, "times": TIMES.get(a, "")}
    text = (WORD if word else BARE)[op][index].format(**fields)
    return _task(text, (a, op, b), f"arithmetic:{'word' if word else 'bare'}:{op}:{index}")


def two_step(rng) -> Task:
    index = rng.randrange(len(TWO_STEP))
    template, shape = TWO_STEP[index]
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 20)
    if index == TWICE_AS_OLD:
        b = 2
    values = {"a": a, "b": b, "c": c}

    def fill(node):
        return values[node] if isinstance(node, str) else (fill(node[0]), node[1], fill(node[2]))

    if "{n1}" in template and shape[1] == "-":  # no negative apples: give away at most what there is
        if shape[2] == "c":
            values["c"] = rng.randint(1, evaluate(fill(shape[0])))
        else:
            values["c"] = evaluate(fill(shape[2])) + rng.randint(0, 20)
    expr, c = fill(shape), values["c"]
    return _task(template.format(**_context(rng), a=a, b=b, c=c), expr, f"arithmetic:two_step:{index}")


def arithmetic(rng) -> Task:
    """About 45% bare expressions and imperatives, 40% one-step word problems, 15% two-step problems."""
    kind = rng.choices(["bare", "word", "two_step"], weights=[45, 40, 15])[0]
    return two_step(rng) if kind == "two_step" else one_step(rng, word=kind == "word")


# Arithmetic said another way: a multiplier or fraction named by a word ("double", "a third of"), a missing number
# to find (the inverse operation), and three numbers in a row. A 135M model trained on the forms above answered
# "What number times 6 equals 54?" with "54 * 6 = 324" and "If you triple 13" with "13 * 10": it maps each question
# onto the operations it has seen written out, so the wording of the operation has to be seen too. Structures are
# the ones `evaluate` and `steps` already read, so the worked steps are written the same way.
SCALED = {  # (template, multiplier or divisor): the question names b; the structure is b * k or b / k
    "*": [("What is twice {b}?", 2), ("Double {b}.", 2), ("What is {b} doubled?", 2),
          ("What do you get when you double {b}?", 2), ("Triple {b}.", 3), ("What is {b} tripled?", 3),
          ("What is three times {b}?", 3), ("What is four times {b}?", 4), ("Square {b}.", 0),
          ("What is the square of {b}?", 0), ("What is {b} times itself?", 0),
          ("{n1} had {b} {obj} and now has twice as many. How many {obj} does {p} have now?", 2),
          ("{n1} has {b} {obj}. {n2} has three times that many. How many {obj} does {n2} have?", 3)],
    "/": [("Halve {b}.", 2), ("What is one half of {b}?", 2), ("Find half of {b}.", 2), ("What is a third of {b}?", 3),
          ("What is one quarter of {b}?", 4), ("Split {b} into 4 equal parts. How big is each part?", 4),
          ("{n1} has {b} {obj} and gives half of them away. How many {obj} does {p} keep?", 2),
          ("A third of the {b} {obj} in a box are red. How many red {obj} are there?", 3)],
}
MISSING = {  # the question gives b and the result c of "x op b"; the structure is the inverse: c - b, c + b, c / b
    "+": ["What number added to {b} gives {c}?", "{b} plus what number makes {c}?", "Find x: x + {b} = {c}.",
          "Solve for n: n + {b} = {c}.", "I add {b} to a number and get {c}. What is the number?",
          "{n1} had some {obj} and got {b} more. Now {p} has {c}. How many did {p} have at first?"],
    "-": ["What number minus {b} leaves {c}?", "Find x: x - {b} = {c}.", "Solve for n: n - {b} = {c}.",
          "{n1} spent ${b} and has ${c} left. How many dollars did {p} have at first?",
          "{n1} gave away {b} {obj} and has {c} left. How many {obj} did {p} start with?"],
    "*": ["What number multiplied by {b} gives {c}?", "{b} times what number is {c}?", "Find x: {b} * x = {c}.",
          "Solve for n: n * {b} = {c}.",
          "{n1} bought {b} equal {boxes} with {c} {obj} in all. How many {obj} were in each?"],
}
THREE = {  # three numbers, left to right: (a op b) op2 c
    "+": ["What is {a} + {b} + {c}?", "Add {a}, {b} and {c}.", "Find the total of {a}, {b} and {c}.",
          "Compute {a} + {b} + {c}.", "{n1} read {a} pages on Monday, {b} on Tuesday and {c} on Wednesday. How many "
          "pages did {p} read?", "A shop sold {a} {obj} in the morning, {b} at noon and {c} in the evening. How many "
          "{obj} did it sell?"],
    "-": ["What is {a} - {b} - {c}?", "Start at {a}, subtract {b}, then subtract {c}. What is left?",
          "{n1} had {a} {obj}, gave {b} to {n2} and {c} to a friend. How many {obj} does {p} have left?"],
}


def arithmetic_forms(rng) -> Task:
    """Training data (not a held-out domain): scaled (40%), missing-number (35%) and three-number (25%) arithmetic."""
    kind = rng.choices(["scaled", "missing", "three"], weights=[40, 35, 25])[0]
    fields = _context(rng)
    if kind == "scaled":
        op = rng.choices("*/", weights=[3, 2])[0]
        index = rng.randrange(len(SCALED[op]))
        template, k = SCALED[op][index]
        if op == "*":
            b = rng.randint(2, 12) if k == 0 else rng.randint(2, 50 if k == 2 else 30)
            expr = (b, "*", b if k == 0 else k)
        else:
            b = k * rng.randint(2, 50 if k == 2 else 20)
            expr = (b, "/", k)
        return _task(template.format(**fields, b=b), expr, f"arithmetic_forms:scaled:{op}:{index}")
    if kind == "missing":
        op = rng.choices("+-*", weights=[2, 1, 2])[0]
        index = rng.randrange(len(MISSING[op]))
        template = MISSING[op][index]
        if op == "*":
            b, x = rng.randint(2, 10), rng.randint(2, 12)
            c, expr = b * x, (b * x, "/", b)
        else:
            x, b = _addends(rng, word="{n1}" in template)
            if op == "+":  # x + b = c
                c, expr = x + b, (x + b, "-", b)
            else:  # x - b = c, x >= b
                x, b = max(x, b), min(x, b)
                c, expr = x - b, (x - b, "+", b)
        return _task(template.format(**fields, b=b, c=c), expr, f"arithmetic_forms:missing:{op}:{index}")
    op = rng.choice("+-")
    index = rng.randrange(len(THREE[op]))
    a, b, c = (rng.randint(2, 30) for _ in range(3))
    if op == "-":
        a = b + c + rng.randint(0, 40)  # nothing goes below zero
    expr = ((a, op, b), op, c)
    return _task(THREE[op][index].format(**fields, a=a, b=b, c=c), expr, f"arithmetic_forms:three:{op}:{index}")
