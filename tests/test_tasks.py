"""The embedded task: seeded, disjoint splits, and a verifier table."""

from __future__ import annotations

import pytest

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.tasks import Example, build_task
from rlopt_cli.tasks.arithmetic import extract_answer, verify

GOLD = Example(prompt="47+38=", answer="85", solution="85")


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("85", 1.0),  # right
        ("85 apples", 1.0),  # extra text after the answer
        (" 85", 1.0),  # leading space
        ("085", 1.0),  # leading zero is the same integer
        ("58", 0.0),  # wrong
        ("8", 0.0),  # truncated
        ("", 0.0),  # empty
        ("eighty-five", 0.0),  # malformed
        ("=85", 0.0),  # does not start with the answer
        ("-85", 0.0),  # wrong sign
    ],
)
def test_verifier_table(completion: str, reward: float) -> None:
    assert verify(completion, GOLD) == reward


def test_extract_answer() -> None:
    assert extract_answer("123abc") == "123"
    assert extract_answer("abc") is None
    assert extract_answer("000") == "0"


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("85", 1.0),
        ("47 + 38 = 85", 1.0),  # a chat model restates the sum: the answer is the last integer
        ("47+38 = 85.", 1.0),
        ("The sum is 085", 1.0),
        ("47 + 38 = 125", 0.0),  # wrong sum
        ("85, no wait, 86", 0.0),  # the last number decides
        ("To compute 47+38, we", 0.0),  # cut off before the answer: its last integer is an operand
        ("eighty-five", 0.0),
        ("", 0.0),
    ],
)
def test_instruct_verifier_table(completion: str, reward: float) -> None:
    task = build_task(TaskConfig(prompt_style="instruct", n_eval=10))
    gold = Example(prompt="Compute 47+38. Reply with just the result.", answer="85", solution="85")
    assert task.verify(completion, gold) == reward


def test_instruct_style_keeps_the_split_and_words_the_prompt() -> None:
    bare = build_task(TaskConfig(n_eval=20))
    instruct = build_task(TaskConfig(prompt_style="instruct", n_eval=20))
    assert [e.answer for e in instruct.eval] == [e.answer for e in bare.eval]  # same problems, other wording
    first = instruct.eval[0]
    a, b = bare.eval[0].prompt.rstrip("=").split("+")
    assert first.prompt == f"Compute {a}+{b}. Reply with just the result."
    assert all(instruct.verify(e.solution, e) == 1.0 for e in instruct.eval)


def test_splits_are_seeded_disjoint_and_sized() -> None:
    task = build_task(TaskConfig())
    again = build_task(TaskConfig())
    assert [e.prompt for e in task.eval] == [e.prompt for e in again.eval]
    assert len(task.eval) == 200
    assert len(task.train) == 90 * 90 - 200
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}
    other = build_task(TaskConfig(split_seed=1))
    assert [e.prompt for e in other.eval] != [e.prompt for e in task.eval]


def test_reference_solutions_are_correct() -> None:
    task = build_task(TaskConfig(digits=3, n_eval=50))
    assert all(verify(e.solution, e) == 1.0 for e in task.eval)
    assert all(len(e.prompt) == 3 + 1 + 3 + 1 for e in task.eval)  # the difficulty knob sets operand digits
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.train}


def test_rewards_is_list_in_list_out() -> None:
    task = build_task(TaskConfig(n_eval=10))
    examples = list(task.eval[:3])
    assert task.rewards([e.answer for e in examples], examples) == [1.0, 1.0, 1.0]
    assert task.rewards(["x", "", examples[2].answer], examples) == [0.0, 0.0, 1.0]


def test_unknown_task() -> None:
    with pytest.raises(RloptError, match="unknown task 'arith'.*did you mean:.*arithmetic"):
        build_task(TaskConfig(name="arith"))
