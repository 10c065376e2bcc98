"""Which code a ProtLLM model folder may carry, and the check that it carries nothing else.

A model folder is loaded with `trust_remote_code=True`, which runs whatever its `auto_map` names: a module of the
folder, but also an absolute path, a `..` path or another Hub repository (`attacker/repo--modeling_x.Class`).
`check_auto_map` accepts only `<module>.<Class>` where `<module>.py` is one of our remote-code files present in the
folder; every loader of our tooling (eval's model predictor, `sharing merge`, `train_sft --model_name_or_path`) calls
it before transformers reads the folder, and the pre-push check reports the same problems.

Only the standard library is imported here, so checking a folder (the sharing CLI) starts without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# The remote code every folder carries: the model, its processor and what they import (the retrieval database).
CORE_CODE_FILES = (
    "configuration_protllm.py",
    "encoder_protllm.py",
    "modeling_protllm.py",
    "processing_protllm.py",
    "retrieval_protllm.py",
)
# Modules only some models need. Each subclasses core classes, and a folder whose auto_map names that subclass
# carries the module (and what it imports): SEPIT's structure bias and mixture of experts; ESM3 / ESM C encoders;
# the processor that reads structure files.
OPTIONAL_CODE_FILES = (
    "esm3_protllm.py",
    "moe_protllm.py",
    "saprot_protllm.py",
    "sepit_protllm.py",
    "structure_files_protllm.py",
    "structure_processing_protllm.py",
    "structure_protllm.py",
)
REMOTE_CODE_FILES = (*CORE_CODE_FILES, *OPTIONAL_CODE_FILES)
# The `protein-function` pipeline, added to folders that are shared (named in config.json's `custom_pipelines`).
PIPELINE_FILE = "pipeline_protllm.py"
OUR_CODE_FILES = (*REMOTE_CODE_FILES, PIPELINE_FILE)
# The JSON files of a folder whose `auto_map` (or `custom_pipelines`) transformers follows.
CODE_REFERENCING_FILES = (
    "config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "protein_tokenizer/tokenizer_config.json",
)
_MODULE_DOT_CLASS = re.compile(r"^([A-Za-z_]\w*)\.([A-Za-z_]\w*)$")
# A relative import as transformers finds one (`dynamic_module_utils.get_relative_imports`): at any indentation.
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE)


class ForeignCodeError(ValueError):
    """A model folder whose `auto_map` names code that is not one of our remote-code files in the folder."""


def _references(data: dict) -> list[tuple[str, str]]:
    """(where, reference) for every code reference of one config: auto_map values and custom pipeline impls."""
    found = []
    for key, value in (data.get("auto_map") or {}).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None:  # a tokenizer's auto_map is [slow, fast] with None for a missing one
                found.append((f"auto_map[{key!r}]", item))
    for task, spec in (data.get("custom_pipelines") or {}).items():
        if isinstance(spec, dict) and "impl" in spec:
            found.append((f"custom_pipelines[{task!r}].impl", spec["impl"]))
    return found


def auto_map_problems(folder) -> list[str]:
    """Every code reference of `folder` that leaves our own files in the folder ([] if none).

    Accepted: `<module>.<Class>` with `<module>.py` in OUR_CODE_FILES and present in the folder. Refused: Hub
    references (`repo--module.Class`), paths (absolute, `..`, sub-folders), other modules, malformed entries.
    """
    folder = Path(folder)
    problems = []
    for name in CODE_REFERENCING_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problems.append(f"{name} is not valid JSON ({error}), so its auto_map cannot be checked")
            continue
        if not isinstance(data, dict):
            continue
        if not isinstance(data.get("auto_map") or {}, dict):
            problems.append(f"{name} auto_map is not a mapping")
            continue
        for where, ref in _references(data):
            match = _MODULE_DOT_CLASS.match(ref) if isinstance(ref, str) else None
            if match is None:
                reason = ("a reference to another Hub repository" if isinstance(ref, str) and "--" in ref
                          else "not `<module>.<Class>` of a file in this folder")
                problems.append(f"{name} {where} = {ref!r} is {reason}; auto_map may name only {list(OUR_CODE_FILES)}")
            elif f"{match.group(1)}.py" not in OUR_CODE_FILES:
                problems.append(f"{name} {where} = {ref!r} names module {match.group(1)!r}, which is not ProtLLM "
                                f"remote code; auto_map may name only {list(OUR_CODE_FILES)}")
            elif not (folder / f"{match.group(1)}.py").is_file():
                problems.append(f"{name} {where} = {ref!r} names {match.group(1)}.py, which is not in the folder")
    return problems


def needed_code_files(folder) -> list[str]:
    """The remote-code files transformers reads to load `folder`, sorted: each module its auto_map and custom_pipelines
    name, and every module those import relatively, transitively (what `trust_remote_code` copies or downloads).
    A named or imported file that is missing is listed too, so a caller can report it."""
    folder = Path(folder)
    pending = []
    for name in CODE_REFERENCING_FILES:
        path = folder / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        for _, ref in _references(data if isinstance(data, dict) else {}):
            match = _MODULE_DOT_CLASS.match(ref) if isinstance(ref, str) else None
            if match is not None:
                pending.append(f"{match.group(1)}.py")
    needed = set()
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        if (folder / name).is_file():
            pending += [f"{module}.py" for module in RELATIVE_IMPORT.findall((folder / name).read_text())]
    return sorted(needed)


def check_auto_map(folder) -> Path:
    """Raise ForeignCodeError naming every `auto_map` entry of `folder` that leaves our own files; return the folder.

    Call it before any `from_pretrained(folder, trust_remote_code=True)`: transformers runs what auto_map names.
    """
    problems = auto_map_problems(folder)
    if problems:
        raise ForeignCodeError(f"refusing to load {folder}: its auto_map names code outside this model folder's "
                               "ProtLLM files (transformers would run it under trust_remote_code): "
                               + "; ".join(problems))
    return Path(folder)
