"""`protein-function`: a transformers pipeline that answers questions about proteins with a ProtLLM.

Remote code: a saved ProtLLM folder carries this file and names it in its config (`custom_pipelines`), so

    from transformers import pipeline
    pipe = pipeline("protein-function", model="org/name", trust_remote_code=True)
    pipe("MKTAYIAKQRQISFVKSHFSRQ")                       # [{"generated_text": "..."}]
    pipe({"sequence": "MKT...", "structure": "x.pdb", "chain": "A", "question": "Where is it located?"})
    pipe(["MKT...", "MSD..."], batch_size=8)             # one [{"generated_text": ...}] per input

works without this repository. Inputs: a sequence string; a dict with `sequence` and/or `structure` (a PDB/mmCIF
path, read by the processor of a model that reads structures; a sequence model's processor refuses it, naming the
protein), optional `chain` and `question` (or `proteins`, a list of such protein dicts, for several proteins in one
question); a chat (a list of `{"role", "content"}` messages whose content holds `{"type": "protein", ...}` and
`{"type": "text", ...}` blocks), answered as text-generation pipelines answer chats (the conversation with the
assistant's reply appended); or a list of any of these. `retrieval_field="ec_number"` (a call argument) shows, for a
model with a retrieval database, the closest proteins that carry that field. Decoding is greedy unless `do_sample=True`
is passed;
other keyword arguments are generation parameters (`max_new_tokens`, ...). Batches are left padded, so a batched
answer equals the one-at-a-time answer.

Only transformers and torch are imported here: every top-level import of a remote-code file is a hard requirement
of whoever loads it.
"""

from transformers import AutoModelForCausalLM, GenerationConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "protein-function"
DEFAULT_QUESTION = "What is the function of this protein?"
PROTEIN_KEYS = ("sequence", "structure", "chain")


def _protein_block(spec, index):
    if isinstance(spec, dict) and "content" in spec and "role" not in spec:
        raise ValueError(f"a chat message needs a 'role' ('user', 'assistant' or 'system'), got {spec!r:.200}")
    if isinstance(spec, str):
        return {"type": "protein", "sequence": spec}
    if isinstance(spec, dict) and (spec.get("sequence") is not None or spec.get("structure") is not None):
        return {"type": "protein", **{k: spec[k] for k in PROTEIN_KEYS if spec.get(k) is not None}}
    raise ValueError(
        f"protein-function input {index}: expected a sequence string or a dict with 'sequence' and/or 'structure', "
        f"got {spec!r:.200}"
    )


def _is_chat(value) -> bool:
    return hasattr(value, "messages") or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)
    )


def to_conversation(item, question=None):
    """One pipeline input -> (chat messages, whether the input was a chat)."""
    if _is_chat(item):
        messages = list(getattr(item, "messages", item))
        return [dict(m) for m in messages], True
    if isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) and "content" in m for m in item):
        index = next(i for i, m in enumerate(item) if "role" not in m)
        raise ValueError(f"chat message {index} needs a 'role' ('user', 'assistant' or 'system'), got {item[index]!r:.200}")
    ask = question or DEFAULT_QUESTION
    if isinstance(item, dict):
        ask = item.get("question") or ask
        specs = item["proteins"] if "proteins" in item else [item]
        if not specs:
            raise ValueError("protein-function input: 'proteins' is empty")
    else:
        specs = [item]
    content = [_protein_block(spec, i) for i, spec in enumerate(specs)] + [{"type": "text", "text": ask}]
    return [{"role": "user", "content": content}], False


def _unwrap(value):
    """Pipeline outputs come batched (lists) from run_single / batch_size=1 and unbatched from larger batches."""
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], (list, bool))):
        return value[0]
    return value


class ProteinFunctionBatchError(ValueError):
    """Some inputs of a call cannot be answered. The message numbers each by its position in the call; `results` holds
    the answers of every other input (None at the bad positions), so one bad input does not lose the rest."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


class ProteinFunctionPipeline(Pipeline):
    """Answer a question about one or more proteins (default: "What is the function of this protein?")."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __call__(self, inputs, *args, **kwargs):
        """Answer one input or a list of them. A list is checked first, input by input: bad inputs are named by their
        position in the call, the others are answered, then `ProteinFunctionBatchError` (a ValueError) reports the
        bad ones and carries the answers (`.results`). An empty list answers `[]`."""
        if not isinstance(inputs, (list, tuple)) or _is_chat(inputs):
            return super().__call__(inputs, *args, **kwargs)
        if not inputs:
            return []
        problems = {}
        for position, item in enumerate(inputs):
            try:
                self._check_input(item, kwargs.get("question"), kwargs.get("retrieval_field"))
            except (ValueError, TypeError, KeyError, OSError) as error:
                problems[position] = f"input {position}: {error}"
        if not problems:
            return super().__call__(list(inputs), *args, **kwargs)
        good = [item for position, item in enumerate(inputs) if position not in problems]
        answers = iter(super().__call__(good, *args, **kwargs) if good else [])
        results = [None if position in problems else next(answers) for position in range(len(inputs))]
        raise ProteinFunctionBatchError(
            f"{len(problems)} of {len(inputs)} inputs cannot be answered (the others were; see `.results`):\n"
            + "\n".join(problems.values()), results)

    def _check_input(self, item, question=None, retrieval_field=None):
        """Raise ValueError for an input the model cannot be asked about (built and tokenized, not generated). The
        search asks for the call's `retrieval_field`, so the answering pass reuses it instead of searching again."""
        conversation, _ = to_conversation(item, question)
        self.processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding=True,
                                           **({"retrieval_field": retrieval_field} if retrieval_field is not None else {}))

    def _sanitize_parameters(self, question=None, generate_kwargs=None, retrieval_field=None, **kwargs):
        preprocess = {} if question is None else {"question": question}
        forward = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        if retrieval_field is not None:
            forward["retrieval_field"] = retrieval_field
        return preprocess, forward, {}

    def preprocess(self, inputs, question=None):
        conversation, is_chat = to_conversation(inputs, question)
        # Lists of one: the collate function below concatenates them into a batch.
        return {"conversation": [conversation], "chat": [is_chat]}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        import torch
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        def collate(items):
            return {key: [value for item in items for value in item[key]] for key in ("conversation", "chat")}

        if not hasattr(inputs, "__len__"):
            inputs = list(inputs)
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        loader = torch.utils.data.DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs, generate_kwargs=None, retrieval_field=None):
        generate_kwargs = dict(generate_kwargs or {})
        user_set = {**getattr(self, "_generate_kwargs", {}), **generate_kwargs}
        overrides = {} if ("do_sample" in user_set or "generation_config" in user_set) else {"do_sample": False}
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, **overrides)
        inputs = self.processor.apply_chat_template(
            model_inputs["conversation"], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", padding=True, padding_side="left",
            **({"retrieval_field": retrieval_field} if retrieval_field is not None else {}),
        )
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        generated = self.model.generate(**inputs, **generate_kwargs)
        if not hasattr(generated, "shape"):  # return_dict_in_generate=True
            generated = generated.sequences
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return {"generated_sequence": new_tokens, "conversation": model_inputs["conversation"], "chat": model_inputs["chat"]}

    def postprocess(self, model_outputs, skip_special_tokens=True):
        tokens = model_outputs["generated_sequence"]
        text = self.processor.batch_decode(tokens, skip_special_tokens=skip_special_tokens)[0].strip()
        if _unwrap(model_outputs["chat"]):
            conversation = _unwrap(model_outputs["conversation"])
            return [{"generated_text": list(conversation) + [{"role": "assistant", "content": text}]}]
        return [{"generated_text": text}]


def register_pipeline() -> None:
    """Register the `protein-function` task with transformers' PIPELINE_REGISTRY (idempotent)."""
    current = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if current is None or current.get("impl") is not ProteinFunctionPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=ProteinFunctionPipeline, pt_model=AutoModelForCausalLM, type="multimodal"
        )


register_pipeline()

__all__ = ["ProteinFunctionPipeline", "ProteinFunctionBatchError", "register_pipeline", "to_conversation", "DEFAULT_QUESTION", "TASK"]
