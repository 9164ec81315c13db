r"""MATH answers: the last `\boxed{}` of a solution, and whether it equals the reference.

The MATH benchmark (Hendrycks et al. 2021) scores a generated solution by the content of its
last `\boxed{...}`, compared with the reference answer after a string normalization (its
`is_equiv` / `strip_string`; PRM800K's grader, the source of MATH-500, and lm-eval's
`hendrycks_math` follow it). This is our own implementation of that convention, in pure Python:
no sympy, no LaTeX parser, so what counts as equal is a fixed list, not algebra.

Equal (both sides are normalized the same way, then compared as strings):
- spacing and layout: spaces, newlines, `\!` `\,` `\;` `\:` `\ ` `\quad`, `\left` / `\right`,
  `\displaystyle`; `\dfrac` and `\tfrac` are `\frac`;
- unbraced arguments: `\frac12` = `\frac{1}{2}`, `\frac1{72}`, `\frac{72}1`, `\sqrt2` =
  `\sqrt{2}`, `\sqrt[3]2` = `\sqrt[3]{2}`;
- decoration: `$`, `\$`, `%`, `\%`, degrees (`^\circ`, `^{\circ}`, `°`), a trailing period, an
  answer wholly in `\text{...}` (`\text{Monday}` = `Monday`), a unit after the value in
  `\text{ ...}` / `\mbox{ ...}` with a leading space (MATH's convention: `10\text{ cm}` = `10`) or
  as a plain word (`10\text{cm}^2` = `10`);
- a single variable's name: `x = 5` = `5`, `\theta=30^\circ` = `30` (one `=`, and the left side
  is a letter or a Greek letter, optionally subscripted);
- numbers: `.5` = `0.5`, thousands separators in a plain number (`10,080` = `10{,}080` =
  `10080`), and plain numbers by exact value: integers, decimals, `a/b` and `\frac{a}{b}` of
  those (`5` = `5.0`, `0.5` = `\frac{1}{2}` = `1/2` = `\frac{2}{4}`; MATH itself only maps
  `0.5` to `\frac{1}{2}`).

Not equal: anything that needs algebra or rounding (`\frac{\sqrt{2}}{2}` vs `\frac{1}{\sqrt{2}}`,
`2x+1` vs `1+2x`, `0.33` vs `\frac{1}{3}`, `\pi` vs `3.14159`), reordered tuples, sets or
intervals (`(1,2)` vs `(2,1)`), `\text{(C)}` vs `C`, and a solution with no `\boxed{}` at all.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACING = re.compile(r"(\\\\)|\\(?:left|right|displaystyle|qquad|quad)(?![A-Za-z])|\\[!,;: ]")
"""Spacing and sizing commands, dropped; group 1 is `\\\\` (a matrix row break), kept."""
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
_WRAPPERS = ("\\text", "\\textbf", "\\mbox", "\\mathrm")
_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{(?: [^{}]*|\s*[A-Za-z][A-Za-z .]*)\}"
                   r"(?:\^\{?[23]\}?)?$")
_VARIABLE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER = r"-?\d+(?:\.\d+)?"
_FRACTION = re.compile(rf"^(-?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}$")
_SLASH = re.compile(rf"^({_NUMBER})/({_NUMBER})$")


def matching_brace(text: str, start: int) -> int | None:
    r"""Index of the `}` closing the `{` at `text[start]`, or None when it is never closed.

    Escaped braces (`\{`, `\}`: literal set braces) neither open nor close a group.
    """
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # a control symbol (\{, \}, \\): never a group delimiter
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    r"""The content of the last complete `\boxed{...}` or `\fbox{...}` of `text` (nested braces
    kept whole), or of a brace-less `\boxed 5` (up to the next space or `$`); None if there is
    none.

    A box whose brace is never closed (a generation cut at its token budget) is skipped for the
    last complete one before it.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        j = match.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            end = matching_brace(text, j)
            if end is not None:
                return text[j + 1:end]
            continue
        word = re.match(r"[^\s$]+", text[j:])
        if word:
            return word.group(0)
    return None


def _unwrap(s: str) -> str:
    r"""`X` when all of `s` is `\text{X}` (or `\textbf`, `\mbox`, `\mathrm`)."""
    for wrapper in _WRAPPERS:
        if s.startswith(wrapper + "{") and matching_brace(s, len(wrapper)) == len(s) - 1:
            return s[len(wrapper) + 1:-1].strip()
    return s


def _drop_unit(s: str) -> str:
    r"""`10` for `10\text{ cm}`, `10\text{cm}^2`: a trailing unit after a non-empty value."""
    match = _UNIT.search(s)
    if match and s[:match.start()].strip():
        return s[:match.start()].rstrip()
    return s


def _strip_period(s: str) -> str:
    s = s.strip()
    return s[:-1].rstrip() if s.endswith(".") and not s.endswith("..") else s


def _tex_token(s: str, i: int) -> str:
    r"""The TeX token at `s[i]`: a control word (`\pi`) or one character."""
    word = re.match(r"\\[A-Za-z]+", s[i:])
    return word.group(0) if word else s[i]


def _brace_arguments(s: str, command: str, count: int) -> str:
    r"""Brace the single-token arguments of `command`: `\frac12` -> `\frac{1}{2}`,
    `\sqrt2` -> `\sqrt{2}` (an optional `[n]` of `\sqrt` is kept). Expects no spaces."""
    pattern = re.compile(re.escape(command) + r"(?![A-Za-z])")
    out, i = [], 0
    while (match := pattern.search(s, i)) is not None:
        out.append(s[i:match.end()])
        j = match.end()
        if command == "\\sqrt" and s.startswith("[", j) and "]" in s[j:]:
            close = s.index("]", j)
            out.append(s[j:close + 1])
            j = close + 1
        for _ in range(count):
            if j >= len(s):
                break
            if s[j] == "{":
                end = matching_brace(s, j)
                if end is None:
                    break  # an unclosed group: leave the rest as it is
                out.append(s[j:end + 1])
                j = end + 1
            else:
                token = _tex_token(s, j)
                out.append("{" + token + "}")
                j += len(token)
        i = j
    return "".join(out) + s[i:]


def normalize_answer(answer: str) -> str:
    """`answer` in the MATH convention's canonical spelling (see the module doc for the list);
    two answers that normalize to the same string are equal."""
    s = _strip_period(answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _SPACING.sub(lambda m: m.group(1) or "", s)
    s = _drop_unit(_unwrap(_strip_period(s)))  # before the spaces go: `\text{ cm}` has one
    s = re.sub(r"\s+", "", s)
    s = _strip_period(s).replace("{,}", ",")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if s.count("=") == 1 and _VARIABLE.match(s.split("=")[0]):
        s = s.split("=")[1]
    s = _brace_arguments(_brace_arguments(s, "\\frac", 2), "\\sqrt", 1)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5, as MATH writes it
    slash = _SLASH.match(s)
    if slash:
        s = f"\\frac{{{slash.group(1)}}}{{{slash.group(2)}}}"
    return s


def number_value(normalized: str) -> Fraction | None:
    r"""The exact value of a normalized plain number (`-3`, `0.25`, `\frac{1}{2}`,
    `-\frac{3}{4}`), or None for anything else (or a zero denominator)."""
    if re.fullmatch(_NUMBER, normalized):
        return Fraction(normalized)
    fraction = _FRACTION.match(normalized)
    if fraction and Fraction(fraction.group(3)) != 0:
        value = Fraction(fraction.group(2)) / Fraction(fraction.group(3))
        return -value if fraction.group(1) else value
    return None


def is_equivalent(prediction: str | None, reference: str) -> bool:
    """Whether the extracted `prediction` (None: the solution boxed nothing) equals `reference`
    under the MATH convention (module doc): equal normalized strings, or equal plain numbers."""
    if prediction is None:
        return False
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if pred == ref:
        return True
    pred_value, ref_value = number_value(pred), number_value(ref)
    return pred_value is not None and pred_value == ref_value
