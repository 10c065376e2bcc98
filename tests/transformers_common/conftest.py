# The vendored files hold mixins, not tests of their own: ProtLLM's tester (tests/test_modeling_protllm_common.py)
# runs them. Keep pytest from collecting them directly (their names start with test_).
collect_ignore_glob = ["*.py"]
