"""ProtLLM in the browser: a Gradio app in the Hugging Face Spaces convention.

    python app.py --model outputs/demo/model --port 7860        # serves on http://127.0.0.1:7860
    PROTLLM_MODEL=org/name PORT=7860 python app.py               # the same, configured the way Spaces are

On a Space this file runs unchanged (`GRADIO_SERVER_NAME=0.0.0.0` makes it listen on every interface there). It needs
gradio, torch and transformers (+ the model's own optional dependencies): the model folder's remote code
(`trust_remote_code=True`) does the protein work. Uploaded structure files are read by this repository's
`structure_protllm.py` (with `structure_files_protllm.py` and `processing_protllm.py`, next to this file; gemmi or
biotite), because a sequence model's folder carries no structure reader; the processor gets the parsed structure.

What a user gets:
- a protein as a sequence (raw or one FASTA record) and/or an uploaded PDB/mmCIF file with a chain selector;
- preset questions per task (function, EC number, reaction, name, a yes/no template) or free text, and follow-up
  questions about the same protein (multi-turn chat: earlier turns stay in the prompt);
- the answer, decoded greedily, and, when the model folder has a retrieval database (`retrieval/`), the neighbours
  the model was shown (identity, E-value, annotations); a preset question is searched as the model was trained to
  be asked it (its `task_fields`: the EC preset among proteins with EC numbers);
- bad input (a residue outside the alphabet, a file that is not a structure, a chain that is not in the file) as a
  readable message naming the problem; the app keeps serving.

Several users: the model loads once; Gradio's queue gathers up to 8 waiting requests into one batch, answered by one
left-padded greedy `generate` call, so a batched answer equals the one-at-a-time answer.

API: the named endpoint `/answer` takes `Sequence` and `Question` (and optionally `Structure file`, `Chain`,
`Conversation`) and returns the answer text first, then the conversation, a status message (the input error, if
any) and the neighbours table:

    from gradio_client import Client
    answer, *_ = Client("http://127.0.0.1:7860/").predict("MKTAYIAKQR...", "What is the name of this protein?",
                                                          api_name="/answer")
"""

import argparse
import os
import re
import time

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

import structure_protllm  # the repository's structure reader (next to this file): every model folder takes its output

DEFAULT_MODEL = "outputs/demo/model"
MAX_BATCH_SIZE = 8

# One preset per task the demo model is trained on; each is one of the training instruction templates
# (data/builders.py TEMPLATES), so the model sees the wording it learned.
PRESET_QUESTIONS = {
    "Function": "Describe the function of this protein.",
    "EC number": "What is the EC number of this enzyme?",
    "Reaction": "What reaction does this enzyme catalyse?",
    "Name": "What is the name of this protein?",
    "Yes/no (edit the property)": "Is this protein a kinase? Answer yes or no.",
}
DEFAULT_QUESTION = PRESET_QUESTIONS["Function"]
# The task of each preset: a model trained with `task_fields` shows its question the closest proteins carrying that
# task's field (an EC question: proteins with EC numbers). Free text gets the closest proteins, whatever they carry.
PRESET_TASKS = {"Function": "function_text", "EC number": "ec_number", "Reaction": "reaction", "Name": "protein_name"}
YES_NO_QUESTION = re.compile(r"^Is this protein .+\? Answer yes or no\.$")
STRUCTURE_FILE_TYPES = [".pdb", ".ent", ".cif", ".mmcif", ".bcif", ".gz"]
EXAMPLE_SEQUENCE = (
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSP"
)
_PROTEIN_PREFIX = re.compile(r"^protein \d+: ")


class InputProblem(ValueError):
    """Input the app cannot answer; the message is shown to the user as is."""


def parse_sequence_text(text: str | None) -> str | None:
    """Raw sequence or one FASTA record -> the residue string (white space kept; the processor removes it).

    Returns None for empty input. Several FASTA records are an error: the app answers about one protein.
    """
    if text is None or not text.strip():
        return None
    lines = text.strip().splitlines()
    headers = [line for line in lines if line.lstrip().startswith(">")]
    if len(headers) > 1:
        raise InputProblem(f"Sequence: the FASTA text holds {len(headers)} records; paste one protein")
    if headers and not lines[0].lstrip().startswith(">"):
        raise InputProblem("Sequence: text before the FASTA header '>'; paste one record or the bare sequence")
    residues = "".join(line for line in lines if not line.lstrip().startswith(">"))
    if not residues.strip():
        raise InputProblem("Sequence: the FASTA record has a header but no residues")
    return residues


def message_text(content) -> str:
    """Text of a chat message content as Gradio hands it over (a string, a text block, or a list of them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    return "\n".join(message_text(part) for part in content)


def neighbours_markdown(neighbours: list[dict] | None) -> str:
    """Markdown table of retrieved neighbours (`{"id", "identity", "evalue", "annotations"}` dicts, best first)."""
    if neighbours is None:
        return ""
    if not neighbours:
        return "**Neighbours in the retrieval database:** none found (the model was told so)."
    rows = ["**Neighbours in the retrieval database** (shown to the model in its prompt):", "",
            "| # | id | identity | E-value | annotations |", "|---|---|---|---|---|"]
    for rank, neighbour in enumerate(neighbours, start=1):
        identity = neighbour.get("identity")
        evalue = neighbour.get("evalue")
        annotations = "; ".join(
            f"{field}: {' '.join(str(text).split())}" for field, text in (neighbour.get("annotations") or {}).items()
        )
        rows.append(
            f"| {rank} | {neighbour.get('id', '')} | {'' if identity is None else f'{100 * float(identity):.0f}%'} "
            f"| {'' if evalue is None else f'{float(evalue):.1e}'} | {annotations.replace('|', '/')} |"
        )
    return "\n".join(rows)


class ProtLLMDemo:
    """The loaded model and processor, and the batched answer function behind the `/answer` endpoint."""

    def __init__(self, model_name_or_path: str, max_new_tokens: int = 128, device: str | None = None):
        self.model_name_or_path = str(model_name_or_path)
        self.max_new_tokens = max_new_tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(self.model_name_or_path, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name_or_path, trust_remote_code=True)
        self.model.to(self.device).eval()
        # Batched greedy generation needs left padding (the answer starts right after each prompt).
        self.processor.tokenizer.padding_side = "left"

    @property
    def retrieval_database(self):
        """The model folder's retrieval database (`retrieval/`), or None (older processors have no attribute)."""
        return getattr(self.processor, "retrieval_database", None)

    # ----- inputs ----------------------------------------------------------------------------------------

    def structure_chains(self, path: str) -> dict[str, str]:
        """Chain id -> sequence of every protein chain of an uploaded file; InputProblem when it is not a structure."""
        try:
            return structure_protllm.parse_structure_chains(path)
        except (ValueError, OSError) as error:
            raise InputProblem(f"Structure file: {error}") from error

    def protein_block(self, sequence_text, structure_path, chain) -> tuple[dict, str]:
        """User input -> (a protein content block with the checked sequence, a one-line description of the protein).

        Validation runs here, one request at a time, so a bad input fails its own request and not the batch.
        """
        sequence = parse_sequence_text(sequence_text)
        structure_path = getattr(structure_path, "path", structure_path) or None  # gradio.FileData or a path
        if sequence is None and structure_path is None:
            raise InputProblem("Give a protein: paste a sequence (raw or FASTA) or upload a PDB/mmCIF file")
        where = "Sequence" if structure_path is None else "Structure file" if sequence is None else "Sequence and structure"
        spec = {"sequence": sequence} if sequence is not None else {}
        try:
            if structure_path is not None:
                # Read here, not by the processor: a sequence model's processor reads no structure file, but every
                # processor takes a parsed structure (its coordinates reach a model that reads structures).
                spec = {"structure": structure_protllm.load_structure(str(structure_path), chain=chain or None, sequence=sequence)}
            prepared = self.processor.prepare_protein(spec, 0)
        except ValueError as error:
            raise InputProblem(f"{where}: {_PROTEIN_PREFIX.sub('', str(error))}") from error
        except ImportError as error:  # a structure library (gemmi, biotite, mini3di) is not installed
            raise InputProblem(f"Structure file: {error}") from error
        block = {"type": "protein", "sequence": prepared["sequence"]}
        description = f"{len(prepared['sequence'])} residues"
        if prepared["structure"] is not None:
            # The parsed structure object, so the file is read once; the processor takes it as is.
            block["structure"] = prepared["structure"]
            description += f" from chain {prepared['structure'].chain_id} of {os.path.basename(str(structure_path))}"
        return block, description

    @staticmethod
    def conversation(protein: dict, history, question: str) -> list[dict]:
        """Chat messages for the model: the protein goes with the first user turn, earlier turns follow as text."""
        turns = [(m["role"], message_text(m.get("content"))) for m in (history or []) if m.get("role") in ("user", "assistant")]
        turns.append(("user", question))
        messages, protein_placed = [], False
        for role, text in turns:
            content = [{"type": "text", "text": text}]
            if role == "user" and not protein_placed:
                content.insert(0, protein)
                protein_placed = True
            messages.append({"role": role, "content": content})
        return messages

    # ----- answering -------------------------------------------------------------------------------------

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy answers to `B` conversations in one left-padded generate call."""
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            padding=True, padding_side="left",
        )
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    def answer(self, sequence: list, question: list, structure_file: list | None = None, chain: list | None = None,
               conversation: list | None = None):
        """Gradio batch function: each argument is a list with one entry per queued request (at most 8).

        Returns one list per output: answers, conversations (chat history with the new turn), status messages,
        neighbour tables. The None defaults only tell API clients that these inputs are optional.
        """
        size = len(sequence)
        structure_file, chain, conversation = (value or [None] * size for value in (structure_file, chain, conversation))
        answers, histories, statuses, tables = [""] * size, [list(h or []) for h in conversation], [""] * size, [""] * size
        valid, conversations, descriptions = [], [], []
        for i in range(size):
            try:
                ask = (question[i] or "").strip()
                if not ask:
                    raise InputProblem("Question: empty; pick a preset question or type one")
                block, description = self.protein_block(sequence[i], structure_file[i], chain[i])
            except InputProblem as problem:
                statuses[i] = f"**Input error.** {problem}"
                continue
            valid.append(i)
            conversations.append(self.conversation(block, histories[i], ask))
            descriptions.append(description)
        if not valid:
            return answers, histories, statuses, tables
        neighbours = [None] * len(valid)
        database = self.retrieval_database
        if database is not None and hasattr(database, "augment"):
            # Search once here so the page shows exactly the neighbours the prompt holds (the processor keeps
            # messages that already carry a neighbours block).
            fields = [database.field_for_task(question_task(question[i])) if hasattr(database, "field_for_task") else None
                      for i in valid]
            # Only when a field is asked: the database class of a folder saved before task_fields takes no `field`.
            conversations = database.augment(conversations, field=fields) if any(fields) else database.augment(conversations)
            neighbours = [_first_neighbours(messages) for messages in conversations]
        started = time.perf_counter()
        generated = self.generate(conversations)
        seconds = time.perf_counter() - started
        for j, i in enumerate(valid):
            answers[i] = generated[j]
            question_text = question[i].strip()
            histories[i] = histories[i] + [{"role": "user", "content": question_text},
                                           {"role": "assistant", "content": generated[j]}]
            statuses[i] = f"Protein: {descriptions[j]}. Answered in {seconds:.1f} s (batch of {len(valid)})."
            tables[i] = neighbours_markdown(neighbours[j])
        return answers, histories, statuses, tables

    def list_chains(self, structure_file):
        """On upload: fill the chain selector with the file's protein chains, or say why the file is unusable."""
        path = getattr(structure_file, "path", structure_file)
        if not path:
            return gr.update(choices=[], value=None), ""
        try:
            chains = self.structure_chains(path)
        except InputProblem as problem:
            return gr.update(choices=[], value=None), f"**Input error.** {problem}"
        choices = [(f"{chain} ({len(seq)} residues)", chain) for chain, seq in chains.items()]
        first = next(iter(chains))
        return (gr.update(choices=choices, value=first),
                f"{os.path.basename(path)}: {len(chains)} protein chain(s); answering about chain {first}.")


def question_task(question: str) -> str | None:
    """The task a preset question (or the yes/no template with another property) asks; None for free text."""
    text = " ".join(str(question).split())
    for name, preset in PRESET_QUESTIONS.items():
        if text == preset and name in PRESET_TASKS:
            return PRESET_TASKS[name]
    return "yes_no" if YES_NO_QUESTION.match(text) else None


def _first_neighbours(messages: list[dict]) -> list[dict] | None:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "neighbours":
                    return list(block.get("neighbours") or [])
    return None


def build_app(demo_model: ProtLLMDemo) -> gr.Blocks:
    """The page: protein and question on the left, answer, conversation and neighbours on the right."""
    with gr.Blocks(title="ProtLLM") as app:
        gr.Markdown(
            "# ProtLLM\nAsk about a protein: paste its sequence (raw or FASTA) or upload a structure, pick a question "
            f"or write your own, then keep asking about the same protein. Model: `{demo_model.model_name_or_path}`; "
            "answers are decoded greedily."
        )
        with gr.Row():
            with gr.Column():
                sequence = gr.Textbox(label="Sequence", lines=5, placeholder=">name\nMKTAYIAKQR... (raw or one FASTA record)")
                with gr.Row():
                    structure_file = gr.File(label="Structure file", file_types=STRUCTURE_FILE_TYPES, type="filepath")
                    chain = gr.Dropdown(label="Chain", choices=[], value=None, allow_custom_value=True,
                                        info="with a structure file; empty: the chain matching the sequence, else the first")
                preset = gr.Dropdown(label="Preset question", choices=list(PRESET_QUESTIONS), value="Function")
                question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, lines=2)
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary")
                    clear = gr.Button("New conversation")
                gr.Examples([[EXAMPLE_SEQUENCE]], inputs=[sequence], label="Example sequence")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=3, interactive=False)
                status = gr.Markdown(label="Status", elem_id="status")
                chat = gr.Chatbot(label="Conversation", height=300)
                neighbours = gr.Markdown(label="Neighbours", elem_id="neighbours")

        preset.change(lambda name: PRESET_QUESTIONS.get(name, DEFAULT_QUESTION), preset, question, queue=False,
                      api_visibility="private")
        structure_file.change(demo_model.list_chains, structure_file, [chain, status], api_visibility="private")
        # A new protein starts a new conversation: the chat is about one protein. Cleared in the browser (js, no
        # server round trip) at the moment of the user's edit, so it can never land after a later answer.
        clear_outputs = "() => [[], '', '', '']"
        for trigger in (sequence.input, structure_file.upload, structure_file.clear, chain.input, clear.click):
            trigger(None, None, [chat, answer, status, neighbours], js=clear_outputs, api_visibility="private")
        gr.on(
            [ask.click, question.submit], demo_model.answer,
            inputs=[sequence, question, structure_file, chain, chat],
            outputs=[answer, chat, status, neighbours],
            batch=True, max_batch_size=MAX_BATCH_SIZE, api_name="answer",
        )
    return app


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("PROTLLM_MODEL", DEFAULT_MODEL),
                        help="model folder or Hub id (env PROTLLM_MODEL; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860),
                        help="port (env PORT; default 7860)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (env GRADIO_SERVER_NAME, which Spaces set to 0.0.0.0; default 127.0.0.1)")
    parser.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("PROTLLM_MAX_NEW_TOKENS", 128)))
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    demo_model = ProtLLMDemo(args.model, max_new_tokens=args.max_new_tokens, device=args.device)
    app = build_app(demo_model)
    # One batch at a time: the queue gathers concurrent requests while a generate call runs.
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
