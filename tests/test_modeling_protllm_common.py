"""transformers' own common model and config tests (vendored from transformers 5.23.0, tests/transformers_common/),
run against ProtLLM the way transformers runs them against LLaVA (tests/models/llava/test_modeling_llava.py).

Inputs: one protein per text row, that row's `<protein>` placeholders first, so every tensor's first dimension is the
batch and the mixins can slice, repeat and pad rows freely. Variants re-run the tests their change touches:
- left padding (some rows shorter, padded on the left as for batched generation),
- a trainable protein encoder (`freeze_protein_encoder=False`),
- tied input/output embeddings (`tie_word_embeddings=True`, as Qwen2 / SmolLM2).

transformers' `GenerationTesterMixin` and `ExportTesterMixin` are not in the transformers sdist (see
tests/transformers_common/README.md). Written here instead: `ProtLLMGenerationTest` (the generate() contracts the mixin
checks: dict outputs, sampling, beam search, stopping, continuing a cache, inputs_embeds), `ProtLLMGenerationChecks`
(assisted decoding == greedy, prompt lookup, static cache, logits_to_keep) and `ProtLLMCompileTest`
(`torch.compile(fullgraph=True)`, `torch.export`).
"""

import copy
import unittest
from unittest import mock

import pytest
import torch
from transformers import GenerationConfig
from transformers.testing_utils import torch_device

from configuration_protllm import ProtLLMConfig
from modeling_protllm import ProtLLMForConditionalGeneration, ProtLLMModel
from processing_protllm import ProtLLMProcessor
from protllm.local_weights import smollm2_path
from protllm.processors import build_processor, build_protein_tokenizer
from protllm.training.collator import render_conversation
from transformers_common import test_modeling_common
from transformers_common.generation.test_utils import GenerationTesterMixin
from transformers_common.test_configuration_common import ConfigTester
from transformers_common.test_modeling_common import ModelTesterMixin, ids_tensor
from transformers_common.test_processing_common import ProcessorTesterMixin

# The `<protein>` placeholder of the tiny text vocabulary (0-2 are bos/pad/eos). Above 4: the SDPA-vs-eager tests
# extend batches with random ids below 5, which must not create placeholders.
PROTEIN_TOKEN_ID = 5
ESM_CLS, ESM_PAD, ESM_EOS = 0, 1, 2
ESM_RESIDUE_IDS = (4, 24)  # the 20 standard amino acids of the ESM-2 alphabet


class ProtLLMModelTester:
    """Tiny configs and inputs: Llama text model (vocab 99), 2-layer ESM encoder, `num_residues` tokens per protein."""

    def __init__(
        self,
        parent,
        batch_size=7,  # the SDPA-vs-eager tests run 7 rows; fewer would be extended with rows without proteins
        text_length=7,
        num_residues=4,
        left_padding=False,
        freeze_protein_encoder=True,
        tie_word_embeddings=False,
        protein_feature_layer=-1,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.num_residues = num_residues
        self.left_padding = left_padding
        self.freeze_protein_encoder = freeze_protein_encoder
        self.tie_word_embeddings = tie_word_embeddings
        self.protein_feature_layer = protein_feature_layer
        self.text_config = {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 37,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": tie_word_embeddings,
        }
        self.protein_config = {
            "model_type": "esm",
            "vocab_size": 33,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "position_embedding_type": "rotary",
            "token_dropout": True,
            "emb_layer_norm_before": False,
            "pad_token_id": ESM_PAD,
            "mask_token_id": 32,
        }
        self.pad_token_id = self.text_config["pad_token_id"]
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.is_training = True
        self.seq_length = text_length + num_residues  # placeholders included
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return ProtLLMConfig(
            protein_config=copy.deepcopy(self.protein_config),
            text_config=copy.deepcopy(self.text_config),
            protein_token_id=PROTEIN_TOKEN_ID,
            projector_type="mlp2x_gelu",
            protein_feature_layer=self.protein_feature_layer,
            freeze_protein_encoder=self.freeze_protein_encoder,
            max_protein_length=32,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def prepare_config_and_inputs(self):
        residues = ids_tensor([self.batch_size, self.num_residues], ESM_RESIDUE_IDS[1] - ESM_RESIDUE_IDS[0])
        protein_input_ids = torch.cat(
            [
                torch.full((self.batch_size, 1), ESM_CLS, dtype=torch.long, device=residues.device),
                residues + ESM_RESIDUE_IDS[0],
                torch.full((self.batch_size, 1), ESM_EOS, dtype=torch.long, device=residues.device),
            ],
            dim=1,
        )
        return self.get_config(), protein_input_ids

    def prepare_config_and_inputs_for_common(self):
        config, protein_input_ids = self.prepare_config_and_inputs()
        # Text ids avoid bos/pad/eos and the placeholder: the only placeholders are the ones set below.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 6) + 6
        attention_mask = torch.ones_like(input_ids)
        if self.left_padding:
            # Row b is padded on the left by b tokens (capped so its protein span and 2 text tokens remain).
            for row in range(1, self.batch_size):
                pad = min(row, self.seq_length - self.num_residues - 2)
                input_ids[row, :pad] = self.pad_token_id
                attention_mask[row, :pad] = 0
                input_ids[row, pad : pad + self.num_residues] = PROTEIN_TOKEN_ID
            input_ids[0, : self.num_residues] = PROTEIN_TOKEN_ID
        else:
            input_ids[:, : self.num_residues] = PROTEIN_TOKEN_ID
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "protein_input_ids": protein_input_ids,
            "protein_attention_mask": torch.ones_like(protein_input_ids),
        }
        return config, inputs_dict


class ProtLLMModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (ProtLLMModel, ProtLLMForConditionalGeneration)
    # Inputs besides input_ids that the attention-backend tests must pass along (they batch-slice them).
    additional_model_inputs = ["protein_input_ids", "protein_attention_mask"]
    _is_composite = True
    tester_kwargs = {}

    @classmethod
    def setUpClass(cls):
        # transformers decides "base model" (no loss: skipped by the training tests) and "causal LM" (gets labels)
        # from its static name tables, which list the library's own models. Add ProtLLM's two classes to the
        # vendored module's copies, as transformers would when shipping a model; transformers itself is untouched.
        cls._name_tables = mock.patch.multiple(
            test_modeling_common,
            MODEL_MAPPING_NAMES={**test_modeling_common.MODEL_MAPPING_NAMES, "protllm": "ProtLLMModel"},
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES={
                **test_modeling_common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                "protllm": "ProtLLMForConditionalGeneration",
            },
        )
        cls._name_tables.start()

    @classmethod
    def tearDownClass(cls):
        cls._name_tables.stop()

    def setUp(self):
        self.model_tester = ProtLLMModelTester(self, **self.tester_kwargs)
        self.config_tester = ConfigTester(
            self,
            config_class=ProtLLMConfig,
            has_text_modality=False,
            common_properties=["protein_token_id", "protein_feature_layer", "projector_type"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    # ----- not applicable to a protein model (each with the reason) -------------------------------------------------

    @unittest.skip(
        "Picks the first `rotary_emb` module, here ESM's (the protein tower is registered first), and rebuilds it "
        "with the text config; the LLM's RoPE scaling is Llama's, covered by transformers' own Llama tests."
    )
    def test_model_rope_scaling_frequencies(self):
        pass

    # Feeds random ids over the whole vocabulary without protein inputs: ids that happen to be <protein> placeholders
    # are refused by design (a placeholder with no protein behind it). One skip per parameterized case.
    for _scaling in ("0_linear", "1_dynamic", "2_yarn"):
        locals()[f"test_model_rope_scaling_from_config_{_scaling}"] = unittest.skip(
            "random ids over the whole vocabulary include <protein> placeholders without protein inputs"
        )(lambda self: None)
    del _scaling

    @unittest.skip(
        "The protein tower is `protein_encoder` (a wrapper holding EsmModel + the optional structure bias), not one of "
        "the vision/audio tower names this test looks up; test_attn_implementation_composite_models checks the "
        "dispatch to both sub-configs."
    )
    def test_sdpa_can_dispatch_composite_models(self):
        pass

    # transformers' check instruments the *first* GradientCheckpointingLayer, here a layer of the frozen encoder. A
    # frozen encoder stays in eval mode and runs without autograd, so it is never checkpointed (by design: there is
    # nothing to recompute). ProtLLMTrainableEncoderTest runs these three tests; test_frozen_encoder_is_not_checkpointed
    # checks the frozen case.
    @unittest.skip("first checkpointing layer is the frozen encoder's; see ProtLLMTrainableEncoderTest")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip("first checkpointing layer is the frozen encoder's; see ProtLLMTrainableEncoderTest")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip("first checkpointing layer is the frozen encoder's; see ProtLLMTrainableEncoderTest")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    # ----- ProtLLM's own checks of the same contracts -----------------------------------------------------------------

    def test_frozen_encoder_is_not_checkpointed(self):
        """Gradient checkpointing with a frozen encoder: the LLM layers recompute in backward, the encoder layers run
        once (eval mode, no autograd), and the trained parameters get the same gradients as without checkpointing."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs["labels"] = inputs["input_ids"].clone()
        torch.manual_seed(0)
        model = ProtLLMForConditionalGeneration(config).train()
        model(**inputs).loss.backward()
        reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Count the runs of the forward each layer hands to its checkpoint function (as transformers' test does).
        runs = {"encoder": 0, "llm": 0}

        def counting(part, layer):
            checkpoint_function = layer._gradient_checkpointing_func

            def run(forward, *args):
                def counted(*a, **k):
                    runs[part] += 1
                    return forward(*a, **k)

                return checkpoint_function(counted, *args)

            layer._gradient_checkpointing_func = run

        counting("encoder", model.model.protein_encoder.esm.encoder.layer[0])
        counting("llm", model.model.language_model.layers[0])
        model(**inputs).loss.backward()

        self.assertEqual(runs["encoder"], 0)  # never checkpointed: eval mode, no autograd
        self.assertEqual(runs["llm"], 2)  # forward + recomputation in backward
        self.assertFalse(any(name.startswith("model.protein_encoder.") for name in reference))
        for name, grad in reference.items():
            torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)

    def test_from_pretrained_strictness(self):
        """A saved folder whose weights lack tensors is refused; `strict=False` and `from_pretrained(None, config=...,
        state_dict=...)` follow transformers' convention (missing weights initialised, reported in the loading info)."""
        import tempfile

        from safetensors.torch import load_file, save_file

        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = ProtLLMForConditionalGeneration(config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            weights = load_file(f"{folder}/model.safetensors")
            dropped = next(key for key in weights if key.startswith("model.projector."))
            del weights[dropped]
            save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
            with self.assertRaisesRegex(ValueError, "missing from the weights"):
                ProtLLMForConditionalGeneration.from_pretrained(folder)
            loaded, info = ProtLLMForConditionalGeneration.from_pretrained(folder, strict=False, output_loading_info=True)
            self.assertIn(dropped, info["missing_keys"])
            loaded = ProtLLMForConditionalGeneration.from_pretrained(folder, strict=False)
            self.assertEqual(loaded.get_parameter(dropped).shape, model.get_parameter(dropped).shape)
        from_state_dict = ProtLLMForConditionalGeneration.from_pretrained(None, config=config, state_dict=model.state_dict())
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(from_state_dict.state_dict()[name], tensor, msg=name)

    def test_return_dict_false_matches_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ProtLLMForConditionalGeneration(config).eval()
        with torch.no_grad():
            as_output = model(**inputs)
            as_tuple = model(**inputs, return_dict=False)
        self.assertIsInstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], as_output.logits)


class ProtLLMGenerationChecks:
    """Generation contracts of transformers' GenerationTesterMixin that this model's issue list named, on one tiny
    config: greedy == assisted (with a smaller assistant), static cache == dynamic cache, logits_to_keep."""

    def _greedy_inputs(self, batch_size):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {key: value[:batch_size] for key, value in inputs.items()}
        torch.manual_seed(0)
        model = ProtLLMForConditionalGeneration(config).eval()
        generation = dict(max_new_tokens=5, do_sample=False, pad_token_id=self.model_tester.pad_token_id)
        return config, model, inputs, generation

    def test_assisted_decoding_matches_greedy_search(self):
        config, model, inputs, generation = self._greedy_inputs(batch_size=1)  # assisted decoding: one row
        assistant_config = copy.deepcopy(config)
        assistant_config.text_config.num_hidden_layers = 1
        torch.manual_seed(1)
        assistant = ProtLLMForConditionalGeneration(assistant_config).eval()
        with torch.no_grad():
            greedy = model.generate(**inputs, **generation)
            assisted = model.generate(**inputs, **generation, assistant_model=assistant)
            # Prompt lookup drafts from the prompt itself: the model is then its own verifier on a cache it extends.
            lookup = model.generate(**inputs, **generation, prompt_lookup_num_tokens=2)
        self.assertEqual(greedy.tolist(), assisted.tolist())
        self.assertEqual(greedy.tolist(), lookup.tolist())

    def test_generate_with_static_cache(self):
        _, model, inputs, generation = self._greedy_inputs(batch_size=2)
        with torch.no_grad():
            dynamic = model.generate(**inputs, **generation)
            static = model.generate(**inputs, **generation, cache_implementation="static")
        self.assertEqual(dynamic.tolist(), static.tolist())

    def test_logits_to_keep(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ProtLLMForConditionalGeneration(config).eval()
        with torch.no_grad():
            full = model(**inputs).logits
            last = model(**inputs, logits_to_keep=1).logits
        self.assertEqual(last.shape[1], 1)
        torch.testing.assert_close(last[:, 0], full[:, -1])


class ProtLLMModelGenerationTest(ProtLLMGenerationChecks, unittest.TestCase):
    def setUp(self):
        self.model_tester = ProtLLMModelTester(self, batch_size=2)


class ProtLLMCompileTest(unittest.TestCase):
    """`torch.compile(fullgraph=True)`: Dynamo traces the whole forward (protein prefill, and static-cache decode
    steps) without a graph break, and the compiled model gives the eager model's outputs. The "eager" backend checks
    exactly the tracing (graph breaks, guards) without Inductor's code generation, which takes minutes on a shared
    CPU; bench/bench_compile.py measures the Inductor-compiled decode."""

    def setUp(self):
        self.model_tester = ProtLLMModelTester(self, batch_size=2)
        self.model_tester.text_config["num_hidden_layers"] = 1
        self.model_tester.protein_config["num_hidden_layers"] = 1
        torch._dynamo.reset()

    def test_compiled_forward_fullgraph_matches_eager(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        self.assertTrue(ProtLLMForConditionalGeneration._can_compile_fullgraph)
        model = ProtLLMForConditionalGeneration(config).eval()
        with torch.no_grad():
            eager = model(**inputs).logits
            compiled = torch.compile(model.forward, fullgraph=True, backend="eager")(**inputs).logits
        torch.testing.assert_close(compiled, eager)

    def test_torch_export_matches_eager(self):
        """`torch.export` of the forward (what transformers' ExportTesterMixin checks; that mixin is not in the sdist):
        no data-dependent Python branch on the protein path, and the exported program gives the eager logits."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ProtLLMForConditionalGeneration(config).eval()
        inputs = {key: value for key, value in inputs.items() if value is not None}
        with torch.no_grad():
            eager = model(**inputs, use_cache=False).logits
            program = torch.export.export(model, args=(), kwargs={**inputs, "use_cache": False}, strict=False)
            exported = program.module()(**inputs, use_cache=False).logits
        torch.testing.assert_close(exported, eager)

    def test_static_cache_compiled_generate_matches_dynamic(self):
        from transformers import CompileConfig

        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ProtLLMForConditionalGeneration(config).eval()
        compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
        compile_config._compile_all_devices = True  # transformers auto-compiles on accelerators only by default
        generation = dict(max_new_tokens=4, do_sample=False, pad_token_id=self.model_tester.pad_token_id)
        with torch.no_grad():
            dynamic = model.generate(**inputs, **generation)
            compiled = model.generate(**inputs, **generation, cache_implementation="static", compile_config=compile_config)
        self.assertEqual(dynamic.tolist(), compiled.tolist())


def _only(base, names, reason):
    """A variant re-running only `names` of `base`: the other tests do not depend on what the variant changes."""
    attrs = {name: None for name in dir(base) if name.startswith("test_") and name not in names}
    attrs["__doc__"] = reason
    return attrs


class ProtLLMLeftPaddedTest(ProtLLMModelTest):
    tester_kwargs = {"left_padding": True}
    locals().update(_only(ProtLLMModelTest, {
        "test_batching_equivalence", "test_model_outputs_equivalence", "test_hidden_states_output",
        "test_attention_outputs", "test_training", "test_eager_matches_sdpa_inference_09_fp32_pad_left",
        "test_eager_matches_sdpa_inference_13_fp32_pad_right",
    }, "Rows padded on the left by different amounts (batched generation's layout)."))


class ProtLLMLeftPaddedGenerationTest(ProtLLMGenerationChecks, unittest.TestCase):
    def setUp(self):
        self.model_tester = ProtLLMModelTester(self, batch_size=2, left_padding=True)


class ProtLLMGenerationTest(unittest.TestCase):
    """The `generate()` contracts transformers' GenerationTesterMixin holds every model to, written here (the mixin is
    not in the transformers sdist): output dicts, sampling, beam search, stopping, continuing from a returned cache,
    generating from `inputs_embeds`. Assisted decoding, prompt lookup and the static cache are in
    ProtLLMGenerationChecks; batched == one row at a time on processor-built prompts in tests/test_core_model.py.

    Inputs: the tiny tester's two rows, left padded by different amounts (batched generation's layout), one protein each.
    """

    max_new_tokens = 4

    seed = 0

    def setUp(self):
        torch.manual_seed(self.seed)  # inputs and weights: the same whatever ran before in this process
        self.model_tester = ProtLLMModelTester(self, batch_size=2, left_padding=True)
        config, self.inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config._attn_implementation = "eager"  # per-step attention weights (output_attentions) need eager attention
        self.model = ProtLLMForConditionalGeneration(config).eval()
        self.batch_size, self.prompt_length = self.inputs["input_ids"].shape
        self.vocab_size = config.text_config.vocab_size

    def generate(self, **kwargs):
        kwargs = {"max_new_tokens": self.max_new_tokens, "pad_token_id": self.model_tester.pad_token_id, **kwargs}
        with torch.no_grad():
            return self.model.generate(**{**self.inputs, **kwargs})

    def assertPromptsKept(self, sequences, copies=1):
        """Each returned row starts with its own prompt: `copies` consecutive rows per input row."""
        prompts = self.inputs["input_ids"].repeat_interleave(copies, dim=0)
        self.assertEqual(sequences[:, : self.prompt_length].tolist(), prompts.tolist())

    def test_greedy_dict_output(self):
        """return_dict_in_generate gives the plain greedy sequences, one score/logit row per new token whose argmax is
        that token, the prefill's logits equal a forward pass over the prompt, and per-step hidden states/attentions."""
        # min_new_tokens: no row stops early, so every step has a token in every row.
        greedy = dict(do_sample=False, min_new_tokens=self.max_new_tokens)
        plain = self.generate(**greedy)
        out = self.generate(
            **greedy, return_dict_in_generate=True, output_scores=True, output_logits=True,
            output_hidden_states=True, output_attentions=True,
        )
        self.assertEqual(out.sequences.tolist(), plain.tolist())
        self.assertEqual(tuple(out.sequences.shape), (self.batch_size, self.prompt_length + self.max_new_tokens))
        self.assertPromptsKept(out.sequences)
        self.assertEqual(len(out.scores), self.max_new_tokens)
        self.assertEqual(len(out.logits), self.max_new_tokens)
        for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
            self.assertEqual(tuple(scores.shape), (self.batch_size, self.vocab_size))
            self.assertEqual(scores.argmax(-1).tolist(), out.sequences[:, self.prompt_length + step].tolist())
            # The protein tokens are never generated (suppressed in the scores), though the raw logits have them.
            self.assertTrue(torch.isinf(scores[:, PROTEIN_TOKEN_ID]).all())
            self.assertTrue(torch.isfinite(logits[:, PROTEIN_TOKEN_ID]).all())
        with torch.no_grad():
            prompt_logits = self.model(**self.inputs).logits[:, -1]
        torch.testing.assert_close(out.logits[0], prompt_logits)

        num_layers = self.model.config.text_config.num_hidden_layers
        num_heads = self.model.config.text_config.num_attention_heads
        self.assertEqual(len(out.hidden_states), self.max_new_tokens)
        self.assertEqual(len(out.attentions), self.max_new_tokens)
        for step, (hidden_states, attentions) in enumerate(zip(out.hidden_states, out.attentions)):
            new_positions = self.prompt_length if step == 0 else 1  # the prefill sees the prompt, then one token a step
            self.assertEqual(len(hidden_states), num_layers + 1)  # embeddings + each layer
            self.assertEqual(tuple(hidden_states[-1].shape), (self.batch_size, new_positions, self.model_tester.hidden_size))
            self.assertEqual(len(attentions), num_layers)
            self.assertEqual(
                tuple(attentions[0].shape), (self.batch_size, num_heads, new_positions, self.prompt_length + step)
            )

    def test_sampling_is_reproducible_with_a_seed(self):
        """Same seed, same samples; num_return_sequences rows per prompt; every sampled token is one top-k kept."""
        sampling = dict(do_sample=True, top_k=5, temperature=1.5, num_return_sequences=3, min_new_tokens=self.max_new_tokens,
                        return_dict_in_generate=True, output_scores=True)
        torch.manual_seed(7)
        first = self.generate(**sampling)
        torch.manual_seed(7)
        second = self.generate(**sampling)
        self.assertEqual(first.sequences.tolist(), second.sequences.tolist())
        self.assertEqual(tuple(first.sequences.shape), (3 * self.batch_size, self.prompt_length + self.max_new_tokens))
        self.assertPromptsKept(first.sequences, copies=3)
        for step, scores in enumerate(first.scores):
            self.assertEqual(tuple(scores.shape), (3 * self.batch_size, self.vocab_size))
            self.assertTrue(torch.isfinite(scores).sum(-1).le(5).all())  # top_k=5: the others are -inf
            chosen = scores.gather(1, first.sequences[:, self.prompt_length + step, None])
            self.assertTrue(torch.isfinite(chosen).all())

    def test_beam_search_scores_are_the_model_log_probabilities(self):
        """Beam search returns num_return_sequences rows per prompt, best first, and each token's transition score is
        the model's log-probability of it, recomputed by one forward pass over the returned sequence."""
        out = self.generate(
            do_sample=False, num_beams=3, num_return_sequences=2, min_new_tokens=self.max_new_tokens,
            return_dict_in_generate=True, output_scores=True, length_penalty=1.0,
        )
        self.assertEqual(tuple(out.sequences.shape), (2 * self.batch_size, self.prompt_length + self.max_new_tokens))
        self.assertPromptsKept(out.sequences, copies=2)
        best_first = out.sequences_scores.view(self.batch_size, 2)
        self.assertTrue((best_first[:, 0] >= best_first[:, 1]).all())

        transition = self.model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
        attention_mask = torch.cat(
            [self.inputs["attention_mask"], torch.ones(self.batch_size, self.max_new_tokens, dtype=torch.long)], dim=1
        ).repeat_interleave(2, dim=0)
        proteins = {key: value.repeat_interleave(2, dim=0) for key, value in self.inputs.items() if key.startswith("protein_")}
        with torch.no_grad():
            logits = self.model(input_ids=out.sequences, attention_mask=attention_mask, **proteins).logits
        log_probs = logits[:, self.prompt_length - 1 : -1].log_softmax(-1)
        recomputed = log_probs.gather(2, out.sequences[:, self.prompt_length :, None]).squeeze(2)
        torch.testing.assert_close(transition, recomputed, atol=1e-4, rtol=1e-4)

    def test_beam_sample_runs_and_is_reproducible(self):
        beam_sample = dict(do_sample=True, num_beams=2, num_return_sequences=2, min_new_tokens=self.max_new_tokens)
        torch.manual_seed(3)
        first = self.generate(**beam_sample)
        torch.manual_seed(3)
        second = self.generate(**beam_sample)
        self.assertEqual(first.tolist(), second.tolist())
        self.assertEqual(tuple(first.shape), (2 * self.batch_size, self.prompt_length + self.max_new_tokens))
        self.assertPromptsKept(first, copies=2)

    def test_eos_min_and_max_new_tokens(self):
        """A row stops at its first EOS (then padded while the others go on); min_new_tokens forbids EOS before;
        max_new_tokens bounds the rest."""
        pad = self.model_tester.pad_token_id
        reference = self.generate(do_sample=False, min_new_tokens=self.max_new_tokens)
        new_tokens = reference[:, self.prompt_length :].tolist()
        eos = new_tokens[0][1]  # row 0's second token: row 0 stops after at most two tokens
        # min_new_tokens kept the configured EOS out of the reference; keep it out here too, so both runs pick from
        # the same tokens and differ only in stopping at `eos`
        configured_eos = self.model.generation_config.eos_token_id
        configured_eos = [configured_eos] if isinstance(configured_eos, int) else list(configured_eos or [])
        stopped = self.generate(do_sample=False, eos_token_id=eos, suppress_tokens=configured_eos)
        expected = []
        for row in new_tokens:
            kept = row[: row.index(eos) + 1] if eos in row else row
            expected.append(kept)
        longest = max(len(kept) for kept in expected)
        expected = [kept + [pad] * (longest - len(kept)) for kept in expected]
        self.assertEqual(stopped[:, self.prompt_length :].tolist(), expected)
        self.assertLessEqual(len(expected[0]) if self.batch_size == 1 else longest, self.max_new_tokens)

        at_least = self.generate(do_sample=False, eos_token_id=eos, min_new_tokens=3, return_dict_in_generate=True,
                                 output_scores=True)
        self.assertGreaterEqual(at_least.sequences.shape[1], self.prompt_length + 3)
        self.assertNotIn(eos, at_least.sequences[:, self.prompt_length : self.prompt_length + 3].flatten().tolist())
        for scores in at_least.scores[:3]:
            self.assertTrue(torch.isinf(scores[:, eos]).all())
        self.assertEqual(self.generate(do_sample=False, max_new_tokens=2, min_new_tokens=2).shape[1], self.prompt_length + 2)

    def test_continuing_from_the_returned_cache_equals_one_go(self):
        """generate(…, past_key_values=previous.past_key_values) on the previous output continues it exactly, with or
        without the protein inputs again (the cache already holds the prompt, proteins included)."""
        greedy = dict(do_sample=False, min_new_tokens=2 * self.max_new_tokens, max_new_tokens=2 * self.max_new_tokens)
        one_go = self.generate(**greedy)
        first = self.generate(do_sample=False, min_new_tokens=self.max_new_tokens, return_dict_in_generate=True)
        attention_mask = torch.cat(
            [self.inputs["attention_mask"], torch.ones(self.batch_size, self.max_new_tokens, dtype=torch.long)], dim=1
        )
        proteins = {key: value for key, value in self.inputs.items() if key.startswith("protein_")}
        for protein_inputs in ({}, proteins):
            cache = copy.deepcopy(first.past_key_values)
            with torch.no_grad():
                continued = self.model.generate(
                    input_ids=first.sequences, attention_mask=attention_mask, past_key_values=cache, do_sample=False,
                    max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens,
                    pad_token_id=self.model_tester.pad_token_id, **protein_inputs,
                )
            self.assertEqual(continued.tolist(), one_go.tolist(), msg=f"protein inputs given again: {bool(protein_inputs)}")

    def test_copies_of_a_row_with_two_proteins_keep_both(self):
        """num_return_sequences copies of a row run its own proteins: each copy's first-step logits equal a forward pass
        of that row."""
        num_residues = self.model_tester.num_residues
        inputs = {key: value.clone() for key, value in self.inputs.items()}
        # Row 0 gets a second protein after one text token; the proteins are ordered row by row: [A, C] then [B].
        inputs["input_ids"][0, num_residues + 1 : 2 * num_residues + 1] = PROTEIN_TOKEN_ID
        second = inputs["protein_input_ids"][1:].clone()
        second[:, 1:-1] = second[:, 1:-1].flip(-1)  # other residues than row 1's protein
        for key in ("protein_input_ids", "protein_attention_mask"):
            extra = second if key == "protein_input_ids" else torch.ones_like(second)
            inputs[key] = torch.cat([inputs[key][:1], extra, inputs[key][1:]])
        with torch.no_grad():
            expected = self.model(**inputs).logits[:, -1].repeat_interleave(2, dim=0)
            out = self.model.generate(
                **inputs, do_sample=True, num_return_sequences=2, max_new_tokens=1, return_dict_in_generate=True,
                output_logits=True, pad_token_id=self.model_tester.pad_token_id,
            )
        torch.testing.assert_close(out.logits[0], expected)
        with torch.no_grad():  # beam search expands the same way
            beams = self.model.generate(**inputs, num_beams=2, max_new_tokens=1, return_dict_in_generate=True,
                                        output_logits=True, pad_token_id=self.model_tester.pad_token_id)
        torch.testing.assert_close(beams.logits[0], expected)

    def test_generate_from_inputs_embeds(self):
        """inputs_embeds instead of input_ids (placeholders found by their embedding, as LLaVA does): the same new
        tokens, and only those are returned (transformers' rule for decoder-only models)."""
        greedy = dict(do_sample=False, min_new_tokens=self.max_new_tokens)
        from_ids = self.generate(**greedy)
        inputs = dict(self.inputs)
        inputs_embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))
        with torch.no_grad():
            from_embeds = self.model.generate(
                inputs_embeds=inputs_embeds, **inputs, **greedy, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.model_tester.pad_token_id,
            )
        self.assertEqual(from_embeds.tolist(), from_ids[:, self.prompt_length :].tolist())


class ProtLLMTrainableEncoderTest(ProtLLMModelTest):
    tester_kwargs = {"freeze_protein_encoder": False, "protein_feature_layer": -2}
    locals().update(_only(ProtLLMModelTest, {
        "test_training", "test_training_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant_false",
        "test_training_gradient_checkpointing_use_reentrant_true", "test_save_load",
        "test_every_trainable_parameter_gets_a_gradient",
    }, "A trainable encoder (second-to-last layer as features, as SEPIT)."))

    # The vendored versions are defined on ModelTesterMixin; re-enable them here (the frozen tester skips them).
    test_training_gradient_checkpointing = ModelTesterMixin.test_training_gradient_checkpointing
    test_training_gradient_checkpointing_use_reentrant_false = (
        ModelTesterMixin.test_training_gradient_checkpointing_use_reentrant_false
    )
    test_training_gradient_checkpointing_use_reentrant_true = (
        ModelTesterMixin.test_training_gradient_checkpointing_use_reentrant_true
    )

    def test_every_trainable_parameter_gets_a_gradient(self):
        """DDP fails ("Expected to have finished reduction") on a trainable parameter without a gradient: the unused
        contact head, and with protein_feature_layer=-2 the last layer and final norm, must not require grad."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs["labels"] = inputs["input_ids"].clone()
        model = ProtLLMForConditionalGeneration(config).train()
        model(**inputs).loss.backward()
        without_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        self.assertEqual(without_grad, [])
        encoder_trainable = [n for n, p in model.model.protein_encoder.named_parameters() if p.requires_grad]
        self.assertTrue(any(n.startswith("esm.encoder.layer.0.") for n in encoder_trainable))
        self.assertFalse(any("contact_head" in n or "emb_layer_norm_after" in n for n in encoder_trainable))


class ProtLLMTiedEmbeddingsTest(ProtLLMModelTest):
    tester_kwargs = {"tie_word_embeddings": True}
    locals().update(_only(ProtLLMModelTest, {
        "test_tied_weights_keys", "test_model_weights_reload_no_missing_tied_weights", "test_load_save_without_tied_weights",
        "test_resize_tokens_embeddings", "test_resize_embeddings_untied", "test_save_load", "test_tied_head_has_a_tp_plan_entry",
        "test_can_init_all_missing_weights", "test_training",
    }, "Input and output embeddings tied (Qwen2 / SmolLM2 LLMs)."))


# ~1 min on one idle core (SmolLM2's 49k-token tokenizer is loaded by every test): part of `make test`, as issue 19 asks.
class ProtLLMProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """transformers' ProcessorTesterMixin on ProtLLMProcessor (SmolLM2's tokenizer + the ESM-2 protein tokenizer).

    The image/video/audio tests skip themselves (no such component); the text and chat-template tests run.
    """

    processor_class = ProtLLMProcessor

    # Tests that feed images to a protein processor: not applicable (the processor refuses images by design). Strict
    # xfail so that a change in the mixin that makes one of them run on text alone shows up.
    _known_failures = {
        "test_flat_kwarg_applied_when_modality_dict_lacks_it": "the mixin passes images (modality input-name check, not applicable); refused",
        "test_get_num_multimodal_tokens_matches_processor_call": "the mixin passes images to __call__ (not applicable to proteins); refused",
        "test_model_input_names": "the mixin passes images (image input-name check, not applicable); refused",
    }
    for _name, _reason in _known_failures.items():
        locals()[_name] = pytest.mark.xfail(strict=True, reason=_reason)(getattr(ProcessorTesterMixin, _name))
    del _name, _reason

    def setUp(self):
        super().setUp()
        # Saving a model folder registers ProtLLMProcessor for AutoProcessor on the class (transformers'
        # register_for_auto_class), so a later save in the same process writes an auto_map the mixin's round-trip
        # comparison does not expect: start every test from the unregistered class, as in a fresh process.
        auto_class = ProtLLMProcessor._auto_class
        ProtLLMProcessor._auto_class = None
        self.addCleanup(setattr, ProtLLMProcessor, "_auto_class", auto_class)

    @classmethod
    def _setup_from_components(cls):
        return build_processor(str(smollm2_path(tokenizer_only=True)), build_protein_tokenizer("esm"),
                               processor_class=ProtLLMProcessor)

    # ----- ProtLLM's own checks of the conventions the fixes above adopted -------------------------------------------

    def test_padding_side_lives_on_the_tokenizer_and_old_folders_load(self):
        """padding_side is the LLM tokenizer's (saved in tokenizer_config.json); a folder saved when it was a processor
        argument (processor_config.json holds it, tokenizer_config.json does not) still loads with it."""
        import json
        import tempfile
        from pathlib import Path

        processor = self._setup_from_components()
        self.assertEqual(processor.tokenizer.padding_side, "left")
        with tempfile.TemporaryDirectory() as folder:
            processor.save_pretrained(folder)
            processor_config = json.loads((Path(folder) / "processor_config.json").read_text())
            tokenizer_config_path = Path(folder) / "tokenizer_config.json"
            tokenizer_config = json.loads(tokenizer_config_path.read_text())
            self.assertNotIn("padding_side", processor_config)
            self.assertEqual(tokenizer_config["padding_side"], "left")
            self.assertEqual(ProtLLMProcessor.from_pretrained(folder).tokenizer.padding_side, "left")

            # The earlier layout, with the side the tokenizer would not default to.
            (Path(folder) / "processor_config.json").write_text(json.dumps({**processor_config, "padding_side": "right"}))
            del tokenizer_config["padding_side"]
            tokenizer_config_path.write_text(json.dumps(tokenizer_config))
            old = ProtLLMProcessor.from_pretrained(folder)
        self.assertEqual(old.tokenizer.padding_side, "right")
        batch = old(text=["a <protein> b", "c"], proteins=[["MKV"], None])
        self.assertEqual(batch["attention_mask"][1][-1], 0)  # the shorter row is padded on the right
        left = old(text=["a <protein> b", "c"], proteins=[["MKV"], None], padding_side="left")
        self.assertEqual(left["attention_mask"][1][0], 0)

    def test_generation_blocks_decide_the_learned_spans(self):
        """With `{% generation %}` blocks the learned spans are the blocks, in the training collator's rendering too
        (`protllm.training.collator.render_conversation`, with `learn_from`); without them, each assistant turn after its generation prompt."""
        processor = self._setup_from_components()
        template = (
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
            "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        )
        messages = [
            {"role": "user", "content": [{"type": "protein", "sequence": "MKV"}, {"type": "text", "text": "Function?"}]},
            {"role": "assistant", "content": "A kinase."},
            {"role": "user", "content": "Location?"},
            {"role": "assistant", "content": "The membrane."},
        ]
        text, proteins, spans = render_conversation(processor, messages, learn_from=2, chat_template=template)
        self.assertEqual(len(proteins), 1)
        self.assertEqual([text[start:end] for start, end in spans], ["The membrane.<|im_end|>"])
        _, _, all_turns = render_conversation(processor, messages, chat_template=template)
        self.assertEqual([text[start:end] for start, end in all_turns], ["A kinase.<|im_end|>", "The membrane.<|im_end|>"])

        # The tokens apply_chat_template marks are those of the blocks, protein tokens never among them.
        out = processor.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        learned = [token for token, flag in zip(out["input_ids"][0], out["assistant_masks"][0]) if flag]
        self.assertEqual(processor.decode(learned), "A kinase.<|im_end|>The membrane.<|im_end|>")

        # SmolLM2's own template has no generation blocks: the answer and its end-of-turn marker are learned.
        text, _, spans = render_conversation(processor, messages)
        self.assertEqual([text[start:end] for start, end in spans], ["A kinase.<|im_end|>\n", "The membrane.<|im_end|>\n"])
