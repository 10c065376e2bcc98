"""Share ProtLLM models: model cards, Hub pushes (full folders and LoRA adapters), merging adapters.

    card.py      the licence rule, the model card (card_template.md) and its model-index
    hub.py       folder checks, the protein-function pipeline file, push, adapter push, merge
    snippet.py   the one copy of the usage snippet (cards and README)
    __main__.py  the CLI: `python -m protllm.sharing card|push|push-adapter|merge`

torch/transformers/peft are imported lazily (only `merge_adapter` needs them): the CLI starts fast.
"""

from ..remote_code import ForeignCodeError, check_auto_map
from .card import (
    base_license,
    build_model_card,
    card_has_eval_results,
    count_parameters,
    evaluation_section,
    hub_id_for,
    render_training,
    resolve_license,
    write_adapter_card,
    write_model_card,
)
from .hub import (
    ModelFolderError,
    add_protein_function_pipeline,
    base_resolves,
    check_adapter_folder,
    check_model_folder,
    merge_adapter,
    prepare_model_folder,
    push_adapter,
    push_model_folder,
    register_protein_function_pipeline,
)
from .snippet import EXAMPLE_SEQUENCE, usage_snippet

__all__ = [
    "EXAMPLE_SEQUENCE", "ForeignCodeError", "ModelFolderError", "add_protein_function_pipeline", "base_license",
    "base_resolves", "build_model_card", "card_has_eval_results", "check_adapter_folder", "check_auto_map",
    "check_model_folder", "count_parameters", "evaluation_section", "hub_id_for", "merge_adapter",
    "prepare_model_folder", "push_adapter", "push_model_folder", "register_protein_function_pipeline",
    "render_training", "resolve_license", "usage_snippet", "write_adapter_card", "write_model_card",
]
