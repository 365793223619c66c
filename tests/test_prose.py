"""The prose of every notebook meets the house targets (CONTRIBUTING.md, "Prose"), measured by tools/prose.py."""
import pytest

import prose  # tools/prose.py
from test_notebooks import NAMES, read


@pytest.mark.parametrize("name", NAMES)
def test_prose_meets_the_targets(name):
    values = prose.measure(name)
    assert not prose.misses(values), f"{name}: {prose.misses(values)} (python tools/prose.py {name} --worst 5)"


@pytest.mark.parametrize("name", NAMES)
def test_check_your_understanding_has_two_or_three_questions_with_collapsed_answers(name):
    cells = [c.source for c in read(name).cells if c.cell_type == "markdown"]
    section = next((c for c in cells if "Check your understanding" in c), "")
    assert 2 <= section.count("<details>") <= 3, f"{name}: 2-3 questions, each answer in <details>"


def test_the_measures_catch_what_they_are_for():
    text = "This is one sentence; it has a semicolon (and a parenthesis) and 3 numbers: 1.5 and 20 %.\n\n- A bullet."
    sample = prose.prose_of(text)
    assert sample.count(";") == 1 and sample.count("(") == 1
    assert prose.numbers(sample) == 3
    assert [len(prose.words(s)) for s in prose.sentences(sample)] == [17, 2]
    assert prose.prose_of("## 3. A heading\n`code here` $x^2$ [link](http://a.b/c)") .split() == ["x", "x", "link"]
