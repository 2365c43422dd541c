"""GSM8K from local files: both formats, the strict and flexible graders on tricky answers, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlopt_cli.config.schema import TaskConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.tasks import Example, build_task
from rlopt_cli.tasks.gsm8k import PROMPT_SUFFIX, extract_answer, make_verifier

pytest.importorskip("datasets")

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN, TEST = str(FIXTURES / "gsm8k_train.jsonl"), str(FIXTURES / "gsm8k_test.jsonl")
GOLD = Example(prompt="q", answer="1200", solution="#### 1,200")


@pytest.fixture(scope="module")
def verl_parquet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """verl's preprocessed GSM8K (examples/data_preprocess/gsm8k.py) made from the JSONL fixture."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in Path(TRAIN).read_text().splitlines()]
    records = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{r['question']} {PROMPT_SUFFIX}"}],
            "ability": "math",
            "reward_model": {
                "style": "rule",
                "ground_truth": r["answer"].split("####")[1].strip().replace(",", ""),
            },
            "extra_info": {"split": "train", "index": i, "answer": r["answer"], "question": r["question"]},
        }
        for i, r in enumerate(rows)
    ]
    path = tmp_path_factory.mktemp("verl") / "gsm8k_verl.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


@pytest.mark.parametrize(
    ("completion", "strict", "flexible"),
    [
        ("3 + 4 = 7 boxes, so 1200 in all.\n#### 1200", 1.0, 1.0),  # the trained format
        ("#### 1,200", 1.0, 1.0),  # thousands separator
        ("#### $1,200", 1.0, 1.0),  # dollar sign
        ("####1200.", 1.0, 1.0),  # no space, sentence-final dot
        ("#### 1200.00", 1.0, 1.0),  # same value
        ("The answer is 1200 dollars.", 0.0, 1.0),  # no '####': only flexible finds it
        ("The answer is $1,200. Check: 600 * 2 = 1200", 0.0, 1.0),  # last number
        ("#### 1200\nbut maybe 1300", 1.0, 0.0),  # trailing text: strict keeps '####', flexible the last
        ("#### 1100\n#### 1200", 1.0, 1.0),  # several answers: the last one counts
        ("#### 120", 0.0, 0.0),  # wrong
        ("#### -1200", 0.0, 0.0),  # wrong sign
        ("", 0.0, 0.0),  # no answer
        ("#### twelve hundred", 0.0, 0.0),  # words are not numbers
    ],
)
def test_grader_table(completion: str, strict: float, flexible: float) -> None:
    assert make_verifier("strict")(completion, GOLD) == strict
    assert make_verifier("flexible")(completion, GOLD) == flexible


def test_extract_answer() -> None:
    assert extract_answer("so -3.5 degrees", "flexible") == "-3.5"
    assert extract_answer("#### 7 apples", "strict") == "7"
    assert extract_answer("nothing here", "flexible") is None
    assert (
        extract_answer("#### 5 " + "x" * 400, "strict") is None
    )  # strict reads the last 300 characters only


def test_loads_the_dataset_format() -> None:
    task = build_task(TaskConfig(name="gsm8k", train_file=TRAIN, eval_file=TEST, n_eval=0))
    assert (len(task.train), len(task.eval)) == (33, 16)
    example = task.train[1]
    assert example.prompt.endswith(PROMPT_SUFFIX)
    assert example.answer == "2240"  # '#### 2,240' with the comma stripped
    assert task.verify(example.solution, example) == 1.0  # every reference solution grades as right
    assert all(task.verify(e.solution, e) == 1.0 for e in [*task.train, *task.eval])
    capped = build_task(TaskConfig(name="gsm8k", train_file=TRAIN, eval_file=TEST, n_eval=5))
    assert [e.prompt for e in capped.eval] == [e.prompt for e in task.eval[:5]]


def test_loads_verl_parquet_like_the_jsonl(verl_parquet: str) -> None:
    jsonl = build_task(TaskConfig(name="gsm8k", train_file=TRAIN, eval_file=TEST))
    verl = build_task(TaskConfig(name="gsm8k", train_file=verl_parquet, eval_file=verl_parquet, n_eval=4))
    assert verl.train == jsonl.train  # same prompts (suffix not doubled), golds and solutions
    assert len(verl.eval) == 4


def test_verl_prompt_as_string(tmp_path: Path) -> None:
    path = tmp_path / "verl.jsonl"
    row = {"prompt": "What is 2+3?", "reward_model": {"ground_truth": "5"}, "data_source": "x"}
    path.write_text(json.dumps(row) + "\n")
    task = build_task(TaskConfig(name="gsm8k", train_file=str(path), eval_file=str(path)))
    assert task.train[0] == Example(f"What is 2+3? {PROMPT_SUFFIX}", "5", "#### 5")


@pytest.mark.parametrize(
    ("content", "train_file", "message"),
    [
        (None, "missing.jsonl", "task.train_file not found"),
        ("", "empty.jsonl", "is empty"),
        (
            '{"q": "x", "a": "#### 1"}\n',
            "cols.jsonl",
            r"has columns q, a; expected gsm8k \(question, answer\) or verl \(prompt, reward_model\)",
        ),
        ("not json\n", "bad.jsonl", "cannot read"),
        ('{"question": "x", "answer": "1"}\n', "nohash.jsonl", "without a '#### N' line"),
        ("x", "data.csv", "must end in .jsonl"),
    ],
)
def test_file_errors_are_one_line(tmp_path: Path, content: str | None, train_file: str, message: str) -> None:
    path = tmp_path / train_file
    if content is not None:
        path.write_text(content)
    with pytest.raises(RloptError, match=message) as err:
        build_task(TaskConfig(name="gsm8k", train_file=str(path), eval_file=TEST))
    assert "\n" not in str(err.value)


def test_unset_file_says_which_key() -> None:
    with pytest.raises(RloptError, match="set task.train_file=PATH"):
        build_task(TaskConfig(name="gsm8k", eval_file=TEST))


def test_missing_datasets_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import now raises ModuleNotFoundError
    with pytest.raises(RloptError, match=r"pip install -e '\.\[real\]'"):
        build_task(TaskConfig(name="gsm8k", train_file=TRAIN, eval_file=TEST))
