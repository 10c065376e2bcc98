"""Fine-tuning a released model folder with plain TRL, with nothing from this repository (issue 14).

The snippet of protllm/sharing/snippet.py (model card "Use" section, README "Fine-tune a released model") runs
verbatim in a fresh interpreter that cannot import the repository, from a temporary directory, against a folder saved
by `save_model_folder`: as written (full fine-tuning) and with its `use_lora = True` switch. Its `collate` function,
written on the processor's standard `apply_chat_template(return_assistant_tokens_mask=True)`, must give the batches
of this repository's training collator.
"""

import json
import math
import re

import pytest
import torch

from conftest import REPO_ROOT
from fresh_process import run_fresh_python
from processing_protllm import ProtLLMProcessor
from protllm.model_folder import save_model_folder
from protllm.sharing.snippet import FINETUNE_SNIPPET, README_REPO_ID, finetune_snippet
from protllm.testing import build_tiny_protllm
from protllm.training.collator import ProtLLMDataCollator

# Appended after the snippet (which stays verbatim): what the trainer learned from, and what it changed.
CHECKS = """
import json, torch
from safetensors.torch import load_file
saved = load_file(repo + "/model.safetensors")
trained = {name.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
           for name, p in trainer.model.named_parameters()}
changed = sorted(name for name, p in trained.items() if name in saved and not torch.equal(p, saved[name]))
lora_nonzero = [name for name, p in trainer.model.named_parameters() if "lora_B" in name and p.abs().sum() > 0]
rows = [train_dataset[i] for i in range(len(train_dataset))]
batch = trainer.data_collator(rows)
labelled = [processor.decode(row[row != -100]) for row in batch["labels"]]
protein_labelled = int((batch["labels"][batch["input_ids"] == processor.protein_token_id] != -100).sum())
tensors = {key: batch[key].tolist() for key in ("input_ids", "attention_mask", "labels", "protein_input_ids")}
print(json.dumps({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "changed": changed,
                  "lora_nonzero": len(lora_nonzero), "labelled": labelled, "protein_labelled": protein_labelled,
                  "rows": rows, "batch": tensors, "saved": sorted(os.listdir(args.output_dir))}))
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    model, processor = build_tiny_protllm("llama")
    return save_model_folder(model, processor, tmp_path_factory.mktemp("released") / "model")


def run_snippet(folder, cwd, lora: bool) -> dict:
    code = finetune_snippet(str(folder))
    assert code.count("use_lora = False") == 1
    if lora:
        code = code.replace("use_lora = False", "use_lora = True")
    stdout = run_fresh_python("import os\n" + code + CHECKS, cwd=cwd, timeout=600)
    return json.loads(stdout.strip().splitlines()[-1])


ANSWERS = ["A transcriptional regulator.", "In the cytoplasm."]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_released_folder_fine_tunes_with_plain_trl(released, tmp_path, lora):
    result = run_snippet(released, tmp_path, lora)
    print(f"fine-tune snippet ({'lora' if lora else 'full'}) losses: {result['losses']}")
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    # Only the assistant answers (and their end-of-turn token) are learned; never a protein or prompt token.
    assert [text.removesuffix("\n") for text in result["labelled"]] == [f"{a}<|im_end|>" for a in ANSWERS]
    assert result["protein_labelled"] == 0
    # The snippet's collate function gives, on the snippet's own rows, the batch train_sft.py's collator gives.
    expected = ProtLLMDataCollator(ProtLLMProcessor.from_pretrained(released))(result["rows"])
    assert {key: expected[key].tolist() for key in result["batch"]} == result["batch"]
    if lora:
        assert result["lora_nonzero"] > 0, "LoRA B matrices start at zero: training must move them"
        assert result["changed"] == [], "LoRA leaves every saved weight of the base model as it was"
        assert "adapter_model.safetensors" in result["saved"]
    else:
        assert any(".projector." in name or name.startswith("projector") for name in result["changed"])
        assert any("language_model" in name for name in result["changed"])
        assert "model.safetensors" in result["saved"]


def test_readme_and_card_show_the_tested_snippet():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Fine-tune a released model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks == [finetune_snippet(README_REPO_ID)]
    assert "skip_prepare_dataset" in section and "data_collator" in section  # the documented TRL settings
    assert "REPO" in FINETUNE_SNIPPET


# ----- the collator and processor behaviours the snippet relies on, in process --------------------------------

MESSAGES = [
    {"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"}, {"type": "text", "text": "Function?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It binds ATP."}]},
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_protllm("llama")


def labelled_texts(processor, batch):
    return [processor.decode(row[row != -100]) for row in batch["labels"]]


def test_assistant_tokens_mask_labels_equal_the_training_collator_labels(tiny):
    """What the snippet's `collate` does, on rows of different lengths and a multi-turn chat: the processor's standard
    assistant mask labels exactly the tokens the training collator labels, and pads the same way."""
    _, processor = tiny
    follow_up = MESSAGES + [{"role": "user", "content": "And its location?"},
                            {"role": "assistant", "content": [{"type": "text", "text": "The nucleus."}]}]
    rows = [{"messages": MESSAGES}, {"messages": follow_up}]
    batch = processor.apply_chat_template([r["messages"] for r in rows], tokenize=True, return_dict=True,
                                          return_tensors="pt", return_assistant_tokens_mask=True, padding_side="right")
    batch["labels"] = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
    training = ProtLLMDataCollator(processor)(rows)
    assert batch.keys() == training.keys() and all(torch.equal(batch[k], training[k]) for k in batch)
    assert labelled_texts(processor, batch)[1] == "It binds ATP.<|im_end|>\nThe nucleus.<|im_end|>\n"


def test_prompt_completion_rows_learn_the_completion_only(tiny):
    _, processor = tiny
    rows = [
        {"messages": MESSAGES},
        {"prompt": MESSAGES[:1], "completion": MESSAGES[1:]},  # TRL's conversational prompt-completion
        {"prompt": MESSAGES + MESSAGES[:1], "completion": [{"role": "assistant", "content": "A kinase."}]},
        {"prompt": "Protein: <protein>\nFunction:", "completion": " An ATPase.", "proteins": ["MKTAYIAKQR"]},  # standard
    ]
    batch = ProtLLMDataCollator(processor)(rows)
    assert labelled_texts(processor, batch) == ["It binds ATP.<|im_end|>\n", "It binds ATP.<|im_end|>\n",
                                                "A kinase.<|im_end|>\n", " An ATPase.<|im_end|>"]
    assert batch["protein_input_ids"].shape[0] == 5  # one per conversation, two in the multi-turn prompt
    assert (batch["labels"][batch["input_ids"] == processor.protein_token_id] == -100).all()
    with pytest.raises(ValueError, match="expected `messages`, or `prompt` and `completion`"):
        ProtLLMDataCollator(processor)([{"text": "x"}])


def test_trl_dataset_preparation_tokenizes_through_the_processor(tiny):
    """TRL's default preparation called `apply_chat_template(..., chat_template=None, tools=None)`, which raised
    TypeError (template passed twice); it now gives the processor's own token ids, protein spans expanded."""
    from trl.data_utils import _tokenize

    _, processor = tiny
    prepared = _tokenize(processor, MESSAGES, chat_template=None, tools=None)
    direct = processor.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)
    assert list(prepared["input_ids"]) == direct["input_ids"][0]
    assert direct["input_ids"][0].count(processor.protein_token_id) == 22


STRUCTURED_TEMPLATE = (
    "{% for message in messages %}{% if add_system_prompt %}{{ 'SYS ' }}{% endif %}{{ message['role'] + ': ' }}"
    "{% for block in message['content'] %}{{ block['text'] }}{% endfor %}{{ '\\n' }}{% endfor %}"
)


def test_apply_chat_template_takes_a_template_for_structured_content(tiny):
    _, processor = tiny
    text = processor.apply_chat_template(MESSAGES, chat_template=STRUCTURED_TEMPLATE, add_system_prompt=True)
    assert text == "SYS user: <protein>Function?\nSYS assistant: It binds ATP.\n"
    batch = processor.apply_chat_template(MESSAGES, chat_template=STRUCTURED_TEMPLATE, tokenize=True, return_dict=True,
                                          return_tensors="pt", return_assistant_tokens_mask=True)
    assert processor.decode(batch["input_ids"][0][batch["assistant_masks"][0] == 1]) == "assistant: It binds ATP.\n"
    # The tokenizer's own (string) template still gets one string per message.
    assert "<|im_start|>user\n<protein>\nFunction?<|im_end|>" in processor.apply_chat_template(MESSAGES)
    assert not processor.template_reads_blocks(None) and processor.template_reads_blocks(STRUCTURED_TEMPLATE)


def test_processor_typed_kwargs_truncation_and_token_counts(tiny):
    _, processor = tiny
    out = processor(text=["a <protein> b", "c"], proteins=[["MKV"], None], text_kwargs={"padding_side": "right"},
                    pad_to_multiple_of=8)
    assert len(out["input_ids"][0]) == 8 and out["attention_mask"][1][-1] == 0
    full = processor(text="<protein> then a long tail of text", proteins=["MKV"])
    cut = processor(text="<protein> then a long tail of text", proteins=["MKV"], truncation=True, max_length=6)
    assert cut["input_ids"][0] == full["input_ids"][0][:6]
    with pytest.raises(ValueError, match="would cut a protein span"):
        processor(text="<protein>", proteins=["MKVLA"], truncation=True, max_length=4)
    counts = processor._get_num_multimodal_tokens(protein_lengths=[5, processor.max_protein_length + 10])
    assert counts.num_protein_tokens == [5, processor.max_protein_length]
    assert counts.num_protein_tokens[0] == processor(text="<protein>", proteins=["MKVLA"])["input_ids"][0].count(
        processor.protein_token_id)
