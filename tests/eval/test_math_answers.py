r"""The MATH answer scorer on hand-written cases: the expected values are the MATH benchmark's
convention (Hendrycks et al.'s `is_equiv`: the last \boxed{}, then strip spacing, \left/\right,
dollars, degrees, units, x= ...), worked out by hand, not by running the code."""

from __future__ import annotations

import pytest

from bitnet_train.eval.math_answers import is_equivalent, last_boxed, normalize_answer


@pytest.mark.parametrize("text, expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{1}, then on reflection \\boxed{2}.", "2"),
    ("\\fbox{7}", "7"),
    ("the answer is $\\boxed 5$.", "5"),
    ("\\boxed {12}", "12"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped set braces do not close the box
    ("\\boxed{3}. Check: \\boxed{\\frac{1", "3"),  # cut mid-box: the last complete one
    ("The answer is 5.", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("answer, expected", [
    ("\\left( 3, \\dfrac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\sqrt[3]2", "\\sqrt[3]{2}"),
    ("10\\text{ cm}", "10"),
    ("10\\text{ cm}^2", "10"),
    ("\\text{Evelyn}", "Evelyn"),
    ("90^\\circ", "90"),
    ("\\$18.90", "18.90"),
    ("x = 5", "5"),
    (".5", "0.5"),
    ("10,\\!080", "10080"),
    ("4.", "4"),
    ("25\\%", "25"),
    ("3/4", "\\frac{3}{4}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
])
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize("prediction, reference", [
    ("\\dfrac{14}{3}", "\\frac{14}{3}"),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("(3, \\tfrac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("10", "10\\text{ inches}"),
    ("Evelyn", "\\text{Evelyn}"),
    ("30^{\\circ}", "30"),
    ("$5$", "5"),
    ("\\$ 32", "32"),
    ("x=\\frac{1}{2}", "\\frac12"),
    ("5", "y = 5"),
    ("0.5", "\\frac{1}{2}"),
    ("2.50", "\\frac{5}{2}"),
    ("-\\frac{3}{4}", "-0.75"),
    ("10080", "10,\\!080"),
    ("p - q", "p-q"),
])
def test_equivalent_answers(prediction, reference):
    assert is_equivalent(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("q - p", "p - q"),
    ("6", "5"),
    ("0.33", "\\frac{1}{3}"),  # rounding is not equality
    ("(2,1)", "(1,2)"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),  # needs algebra
    ("xy = 5", "5"),  # only a single variable's name is dropped
    ("C", "\\text{(C)}"),
    ("", "5"),
    (None, "5"),  # the solution boxed nothing
])
def test_different_answers(prediction, reference):
    assert not is_equivalent(prediction, reference)
