"""Stand-in for transformers' `tests/exporters/test_export.py` (not shipped in the transformers 5.23.0 sdist).

`test_modeling_common.ModelTesterMixin` inherits `ExportTesterMixin`; transformers' `test_torch_export_*` tests live
there and are not vendored. ProtLLM's own `torch.export` / `torch.compile(fullgraph=True)` checks are in
tests/test_modeling_protllm_common.py.
"""


class ExportTesterMixin:
    pass
