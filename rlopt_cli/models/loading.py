"""Models and tokenizers: the embedded tiny model (built from a transformers config, no download) or any local
Hugging Face folder / hub id. Everything saved here loads with plain `AutoModelForCausalLM` / `AutoTokenizer`.

The embedded default is a Qwen2 causal LM (4 layers, width 128, about 1.06M parameters) with a character-level
`tokenizers` WordLevel tokenizer wrapped as a transformers fast tokenizer. It is small, not fake: the same
trainer, checkpoints and sparsity tools run on it as on Qwen3-8B.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rlopt_cli.errors import RloptError
from rlopt_cli.models.safetensors_files import read_headers, weight_files

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlopt_cli.config.schema import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
# Digits, arithmetic and punctuation, space, and lower-case letters: enough for the built-in task and for
# short text answers; anything else maps to [UNK].
CHARACTERS = list("0123456789+-*/=#.,:?() ") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
MAX_POSITIONS = 64
# Pickled weights can run code when loaded; rlopt loads safetensors only, everywhere it reads weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Any one of these makes a folder's tokenizer loadable by AutoTokenizer (fast, sentencepiece, or GPT-2 BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
CONVERT_HINT = (
    "rlopt reads only safetensors; convert a trusted file with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)"
)


def refuse_pickle(path: Path) -> None:
    """Pickled weights can run code when loaded: refuse them, saying how to convert."""
    if path.suffix in PICKLE_SUFFIXES:
        raise RloptError(f"{path} is a pickle, which rlopt refuses to load; {CONVERT_HINT}")


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """Character-level tokenizer: one token per character, [BOS] prepended, left padding for generation."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )  # heavy: imported on use
    from transformers import PreTrainedTokenizerFast  # heavy: imported on use

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


def build_embedded_model(
    cfg: ModelConfig, vocab_size: int, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """A randomly initialised Qwen2 model of the configured size, seeded by `cfg.init_seed`."""
    import torch  # heavy: imported on use
    from transformers import Qwen2Config, Qwen2ForCausalLM  # heavy: imported on use

    config = Qwen2Config(
        **attention_kwargs(cfg.attn_implementation),
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,  # untied, as in the paper's models: lm_head counts as its own parameters
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = Qwen2ForCausalLM(config)
    return model.float()


def check_model_path(path: str | Path) -> Path | None:
    """A local folder must hold safetensors weights; pickles are refused. Returns None for a hub id."""
    p = Path(path)

    refuse_pickle(p)
    if not p.exists():
        if str(path).startswith((".", "/", "~")) or p.parent != Path("."):
            raise RloptError(f"model path not found: {path}")
        return None  # looks like a hub id
    if not p.is_dir():
        raise RloptError(f"{p} is not a model folder (expected config.json and *.safetensors)")
    if not any(p.glob("*.safetensors")):
        pickles = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        hint = f" (found pickles {', '.join(pickles)}: convert them to safetensors)" if pickles else ""
        raise RloptError(f"no *.safetensors weights in {p}{hint}")
    # a truncated or corrupt file is a one-line error here, not a traceback inside transformers later
    read_headers(weight_files(p))
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise RloptError(
            f"no tokenizer in {p} (expected one of {', '.join(TOKENIZER_FILES)}); save it beside the weights: "
            "AutoTokenizer.from_pretrained(SOURCE).save_pretrained(DIR)"
        )
    return p


def has_chat_template(folder: Path) -> bool:
    """Whether a local model folder's tokenizer carries a chat template, read from its files without loading
    it: transformers 5 saves `chat_template.jinja`, older versions a `chat_template` key in
    tokenizer_config.json or `chat_template.json`."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def check_chat_template(path: str | Path, wanted: bool) -> None:
    """A real model prompted through its chat template must have one: without it, an instruct model would be
    prompted with plain text and the run would measure the wrong thing, silently."""
    folder = Path(path)
    if wanted and folder.is_dir() and not has_chat_template(folder):
        raise RloptError(
            f"the tokenizer in {folder} has no chat template, but task.chat_template = true: set "
            "task.chat_template=false to prompt with plain text, or save a tokenizer that has one"
        )


def quiet_transformers() -> None:
    """Keep the terminal for rlopt's own progress bar: no per-shard bars, no info chatter."""
    from transformers.utils import logging  # heavy: imported on use

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def check_attention(name: str, device: torch.device) -> None:
    """Refuse, before anything loads, an attention kernel this machine cannot run. flex_attention is refused off
    CUDA too: on CPU torch builds it with torch.compile's C++ backend (it failed to compile on this project's
    CI machine), and it gains nothing over sdpa there."""
    if name not in ("flash_attention_2", "flex_attention"):
        return
    if device.type != "cuda":
        raise RloptError(
            f"model.attn_implementation = {name!r} needs a CUDA device, but this run is on {device}: "
            "use sdpa (or auto) on CPU"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RloptError(
            "model.attn_implementation = 'flash_attention_2' needs the flash-attn package: "
            "pip install flash-attn --no-build-isolation, or use sdpa"
        )


def attention_kwargs(name: str) -> dict[str, Any]:
    """`attn_implementation` for transformers; nothing for 'auto', so transformers chooses as it always did."""
    return {} if name == "auto" else {"attn_implementation": name}


def placement_kwargs(device: torch.device) -> dict[str, Any]:
    """`device_map` where it saves host memory (an accelerator) and transformers can honour it (accelerate)."""
    if device.type == "cpu" or importlib.util.find_spec("accelerate") is None:
        return {}
    return {"device_map": device}


def load_pretrained(
    path: str | Path, device: torch.device, attn_implementation: str = "auto"
) -> tuple[Any, PreTrainedTokenizerBase]:
    """fp32 master weights on `device`, whatever dtype the folder stores (bf16 autocast is the trainer's job).

    On a GPU with accelerate installed (the `real` extra has it) the weights load straight onto `device`
    (`device_map`): each tensor is read from the safetensors file, cast to fp32 and placed there, so the run never
    holds a whole fp32 copy in host memory (6.9 GB at Qwen3-1.7B) before moving it. transformers needs accelerate
    for any `device_map`; without it, and on CPU (where there is nothing to move), the model loads on the host and
    moves once: the same weights, bit for bit."""
    import torch  # heavy: imported on use
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: imported on use

    check_model_path(path)
    check_attention(attn_implementation, device)
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch.float32,
            use_safetensors=True,
            **placement_kwargs(device),
            **attention_kwargs(attn_implementation),
        )
    except (OSError, ValueError) as err:  # a missing or malformed config.json / tokenizer file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RloptError(f"cannot load model {path}: {reason}") from None
    if tokenizer.pad_token is None:  # many base models ship without one; generation needs it
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return cast(Any, model).to(device), tokenizer  # already there with device_map


def load_policy(
    cfg: Any, device: torch.device, warm_start: Path | None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The model a run starts from: a model folder, the embedded model's warm-up checkpoint (`warm_start`, made
    by the warm-up stage, rlopt_cli/training/warmup.py), or a random embedded model. Loading never trains."""
    quiet_transformers()
    check_attention(cfg.model.attn_implementation, device)
    model: Any
    if not cfg.model.is_embedded:
        model, tokenizer = load_pretrained(cfg.model.name_or_path, device, cfg.model.attn_implementation)
    elif warm_start is not None:
        model, tokenizer = load_pretrained(warm_start, device, cfg.model.attn_implementation)
    else:
        tokenizer = build_char_tokenizer()
        model = cast(Any, build_embedded_model(cfg.model, len(tokenizer), tokenizer)).to(device)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def enable_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them. Non-reentrant, as
    transformers defaults to, said here because it matters: the KV-cache route of `grpo.token_logprobs` hands the
    prompt's keys/values out of a checkpointed layer through its cache, and only non-reentrant checkpointing builds
    their autograd graph (the reentrant kind runs the layer under no_grad; `prompt_cache` refuses that)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> bool:
    """Whether `render_prompts` wraps prompts in the template: it is wanted and the tokenizer has one."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chat_template: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Wrap each prompt as a user turn when the tokenizer has a chat template (and it is wanted);
    `template_kwargs` are the template's own variables (task.chat_template_kwargs, e.g. enable_thinking)."""
    if not uses_chat_template(tokenizer, chat_template):
        return prompts
    return [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
                **(template_kwargs or {}),
            )
        )
        for p in prompts
    ]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], templated: bool) -> Any:
    """Left-padded ids and attention mask of `prompts` (a BatchEncoding of [B, P] tensors).

    Templated text already holds every special token the model expects (a Llama-3 template writes
    <|begin_of_text|> itself), so it is encoded without the tokenizer's own, as transformers'
    `apply_chat_template(tokenize=True)` does; else a BOS-adding tokenizer gives two BOS. Plain prompts keep
    them (the embedded tokenizer prepends its [BOS])."""
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)


def mark_saved_dtype(folder: Path, dtype_name: str) -> None:
    """Record the dtype the weights were saved in (transformers writes the in-memory fp32 dtype otherwise)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype_name
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def parameter_count(model: PreTrainedModel) -> int:
    """Distinct parameters (a tied lm_head counted once)."""
    return sum(p.numel() for p in model.parameters())


def cache_argument(model: Any) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; accept both so older installs work."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def custom_attention_mask(model: Any, allowed: torch.Tensor) -> torch.Tensor | None:
    """`allowed` [B, Q, K] (query may attend key) as the 4D mask [B, 1, Q, K] that the model's attention takes
    as given, skipping transformers' own mask building: bool for sdpa, additive for eager. None for attention
    kernels that take padding masks only (flash attention), and where a sliding window is shorter than K (a
    window at least K long changes nothing)."""
    import torch  # heavy: imported on use

    config = model.config
    window = getattr(config, "sliding_window", None)
    if window and allowed.shape[-1] > window:
        return None
    if config._attn_implementation == "sdpa":
        return allowed[:, None]
    if config._attn_implementation == "eager":  # eager attention adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return None
