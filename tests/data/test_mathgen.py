import operator
import re
from fractions import Fraction

from moelab.data.mathgen import _evaluate, _linear, _render, generate_problems

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": Fraction}  # Fraction(a, b) = a / b
STEP = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")
# Word-problem answers recomputed from the question's numbers, in the order the question names them.
WORD_ORACLES = {
    "word:shopping": lambda had, packs, each: had + packs * each,
    "word:sharing": lambda total, friends: total / friends,
    "word:change": lambda count, price, note: note - count * price,
    "word:travel": lambda speed, hours: speed * hours,
    "word:ages": lambda age, gap, years: age + gap + years,
}


def test_rendering_and_steps_hand_worked():
    expr = ("*", ("-", 10, ("-", 4, 3)), 2)
    assert _render(expr) == "(10 - (4 - 3)) * 2"
    steps = []
    assert _evaluate(expr, steps) == 18
    assert steps == ["4 - 3 = 1", "10 - 1 = 9", "9 * 2 = 18"]
    assert _render(("+", ("*", 3, 4), 5)) == "3 * 4 + 5"  # no parentheses needed
    assert _linear(1, -2) == "x - 2" and _linear(7, 4) == "7x + 4" and _linear(0, -5) == "-5"
    assert _linear(3, 0) == "3x"


def test_deterministic_given_seed_and_count():
    a, b = generate_problems(50, seed=3), generate_problems(50, seed=3)
    assert a == b
    assert generate_problems(50, seed=4) != a
    assert generate_problems(20, seed=3) == a[:20]  # one stream: a prefix of a longer run


def _check_steps(steps):
    for step in steps:
        m = STEP.match(step)
        if m:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == c, step


def test_every_answer_is_correct():
    problems = generate_problems(3000, seed=0)
    kinds = {p.kind.split(":")[0] for p in problems}
    assert kinds == {"arithmetic", "algebra", "word"}
    for p in problems:
        assert p.text.startswith(f"Problem: {p.question}\nSolution:\n") and p.text.endswith(f"Answer: {p.answer}")
        _check_steps(p.steps)
        if p.kind == "arithmetic":
            expr = p.question.removeprefix("Calculate ").removesuffix(".")
            assert Fraction(eval(expr)) == int(p.answer), p.question  # eval of digits and + - * / ( )
            assert p.steps[-1].endswith(f"= {p.answer}")
        elif p.kind == "algebra":
            m = re.fullmatch(r"Solve for x: (.+) = (.+)\.", p.question)
            x = int(p.answer.removeprefix("x = "))
            assert _value(m[1], x) == _value(m[2], x), p.question
        else:
            numbers = [int(n) for n in re.findall(r"\d+", p.question)]
            assert WORD_ORACLES[p.kind](*numbers) == int(p.answer), p.question


def _value(side: str, x: int) -> int:
    """Evaluate `3x + 4`, `x - 2`, `-5` at x."""
    return eval(re.sub(r"(\d)x", r"\1*x", side), {"x": x})
