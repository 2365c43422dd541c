"""MATH from local files: the boxed-answer extractor, the math-verify grader on tricky answers, skipping golds
that do not parse, and a timeout that works off the main thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.tasks import Example, build_task
from rlopt_cli.tasks.math import PROMPT_SUFFIX, Grader, last_boxed, with_timeout

pytest.importorskip("math_verify")
pytest.importorskip("datasets")

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN, TEST = str(FIXTURES / "math_train.jsonl"), str(FIXTURES / "math_test.jsonl")


@pytest.fixture(scope="module")
def grader() -> Grader:
    return Grader()


def example(answer: str) -> Example:
    return Example(prompt="p", answer=answer, solution=f"\\boxed{{{answer}}}")


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("first \\boxed{1}, finally \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\left(\\frac{-1}{2}, 3\\right)}", "\\left(\\frac{-1}{2}, 3\\right)"),
        ("\\fbox{7}", "7"),
        ("$\\boxed 9$", "9"),
        ("no box here", None),
        ("\\boxed{1 + {2}", None),  # unbalanced
    ],
)
def test_last_boxed(text: str, boxed: str | None) -> None:
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("gold", "completion", "reward"),
    [
        ("\\frac{1}{2}", "So the answer is $\\boxed{\\frac{1}{2}}$.", 1.0),
        ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),  # \frac vs decimal
        ("\\frac{1}{2}", "\\boxed{1/2}", 1.0),
        ("\\frac{1}{2}", "\\boxed{\\frac12}", 1.0),  # malformed \frac repaired
        ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", 1.0),
        ("\\frac{1}{2}", "\\boxed{\\frac{2}{3}}", 0.0),
        ("6\\sqrt{3}", "\\boxed{6\\sqrt3}", 1.0),
        ("10", "\\boxed{10 \\text{ cm}}", 1.0),  # units
        ("144^\\circ", "\\boxed{144}", 1.0),  # degrees
        ("1000", "\\boxed{1,000}", 1.0),  # commas
        ("18", "\\boxed{\\$18}", 1.0),  # dollar sign
        ("3", "\\boxed{3}. Trailing text: not 4, surely not 5.", 1.0),
        ("3", "First I got \\boxed{2}, but correcting: \\boxed{3}", 1.0),  # several boxes: the last counts
        ("3", "\\boxed{3} ... on reflection \\boxed{2}", 0.0),
        ("3", "The answer is 3.", 0.0),  # no box: no anchored answer
        ("3", "", 0.0),  # no answer
        ("x^2 + 6x + 9", "\\boxed{9 + 6x + x^2}", 1.0),  # symbolic equality
        ("\\left(-\\frac{1}{2}, \\frac{3}{2}\\right)", "\\boxed{(-0.5, 1.5)}", 1.0),  # tuples
        ("5", "\\boxed{x = 5}", 1.0),
        ("-5", "\\boxed{5}", 0.0),
    ],
)
def test_grader_table(grader: Grader, gold: str, completion: str, reward: float) -> None:
    assert grader(completion, example(gold)) == reward


def test_fixture_splits_and_reference_solutions(grader: Grader) -> None:
    task = build_task(TaskConfig(name="math", train_file=TRAIN, eval_file=TEST, n_eval=0))
    assert (len(task.train), len(task.eval)) == (32, 16)
    assert all(e.prompt.endswith(PROMPT_SUFFIX) for e in task.eval)
    assert (
        task.eval[0].answer == json.loads(Path(TEST).read_text().splitlines()[0])["answer"]
    )  # MATH-500 column
    assert all(task.verify(e.solution, e) == 1.0 for e in [*task.train, *task.eval])
    wrong = [task.verify("\\boxed{123456}", e) for e in task.train]
    assert sum(wrong) == 0.0


def test_ungradable_golds_are_skipped_with_a_count(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    rows = [
        {"problem": "ok", "solution": "so \\boxed{2}"},
        {"problem": "no box", "solution": "the answer is 2"},
        {"problem": "empty box", "solution": "\\boxed{}"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="skipped 2 of 3 rows"):
        task = build_task(TaskConfig(name="math", train_file=str(path), eval_file=TEST))
    assert [e.answer for e in task.train] == ["2"]


def test_wrong_columns_name_found_and_expected(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(
        RloptError, match=r"has columns question, answer; expected math500 \(problem, answer\)"
    ):
        build_task(TaskConfig(name="math", train_file=str(path), eval_file=TEST))


def test_grading_works_off_the_main_thread(grader: Grader) -> None:
    """math-verify's own signal-based timeout fails in a worker thread; ours does not."""
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(grader("\\boxed{0.5}", example("\\frac{1}{2}"))))
    worker.start()
    worker.join(30)
    assert results == [1.0]


def test_timeout_returns_the_default() -> None:
    start = time.perf_counter()
    assert with_timeout(lambda: time.sleep(5) or 1, default=0, seconds=0.1) == 0
    assert time.perf_counter() - start < 2
    assert with_timeout(lambda: 1 // 0, default=-1) == -1  # an exception scores as the default
    assert with_timeout(lambda: 42, default=0) == 42
