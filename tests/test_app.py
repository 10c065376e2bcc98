"""The web demo (app.py) as its users meet it: a served app, called through gradio_client, plain HTTP and a browser.

One app process serves the whole module (a tiny random ProtLLM saved as a model folder, started exactly as the README
says: `python app.py --model DIR --port P`). Every answer is checked against `generate` called directly on the same
folder, loaded the documented way (Auto classes, trust_remote_code), one conversation at a time.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

MAX_NEW_TOKENS = 8
STARTUP_TIMEOUT_S = 240
SEQUENCES = [
    "MKTAYIAKQRQISFVKSHFSRQ",
    "MSDNELKSLLEQAGVTSPEVAAAALTALKA",
    "MGSSHHHHHHSSGLVPRGSH",
    "MALWMRLLPLLALLALWGPDPAAAFVNQHLCGSHLVEALYLVCGERGFFYTPKT",
    "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG",
    "MEEPQSDPSVEPPLSQETFSDLWKLL",
    "MTEYKLVVVGAGGVGKSALTIQLIQNHFV",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF",
]
NAME_QUESTION = "What is the name of this protein?"
CSA_STRUCTURE = "structures/csa_enzymes/1A05.pdb.gz"  # chains A and B


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chain_sequence(path, chain: str) -> str:
    """The residues of `chain` in a structure file: what the app's sequence model is asked about after an upload (its
    processor reads sequences only; the structure's coordinates reach only a model that reads structures)."""
    from structure_protllm import load_structure

    return load_structure(str(path), chain=chain).sequence


def _protein_chat(protein: dict, question: str, earlier_turns=()) -> list[dict]:
    """The documented chat format (README "Use a released model"): the protein goes with the first user turn.

    `earlier_turns`: texts of the turns before `question`, alternating user and assistant.
    """
    texts = [*earlier_turns, question]
    messages = [{"role": "assistant" if i % 2 else "user", "content": [{"type": "text", "text": text}]}
                for i, text in enumerate(texts)]
    messages[0]["content"].insert(0, {"type": "protein", **protein})
    return messages


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm

    model, processor = build_tiny_protllm("llama", seed=0)
    return save_model_folder(model, processor, tmp_path_factory.mktemp("app") / "model")


@pytest.fixture(scope="module")
def direct(model_dir):
    """`answer(conversation) -> str`: greedy generate on one conversation, as a user of the folder would call it."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()

    def answer(conversation):
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    return answer


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Base URL of `python app.py --model DIR --port P` running in a subprocess on a free loopback port."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app_log") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio_tmp")), PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "app.py"), "--model", str(model_dir), "--port", str(port),
             "--max-new-tokens", str(MAX_NEW_TOKENS)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode} before serving:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not serve within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def _http_answer(url: str, data: list) -> list:
    """Call /answer over plain HTTP: POST the inputs, then read the result from the event stream."""
    request = urllib.request.Request(url + "gradio_api/call/answer", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/answer/{event_id}", timeout=120) as response:
        event = None
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                assert event == "complete", f"/answer failed: {line}"
                return json.loads(line.split(":", 1)[1])
    raise AssertionError("the event stream ended without a result")


# ----- unit: input parsing (no server) ------------------------------------------------------------------------


def test_fasta_and_raw_sequence_parse_alike():
    from app import InputProblem, parse_sequence_text

    assert parse_sequence_text(">sp|P69905|HBA_HUMAN Hemoglobin\nMVLSPADKTN\nVKAAWGKVGA\n") == "MVLSPADKTNVKAAWGKVGA"
    assert parse_sequence_text("  MVLSPADKTN VKAAWGKVGA ") == "MVLSPADKTN VKAAWGKVGA"  # white space goes in the processor
    assert parse_sequence_text("   ") is None
    with pytest.raises(InputProblem, match="2 records"):
        parse_sequence_text(">a\nMKT\n>b\nMKV\n")
    with pytest.raises(InputProblem, match="no residues"):
        parse_sequence_text(">only a header\n")


def test_preset_questions_are_training_instructions():
    """Each preset is worded as the instructions the demo model was trained on (data/builders.py)."""
    from app import PRESET_QUESTIONS
    from data.builders import TEMPLATES

    for task, name in [("function_text", "Function"), ("ec_number", "EC number"), ("reaction", "Reaction"),
                       ("protein_name", "Name")]:
        assert PRESET_QUESTIONS[name] in TEMPLATES[task]
    yes_no = next(q for n, q in PRESET_QUESTIONS.items() if n.startswith("Yes/no"))
    assert any(yes_no == t.format(label="a kinase") for t in TEMPLATES["yes_no"])


# ----- the served app -----------------------------------------------------------------------------------------


def test_answer_endpoint_matches_generate_through_client_and_http(server, client, direct):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/answer"]
    labels = [p["label"] for p in api["parameters"]]
    assert labels[:2] == ["Sequence", "Question"]
    assert all(p["parameter_has_default"] for p in api["parameters"][1:]), "only Sequence may be required"
    assert api["returns"][0]["label"] == "Answer"

    expected = [direct(_protein_chat({"sequence": s}, NAME_QUESTION)) for s in SEQUENCES[:3]]
    assert all(expected) and len(set(expected)) > 1, "the tiny model must give distinct non-empty answers to test"
    assert client.predict(SEQUENCES[0], NAME_QUESTION, api_name="/answer")[0] == expected[0]
    assert client.predict(sequence=SEQUENCES[1], question=NAME_QUESTION, api_name="/answer")[0] == expected[1]
    # FASTA input and lower case give the same protein.
    fasta = ">query\n" + SEQUENCES[2][:10].lower() + "\n" + SEQUENCES[2][10:] + "\n"
    # Plain HTTP takes every input in order (Gradio fills defaults only in its clients): file, chain, conversation.
    assert _http_answer(server, [fasta, NAME_QUESTION, None, None, []])[0] == expected[2]
    # The default question is the preset "Function" question.
    from app import DEFAULT_QUESTION

    assert client.predict(SEQUENCES[0], api_name="/answer")[0] == direct(_protein_chat({"sequence": SEQUENCES[0]}, DEFAULT_QUESTION))


def test_follow_up_question_keeps_the_conversation(client, direct):
    first, history, _, _ = client.predict(SEQUENCES[3], NAME_QUESTION, api_name="/answer")
    follow_up = "What is the EC number of this enzyme?"
    second, history, _, _ = client.predict(SEQUENCES[3], follow_up, None, None, history, api_name="/answer")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert second == direct(_protein_chat({"sequence": SEQUENCES[3]}, follow_up, earlier_turns=(NAME_QUESTION, first)))


def test_bad_input_is_named_and_the_app_keeps_serving(server, client, direct, tmp_path):
    from gradio_client import handle_file

    answer, history, status, _ = client.predict("MKTAYIAKJRQ", NAME_QUESTION, api_name="/answer")
    assert answer == "" and history == []
    assert "'J'" in status and "position 9" in status
    assert "position 3" in _http_answer(server, ["MK1TAY", NAME_QUESTION, None, None, []])[2]

    not_structure = tmp_path / "notes.pdb"
    not_structure.write_text("these are my notes, not atoms\n")
    status = client.predict("", NAME_QUESTION, handle_file(str(not_structure)), api_name="/answer")[2]
    assert "notes.pdb" in status and "no protein chain" in status

    assert "Give a protein" in client.predict("", NAME_QUESTION, api_name="/answer")[2]
    assert "Question" in client.predict(SEQUENCES[0], "  ", api_name="/answer")[2]
    # Still serving, and still right.
    assert client.predict(SEQUENCES[0], NAME_QUESTION, api_name="/answer")[0] == direct(_protein_chat({"sequence": SEQUENCES[0]}, NAME_QUESTION))


def test_structure_upload_with_chain_matches_generate(client, direct, shared_data):
    from gradio_client import handle_file

    path = shared_data / CSA_STRUCTURE
    for chain in ("A", "B"):
        answer, _, status, _ = client.predict("", NAME_QUESTION, handle_file(str(path)), chain, api_name="/answer")
        assert f"chain {chain} of 1A05.pdb.gz" in status
        assert answer == direct(_protein_chat({"sequence": _chain_sequence(path, chain)}, NAME_QUESTION))
    status = client.predict("", NAME_QUESTION, handle_file(str(path)), "Z", api_name="/answer")[2]
    assert "chain 'Z' not found" in status and "'A', 'B'" in status


def test_eight_concurrent_requests_are_batched_and_correct(client, direct):
    expected = [direct(_protein_chat({"sequence": s}, NAME_QUESTION)) for s in SEQUENCES]
    started = time.perf_counter()
    client.predict(SEQUENCES[0], NAME_QUESTION, api_name="/answer")
    one = time.perf_counter() - started

    started = time.perf_counter()
    jobs = [client.submit(s, NAME_QUESTION, api_name="/answer") for s in SEQUENCES]
    results = [job.result(timeout=120) for job in jobs]
    eight = time.perf_counter() - started
    assert [r[0] for r in results] == expected
    batch_sizes = [int(r[2].rsplit("batch of ", 1)[1].rstrip(").")) for r in results]
    print(f"\n/answer latency: 1 request {one:.2f} s; 8 concurrent requests {eight:.2f} s; batch sizes {batch_sizes}")
    assert max(batch_sizes) > 1, "the queue should gather concurrent requests into one generate call"

    # Threads with their own clients: several users at once.
    from gradio_client import Client

    def ask(sequence):
        return Client(client.src, verbose=False).predict(sequence, NAME_QUESTION, api_name="/answer")[0]

    with ThreadPoolExecutor(len(SEQUENCES)) as pool:
        assert list(pool.map(ask, SEQUENCES)) == expected


def test_browser_types_a_sequence_and_reads_the_answer(server, direct, shared_data):
    """Headless Chromium (Debian's package, driven by Playwright) uses the page as a person would."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "Chromium is not installed (scripts/setup.sh installs Debian's `chromium`)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    from app import DEFAULT_QUESTION

    expect.set_options(timeout=60_000)  # a loaded CI machine answers slowly; a hung app still fails the test
    screenshot = REPO_ROOT / "outputs" / "app_screenshot.png"
    screenshot.parent.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(server)
            page.get_by_label("Sequence", exact=True).fill(SEQUENCES[4])
            page.get_by_label("Question", exact=True).fill(NAME_QUESTION)
            page.get_by_role("button", name="Ask").click()
            expected = direct(_protein_chat({"sequence": SEQUENCES[4]}, NAME_QUESTION))
            expect(page.get_by_label("Answer", exact=True)).to_have_value(expected)
            expect(page.locator("#status")).to_contain_text(f"{len(SEQUENCES[4])} residues")
            page.screenshot(path=str(screenshot), full_page=True)

            # A bad residue: the page says which and where; the previous conversation is cleared.
            page.get_by_label("Sequence", exact=True).fill("MKTAYIAKQRQZZ9SF")
            page.get_by_role("button", name="Ask").click()
            expect(page.locator("#status")).to_contain_text("invalid residue '9' at position 14")
            expect(page.get_by_label("Answer", exact=True)).to_have_value("")

            # A structure upload fills the chain selector; the answer is about the chain picked there.
            page.get_by_label("Sequence", exact=True).fill("")
            structure = shared_data / CSA_STRUCTURE
            page.locator("input[type=file]").set_input_files(str(structure))
            expect(page.locator("#status")).to_contain_text("2 protein chain(s)")
            page.get_by_label("Chain", exact=True).click()
            page.get_by_role("option", name="B (").click()
            page.get_by_role("button", name="Ask").click()
            expect(page.locator("#status")).to_contain_text("from chain B of 1A05.pdb.gz")
            expected = direct(_protein_chat({"sequence": _chain_sequence(structure, "B")}, DEFAULT_QUESTION))
            expect(page.get_by_label("Answer", exact=True)).to_have_value(expected)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000


def test_neighbours_shown_when_the_model_has_a_retrieval_database(tmp_path):
    """In process (no server): the neighbours table lists what the database search returns, and the answer is the
    one the processor's own retrieval gives through generate."""
    from app import ProtLLMDemo
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm
    from retrieval_protllm import RetrievalDatabase

    pytest.importorskip("pyswrd")
    model, processor = build_tiny_protllm("llama", seed=0)
    database = RetrievalDatabase([
        {"id": "P1", "sequence": SEQUENCES[3], "annotations": {"protein_name": "Insulin-like protein"}},
        {"id": "P2", "sequence": SEQUENCES[4], "annotations": {"protein_name": "Ubiquitin", "ec_number": "none"}},
    ])
    processor.retrieval_database = database
    folder = save_model_folder(model, processor, tmp_path / "model")

    app = ProtLLMDemo(folder, max_new_tokens=MAX_NEW_TOKENS)
    assert app.retrieval_database is not None
    query = SEQUENCES[4][:60]
    answers, _, statuses, tables = app.answer([query, "MKTAYIAKQRQISFVKSHFSRQ"], [NAME_QUESTION] * 2, [None] * 2, [None] * 2, [[], []])
    hits = database.search([query])[0]
    assert hits and hits[0]["id"] == "P2"
    assert "| 1 | P2 |" in tables[0] and "Ubiquitin" in tables[0] and f"{100 * hits[0]['identity']:.0f}%" in tables[0]
    assert "Neighbours" in tables[1]  # searched too: a table or "none found"

    inputs = app.processor.apply_chat_template(_protein_chat({"sequence": query}, NAME_QUESTION),
                                               add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        output = app.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert answers[0] == app.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    # A model trained with task_fields: the EC preset sees the closest protein with an EC number (here by composition:
    # the insulin query's homolog P1 has none), the name preset its homolog, free text the closest protein.
    from app import PRESET_QUESTIONS, question_task

    app.retrieval_database.config.update(task_fields={"ec_number": "ec_number"}, fallback="composition")
    insulin = SEQUENCES[3][:60]
    _, _, _, tables = app.answer([insulin] * 3, [PRESET_QUESTIONS["EC number"], NAME_QUESTION, "What is it?"],
                                 [None] * 3, [None] * 3, [[], [], []])
    assert "| P2 |" in tables[0] and "P1" not in tables[0]
    assert "| 1 | P1 |" in tables[1] and "| 1 | P1 |" in tables[2]
    assert question_task(PRESET_QUESTIONS["Reaction"]) == "reaction" and question_task("What is it?") is None
    assert question_task("Is this protein  a toxin? Answer yes or no.") == "yes_no"
