"""Stand-in for transformers' `tests/generation/test_utils.py` (not shipped in the transformers 5.23.0 sdist).

`test_modeling_common.py` imports `GenerationTesterMixin` for one check: a model that can `generate` must have a
tester inheriting it. ProtLLM's tester inherits this class and carries its own generation checks (greedy ==
assisted decoding, static cache, compiled decoding, logits_to_keep) in tests/test_modeling_protllm_common.py.
"""


class GenerationTesterMixin:
    pass
