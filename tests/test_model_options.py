"""The model-side knobs of issue 17 on the embedded model and tiny real architectures: the attention kernel
(`model.attn_implementation`), the chat template's own variables (`task.chat_template_kwargs`), prompts encoded
without a second BOS after templating, and weights loaded straight onto their device in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlopt_cli.algo import grpo
from rlopt_cli.config.recipes import load_config
from rlopt_cli.config.schema import ModelConfig
from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import (
    build_char_tokenizer,
    build_embedded_model,
    encode_prompts,
    load_pretrained,
    render_prompts,
)
from tests.tiny_hf import CHAT_TEMPLATE, byte_tokenizer, save_tiny_model

# Qwen3's switch, as its template reads it: without the variable it thinks; enable_thinking=false writes an empty
# think block after the generation prompt, so the model answers directly.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)


def batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Two prompts (one left-padded) with 3 completions each, one ending early."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (2, 7), generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :3] = 0
    completion = torch.randint(4, vocab, (6, 5), generator=gen)
    cmask = torch.ones_like(completion)
    cmask[2, 3:] = 0
    return prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0), completion, cmask


def all_routes(model: Any, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Log-probs by every route of `grpo.token_logprobs` (per row, shared prompt cache, packed)."""
    with torch.no_grad():
        return [grpo.token_logprobs(model, *inputs, 1.0, g, pack) for g, pack in ((1, 0), (3, 0), (3, 512))]


# ---------------------------------------------------------------------------------------------------------------
# 1. model.attn_implementation


def test_embedded_model_eager_and_sdpa_agree() -> None:
    tok = build_char_tokenizer()
    models = {
        name: build_embedded_model(ModelConfig(attn_implementation=name), len(tok), tok)
        for name in ("auto", "eager", "sdpa")
    }
    assert {n: m.config._attn_implementation for n, m in models.items()} == {
        "auto": "sdpa",  # what transformers picks on its own (and what every run so far used)
        "eager": "eager",
        "sdpa": "sdpa",
    }
    inputs = batch(len(tok))
    eager, sdpa = all_routes(models["eager"], inputs), all_routes(models["sdpa"], inputs)
    assert all(torch.equal(a, b) for a, b in zip(all_routes(models["auto"], inputs), sdpa, strict=True))
    for a, b in zip(eager, sdpa, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_real_architecture_loads_the_chosen_kernel_and_agrees(arch: str, tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / arch, arch)
    cpu = torch.device("cpu")
    eager, _ = load_pretrained(folder, cpu, "eager")
    sdpa, _ = load_pretrained(folder, cpu, "sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    inputs = batch(eager.config.vocab_size)
    for a, b in zip(all_routes(eager, inputs), all_routes(sdpa, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    from rlopt_cli.models.loading import load_policy

    cfg = load_config(None, [f"model.name_or_path={folder}", "model.attn_implementation=eager"])
    policy, _ = load_policy(cfg, cpu, None)  # the trainer's own entry: the choice reaches the model
    assert policy.config._attn_implementation == "eager"


def test_flash_and_flex_attention_on_cpu_are_one_line_errors_before_the_run_folder(tmp_path: Path) -> None:
    from rlopt_cli.training.loop import train

    folder = save_tiny_model(tmp_path / "m", "qwen3")
    for kernel in ("flash_attention_2", "flex_attention"):
        with pytest.raises(
            RloptError, match=f"'{kernel}' needs a CUDA device, but this run is on cpu: use sdpa"
        ):
            load_pretrained(folder, torch.device("cpu"), kernel)
    cfg = load_config(None, ["model.attn_implementation=flash_attention_2", "train.device=cpu"])
    with pytest.raises(RloptError, match="needs a CUDA device") as err:
        train(cfg, tmp_path / "runs", say=lambda *_: None)
    assert "\n" not in str(err.value) and not (tmp_path / "runs").exists()
    with pytest.raises(RloptError, match="model.attn_implementation = 'flash' is not one of auto, eager"):
        load_config(None, ["model.attn_implementation=flash"])


# ---------------------------------------------------------------------------------------------------------------
# 2. task.chat_template_kwargs


def test_template_kwargs_reach_the_template() -> None:
    tok = byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    thinking = render_prompts(tok, ["2+3?"], True)[0]
    direct = render_prompts(tok, ["2+3?"], True, {"enable_thinking": False})[0]
    assert thinking == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert direct == thinking + "<think>\n\n</think>\n\n"
    assert render_prompts(tok, ["2+3?"], False, {"enable_thinking": False}) == ["2+3?"]  # no template wanted


def test_template_kwargs_config(tmp_path: Path) -> None:
    from rlopt_cli.config.recipes import from_dict, read_toml, to_dict, to_toml

    cfg = load_config(None, ["task.chat_template_kwargs={enable_thinking = false}"])
    assert cfg.task.chat_template_kwargs == {"enable_thinking": False}
    assert load_config(None, []).task.chat_template_kwargs == {}
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert to_dict(from_dict(read_toml(tmp_path / "c.toml"))) == to_dict(cfg)  # what config.toml holds
    hash(cfg)  # frozen configs stay hashable with a table in them
    bad = {
        "task.chat_template_kwargs=true": "must be a table, e.g. {enable_thinking = false}",
        "task.chat_template_kwargs={tokenize = true}": "may not set tokenize",
    }
    for override, message in bad.items():
        with pytest.raises(RloptError, match=message):
            load_config(None, [override])
    with pytest.raises(RloptError, match="task.chat_template = false, so no template reads it"):
        load_config(None, ["task.chat_template_kwargs={enable_thinking = false}", "task.chat_template=false"])


@pytest.mark.slow
def test_template_kwargs_reach_rollouts_and_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One GRPO step on a tiny Qwen3 whose tokenizer carries the thinking switch: the trainer's rollouts and its
    evaluation both generate from prompts rendered with enable_thinking = false."""
    from rlopt_cli.rollout.hf import HFBackend
    from rlopt_cli.training.loop import train

    folder = save_tiny_model(tmp_path / "qwen3", "qwen3")
    tok = byte_tokenizer()
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(folder)
    seen: list[str] = []
    real = HFBackend.generate
    monkeypatch.setattr(
        HFBackend,
        "generate",
        lambda self, prompts, *a, **k: (seen.extend(prompts), real(self, prompts, *a, **k))[1],
    )
    cfg = load_config(
        None,
        [
            f"model.name_or_path={folder}",
            "task.chat_template_kwargs={enable_thinking = false}",
            "task.prompt_style=instruct",
            "task.n_eval=2",
            "grpo.num_generations=2",
            "grpo.batch_size=2",
            "grpo.max_completion_length=2",
            "train.steps=1",
            "train.device=cpu",
            "log.progress=false",
        ],
    )
    train(cfg, tmp_path / "runs", say=lambda *_: None)
    assert len(seen) == 2 + 1 + 2  # eval before step 1, the step's one prompt, eval at the end
    assert all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p in seen)


# ---------------------------------------------------------------------------------------------------------------
# 3. one BOS after the chat template


def bos_tokenizer() -> Any:
    """A Llama-3-like tokenizer: it prepends <s> to every encoding, and its chat template writes <s> itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "2+3?", "5", "hi"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=template,
    )


def test_templated_prompts_get_one_bos() -> None:
    tok = bos_tokenizer()
    rendered = render_prompts(tok, ["2+3?", "hi"], True)
    assert rendered[0] == "<s><user> 2+3? </s> <assistant> "
    twice = tok(rendered).input_ids[0]
    assert twice[:2] == [1, 1]  # the finding: the tokenizer's <s> before the template's
    ids = encode_prompts(tok, rendered, templated=True)
    real = [row[mask.bool()].tolist() for row, mask in zip(ids.input_ids, ids.attention_mask, strict=True)]
    assert real == [[1, 4, 6, 2, 5], [1, 4, 8, 2, 5]]
    plain = encode_prompts(tok, ["2+3?"], templated=False).input_ids.tolist()
    assert plain == [[1, 6]]  # an untemplated prompt keeps the tokenizer's BOS


def test_rollouts_of_templated_prompts_start_with_one_bos() -> None:
    """The hf backend's prompt ids are what every log-prob pass (policy, old, reference) forwards."""
    from rlopt_cli.rollout import make_backend
    from tests.tiny_hf import tiny_model

    tok = bos_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    for chat_template, prompt_ids in ((True, [1, 4, 6, 2, 5]), (False, [1, 6])):
        cfg = load_config(None, [f"task.chat_template={str(chat_template).lower()}"])
        prompts = render_prompts(tok, ["2+3?"], chat_template)
        rollout = make_backend("hf", model, tok, cfg).generate(prompts, 2, 3, 1.0, seed=0)
        assert rollout.prompt_ids.tolist() == [prompt_ids] * 2


def test_embedded_prompts_are_encoded_as_before() -> None:
    """The embedded tokenizer has no template: prompts stay plain and keep their [BOS], exactly as before."""
    from rlopt_cli.rollout import make_backend

    tok = build_char_tokenizer()
    model = build_embedded_model(ModelConfig(num_layers=1, hidden_size=32, num_heads=2), len(tok), tok)
    prompts = render_prompts(tok, ["12+34=", "5+6="], True)
    assert prompts == ["12+34=", "5+6="]
    rollout = make_backend("hf", model, tok, load_config(None, [])).generate(prompts, 1, 2, 0.0, seed=0)
    before = tok(prompts, return_tensors="pt", padding=True)  # how prompts were encoded until now
    assert (
        torch.equal(rollout.prompt_ids, before.input_ids)
        and int(rollout.prompt_ids[0, 0]) == tok.bos_token_id
    )


def test_sft_batches_of_templated_prompts_start_with_one_bos() -> None:
    from rlopt_cli.algo.sft import sft_batch
    from rlopt_cli.tasks import Example

    tok = bos_tokenizer()
    prompts = render_prompts(tok, ["2+3?"], True)
    examples = [Example(prompt="2+3?", answer="5", solution="5")]
    batch = sft_batch(tok, prompts, examples, torch.device("cpu"), templated=True)
    assert batch.prompt_ids.tolist() == [[1, 4, 6, 2, 5]]
    plain = sft_batch(
        tok, ["2+3?"], examples, torch.device("cpu")
    )  # untemplated prompts keep the tokenizer's BOS
    assert plain.prompt_ids[0, 0].item() == 1


# ---------------------------------------------------------------------------------------------------------------
# 5. the no-grad log-prob passes (old log-probs, the KL reference) build no KV cache


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logprob_passes_build_no_kv_cache(arch: str) -> None:
    """Every decoder forward of every route asks for no cache (use_cache=False) and returns none of its own: the
    shared-prompt route hands in rlopt's caches (`prompt_cache.py`), which hold the prompt's keys/values it needs."""
    from tests.tiny_hf import tiny_model

    model = tiny_model(arch).eval()
    seen: list[tuple[Any, bool]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        returned = getattr(out, "past_key_values", None)
        seen.append((kwargs.get("use_cache"), returned is None or returned is given))

    model.get_decoder().register_forward_hook(record, with_kwargs=True)
    all_routes(model, batch(model.config.vocab_size))
    assert len(seen) == 1 + 2 + 1  # per row, shared prompt (prompt, completions), packed
    assert seen == [(False, True)] * 4


# ---------------------------------------------------------------------------------------------------------------
# 4. loading: fp32 master weights placed on their device as they load


def test_accelerators_load_through_device_map_when_accelerate_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from rlopt_cli.models.loading import placement_kwargs

    cuda = torch.device("cuda", 1)
    assert placement_kwargs(torch.device("cpu")) == {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert placement_kwargs(cuda) == {"device_map": cuda}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None
    )  # transformers would refuse device_map
    assert placement_kwargs(cuda) == {}


def test_weights_load_in_fp32_onto_the_target_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "m", "qwen3")
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    stored.save_pretrained(folder)  # the folder now holds bf16, as a hub model does
    calls: list[dict[str, Any]] = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: (calls.append(k), real(*a, **k))[1]
    )
    model, _ = load_pretrained(folder, torch.device("cpu"))
    assert "device_map" not in calls[0] and calls[0]["dtype"] == torch.float32  # on the host: nothing to move
    assert "attn_implementation" not in calls[0]  # auto: transformers' own choice, as before
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32 and p.device.type == "cpu"
        assert torch.equal(p, stored.state_dict()[name].float())  # bf16 -> fp32 is exact
