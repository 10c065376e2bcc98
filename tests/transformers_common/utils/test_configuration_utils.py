"""Stand-in for transformers' `tests/utils/test_configuration_utils.py` (not shipped in the transformers 5.23.0 sdist).

`ConfigTester.check_config_arguments_init` is its only user, and it returns before reading this for composite
configs (`config_class.sub_configs`), which ProtLLMConfig is.
"""

config_common_kwargs = {}
