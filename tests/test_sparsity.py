"""`rlopt sparsity`: hand-built safetensors pairs whose counts are known exactly, the CLI, and a real tiny run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from rlopt_cli.cli import app
from rlopt_cli.errors import RloptError
from rlopt_cli.sparsity.compare import effective_rank, layer_index, module_type, sparsity
from rlopt_cli.sparsity.count import Counts, count_slice, settled_range

runner = CliRunner()


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """An HF-style model folder: model.safetensors (+ config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def counts_of(tmp_path: Path, a: list[float], b: list[float], stored=torch.float32, **kw) -> Counts:
    """Counts for one tensor pair given as lists, saved in the `stored` dtype; `kw` go to sparsity()."""
    fa = write_file(tmp_path / "a.safetensors", {"w": torch.tensor(a, dtype=stored)})
    fb = write_file(tmp_path / "b.safetensors", {"w": torch.tensor(b, dtype=stored)})
    return sparsity(fa, fb, **kw).total


# ---- the three rules, coordinate by coordinate -------------------------------------------------------------


def test_bitwise_only_changes(tmp_path: Path) -> None:
    # -0.0 vs 0.0 differs in its sign bit only; 1 + 2^-20 moves by 9.5e-7 < atol and < rtol * 1.
    c = counts_of(tmp_path, [0.0, 1.0, 0.5, 3.0], [-0.0, 1.0 + 2**-20, 0.5, 3.0])
    assert c == Counts(n=4, bitwise=2, atol=0, relative=0)


def test_atol_just_below_and_just_above(tmp_path: Path) -> None:
    # |Δ| = 8e-6 (below 1e-5) twice, 1.2e-5 (above) twice, with either sign.
    c = counts_of(tmp_path, [0.0, 1.0, 0.0, 1.0], [8e-6, 1.0 - 8e-6, -1.2e-5, 1.0 + 1.2e-5])
    assert (c.n, c.bitwise, c.atol) == (4, 4, 2)


def test_atol_exact_boundary_is_not_a_change(tmp_path: Path) -> None:
    # With atol = 2^-10 (exact in fp32): |Δ| == atol does not count, one fp32 step above it does.
    c = counts_of(tmp_path, [0.0, 0.0], [2**-10, 2**-10 + 2**-30], atol=2**-10)
    assert (c.bitwise, c.atol) == (2, 1)


@pytest.mark.parametrize(
    ("a", "b", "rtol", "counted"),
    [
        (1.0, 1.0 + 2**-10, 1e-3, False),  # |Δ| 9.77e-4 < 1e-3 * 1.00098
        (1.0, 1.0 + 2**-9, 1e-3, True),  # |Δ| 1.95e-3 > 1e-3 * 1.00195
        (0.0, 1e-30, 1e-3, True),  # any move away from zero is relatively large
        (-1.0, 1.0, 1e-3, True),  # a sign flip
        (1.0, 2.0, 0.5, False),  # |Δ| = 1 == 0.5 * max(1, 2): not strictly greater
        (1.0, 2.5, 0.5, True),  # |Δ| = 1.5 > 1.25
        (0.0, -0.0, 1e-3, False),  # bitwise only
        (1e6, 1e6 + 64.0, 1e-3, False),  # |Δ| = 64 >> atol, but 6.4e-5 relative
    ],
)
def test_relative_rule(tmp_path: Path, a: float, b: float, rtol: float, counted: bool) -> None:
    assert counts_of(tmp_path, [a], [b], rtol=rtol).relative == int(counted)


def test_bf16_one_ulp_on_small_and_large_weights(tmp_path: Path) -> None:
    # fp32 inputs: a 1-ULP bf16 move at 2^-12 (ULP 2^-19 = 1.9e-6, under atol), a 1-ULP move at 1.0 (ULP 2^-7),
    # and a move of 2^-10 at 1.0 that is under half a bf16 ULP, so it vanishes when both sides round to bf16.
    a = [2**-12, 1.0, 1.0]
    b = [2**-12 + 2**-19, 1.0 + 2**-7, 1.0 + 2**-10]
    as_bf16 = counts_of(tmp_path, a, b, dtype="bfloat16")
    assert as_bf16 == Counts(n=3, bitwise=2, atol=1, relative=2)
    as_stored = counts_of(tmp_path, a, b)  # fp32: all three moved; 2^-10 passes atol but not rtol
    assert as_stored == Counts(n=3, bitwise=3, atol=2, relative=2)
    as_f32 = counts_of(tmp_path, a, b, dtype="float32")
    assert as_f32 == as_stored


def test_bf16_stored_pair(tmp_path: Path) -> None:
    # bf16 on disk, compared as stored: the same 1-ULP moves as above, without any cast.
    a = [2**-12, 1.0, 1.0]
    b = [2**-12 + 2**-19, 1.0 + 2**-7, 1.0]
    assert counts_of(tmp_path, a, b, stored=torch.bfloat16) == Counts(n=3, bitwise=2, atol=1, relative=2)


def test_large_tensor_is_counted_in_slices(tmp_path: Path) -> None:
    # Over many slices of FLOAT_CHUNK elements, with changes dense (every coordinate) and sparse (gathered first).
    a = torch.zeros(3 << 20)
    b = a.clone()
    b[: 1 << 20] = 1.0  # the first slice: every coordinate changed
    b[(2 << 20) + 5 :: 1000] = 1e-6  # the last slice: sparse, all below atol
    fa, fb = (
        write_file(tmp_path / "a.safetensors", {"w": a}),
        write_file(tmp_path / "b.safetensors", {"w": b}),
    )
    sparse = len(range((2 << 20) + 5, 3 << 20, 1000))
    assert sparsity(fa, fb).total == Counts(3 << 20, (1 << 20) + sparse, 1 << 20, (1 << 20) + sparse)


def test_settled_range_by_hand() -> None:
    # bf16 (7 mantissa bits), atol 1e-5 < 2^-16: from 2^-9 (bits 0x3B00) up to infinity (0x7F80) every change
    # passes atol (one ULP >= 2^-16) and rtol 1e-3 < 2^-8. float16 at rtol 1e-3 has no such range (2^-11 needed).
    assert settled_range(torch.bfloat16, 1e-5, 1e-3) == (0x3B00, 0x7F80)
    assert settled_range(torch.bfloat16, 1e-5, 2**-8) is None
    assert settled_range(torch.float16, 1e-5, 1e-3) is None
    assert settled_range(torch.float16, 1e-5, 4e-4) == (0x2400, 0x7C00)  # 2^-6: one ULP 2^-16 > 1e-5
    assert settled_range(torch.float32, 1e-5, 1e-3) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("atol", "rtol"),
    [
        *[(1e-5, 1e-3), (1e-5, 4e-4), (0.0, 0.0), (2**-16, 2**-8 * (1 - 2**-20)), (1e-5, 3e-3)],
        *[(2**-17, 2**-11 * (1 - 2**-20)), (0.5, 1e-5), (1e-30, 2**-13), (1e-5, 5e-3), (1e-5, 7e-4)],
    ],
)
@pytest.mark.parametrize("every", [1, 64])  # every coordinate moved (dense), or one in 64 (gathered first)
def test_bit_rules_count_as_the_float_rules(dtype: torch.dtype, atol: float, rtol: float, every: int) -> None:
    # A holds every 16-bit pattern (both zeros, subnormals, normals, infinities, NaNs) 4 times; B moves each by
    # -3..3 ULPs, flips its sign, or replaces it with random bits. The bit shortcut must count exactly as the
    # float rules do on every coordinate, whatever the magnitudes and tolerances.
    gen = torch.Generator().manual_seed(0)
    a_bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).repeat(4)  # [262144]
    n = a_bits.numel()
    kind = torch.randint(0, 3, (n,), generator=gen)
    ulps = (a_bits.to(torch.int32) + torch.randint(-3, 4, (n,), generator=gen)).to(torch.int16)  # wraps
    flipped = a_bits ^ -(1 << 15)
    random_bits = torch.randint(-(1 << 15), 1 << 15, (n,), generator=gen, dtype=torch.int32).to(torch.int16)
    b_bits = torch.where(kind == 0, ulps, torch.where(kind == 1, flipped, random_bits))
    keep = torch.arange(n) % every == 0
    b_bits = torch.where(keep, b_bits, a_bits)
    a, b = a_bits.view(dtype), b_bits.view(dtype)
    settled = settled_range(dtype, atol, rtol)
    assert count_slice(a, b, atol, rtol, settled) == count_slice(a, b, atol, rtol, None)


@pytest.mark.parametrize("open_batch", [1 << 20, 1000])  # the float rules once per tensor, or many times
def test_bf16_tensor_over_many_slices(monkeypatch: pytest.MonkeyPatch, open_batch: int) -> None:
    # 3 bit-rule slices of a bf16 tensor with small and large weights: dense 1-ULP moves in the first slice,
    # sparse ones after. The batched float rules must count as the float rules applied slice by slice.
    import rlopt_cli.sparsity.count as kernel

    monkeypatch.setattr(kernel, "OPEN_BATCH", open_batch)
    gen = torch.Generator().manual_seed(0)
    n = 3 * kernel.BITS_CHUNK
    a = (torch.randn(n, generator=gen) * torch.logspace(-6, 0, n)).to(torch.bfloat16)  # |w| from ~1e-6 to ~1
    b = a.clone()
    moved = torch.rand(n, generator=gen) < torch.where(torch.arange(n) < kernel.BITS_CHUNK, 0.3, 0.01)
    b.view(torch.int16)[moved] += 1
    want = sum(
        (count_slice(a[i : i + 4096], b[i : i + 4096], 1e-5, 1e-3) for i in range(0, n, 4096)), Counts()
    )
    got = kernel.count_changed(a, b, 1e-5, 1e-3)
    assert got == Counts(n, want.bitwise, want.atol, want.relative)
    assert 0 < got.atol < got.bitwise  # small weights moved by less than atol: the float rules had work to do


# ---- grouping, tied weights, shards, skipped tensors -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "module", "layer"),
    [
        ("model.embed_tokens.weight", "embedding", None),
        ("model.layers.0.self_attn.q_proj.weight", "attn.q", 0),
        ("model.layers.11.self_attn.k_proj.bias", "attn.k", 11),
        ("model.layers.2.self_attn.v_proj.weight", "attn.v", 2),
        ("model.layers.2.self_attn.o_proj.weight", "attn.o", 2),
        ("model.layers.3.self_attn.q_norm.weight", "norm", 3),  # Qwen3: a norm, not q
        ("model.layers.3.mlp.gate_proj.weight", "mlp.gate", 3),
        ("model.layers.3.mlp.up_proj.weight", "mlp.up", 3),
        ("model.layers.30.mlp.down_proj.weight", "mlp.down", 30),
        ("model.layers.3.input_layernorm.weight", "norm", 3),
        ("model.norm.weight", "norm", None),
        ("lm_head.weight", "lm_head", None),
        ("transformer.h.4.ln_1.weight", "norm", 4),
        ("model.layers.1.router.weight", "other", 1),
    ],
)
def test_module_type_and_layer(name: str, module: str, layer: int | None) -> None:
    assert (module_type(name), layer_index(name)) == (module, layer)


def tiny_model(seed: int, untied: bool = True) -> dict[str, torch.Tensor]:
    """A 2-layer Llama-shaped state dict (vocab 10, hidden 4)."""
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g), "model.norm.weight": torch.ones(4)}
    for i in range(2):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=g)
        t[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(4, 8, generator=g)
    if untied:
        t["lm_head.weight"] = torch.randn(10, 4, generator=g)
    return t


def changed_copy(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Every coordinate of `names` moved by +1 (changed under all three rules)."""
    return {k: v + 1.0 if k in names else v.clone() for k, v in tensors.items()}


def test_groups_by_module_and_layer(tmp_path: Path) -> None:
    a = tiny_model(0)
    b = changed_copy(a, ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"])
    r = sparsity(write_model(tmp_path / "a", a), write_model(tmp_path / "b", b))
    assert r.total == Counts(40 + 4 + 2 * (16 + 32) + 40, 56, 56, 56)
    by_module = r.by("module")
    assert list(by_module) == ["embedding", "attn.q", "mlp.down", "norm", "lm_head"]
    assert by_module["attn.q"] == Counts(32, 16, 16, 16) and by_module["lm_head"] == Counts(40, 40, 40, 40)
    assert list(r.by("layer")) == ["0", "1", "none"]
    assert r.by("layer")["1"] == Counts(48, 16, 16, 16)


def test_tied_lm_head_is_counted_once(tmp_path: Path) -> None:
    a = tiny_model(0, untied=False)
    a["lm_head.weight"] = a["model.embed_tokens.weight"].clone()  # saved twice, but config says tied
    b = changed_copy(a, ["model.embed_tokens.weight", "lm_head.weight"])
    tied = {"tie_word_embeddings": True}
    r = sparsity(write_model(tmp_path / "a", a, tied), write_model(tmp_path / "b", b, tied))
    assert r.total.n == 40 + 4 + 2 * 48 and r.total.bitwise == 40
    assert [(s.name, "tied" in s.reason) for s in r.skipped] == [("lm_head.weight", True)]

    # The usual HF export: the tied lm_head is simply absent from the file.
    absent = tiny_model(0, untied=False)
    r2 = sparsity(write_model(tmp_path / "c", absent), write_model(tmp_path / "d", absent))
    assert r2.total.n == 40 + 4 + 2 * 48 and not r2.skipped


def test_sharded_model_with_index(tmp_path: Path) -> None:
    a = tiny_model(0)
    b = changed_copy(a, ["model.layers.0.mlp.down_proj.weight"])
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(b)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, keys in shards.items():
        save_file({k: b[k] for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    sharded = sparsity(write_model(tmp_path / "a", a), folder)
    single = sparsity(write_model(tmp_path / "a", a), write_model(tmp_path / "b", b))
    assert sharded.total == single.total == Counts(180, 32, 32, 32)


def test_shape_mismatch_and_one_sided_tensors_are_skipped(tmp_path: Path) -> None:
    a = tiny_model(0)
    b = changed_copy(a, [])
    b["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 5)
    b["model.extra.weight"] = torch.zeros(3)
    del b["model.norm.weight"]
    r = sparsity(write_model(tmp_path / "a", a), write_model(tmp_path / "b", b))
    assert r.total.n == 180 - 16 - 4  # neither skipped tensor is counted
    reasons = {s.name: s.reason for s in r.skipped}
    assert reasons == {
        "model.extra.weight": "only in B",
        "model.layers.0.self_attn.q_proj.weight": "shape differs: A [4, 4], B [4, 5]",
        "model.norm.weight": "only in A",
    }


# ---- effective rank ----------------------------------------------------------------------------------------


def test_effective_rank_of_known_updates() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 3, generator=g))  # [40, 3] orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(30, 3, generator=g))  # [30, 3]
    assert effective_rank(u @ v.T) == 3  # three equal singular values: all are needed
    assert effective_rank(u @ torch.diag(torch.tensor([10.0, 0.5, 0.1])) @ v.T) == 1  # 100 of 100.26 > 99%
    assert effective_rank(u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v.T) == 3  # 13 of 14 < 99%
    assert effective_rank(torch.zeros(5, 4)) == 0


def test_rank_through_compare(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    a = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=g),
        "model.norm.weight": torch.ones(8),
    }
    delta = sum(torch.outer(torch.randn(64, generator=g), torch.randn(32, generator=g)) for _ in range(3))
    b = {
        "model.layers.0.mlp.up_proj.weight": a["model.layers.0.mlp.up_proj.weight"] + delta,
        "model.norm.weight": a["model.norm.weight"],
    }
    r = sparsity(write_model(tmp_path / "a", a), write_model(tmp_path / "b", b), rank=True)
    summary = r.to_dict()["rank"]
    assert [row["full_rank"] for row in summary["tensors"]] == [32]  # the 1-D norm has no rank
    assert summary["mean"] == 3 and summary["mean_pct"] == pytest.approx(100 * summary["mean"] / 32)


# ---- the library's errors ----------------------------------------------------------------------------------


def test_mixed_stored_dtypes_need_an_explicit_dtype(tmp_path: Path) -> None:
    fa = write_file(tmp_path / "a.safetensors", {"w": torch.ones(4)})
    fb = write_file(tmp_path / "b.safetensors", {"w": torch.ones(4, dtype=torch.bfloat16)})
    with pytest.raises(RloptError, match="pass --dtype bfloat16"):
        sparsity(fa, fb)
    assert sparsity(fa, fb, dtype="bfloat16").total == Counts(4, 0, 0, 0)


# ---- the command -------------------------------------------------------------------------------------------


def pair(tmp_path: Path) -> tuple[Path, Path]:
    a = tiny_model(0)
    b = changed_copy(a, ["model.layers.1.self_attn.q_proj.weight"])
    return write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)


def test_cli_json(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    result = runner.invoke(app, ["sparsity", str(a), str(b), "--json", "--rank"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"n_params", "rules", "by_module", "by_layer", "skipped", "rank"} <= set(data)
    assert data["n_params"] == 180
    assert data["rules"]["atol"] == {
        "changed": 16,
        "fraction": 16 / 180,
        "sparsity_pct": 100 * (1 - 16 / 180),
    }
    assert data["by_layer"]["1"]["bitwise"]["changed"] == 16
    assert data["rank"]["tensors"][0]["name"] == "lm_head.weight"  # names in natural order


def test_cli_csv_and_tables(tmp_path: Path) -> None:
    a, b = pair(tmp_path)
    out = tmp_path / "out" / "tensors.csv"
    for by in ("module", "layer", "tensor"):
        result = runner.invoke(
            app, ["sparsity", str(a), str(b), "--by", by, "--csv", str(out)], env={"COLUMNS": "200"}
        )
        assert result.exit_code == 0, result.output
        assert "updated % by " + by in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7
    q1 = next(r for r in rows if r["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert (q1["module"], q1["layer"], q1["shape"], q1["n"], q1["bitwise"], q1["relative_frac"]) == (
        "attn.q", "1", "4x4", "16", "16", "1.0",
    )  # fmt: skip


def test_cli_run_folder_and_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step, seed_names in ((0, []), (2, ["model.norm.weight"]), (4, ["lm_head.weight"])):
        write_model(run / "checkpoints" / f"step-{step:06d}", changed_copy(tiny_model(0), seed_names))
    start = run / "checkpoints" / "step-000000"
    assert sparsity(start, run).total.bitwise == 40  # the last checkpoint
    assert sparsity(start, run, step=2).total.bitwise == 4


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (arguments, expected message part), building the files each case needs."""
    good = write_model(tmp / "good", tiny_model(0))
    (tmp / "empty").mkdir()
    (tmp / "weights.bin").write_bytes(b"\x80\x04not really a pickle")
    (tmp / "hf").mkdir()
    (tmp / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    other = write_model(tmp / "other", {"encoder.weight": torch.ones(3)})
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    g = str(good)
    return {
        "missing": ([g, str(tmp / "nope")], "checkpoint not found"),
        "no weights": ([g, str(tmp / "empty")], "no model.safetensors"),
        "pickle file": ([str(tmp / "weights.bin"), g], "is a pickle"),
        "pickle folder": ([g, str(tmp / "hf")], "pytorch_model.bin"),
        "nothing in common": ([g, str(other)], "share no comparable tensor"),
        "corrupt header": ([g, str(corrupt)], "corrupt or not safetensors"),
        "negative atol": ([g, g, "--atol", "-1e-5"], "--atol must be"),
        "negative rtol": ([g, g, "--rtol", "-0.1"], "--rtol must be"),
        "unknown dtype": ([g, g, "--dtype", "bf16"], "unknown --dtype 'bf16'"),
        "unknown grouping": ([g, g, "--by", "layers"], "did you mean: layer"),
        "step without run": ([g, g, "--step", "3"], "--step picks a checkpoint of a run folder"),
    }


CASES = [
    *("missing", "no weights", "pickle file", "pickle folder", "nothing in common", "corrupt header"),
    *("negative atol", "negative rtol", "unknown dtype", "unknown grouping", "step without run"),
]


@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input(tmp_path: Path, case: str) -> None:
    args, message = bad_inputs(tmp_path)[case]
    for as_json in ([], ["--json"]):
        assert message in one_line_error(runner.invoke(app, ["sparsity", *args, *as_json]))


# ---- a real run ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_agrees_with_in_training_sparsity(tmp_path: Path) -> None:
    from rlopt_cli.config.recipes import load_config
    from rlopt_cli.training.loop import train

    overrides = [
        "model.warmup_steps=0", "task.n_eval=16", "grpo.num_generations=4", "grpo.batch_size=8", "train.steps=2",
        "train.eval_every=2", "train.checkpoint_every=2", "log.progress=false",
        # a random-init model earns no reward, so no gradient: weight decay moves the weights instead
        "optimizer.lr=0.1", "optimizer.weight_decay=0.1",
    ]  # fmt: skip
    run = train(load_config(None, overrides), tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    result = sparsity(run / "checkpoints" / "step-000000", run)
    assert result.to_dict()["n_params"] == summary["n_params"]
    assert result.to_dict()["rules"]["bitwise"]["fraction"] == summary["sparsity/bitwise_frac"]
    assert result.to_dict()["rules"]["atol"]["fraction"] == summary["sparsity/atol_frac"]
    assert 0 < summary["sparsity/bitwise_frac"] and not result.skipped
