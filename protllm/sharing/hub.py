"""Hub side of sharing: check a model folder, make it Hub-ready, push it, push or merge a LoRA adapter.

A model folder (`protllm.model_folder.save_model_folder`) becomes Hub-ready with `prepare_model_folder`: it gains
the `protein-function` pipeline (pipeline_protllm.py, named in config.json's `custom_pipelines`) and our model card
(`card.py`). `push_model_folder` checks the folder first (`check_model_folder`: config, safetensors weights, every
remote-code file and every file they import, an `auto_map` that names only our own files, processor and both
tokenizers) and names everything wrong before anything is uploaded.

torch, transformers and peft are imported only by `merge_adapter`: checking and pushing start fast.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from ..remote_code import PIPELINE_FILE, RELATIVE_IMPORT, auto_map_problems, check_auto_map, needed_code_files
from .card import HUB_ID_PATTERN, card_has_eval_results, safetensors_header, write_adapter_card, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_TASK = "protein-function"
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {"impl": "pipeline_protllm.ProteinFunctionPipeline", "pt": ["AutoModelForCausalLM"], "type": "multimodal"}
}
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "tokenizer.json",
                   "protein_tokenizer/tokenizer_config.json", "protein_tokenizer/vocab.txt")
REQUIRED_AUTO_MAP = {"config.json": ("AutoConfig", "AutoModel", "AutoModelForCausalLM"),
                     "processor_config.json": ("AutoProcessor",)}
UPLOAD_IGNORE = ["__pycache__/*", "*.pyc", ".*", "**/.*", "checkpoint-*/**", "*.lock"]


class ModelFolderError(ValueError):
    """A folder that cannot be pushed or merged; the message names everything that is missing or wrong."""


# ---------------------------------------------------------------------------------------------- folders


def _pipeline_source() -> Path:
    """pipeline_protllm.py as this process imports it (the checkout's root, or site-packages when installed)."""
    spec = importlib.util.find_spec(PIPELINE_FILE[:-3])
    return Path(spec.origin) if spec is not None and spec.origin else REPO_ROOT / PIPELINE_FILE


def register_protein_function_pipeline():
    """Register the `protein-function` task in this process (transformers' PIPELINE_REGISTRY)."""
    if importlib.util.find_spec(PIPELINE_FILE[:-3]) is None:  # run from outside the checkout
        sys.path.insert(0, str(REPO_ROOT))
    import pipeline_protllm

    pipeline_protllm.register_pipeline()
    return pipeline_protllm.ProteinFunctionPipeline


def add_protein_function_pipeline(folder) -> Path:
    """Copy pipeline_protllm.py into a saved model folder and name it in config.json's `custom_pipelines`,
    so `pipeline("protein-function", model=FOLDER_OR_REPO, trust_remote_code=True)` works anywhere."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{folder} has no config.json: save the model first (model_folder.save_model_folder)")
    shutil.copyfile(_pipeline_source(), folder / PIPELINE_FILE)
    config = json.loads(config_path.read_text())
    config["custom_pipelines"] = {**(config.get("custom_pipelines") or {}), **json.loads(json.dumps(CUSTOM_PIPELINES))}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def prepare_model_folder(folder, **card_kwargs) -> Path:
    """Make a folder written by `model_folder.save_model_folder` Hub-ready: the pipeline and the model card."""
    add_protein_function_pipeline(folder)
    write_model_card(folder, **card_kwargs)
    return Path(folder)




def check_model_folder(folder) -> list[str]:
    """Everything a ProtLLM model folder lacks for loading with the Auto classes and the pipeline ([] if none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a directory"]
    problems = []
    config = None
    if not (folder / "config.json").is_file():
        problems.append("config.json (the model configuration)")
    else:
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "protllm":
            problems.append(f"config.json model_type is {config.get('model_type')!r}, expected 'protllm'")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        problems += [f"weight shard {s} (listed in model.safetensors.index.json)" for s in sorted(shards) if not (folder / s).is_file()]
    if not weights:
        legacy = sorted(p.name for p in folder.glob("*.bin"))
        problems.append("weights: no *.safetensors file" + (f" (found {legacy}: save with safe_serialization)" if legacy else ""))
    # The files transformers reads for this folder's auto_map: the core ones, plus the optional ones its model uses.
    problems += [f"remote-code file {name}" for name in needed_code_files(folder) if not (folder / name).is_file()]
    for py in sorted(folder.glob("*.py")):
        for module in RELATIVE_IMPORT.findall(py.read_text()):
            if not (folder / f"{module}.py").is_file():
                problems.append(f"remote-code file {module}.py (imported by {py.name})")
    for file, keys in REQUIRED_AUTO_MAP.items():
        if not (folder / file).is_file():
            continue
        auto_map = json.loads((folder / file).read_text()).get("auto_map") or {}
        problems += [f"{file} auto_map entry {key}" for key in keys if key not in auto_map]
    problems += auto_map_problems(folder)  # every code reference must be one of our files in this folder
    if config is not None:
        if PIPELINE_TASK not in (config.get("custom_pipelines") or {}):
            problems.append(f"config.json custom_pipelines entry {PIPELINE_TASK!r} (run `python -m protllm.sharing card FOLDER`)")
    problems += [f"processor file {name}" for name in PROCESSOR_FILES if not (folder / name).is_file()]
    if not ((folder / "chat_template.jinja").is_file() or "chat_template" in _maybe_json(folder / "tokenizer_config.json")
            or "chat_template" in _maybe_json(folder / "processor_config.json")):
        problems.append("chat template (chat_template.jinja)")
    return list(dict.fromkeys(problems))


def _maybe_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}



def _upload(folder, repo_id, private, token, commit_message, create_pr=False):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token,
                             ignore_patterns=UPLOAD_IGNORE, create_pr=create_pr)


def push_model_folder(folder, repo_id: str, private: bool = False, token: str | None = None,
                      commit_message: str = "Upload ProtLLM model", create_pr: bool = False, **card_kwargs):
    """Check a ProtLLM model folder and upload it to the Hub repository `repo_id` (created if needed).

    Raises ModelFolderError naming every missing file before anything is uploaded. Writes a card when the folder
    has none (card_kwargs: see `build_model_card`); warns when the card carries no evaluation results.
    Returns the upload's CommitInfo.
    """
    folder = Path(folder)
    problems = check_model_folder(folder)
    if problems:
        raise ModelFolderError(f"cannot push {folder}: it lacks " + "; ".join(problems))
    readme = folder / "README.md"
    if not readme.is_file() or card_kwargs:
        write_model_card(folder, repo_id=repo_id, **card_kwargs)
    elif 'repo = "ORG/NAME"' in readme.read_text():  # a card written before the repository id was known
        readme.write_text(readme.read_text().replace('repo = "ORG/NAME"', f'repo = "{repo_id}"'))
    if not card_has_eval_results(folder):
        warnings.warn(f"the model card of {folder} has no evaluation results (model-index): run `python -m eval` "
                      "and write the card with --metrics", UserWarning, stacklevel=2)
    return _upload(folder, repo_id, private, token, commit_message, create_pr)



# ---------------------------------------------------------------------------------------------- adapters


def _adapter_weights(folder: Path) -> list[str]:
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return []
    return [k for k in safetensors_header(weights) if k != "__metadata__"]


def base_resolves(name: str, token: str | None = None) -> tuple[bool, str]:
    """Whether an adapter's base (`base_model_name_or_path`) can be loaded by others: (ok, reason)."""
    if not name:
        return False, "adapter_config.json has no base_model_name_or_path"
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            return False, f"base {name!r} is a local path without config.json"
        return True, "local folder"
    if not HUB_ID_PATTERN.match(name):
        return False, f"base {name!r} is neither an existing folder nor a Hub repository id"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi(token=token).model_info(name)
        return True, "Hub repository"
    except RepositoryNotFoundError:
        return False, f"base {name!r} is not a Hub repository (or it is private and no token was given)"
    except OfflineModeIsEnabled:
        return False, f"base {name!r} cannot be checked offline (HF_HUB_OFFLINE=1)"
    except Exception as error:  # noqa: BLE001 - network errors: report, do not guess
        return False, f"base {name!r} could not be checked on the Hub ({type(error).__name__}: {error})"


def check_adapter_folder(folder, require_projector: bool = True) -> dict:
    """Problems of a PEFT adapter folder; returns its adapter_config.json. Raises ModelFolderError."""
    folder = Path(folder)
    problems = []
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{folder} is not a PEFT adapter folder: no adapter_config.json")
    adapter_config = json.loads(config_path.read_text())
    keys = _adapter_weights(folder)
    if not keys:
        problems.append("adapter_model.safetensors (the adapter weights)")
    elif require_projector and not any(".projector." in k for k in keys):
        problems.append("projector weights in adapter_model.safetensors (train with modules_to_save=['projector'], "
                        "or pass require_projector=False if the projector was frozen)")
    if problems:
        raise ModelFolderError(f"cannot use adapter {folder}: it lacks " + "; ".join(problems))
    return adapter_config


def push_adapter(adapter_folder, repo_id: str, *, base_repo_id: str | None = None, private: bool = False,
                 token: str | None = None, commit_message: str = "Upload ProtLLM LoRA adapter",
                 require_projector: bool = True, create_pr: bool = False):
    """Upload a PEFT adapter folder (LoRA + the projector via modules_to_save) with a card.

    The base named in adapter_config.json (`base_model_name_or_path`, or `base_repo_id` which replaces it in the
    uploaded copy: use it when training saved a local path) must be a Hub repository that resolves.
    """
    adapter_folder = Path(adapter_folder)
    adapter_config = check_adapter_folder(adapter_folder, require_projector)
    base = base_repo_id or adapter_config.get("base_model_name_or_path")
    if base and Path(base).exists() and base_repo_id is None:
        raise ModelFolderError(
            f"adapter {adapter_folder} names a local base {base!r}: others cannot load that. Push the base first "
            f"(push_model_folder) and pass base_repo_id='ORG/NAME'")
    ok, reason = base_resolves(base, token)
    if not ok:
        raise ModelFolderError(f"adapter {adapter_folder}: its base does not resolve: {reason}")
    with tempfile.TemporaryDirectory(prefix="protllm-adapter-") as staging:
        staging = Path(staging)
        for item in adapter_folder.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, staging / item.name)
        adapter_config["base_model_name_or_path"] = base
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        write_adapter_card(staging, repo_id=repo_id, base_repo_id=base, adapter_config=adapter_config)
        return _upload(staging, repo_id, private, token, commit_message, create_pr)



def merge_adapter(base_folder, adapter_folder, out_folder, **card_kwargs) -> Path:
    """Load the base ProtLLM folder, apply the PEFT adapter, merge it, and save a complete ProtLLM folder."""
    adapter_config = check_adapter_folder(adapter_folder, require_projector=False)
    base_folder = check_auto_map(base_folder)  # before any of its code could run
    problems = [p for p in check_model_folder(base_folder) if "custom_pipelines" not in p and PIPELINE_FILE not in p]
    if problems:
        raise ModelFolderError(f"cannot merge into base {base_folder}: it lacks " + "; ".join(problems))
    named = adapter_config.get("base_model_name_or_path")
    if named and Path(named).exists() and Path(named).resolve() != base_folder.resolve():
        warnings.warn(f"adapter {adapter_folder} was trained on {named}, merging into {base_folder}", UserWarning,
                      stacklevel=2)
    from peft import PeftModel

    from ..model_folder import load_model_folder, save_model_folder

    base, processor = load_model_folder(base_folder)
    merged = PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()
    merged.eval()
    out_folder = Path(out_folder)
    save_model_folder(merged, processor, out_folder)
    add_protein_function_pipeline(out_folder)
    for name in ("training_args.json", "metrics.json"):
        for source in (Path(adapter_folder) / name, base_folder / name):
            if source.is_file() and not (out_folder / name).is_file():
                shutil.copyfile(source, out_folder / name)
    write_model_card(out_folder, **card_kwargs)
    return out_folder


