"""Model cards for ProtLLM folders and LoRA adapters: the licence rule, the card, its model-index.

The card (`card_template.md`, a `huggingface_hub.ModelCard` template) names the base models and the licence they
impose, the architecture and parameter counts, the usage snippet (`snippet.py`), the training recipe stage by
stage, the evaluation (eval's metrics.json as model-index, beside the retrieval baseline), limitations and
citations. TRL's generated card is wrong for this model, so we write our own.

Licence rule (`resolve_license`): a derived model is bound by every base's licence. One licence shared by all
bases is inherited; different known licences give the most restrictive one (permissive MIT/BSD < Apache-2.0 <
CC-BY < CC-BY-SA < community licences with use policies such as Llama's < non-commercial); if any base's licence
is unknown, or two different licences are equally restrictive, the card says `other` and lists every base's
licence so a person decides.

Neither torch nor transformers is imported: writing a card reads only JSON and safetensors headers.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from ..local_weights import LOCAL_ALIASES, SMOLLM2_NAME
from ..parameter_groups import parameter_counts
from .snippet import adapter_snippet, finetune_snippet, usage_snippet

CARD_TEMPLATE = (Path(__file__).parent / "card_template.md").read_text()
BASELINE_PREDICTORS = ("retrieval", "most_common")

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


# ---------------------------------------------------------------------------------------------- licences

# Hub-id prefix -> licence id, for the bases the recipes name. Longest prefix wins.
KNOWN_LICENSES = {
    "facebook/esm2_": "mit",
    "facebook/esm1b": "mit",
    "westlake-repl/SaProt": "mit",
    # EvolutionaryScale's licences are their own agreements (no Hub licence id): `other`, named by
    # EVOLUTIONARYSCALE_LICENCES below. Published names (recipes may use them) and Hub ids both map.
    "EvolutionaryScale/esm3-sm-open-v1": "other",
    "EvolutionaryScale/esmc-300m": "other",
    "EvolutionaryScale/esmc-600m": "other",
    "esm3-sm-open-v1": "other",
    "esmc-300m": "other",
    "esmc-600m": "other",
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
# Licences of EvolutionaryScale's open models, as the esm package's LICENSE.md (3.2.1.post1) states them per model
# (read from the package, not guessed): the model card records the one of the encoder used.
EVOLUTIONARYSCALE_LICENCES = {
    "esm3-sm-open-v1": {
        "name": "Cambrian Non-Commercial License Agreement",
        "url": "https://www.evolutionaryscale.ai/policies/cambrian-non-commercial-license-agreement",
    },
    "esmc-300m": {
        "name": "Cambrian Open License Agreement",
        "url": "https://www.evolutionaryscale.ai/policies/cambrian-open-license-agreement",
    },
    "esmc-600m": {
        "name": "Cambrian Non-Commercial License Agreement",
        "url": "https://www.evolutionaryscale.ai/policies/cambrian-non-commercial-license-agreement",
    },
}


def evolutionaryscale_licence(name: str | None) -> dict | None:
    """The licence agreement of an EvolutionaryScale model named by published name, Hub id or local path."""
    if not name:
        return None
    basename = Path(str(name).rstrip("/")).name
    return next((lic for model, lic in EVOLUTIONARYSCALE_LICENCES.items() if basename.startswith(model)), None)


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
# Local folder names of offline copies (protllm.local_weights) -> their Hub ids.
LOCAL_NAME_TO_HUB_ID = {name: LOCAL_ALIASES["smollm2-local"] for name in (SMOLLM2_NAME, f"{SMOLLM2_NAME}-tokenizer")}
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    listed = ", ".join(
        f"`{b}`: {lic or 'unknown'}" + (f" ({agreement['name']}, {agreement['url']})" if (agreement := evolutionaryscale_licence(b)) else "")
        for b, lic in bases.items())
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
    if HUB_ID_PATTERN.match(name) and not Path(name).exists():
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


class _HeaderTensor:
    """A tensor known only by its safetensors header entry: enough for `parameter_counts`."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def numel(self) -> int:
        return math.prod(self.shape)


def safetensors_header(file) -> dict:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, offsets); no tensor is read."""
    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size))


def count_parameters(folder) -> dict[str, int]:
    """Parameter counts per part (protllm.parameter_groups) of a saved folder's weights, from the headers only."""
    named = [(name, _HeaderTensor(info["shape"])) for file in sorted(Path(folder).glob("*.safetensors"))
             for name, info in safetensors_header(file).items() if name != "__metadata__"]
    return parameter_counts(named)


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


def _stage_results(summaries) -> list[str]:
    """Card lines for what the stages measured about themselves (`training_args.json` -> `summaries`): today the
    warm-up's masked-LM perplexity on held-out proteins, beside what residue frequencies alone give."""
    lines = []
    for summary in summaries if isinstance(summaries, list) else []:
        perplexity = summary.get("mlm_perplexity") if isinstance(summary, dict) else None
        if not isinstance(perplexity, dict):
            continue
        before, after = perplexity.get("before") or {}, perplexity.get("after") or {}
        if not isinstance(before.get("perplexity"), (int, float)) or not isinstance(after.get("perplexity"), (int, float)):
            continue
        line = (f"Encoder warm-up (stage `{summary.get('stage', 'warmup')}`): masked-LM perplexity on "
                f"{after.get('sequences', '?')} held-out proteins, {before['perplexity']:.2f} before and "
                f"{after['perplexity']:.2f} after")
        reference = perplexity.get("unigram_reference")
        if isinstance(reference, (int, float)):
            line += f"; residue frequencies alone give {reference:.2f} (an encoder must go below it to use context)"
        lines += [line + ".", ""]
    return lines


def render_training(training_args: dict | None) -> str:
    if not training_args:
        return ("No training arguments were recorded with this folder (`training_args.json`); the recipe that made "
                "it is unknown to this card.")
    setup, stages = _stages(training_args)
    # Per-stage summaries are long JSON (a table cell would cut it at 120 characters): the card states what they
    # measured, and the whole of them stays in training_args.json.
    summaries = setup.pop("summaries", None)
    parts = _stage_results(summaries)
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
    dataset_ids = [d for d in datasets if isinstance(d, str) and HUB_ID_PATTERN.match(d) and not Path(d).exists()]

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
        card_data, template_str=CARD_TEMPLATE, retrieval=retrieval_section(folder), model_name=model_name, summary=summary, architecture=architecture,
        parameters=parameters, bases_text="; ".join(bases_text), license=license, license_reason=licence_reason,
        usage=usage_snippet(repo_id).rstrip(), finetune=finetune_snippet(repo_id).rstrip(), max_protein_length=config.get("max_protein_length"),
        structure=structure, training=render_training(training_args), evaluation=evaluation,
        has_eval=bool(eval_results), stella=STELLA_BIBTEX, sepit=SEPIT_BIBTEX,
    )


def retrieval_section(folder) -> str | None:
    """What the folder's retrieval database is (size, sources, search, the identity cap used in training), read from
    `retrieval/retrieval_config.json`; None when the model has no database."""
    path = Path(folder) / "retrieval" / "retrieval_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    training = config.get("training") or {}
    sources = config.get("sources") or []
    sources = ", ".join(f"`{s}`" if isinstance(s, str) else f"`{s.get('name', s)}`" for s in sources) or "not recorded"
    fields = ", ".join(f"{field} {count}" for field, count in (config.get("fields") or {}).items()) or "not recorded"
    lines = [
        f"- **Database**: {config.get('size', '?')} proteins with their annotations (annotated: {fields}), "
        f"in `retrieval/` (plain JSON, no pickle). Sources: {sources}.",
        f"- **Search**: {config.get('tool', 'not recorded')}; top {config.get('k')} neighbours with E-value <= {config.get('max_evalue')}, "
        "rendered into the prompt next to the protein tokens (the encoder path stays).",
    ]
    if config.get("per_field"):
        lines.append(f"- **Per field**: the top {config.get('k')} are found for each annotation field among the proteins "
                     "that carry it, and each shows that field, so every kind of question has a neighbour with its kind "
                     "of answer.")
    if config.get("task_fields"):
        pairs = ", ".join(f"{task} -> {field}" for task, field in config["task_fields"].items())
        lines.append(f"- **By question**: in training, questions of a task saw the closest proteins that carry its field "
                     f"({pairs}). Ask the same way: `apply_chat_template(..., retrieval_field=\"ec_number\")` "
                     "(`processor.retrieval_database.field_for_task(task)` gives the field), or "
                     "`pipe(..., retrieval_field=...)`; `python -m eval` does it per task.")
    if config.get("fallback") == "composition":
        closest = "the protein closest" if config.get("k") == 1 else f"the {config.get('k')} proteins closest"
        verb = "is" if config.get("k") == 1 else "are"
        lines.append(f"- **No homolog found**: {closest} in amino-acid + dipeptide composition (cosine) {verb} shown "
                     "instead, labelled \"no homolog, similar composition\".")
    if training:
        lines.append(f"- **Training**: each training protein saw neighbours from the training set excluding itself "
                     f"({training.get('exclusion', 'leave_one_out')}) and anything above {training.get('max_identity')} identity, "
                     "so the model learned to use distant homologs rather than copy an identical neighbour"
                     + (" (composition neighbours under the same exclusions)" if config.get("fallback") else "") + ".")
    lines.append("- Pass `retrieval=False` to `processor.apply_chat_template` for the encoder path alone, or your own "
                 "`{\"type\": \"neighbours\", ...}` block.")
    return "\n".join(lines)


def write_model_card(folder, **kwargs) -> Path:
    """Build the card (see `build_model_card`) and save it as FOLDER/README.md."""
    card = build_model_card(folder, **kwargs)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def card_has_eval_results(folder) -> bool:
    readme = Path(folder) / "README.md"
    return readme.is_file() and bool(_card_metadata(readme.read_text()).get("model-index"))


def write_adapter_card(folder, *, repo_id: str, base_repo_id: str, adapter_config: dict) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", base_model=base_repo_id, pipeline_tag="text-generation",
                         tags=["protllm", "protein", "biology", "lora", "peft", "custom_code"])
    lora = {k: adapter_config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")}
    text = (f"---\n{data.to_yaml()}\n---\n\n# {repo_id.split('/')[-1]}\n\nA LoRA adapter (with the trained projector, "
            f"saved through `modules_to_save`) for the ProtLLM [`{base_repo_id}`](https://huggingface.co/{base_repo_id}). "
            f"Its model card holds the training recipe, evaluation, limitations and citations (STELLA arXiv 2506.03800, "
            f"SEPIT arXiv 2410.03553).\n\nAdapter settings:\n\n{_kv_table(lora.items())}\n\n## Use\n\n```python\n"
            + adapter_snippet(base_repo_id, repo_id) +
            "```\n\n`python -m protllm.sharing merge BASE ADAPTER OUT` writes a merged model with the same answers.\n")
    path = Path(folder) / "README.md"
    ModelCard(text).save(path)
    return path

