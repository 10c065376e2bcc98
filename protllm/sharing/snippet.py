"""The one copy of the usage snippet: every model card's "Use" section and README's "Use a released model" block.

`usage_snippet(repo_id)` fills in the repository; README holds `usage_snippet("org/name")` verbatim
(tests/test_sharing.py checks it and runs it in a fresh process against a saved folder).
"""

EXAMPLE_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDW"
README_REPO_ID = "org/name"

# REPO and SEQUENCE are placeholders (filled by `usage_snippet`).
USAGE_SNIPPET = '''from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

repo = "REPO"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

# Chat with protein content blocks; a block may also carry "structure": "model.pdb" (PDB/mmCIF) and "chain": "A".
sequence = "SEQUENCE"
messages = [{"role": "user", "content": [
    {"type": "protein", "sequence": sequence},
    {"type": "text", "text": "What is the function of this protein?"},
]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print(answer)

# Keep chatting: earlier turns and their proteins stay in the prompt.
messages += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
             {"role": "user", "content": [{"type": "protein", "sequence": sequence[:80]},
                                          {"type": "text", "text": "And this fragment of it?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

# The same through a pipeline: a sequence, or {"sequence", "structure", "chain", "question"}, or a list of them.
pipe = pipeline("protein-function", model=repo, trust_remote_code=True)
for result in pipe([sequence, {"sequence": sequence[:80], "question": "Where is this protein located?"}],
                   batch_size=2, max_new_tokens=64):
    print(result[0]["generated_text"])
'''

# The adapter card's snippet: BASE (the base ProtLLM repository) and REPO (the adapter's) are placeholders.
ADAPTER_SNIPPET = '''from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor

base = AutoModelForCausalLM.from_pretrained("BASE", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "REPO").eval()  # LoRA + the trained projector
processor = AutoProcessor.from_pretrained("BASE", trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"},
                                         {"type": "text", "text": "What is the function of this protein?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
'''


def usage_snippet(repo_id: str) -> str:
    """The usage code for the model `repo_id` (a Hub id or a local folder)."""
    return USAGE_SNIPPET.replace("REPO", repo_id).replace("SEQUENCE", EXAMPLE_SEQUENCE)


def adapter_snippet(base_repo_id: str, repo_id: str) -> str:
    """The usage code for the LoRA adapter `repo_id` on its base ProtLLM `base_repo_id`."""
    return ADAPTER_SNIPPET.replace("BASE", base_repo_id).replace("REPO", repo_id)


# The fine-tune snippet: every model card's "Use" section and README's "Fine-tune a released model" block (REPO is a
# placeholder, filled by `finetune_snippet`). tests/test_finetune_released.py runs it verbatim in a fresh process
# against a saved folder, as written (full fine-tuning) and with `use_lora = True`.
FINETUNE_SNIPPET = '''from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoProcessor
from trl import SFTConfig, SFTTrainer

repo = "REPO"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

# Chat rows with protein content blocks (a block may also carry "structure": "model.pdb" and "chain": "A").
def row(sequence, question, answer):
    return {"messages": [
        {"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}

train_dataset = Dataset.from_list([
    row("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "What is the function of this protein?", "A transcriptional regulator."),
    row("MSLEQKKGADIISKILQIQNSIGKTTSPSTLKT", "Where is this protein located?", "In the cytoplasm."),
])

# Batches through the processor's chat template, proteins tokenized (and structures read) per batch; the loss
# covers the assistant answers only: the tokens the processor marks in `assistant_masks`, never a protein token.
def collate(rows):
    batch = processor.apply_chat_template([r["messages"] for r in rows], tokenize=True, return_dict=True,
                                          return_tensors="pt", return_assistant_tokens_mask=True, padding_side="right")
    batch["labels"] = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
    return batch

args = SFTConfig(
    output_dir="protllm-finetuned", max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4, logging_steps=1,
    use_cpu=True, bf16=False,  # on CPU; drop this line on a GPU
    # `collate` tokenizes the proteins per batch, so TRL's text-only dataset preparation is skipped and the
    # content-block column is kept.
    dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
)
use_lora = False  # True: train LoRA adapters on the LLM (and the projector in full) instead of every weight
peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], modules_to_save=["projector"],
                         task_type="CAUSAL_LM") if use_lora else None
trainer = SFTTrainer(
    model=model, args=args, train_dataset=train_dataset, processing_class=processor, peft_config=peft_config,
    data_collator=collate,
)
trainer.train()
trainer.save_model()
'''


def finetune_snippet(repo_id: str) -> str:
    """The fine-tuning code for the model `repo_id` (a Hub id or a local folder), with plain TRL."""
    return FINETUNE_SNIPPET.replace("REPO", repo_id)
