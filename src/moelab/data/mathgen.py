"""A seeded generator of school math with worked answers: arithmetic, linear equations, word problems.

Every problem is built from its answer's arithmetic, so answers are correct by construction; the tests
re-evaluate each question independently. Same (count, seed) -> same problems, on every machine.
"""

from __future__ import annotations

import dataclasses
import operator
import random
from typing import Callable

# The share of each family in the generated stream.
FAMILY_WEIGHTS = {"arithmetic": 0.4, "algebra": 0.3, "word": 0.3}
NAMES = ("Ana", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Juno")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cards", "shells", "stamps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    kind: str  # "arithmetic", "algebra" or "word:<template>"
    question: str
    steps: tuple[str, ...]
    answer: str

    @property
    def text(self) -> str:
        lines = [f"Problem: {self.question}", "Solution:", *self.steps, f"Answer: {self.answer}"]
        return "\n".join(lines)


def generate_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` problems drawn from one `random.Random(seed)` stream (deterministic)."""
    rng = random.Random(seed)
    families = list(FAMILY_WEIGHTS)
    weights = list(FAMILY_WEIGHTS.values())
    makers = {"arithmetic": arithmetic_problem, "algebra": algebra_problem, "word": word_problem}
    return [makers[rng.choices(families, weights)[0]](rng) for _ in range(count)]


# ---- arithmetic ------------------------------------------------------------------------------
# An expression is an int (a leaf) or a tuple (op, left, right).
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}  # "/" is exact


def _random_expr(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.3:
        return rng.randint(1, 30)
    op = rng.choice("+-*/")
    if op == "/":
        # Division only between leaves, built from the quotient so that it is exact.
        divisor = rng.randint(2, 12)
        return ("/", divisor * rng.randint(1, 12), divisor)
    if op == "*":
        # Small factors keep the numbers readable.
        return ("*", _random_expr(rng, depth - 1), rng.randint(2, 9))
    return (op, _random_expr(rng, depth - 1), _random_expr(rng, depth - 1))


def _render(expr) -> str:
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    prec = _PRECEDENCE[op]
    left_s, right_s = _render(left), _render(right)
    # Parenthesise a lower-precedence left child, and any non-leaf right child of equal or lower
    # precedence (a - (b - c) and a / (b * c) need them; a + (b + c) merely keeps them).
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < prec:
        left_s = f"({left_s})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= prec:
        right_s = f"({right_s})"
    return f"{left_s} {op} {right_s}"


def _evaluate(expr, steps: list[str]) -> int:
    """Value of `expr`, appending one `a op b = c` line per operation in evaluation order."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = _evaluate(left, steps), _evaluate(right, steps)
    value = _OPS[op](a, b)
    steps.append(f"{a} {op} {b} = {value}")
    return value


def arithmetic_problem(rng: random.Random) -> Problem:
    expr = _random_expr(rng, depth=2)
    while isinstance(expr, int):  # a bare number is not a problem
        expr = _random_expr(rng, depth=2)
    steps: list[str] = []
    value = _evaluate(expr, steps)
    return Problem(kind="arithmetic", question=f"Calculate {_render(expr)}.", steps=tuple(steps),
                   answer=str(value))


# ---- linear equations --------------------------------------------------------------------------
def _linear(coef: int, const: int) -> str:
    """`3x + 4`, `x - 2`, `7x`, or `-5` when the x term is absent."""
    if coef == 0:
        return str(const)
    x_term = "x" if coef == 1 else f"{coef}x"
    if const == 0:
        return x_term
    return f"{x_term} {'+' if const > 0 else '-'} {abs(const)}"


def algebra_problem(rng: random.Random) -> Problem:
    """Solve a*x + b = c*x + d with an integer solution x (a > c >= 0, b != 0)."""
    x = rng.randint(-10, 10)
    a = rng.randint(2, 12)
    c = rng.choice([0, rng.randint(1, a - 1)])
    b = rng.choice([v for v in range(-20, 21) if v != 0])
    d = (a - c) * x + b
    steps = []
    if c:
        steps.append(f"Subtract {_linear(c, 0)} from both sides: {_linear(a - c, b)} = {d}.")
    verb = "Subtract" if b > 0 else "Add"
    steps.append(f"{verb} {abs(b)} {'from' if b > 0 else 'to'} both sides: {_linear(a - c, 0)} = {d - b}.")
    steps.append(f"Divide both sides by {a - c}: x = {x}.")
    question = f"Solve for x: {_linear(a, b)} = {_linear(c, d)}."
    return Problem(kind="algebra", question=question, steps=tuple(steps), answer=f"x = {x}")


# ---- word problems -----------------------------------------------------------------------------
# Each template draws its numbers, then returns (question, steps, answer). The question names its
# numbers in a fixed order, which the tests use to recompute the answer independently.
def _shopping(rng: random.Random, name: str, item: str):
    packs, each, had = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 30)
    q = (f"{name} has {had} {item} and buys {packs} packs with {each} {item} in each pack. "
         f"How many {item} does {name} have now?")
    bought = packs * each
    return q, [f"{packs} * {each} = {bought}", f"{had} + {bought} = {had + bought}"], had + bought


def _sharing(rng: random.Random, name: str, item: str):
    friends, share = rng.randint(2, 9), rng.randint(2, 15)
    q = (f"{name} shares {friends * share} {item} equally among {friends} friends. "
         f"How many {item} does each friend get?")
    return q, [f"{friends * share} / {friends} = {share}"], share


def _change(rng: random.Random, name: str, item: str):
    count, price = rng.randint(2, 9), rng.randint(1, 9)
    note = next(n for n in (10, 20, 50, 100) if n > count * price)
    q = (f"{name} buys {count} {item} at {price} dollars each and pays with a {note} dollar note. "
         f"How much change does {name} get, in dollars?")
    cost = count * price
    return q, [f"{count} * {price} = {cost}", f"{note} - {cost} = {note - cost}"], note - cost


def _travel(rng: random.Random, name: str, item: str):
    speed, hours = rng.randint(3, 90), rng.randint(2, 8)
    q = f"{name} travels at {speed} km per hour for {hours} hours. How many km does {name} travel?"
    return q, [f"{speed} * {hours} = {speed * hours}"], speed * hours


def _ages(rng: random.Random, name: str, item: str):
    age, gap, years = rng.randint(5, 40), rng.randint(1, 30), rng.randint(2, 20)
    other = NAMES[(NAMES.index(name) + 1) % len(NAMES)]
    q = (f"{name} is {age} years old and {other} is {gap} years older than {name}. "
         f"How old will {other} be in {years} years?")
    return q, [f"{age} + {gap} = {age + gap}", f"{age + gap} + {years} = {age + gap + years}"], age + gap + years


WORD_TEMPLATES: dict[str, Callable] = {
    "shopping": _shopping, "sharing": _sharing, "change": _change, "travel": _travel, "ages": _ages,
}


def word_problem(rng: random.Random) -> Problem:
    template = rng.choice(sorted(WORD_TEMPLATES))
    question, steps, answer = WORD_TEMPLATES[template](rng, rng.choice(NAMES), rng.choice(ITEMS))
    return Problem(kind=f"word:{template}", question=question, steps=tuple(steps), answer=str(answer))
