"""Share ProtLLM models: model cards, Hub pushes (full folders and LoRA adapters), merging adapters, the pipeline.

    python sharing.py card FOLDER [--metrics metrics.json] [--training-args args.json] [--repo-id ORG/NAME]
    python sharing.py push FOLDER --repo-id ORG/NAME [--private] [--token T] [--metrics ...] [--training-args ...]
    python sharing.py push-adapter ADAPTER --repo-id ORG/NAME-lora [--base-repo-id ORG/NAME] [--private]
    python sharing.py merge BASE_FOLDER ADAPTER OUT_FOLDER

A model folder (`model_folder.save_model_folder`) becomes Hub-ready with `prepare_model_folder`: it gains the
`protein-function` pipeline (pipeline_protllm.py, named in config.json's `custom_pipelines`) and a README.md model
card written here (TRL's generated card is wrong for this model). `push_model_folder` checks the folder (config,
safetensors weights, every remote-code file and every file they import, processor and both tokenizers) and names
everything missing before anything is uploaded.

Licence rule (`resolve_license`): a derived model is bound by every base's licence. One licence shared by all
bases is inherited; different known licences give the most restrictive one (permissive MIT/BSD < Apache-2.0 <
CC-BY < CC-BY-SA < community licences with use policies such as Llama's < non-commercial); if any base's licence
is unknown, or two different licences are equally restrictive, the card says `other` and lists every base's
licence so a person decides.

torch/transformers/peft are imported lazily: the CLI starts fast and `card` needs neither.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
PIPELINE_FILE = "pipeline_protllm.py"
PIPELINE_TASK = "protein-function"
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {"impl": "pipeline_protllm.ProteinFunctionPipeline", "pt": ["AutoModelForCausalLM"], "type": "multimodal"}
}
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "tokenizer.json",
                   "protein_tokenizer/tokenizer_config.json", "protein_tokenizer/vocab.txt")
REQUIRED_AUTO_MAP = {"config.json": ("AutoConfig", "AutoModel", "AutoModelForCausalLM"),
                     "processor_config.json": ("AutoProcessor",)}
UPLOAD_IGNORE = ["__pycache__/*", "*.pyc", ".*", "**/.*", "checkpoint-*/**", "*.lock"]
BASELINE_PREDICTORS = ("retrieval", "most_common")
DEFAULT_QUESTION = "What is the function of this protein?"

STELLA_BIBTEX = """@article{xiao2025stella,
  title   = {STELLA: Towards Protein Function Prediction with Multimodal LLMs Integrating Sequence-Structure Representations},
  author  = {Xiao, Hongwang and Lin, Wenjun and Chen, Xi and Wang, Hui and Chen, Kai and Li, Jiashan and Sun, Yuancheng and Dai, Sicheng and Wu, Boya and Ye, Qiwei},
  journal = {arXiv preprint arXiv:2506.03800},
  year    = {2025},
  url     = {https://arxiv.org/abs/2506.03800}
}"""
SEPIT_BIBTEX = """@article{wu2024sepit,
  title   = {Structure-Enhanced Protein Instruction Tuning: Towards General-Purpose Protein Understanding with LLMs},
  author  = {Wu, Wei and Wang, Chao and Chen, Liyi and Yin, Mingze and Zhu, Yiheng and Fu, Kun and Ye, Jieping and Xiong, Hui and Wang, Zheng},
  journal = {arXiv preprint arXiv:2410.03553},
  year    = {2024},
  url     = {https://arxiv.org/abs/2410.03553}
}"""

# The snippet of docs/use_a_released_model.md and of every card (REPO replaced by the repository id).
EXAMPLE_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDW"
USAGE_SNIPPET = '''from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

repo = "REPO"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

# Chat with protein content blocks; a block may also carry "structure": "model.pdb" (PDB/mmCIF) and "chain": "A".
sequence = "SEQUENCE"
messages = [{"role": "user", "content": [
    {"type": "protein", "sequence": sequence},
    {"type": "text", "text": "What is the function of this protein?"},
]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print(answer)

# Keep chatting: earlier turns and their proteins stay in the prompt.
messages += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
             {"role": "user", "content": [{"type": "protein", "sequence": sequence[:80]},
                                          {"type": "text", "text": "And this fragment of it?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

# The same through a pipeline: a sequence, or {"sequence", "structure", "chain", "question"}, or a list of them.
pipe = pipeline("protein-function", model=repo, trust_remote_code=True)
for result in pipe([sequence, {"sequence": sequence[:80], "question": "Where is this protein located?"}],
                   batch_size=2, max_new_tokens=64):
    print(result[0]["generated_text"])
'''


def usage_snippet(repo_id: str) -> str:
    return USAGE_SNIPPET.replace("REPO", repo_id).replace("SEQUENCE", EXAMPLE_SEQUENCE)


class ModelFolderError(ValueError):
    """A folder that cannot be pushed or merged; the message names everything that is missing or wrong."""


# ---------------------------------------------------------------------------------------------- licences

# Hub-id prefix -> licence id, for the bases the recipes name. Longest prefix wins.
KNOWN_LICENSES = {
    "facebook/esm2_": "mit",
    "facebook/esm1b": "mit",
    "westlake-repl/SaProt": "mit",
    "EvolutionaryScale/esm3": "other",  # EvolutionaryScale Cambrian Open License
    "meta-llama/Meta-Llama-3-": "llama3",
    "meta-llama/Llama-3.1-": "llama3.1",
    "meta-llama/Meta-Llama-3.1-": "llama3.1",
    "meta-llama/Llama-3.2-": "llama3.2",
    "meta-llama/Llama-3.3-": "llama3.3",
    "meta-llama/Llama-2-": "llama2",
    "TinyLlama/": "apache-2.0",
    "HuggingFaceTB/SmolLM": "apache-2.0",
    "Qwen/Qwen2.5-0.5B": "apache-2.0",
    "Qwen/Qwen2.5-1.5B": "apache-2.0",
    "Qwen/Qwen2.5-7B": "apache-2.0",
    "Qwen/Qwen2.5-3B": "other",  # Qwen research licence
    "microsoft/Phi-3": "mit",
    "openai-community/gpt2": "mit",
    "gpt2": "mit",
    "google/gemma": "gemma",
}
# Higher = more restrictive.
LICENSE_RANK = {
    "mit": 0, "bsd-2-clause": 0, "bsd-3-clause": 0, "unlicense": 0, "cc0-1.0": 0,
    "apache-2.0": 1,
    "cc-by-4.0": 2,
    "cc-by-sa-4.0": 3,
    "openrail": 4, "openrail++": 4, "bigscience-openrail-m": 4, "creativeml-openrail-m": 4,
    "llama2": 5, "llama3": 5, "llama3.1": 5, "llama3.2": 5, "llama3.3": 5, "gemma": 5,
    "cc-by-nc-4.0": 6, "cc-by-nc-sa-4.0": 7, "cc-by-nc-nd-4.0": 8,
}
# Local folder names of offline copies -> their Hub ids.
LOCAL_NAME_TO_HUB_ID = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
                        "SmolLM2-135M-Instruct-tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_license(name: str) -> str | None:
    """The licence of one base model: a local folder's card metadata, else the table above, else None."""
    path = Path(name)
    if path.is_dir() and (path / "README.md").is_file():
        meta = _card_metadata((path / "README.md").read_text())
        if meta.get("license"):
            return str(meta["license"])
    hub_id = hub_id_for(name) or name
    matches = [prefix for prefix in KNOWN_LICENSES if hub_id.startswith(prefix)]
    return KNOWN_LICENSES[max(matches, key=len)] if matches else None


def resolve_license(bases: dict[str, str | None]) -> tuple[str, str]:
    """`{base: licence or None}` -> (licence id for the card, a sentence saying why). See the module docstring."""
    if not bases:
        return "other", "No base model is recorded, so no licence can be inherited: `other`, decide before sharing."
    listed = ", ".join(f"`{b}`: {lic or 'unknown'}" for b, lic in bases.items())
    licences = set(bases.values())
    if None in licences:
        return "other", f"At least one base licence is unknown ({listed}): `other` until a person checks them."
    if len(licences) == 1:
        only = licences.pop()
        return only, f"Inherited from the base models ({listed})."
    unranked = [lic for lic in licences if lic not in LICENSE_RANK]
    if unranked:
        return "other", f"The bases carry different licences, some not ranked here ({listed}): `other`; every base licence applies."
    top = max(LICENSE_RANK[lic] for lic in licences)
    strictest = sorted(lic for lic in licences if LICENSE_RANK[lic] == top)
    if len(strictest) > 1:
        return "other", f"The bases carry equally restrictive but different licences ({listed}): `other`; all of them apply."
    return strictest[0], f"The most restrictive of the base licences ({listed}); every base licence applies."


def hub_id_for(name: str | None) -> str | None:
    """A Hub id for a base given as a Hub id or as a local folder of a known model; None for other local paths."""
    if not name:
        return None
    name = str(name)
    basename = Path(name.rstrip("/")).name
    if basename in LOCAL_NAME_TO_HUB_ID and (Path(name).exists() or "/" in name and name.startswith(("/", "."))):
        return LOCAL_NAME_TO_HUB_ID[basename]
    if _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


# ---------------------------------------------------------------------------------------------- reading inputs


def _load_json(value, what: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return json.loads(path.read_text())


def _card_metadata(text: str) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return {}
    import yaml

    return yaml.safe_load(match.group(1)) or {}


def count_parameters(folder) -> dict[str, int]:
    """Parameter counts per part from the safetensors headers (no tensors are read)."""
    counts: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in info["shape"]:
                n *= dim
            part = ("protein_encoder" if ".protein_encoder." in f".{name}" else "projector" if ".projector." in f".{name}"
                    else "structure" if ".structure" in name else "language_model")
            counts[part] = counts.get(part, 0) + n
    counts["total"] = sum(counts.values())
    return counts


def _stages(training_args: dict) -> tuple[dict, list[tuple[str, dict]]]:
    """Split a training-args dict into (setup, [(stage name, hyper-parameters)])."""
    stages = training_args.get("stages")
    setup = {k: v for k, v in training_args.items() if k != "stages"}
    if isinstance(stages, dict):
        return setup, [(str(k), dict(v or {})) for k, v in stages.items()]
    if isinstance(stages, list):
        out = []
        for i, stage in enumerate(stages):
            stage = dict(stage or {})
            out.append((str(stage.pop("name", stage.pop("stage", f"stage {i + 1}"))), stage))
        return setup, out
    name = str(training_args.get("stage") or "sft")
    return {k: training_args[k] for k in _SETUP_KEYS if k in training_args}, [(name, {k: v for k, v in training_args.items() if k not in _SETUP_KEYS})]


_SETUP_KEYS = ("recipe", "language_model", "llm", "text_model", "model_name_or_path", "protein_encoder", "encoder",
               "dataset", "datasets", "dataset_name", "train_file", "eval_file", "seed")
KEY_HPARAMS = ("trainable", "train", "num_train_epochs", "max_steps", "learning_rate", "projector_learning_rate",
               "llm_learning_rate", "encoder_learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
               "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "max_length", "bf16", "fp16",
               "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save",
               "moe_num_experts", "moe_top_k", "moe_capacity_factor", "moe_router_aux_loss_coef", "structure_dropout",
               "optim", "seed", "train_examples", "train_seconds", "final_loss")


def _fmt_value(value) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _kv_table(items) -> str:
    rows = ["| setting | value |", "|---|---|"] + [f"| `{k}` | {_fmt_value(v)} |" for k, v in items]
    return "\n".join(rows)


def render_training(training_args: dict | None) -> str:
    if not training_args:
        return ("No training arguments were recorded with this folder (`training_args.json`); the recipe that made "
                "it is unknown to this card.")
    setup, stages = _stages(training_args)
    parts = []
    shown_setup = [(k, v) for k, v in setup.items() if v is not None and not isinstance(v, dict)]
    if shown_setup:
        parts += ["Setup:", "", _kv_table(shown_setup), ""]
    names = " -> ".join(f"`{name}`" for name, _ in stages)
    parts += [f"Stages, in order: {names} (each starts from the previous stage's saved output).", ""]
    for name, params in stages:
        items = [(k, v) for k, v in params.items() if v is not None]
        key = [(k, v) for k, v in items if k in KEY_HPARAMS]
        rest = [(k, v) for k, v in items if k not in KEY_HPARAMS]
        parts += [f"#### Stage `{name}`", ""]
        if key:
            parts += [_kv_table(key), ""]
        if rest:
            parts += ["<details><summary>all other arguments of this stage</summary>", "", _kv_table(rest), "",
                      "</details>", ""]
    return "\n".join(parts).rstrip()


# ---------------------------------------------------------------------------------------------- evaluation


def _shown_metrics(family: str, available) -> list[str]:
    try:
        from eval.report import SHOWN

        order = [m for m in SHOWN.get(family, []) if m in available]
    except Exception:  # noqa: BLE001 - eval/ is optional tooling for the card
        order = []
    return order + sorted(m for m in available if m not in order)


def pick_model_predictor(predictors, model_predictor: str | None = None, folder_name: str | None = None) -> str | None:
    if model_predictor is not None:
        if model_predictor not in predictors:
            raise ValueError(f"predictor {model_predictor!r} is not in the metrics (have {sorted(predictors)})")
        return model_predictor
    candidates = [p for p in predictors if p not in BASELINE_PREDICTORS and not p.endswith("+shuffled_proteins")]
    if len(candidates) == 1:
        return candidates[0]
    if folder_name in candidates:
        return folder_name
    if not candidates:
        return None
    raise ValueError(f"metrics.json scores several models {candidates}: say which one this card is for (model_predictor)")


def evaluation_section(metrics: dict | None, model_name: str, eval_dataset: str | None = None,
                       model_predictor: str | None = None, folder_name: str | None = None):
    """metrics.json (eval/report.py) -> (list of EvalResult for model-index, markdown section)."""
    from huggingface_hub import EvalResult

    if not metrics or not metrics.get("tasks"):
        return [], ("**No evaluation results.** This folder was shared without an evaluation report "
                    "(`python -m eval ... --predictor FOLDER --predictor retrieval` writes one); treat its answers as "
                    "unvalidated.")
    header = metrics.get("header") or {}
    data = header.get("data") or "unknown"
    dataset_id = eval_dataset or Path(str(data)).stem
    split = header.get("split") or ("holdout" if header.get("holdout") else None)
    results, lines = [], []
    for task, task_res in metrics["tasks"].items():
        predictors = task_res.get("predictors") or {}
        chosen = pick_model_predictor(predictors, model_predictor, folder_name)
        if chosen is None:
            lines += [f"### {task}", "", "No model predictor in this task's results (baselines only).", ""]
            continue
        model_res = predictors[chosen]
        family = model_res.get("family") or task_res.get("family") or "text"
        values = {k: m.get("value") for k, m in model_res["metrics"].items() if m.get("value") is not None}
        shown = _shown_metrics(family, values)
        for metric in shown:
            results.append(EvalResult(
                task_type="text-generation", task_name=f"protein {task}", dataset_type=dataset_id,
                # model-index groups results by (task type, dataset): the config keeps tasks of one file apart
                dataset_name=dataset_id, dataset_config=task, dataset_split=split, metric_type=metric, metric_name=metric,
                metric_value=round(float(values[metric]), 4),
            ))
        others = [p for p in ("retrieval", "most_common", f"{chosen}+shuffled_proteins") if p in predictors]
        n = task_res.get("n") or model_res.get("counts", {}).get("n_examples")
        lines += [f"### {task} (n = {n}, {dataset_id}{', split ' + split if split else ''})", ""]
        if "retrieval" not in predictors:
            lines += ["> No nearest-neighbour retrieval baseline was run for this task: the numbers below cannot be "
                      "told apart from memorisation. Rerun `python -m eval` with `--predictor retrieval`.", ""]
        columns = ["this model"] + [{"retrieval": "retrieval (MMseqs2 nearest neighbour)",
                                     "most_common": "most common answer"}.get(p, "this model, shuffled proteins")
                                    for p in others]
        lines.append("| metric | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for metric in shown:
            cells = [_metric_cell(model_res["metrics"].get(metric))] + [
                _metric_cell(predictors[p]["metrics"].get(metric)) for p in others]
            primary = " (primary)" if metric == model_res.get("primary") else ""
            lines.append(f"| {metric}{primary} | " + " | ".join(cells) + " |")
        lines.append("")
        bins = model_res.get("by_identity_bin") or {}
        if bins:
            primary = model_res.get("primary")
            retrieval_bins = (predictors.get("retrieval") or {}).get("by_identity_bin") or {}
            lines += [f"{primary} by sequence identity of the test protein to its nearest training protein:", "",
                      "| identity | n | this model | retrieval |", "|---|---|---|---|"]
            for label, row in bins.items():
                ret = retrieval_bins.get(label, {}).get(primary)
                lines.append(f"| {label} | {row.get('n')} | {_num(row.get(primary))} | {_num(ret)} |")
            lines.append("")
    text = ("Values in [0, 1]; 95% bootstrap intervals in brackets. Greedy decoding. The retrieval baseline answers "
            "with the annotation of the most similar training protein (MMseqs2): read every model number beside it.\n\n"
            + "\n".join(lines).rstrip())
    return results, text


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _metric_cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("ci_low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


# ---------------------------------------------------------------------------------------------- the card

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

- **Architecture**: {{ architecture }}
- **Parameters**: {{ parameters }}
- **Base models**: {{ bases_text }}
- **Licence**: `{{ license }}`. {{ license_reason }}
- **Code**: remote code in this repository (`trust_remote_code=True`); `pipeline("protein-function", ...)` is included.

## Use

```python
{{ usage }}
```

Inputs: amino-acid sequences (20 standard residues and B, Z, U, O, X; at most {{ max_protein_length }} residues,
longer ones are cropped with a warning){% if structure %}, optionally with a PDB/mmCIF structure{% endif %}. Batches are
left padded; batched answers equal one-at-a-time answers.

## Training

{{ training }}

## Evaluation

{{ evaluation }}

## Limitations

- **Memorisation, not understanding, on novel proteins.** Function-text models of this kind score mostly by
  recalling annotations of similar training proteins: STELLA's ROUGE-L drops from 0.50 to 0.19 on proteins
  released after its training data. Expect answers for proteins with no close homologue in the training set to be
  fluent and wrong. Check the identity breakdown above and compare with the retrieval baseline, which is reported
  beside every number because nearest-neighbour lookup is a strong baseline for function text.
- Answers are generated text, not curated annotation: do not use them as database entries without review.
- Trained on the data listed above only (mostly Swiss-Prot-derived); organisms, families and property types outside
  it are out of distribution.
- Sequence length is capped at {{ max_protein_length }} residues.
{% if not has_eval %}- **This model was shared without evaluation results.**
{% endif %}
## Citation

This implementation follows STELLA and SEPIT; please cite them:

```bibtex
{{ stella }}

{{ sepit }}
```
"""


def build_model_card(folder, *, repo_id: str | None = None, training_args=None, metrics=None,
                     base_models: list[str] | None = None, datasets: list[str] | None = None,
                     license: str | None = None, model_name: str | None = None, eval_dataset: str | None = None,
                     model_predictor: str | None = None, tags: list[str] | None = None,
                     pipeline_tag: str = "text-generation", extra_base_licenses: dict | None = None):
    """Write nothing; return a `huggingface_hub.ModelCard` for a ProtLLM model folder.

    training_args: dict or JSON path (the trainer's record; `stages` a list or dict of per-stage hyper-parameters;
    `language_model` / `protein_encoder` / `datasets` read when the arguments below are not given); defaults to
    FOLDER/training_args.json. metrics: dict or path of eval's metrics.json; defaults to FOLDER/metrics.json.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if training_args is None and (folder / "training_args.json").is_file():
        training_args = folder / "training_args.json"
    if metrics is None and (folder / "metrics.json").is_file():
        metrics = folder / "metrics.json"
    training_args = _load_json(training_args, "training args")
    metrics = _load_json(metrics, "metrics")
    setup = _stages(training_args)[0] if training_args else {}
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    repo_id = repo_id or "ORG/NAME"

    if base_models is None:
        llm = next((setup[k] for k in ("language_model", "llm", "text_model", "model_name_or_path") if setup.get(k)), None)
        encoder = next((setup[k] for k in ("protein_encoder", "encoder") if setup.get(k)), None)
        base_models = [b for b in (llm, encoder) if b]
    base_ids, bases_text, licences = [], [], {}
    for base in base_models:
        hub_id = hub_id_for(base)
        if hub_id:
            base_ids.append(hub_id)
            bases_text.append(f"[`{hub_id}`](https://huggingface.co/{hub_id})")
        else:
            bases_text.append(f"`{Path(str(base)).name}` (a local model, not on the Hub)")
        licences[hub_id or str(base)] = (extra_base_licenses or {}).get(base) or base_license(str(base))
    if not base_models:
        bases_text = ["not recorded (pass base_models or record `language_model` / `protein_encoder`)"]
    if not any(re.search(r"esm|saprot|prot", str(b), re.I) for b in base_models):
        bases_text.append("protein encoder: no pretrained checkpoint recorded (randomly initialised and trained here, "
                          "or not recorded)")
    licence_reason = ""
    if license is None:
        license, licence_reason = resolve_license(licences)
    if datasets is None:
        raw = setup.get("datasets") or setup.get("dataset") or setup.get("dataset_name")
        datasets = [raw] if isinstance(raw, str) else list(raw or [])
    dataset_ids = [d for d in datasets if isinstance(d, str) and _HUB_ID.match(d) and not Path(d).exists()]

    eval_results, evaluation = evaluation_section(metrics, model_name, eval_dataset, model_predictor, folder.name)
    text_config, protein_config = config.get("text_config", {}), config.get("protein_config", {})
    card_tags = ["protllm", "protein", "biology", "protein-function-prediction", "multimodal", "custom_code"]
    if config.get("projector_type") == "linear":
        card_tags.append("stella")
    if config.get("use_structure_bias") or config.get("moe_num_experts") or config.get("projector_type") == "mlp2x_gelu":
        card_tags.append("sepit")
    if config.get("moe_num_experts"):
        card_tags.append("moe")
    card_tags += [t for t in (tags or []) if t not in card_tags]
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=pipeline_tag, tags=card_tags, base_model=base_ids or None,
        datasets=dataset_ids or None, license=license, model_name=model_name, eval_results=eval_results or None,
        language=["en"],
    )
    counts = count_parameters(folder)
    parameters = ", ".join(f"{k.replace('_', ' ')} {v / 1e6:,.2f}M" for k, v in counts.items())
    moe = (f"; LLM feed-forward blocks are mixtures of {config['moe_num_experts']} experts (top-{config.get('moe_top_k')})"
           if config.get("moe_num_experts") else "")
    structure = bool(config.get("use_structure_bias") or config.get("protein_encoder_input") == "saprot")
    architecture = (
        f"protein encoder {protein_config.get('model_type', 'esm')} ({protein_config.get('num_hidden_layers')} layers, "
        f"width {protein_config.get('hidden_size')}; backend `{config.get('protein_encoder_backend')}`, input "
        f"`{config.get('protein_encoder_input')}`{', SEPIT structure bias' if config.get('use_structure_bias') else ''}) "
        f"-> `{config.get('projector_type')}` projector -> {text_config.get('model_type')} LLM "
        f"({text_config.get('num_hidden_layers', text_config.get('n_layer'))} layers, width "
        f"{text_config.get('hidden_size', text_config.get('n_embd'))}){moe}"
    )
    summary = (f"A ProtLLM: a protein-language model that answers questions about proteins (function, localisation, "
               f"EC number, ...) from their amino-acid sequence{' and structure' if structure else ''}, in the style "
               f"of STELLA (arXiv 2506.03800) and SEPIT (arXiv 2410.03553). The protein encoder's per-residue states are "
               f"projected into the LLM's input embeddings at `<protein>` placeholders.")
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=model_name, summary=summary, architecture=architecture,
        parameters=parameters, bases_text="; ".join(bases_text), license=license, license_reason=licence_reason,
        usage=usage_snippet(repo_id).rstrip(), max_protein_length=config.get("max_protein_length"),
        structure=structure, training=render_training(training_args), evaluation=evaluation,
        has_eval=bool(eval_results), stella=STELLA_BIBTEX, sepit=SEPIT_BIBTEX,
    )


def write_model_card(folder, **kwargs) -> Path:
    """Build the card (see `build_model_card`) and save it as FOLDER/README.md."""
    card = build_model_card(folder, **kwargs)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


# ---------------------------------------------------------------------------------------------- folders


def register_protein_function_pipeline():
    """Register the `protein-function` task in this process (transformers' PIPELINE_REGISTRY)."""
    if str(REPO_ROOT) not in sys.path:
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
    shutil.copyfile(REPO_ROOT / PIPELINE_FILE, folder / PIPELINE_FILE)
    config = json.loads(config_path.read_text())
    config["custom_pipelines"] = {**(config.get("custom_pipelines") or {}), **json.loads(json.dumps(CUSTOM_PIPELINES))}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def prepare_model_folder(folder, **card_kwargs) -> Path:
    """Make a folder written by `model_folder.save_model_folder` Hub-ready: the pipeline and the model card."""
    add_protein_function_pipeline(folder)
    write_model_card(folder, **card_kwargs)
    return Path(folder)


def save_for_hub(model, processor, folder, **card_kwargs) -> Path:
    """`save_model_folder` + pipeline + model card. card_kwargs: see `build_model_card`."""
    from model_folder import save_model_folder

    save_model_folder(model, processor, folder)
    return prepare_model_folder(folder, **card_kwargs)


def _remote_code_files() -> tuple[str, ...]:
    """model_folder.REMOTE_CODE_FILES, read from its source so that checking a folder imports no torch."""
    import ast

    tree = ast.parse((REPO_ROOT / "model_folder.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REMOTE_CODE_FILES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    from model_folder import REMOTE_CODE_FILES  # pragma: no cover - defined some other way

    return tuple(REMOTE_CODE_FILES)


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.M)


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
    code = list(_remote_code_files()) + [PIPELINE_FILE]
    problems += [f"remote-code file {name}" for name in code if not (folder / name).is_file()]
    for py in sorted(folder.glob("*.py")):
        for module in _RELATIVE_IMPORT.findall(py.read_text()):
            if not (folder / f"{module}.py").is_file():
                problems.append(f"remote-code file {module}.py (imported by {py.name})")
    for file, keys in REQUIRED_AUTO_MAP.items():
        if not (folder / file).is_file():
            continue
        auto_map = json.loads((folder / file).read_text()).get("auto_map") or {}
        problems += [f"{file} auto_map entry {key}" for key in keys if key not in auto_map]
        for ref in auto_map.values():
            for item in ref if isinstance(ref, (list, tuple)) else [ref]:
                if item and not (folder / (item.split("--")[-1].rsplit(".", 1)[0] + ".py")).is_file():
                    problems.append(f"remote-code file for {item} (named in {file} auto_map)")
    if config is not None:
        if PIPELINE_TASK not in (config.get("custom_pipelines") or {}):
            problems.append(f"config.json custom_pipelines entry {PIPELINE_TASK!r} (run sharing.add_protein_function_pipeline)")
    problems += [f"processor file {name}" for name in PROCESSOR_FILES if not (folder / name).is_file()]
    if not ((folder / "chat_template.jinja").is_file() or "chat_template" in _maybe_json(folder / "tokenizer_config.json")
            or "chat_template" in _maybe_json(folder / "processor_config.json")):
        problems.append("chat template (chat_template.jinja)")
    return list(dict.fromkeys(problems))


def _maybe_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def card_has_eval_results(folder) -> bool:
    readme = Path(folder) / "README.md"
    return readme.is_file() and bool(_card_metadata(readme.read_text()).get("model-index"))


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
    files = [folder / "adapter_model.safetensors"]
    if not files[0].is_file():
        return []
    with open(files[0], "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return [k for k in header if k != "__metadata__"]


def base_resolves(name: str, token: str | None = None) -> tuple[bool, str]:
    """Whether an adapter's base (`base_model_name_or_path`) can be loaded by others: (ok, reason)."""
    if not name:
        return False, "adapter_config.json has no base_model_name_or_path"
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            return False, f"base {name!r} is a local path without config.json"
        return True, "local folder"
    if not _HUB_ID.match(name):
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


ADAPTER_SNIPPET = '''from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor

base = AutoModelForCausalLM.from_pretrained("BASE", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "REPO").eval()  # LoRA + the trained projector
processor = AutoProcessor.from_pretrained("BASE", trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"},
                                         {"type": "text", "text": "What is the function of this protein?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
'''


def write_adapter_card(folder, *, repo_id: str, base_repo_id: str, adapter_config: dict) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", base_model=base_repo_id, pipeline_tag="text-generation",
                         tags=["protllm", "protein", "biology", "lora", "peft", "custom_code"])
    lora = {k: adapter_config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")}
    text = (f"---\n{data.to_yaml()}\n---\n\n# {repo_id.split('/')[-1]}\n\nA LoRA adapter (with the trained projector, "
            f"saved through `modules_to_save`) for the ProtLLM [`{base_repo_id}`](https://huggingface.co/{base_repo_id}). "
            f"Its model card holds the training recipe, evaluation, limitations and citations (STELLA arXiv 2506.03800, "
            f"SEPIT arXiv 2410.03553).\n\nAdapter settings:\n\n{_kv_table(lora.items())}\n\n## Use\n\n```python\n"
            + ADAPTER_SNIPPET.replace("BASE", base_repo_id).replace("REPO", repo_id) +
            "```\n\n`sharing.merge_adapter(base, adapter, out)` writes a merged model with the same answers.\n")
    path = Path(folder) / "README.md"
    ModelCard(text).save(path)
    return path


def merge_adapter(base_folder, adapter_folder, out_folder, **card_kwargs) -> Path:
    """Load the base ProtLLM folder, apply the PEFT adapter, merge it, and save a complete ProtLLM folder."""
    adapter_config = check_adapter_folder(adapter_folder, require_projector=False)
    base_folder = Path(base_folder)
    problems = [p for p in check_model_folder(base_folder) if "custom_pipelines" not in p and PIPELINE_FILE not in p]
    if problems:
        raise ModelFolderError(f"cannot merge into base {base_folder}: it lacks " + "; ".join(problems))
    named = adapter_config.get("base_model_name_or_path")
    if named and Path(named).exists() and Path(named).resolve() != base_folder.resolve():
        warnings.warn(f"adapter {adapter_folder} was trained on {named}, merging into {base_folder}", UserWarning,
                      stacklevel=2)
    from peft import PeftModel

    from model_folder import register_auto_classes, save_model_folder
    from modeling_protllm import ProtLLMForConditionalGeneration
    from processing_protllm import ProtLLMProcessor

    register_auto_classes()
    base = ProtLLMForConditionalGeneration.from_pretrained(base_folder)
    processor = ProtLLMProcessor.from_pretrained(base_folder)
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


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python sharing.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    card_args = argparse.ArgumentParser(add_help=False)
    card_args.add_argument("--metrics", help="eval metrics.json (default FOLDER/metrics.json)")
    card_args.add_argument("--training-args", help="training-args JSON (default FOLDER/training_args.json)")
    card_args.add_argument("--base-model", action="append", help="base model Hub id or path (repeatable: LLM, encoder)")
    card_args.add_argument("--dataset", action="append", help="training dataset Hub id (repeatable)")
    card_args.add_argument("--license", help="override the inherited licence")
    card_args.add_argument("--eval-dataset", help="Hub id of the evaluation dataset for model-index")
    card_args.add_argument("--model-predictor", help="which predictor of metrics.json is this model")

    card = sub.add_parser("card", parents=[card_args], help="write FOLDER/README.md and add the pipeline")
    card.add_argument("folder")
    card.add_argument("--repo-id", help="repository id used in the usage snippet")
    push = sub.add_parser("push", parents=[card_args], help="check and upload a model folder")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token")
    push.add_argument("--commit-message", default="Upload ProtLLM model")
    push.add_argument("--create-pr", action="store_true")
    adapter = sub.add_parser("push-adapter", help="check and upload a PEFT adapter folder")
    adapter.add_argument("folder")
    adapter.add_argument("--repo-id", required=True)
    adapter.add_argument("--base-repo-id", help="Hub id of the base ProtLLM (replaces a local base path)")
    adapter.add_argument("--private", action="store_true")
    adapter.add_argument("--token")
    adapter.add_argument("--no-projector-ok", action="store_true", help="accept an adapter without projector weights")
    merge = sub.add_parser("merge", parents=[card_args], help="merge a PEFT adapter into its base model folder")
    merge.add_argument("base")
    merge.add_argument("adapter")
    merge.add_argument("out")
    return parser


def _card_kwargs(args) -> dict:
    kwargs = {"metrics": args.metrics, "training_args": args.training_args, "base_models": args.base_model,
              "datasets": args.dataset, "license": args.license, "eval_dataset": args.eval_dataset,
              "model_predictor": args.model_predictor}
    return {k: v for k, v in kwargs.items() if v is not None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "card":
            add_protein_function_pipeline(args.folder)
            path = write_model_card(args.folder, repo_id=args.repo_id, **_card_kwargs(args))
            print(f"wrote {path}")
        elif args.command == "push":
            info = push_model_folder(args.folder, args.repo_id, private=args.private, token=args.token,
                                     commit_message=args.commit_message, create_pr=args.create_pr, **_card_kwargs(args))
            print(f"pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
        elif args.command == "push-adapter":
            info = push_adapter(args.folder, args.repo_id, base_repo_id=args.base_repo_id, private=args.private,
                                token=args.token, require_projector=not args.no_projector_ok)
            print(f"pushed adapter {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
        elif args.command == "merge":
            out = merge_adapter(args.base, args.adapter, args.out, **_card_kwargs(args))
            print(f"wrote merged model {out}")
    except (ModelFolderError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the Hub: offline, unreachable, unauthorised (huggingface_hub errors are OSErrors)
        print(f"error: the Hub refused or could not be reached: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
