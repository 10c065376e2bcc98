"""Retrieval for ProtLLM: a database of known proteins and their annotations, a homology search, and the prompt block.

A model folder may carry `retrieval/`; `ProtLLMProcessor.from_pretrained` loads it, and from then on every chat
that holds a protein gets, right after each protein block, a `{"type": "neighbours", ...}` block listing the
protein's nearest database proteins (identity, E-value, annotations). The protein tokens stay: retrieval adds text
to the prompt, it does not replace the encoder. A user who passes a neighbours block (their own neighbours, or
`{"type": "neighbours", "neighbours": []}` for none) is not overridden.

Folder format (`retrieval/`, no pickle anywhere):

    retrieval_config.json   {"format_version": 1, "k", "max_evalue", "max_annotation_chars", "tool", "size",
                             "sources", "training": {"max_identity", "exclusion"}, ...}
    database.jsonl          one protein per line: {"id", "sequence", "annotations": {field: text}, "cluster"?}

The model card describes the database for a reader (`protllm.sharing.card.retrieval_section`).

Search: SWORD heuristic filter + full Smith-Waterman (BLOSUM62, gap 10/1) through the pip package `pyswrd`, so
loading a model from the Hub needs no system binary. Neighbours are ranked by E-value; `identity` is the
identity over the aligned region (pyopal's `FullResult.identity()`), `coverage` the aligned fraction of the query.

Fallback (`"fallback": "composition"` in the config): a protein with no homolog (nothing at `max_evalue`) gets its
`k` nearest database proteins by amino-acid + dipeptide composition (cosine similarity of 420 frequencies),
marked `"method": "composition"` and rendered as such. Below the twilight zone of alignment, composition still
separates protein classes (membrane, ribosomal, secreted, disordered); on the demo's test proteins (<=30% identity
to training, most with no homolog) it raised copied-answer ROUGE-L on reactions from 0.199 to 0.273 (eval/README.md).

Per field (`"per_field": true`): the `k` closest proteins are found for each annotation field separately, among the
proteins that carry it (homology first, then the fallback), and each shows only that field; a protein chosen for two
fields is listed once with both. The question then always has a neighbour carrying its kind of answer: a database
that mixes sources (names from one, EC numbers from another) otherwise often offers a name to an EC question.

By question (`retrieval_field=` in `ProtLLMProcessor.apply_chat_template`, one field or one per conversation): the
`k` closest proteins among those carrying that field, each showing only it. `"task_fields": {task: field}` in the
config records which field each training task was given (`python -m eval` passes it per task), so a model trained that
way is asked the same way: an EC question sees the closest protein with an EC number, not the closest protein.
"""

import json
import os
from pathlib import Path

import numpy as np

try:
    import pyswrd
except ImportError:  # optional: only searching needs it, loading and rendering do not
    pyswrd = None

DATABASE_DIR = "retrieval"
DATABASE_FILE = "database.jsonl"
CONFIG_FILE = "retrieval_config.json"
FORMAT_VERSION = 1

# How each annotation field is labelled in the prompt, in the order shown (short fields first, so that a long
# function text cut at `max_annotation_chars` comes last); fields not listed follow under their own name.
FIELD_LABELS = {"protein_name": "name", "ec_number": "EC", "keywords": "keywords", "go": "GO", "reaction": "reaction",
                "function_text": "function"}
NO_NEIGHBOURS_TEXT = "Similar proteins in the database: none found."
FALLBACKS = (None, "composition")
COMPOSITION_TEXT = "no homolog, similar composition"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_AMINO_ACID_INDEX = {a: i for i, a in enumerate(AMINO_ACIDS)}


class RetrievalError(ValueError):
    """A retrieval database or neighbour list that cannot be used; the message names the entry or field."""


def _in_prompt_order(fields) -> list[str]:
    """`fields` in the order the prompt shows them: those of FIELD_LABELS first, in its order, then the rest."""
    return [field for field in FIELD_LABELS if field in fields] + [field for field in fields if field not in FIELD_LABELS]


def _format_neighbour(neighbour: dict, max_annotation_chars: int) -> str:
    # One line per neighbour, short fields first and no list numbers or E-values: a small LLM copies an EC number
    # or a name from this line, and "1." or "E=5e-14" next to it were copied into its answers.
    identity = neighbour.get("identity")
    if neighbour.get("method") == "composition":
        facts = [COMPOSITION_TEXT]
    else:
        facts = [f"{100 * float(identity):.0f}% identity" if identity is not None else "similar protein"]
    annotations = neighbour.get("annotations") or {}
    for field in _in_prompt_order(annotations):
        text = " ".join(str(annotations[field]).split())
        if not text:
            continue
        if len(text) > max_annotation_chars:
            text = text[: max_annotation_chars - 3].rstrip() + "..."
        facts.append(f"{FIELD_LABELS.get(field, field)}: {text}")
    return "- " + "; ".join(facts)


def render_neighbours(neighbours, max_annotation_chars: int = 160) -> str:
    """The text a neighbours block becomes in the prompt (one line per neighbour, best first).

    `neighbours`: a list of dicts with optional `identity` (0-1) and `annotations` ({field: text}); the E-value
    and score a search returns stay in the block, not in the text. An empty list renders as "none found": the
    model is told that nothing similar is known.
    """
    if not neighbours:
        return NO_NEIGHBOURS_TEXT
    if not isinstance(neighbours, (list, tuple)):
        raise RetrievalError(f"a neighbours block holds a list of neighbours, got {type(neighbours).__name__}")
    lines = ["Similar proteins in the database, closest first:"]
    for rank, neighbour in enumerate(neighbours, start=1):
        if not isinstance(neighbour, dict):
            raise RetrievalError(f"neighbour {rank}: expected a dict with identity/evalue/annotations, got {neighbour!r:.80}")
        lines.append(_format_neighbour(neighbour, max_annotation_chars))
    return "\n".join(lines)


def render_block(block: dict) -> str:
    """Text of a `{"type": "neighbours"}` content block: its `text` when given, else its rendered `neighbours`."""
    if block.get("text"):
        return block["text"]
    return render_neighbours(block.get("neighbours") or [])


def composition_profiles(sequences: list[str]) -> np.ndarray:
    """Unit-length amino-acid + dipeptide frequency vectors, `(N, 420)` float32 (letters outside the 20 are skipped)."""
    profiles = np.zeros((len(sequences), 420), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        ids = np.array([_AMINO_ACID_INDEX[a] for a in str(sequence).upper() if a in _AMINO_ACID_INDEX], dtype=np.int64)
        if len(ids):
            profiles[row, :20] = np.bincount(ids, minlength=20) / len(ids)
        if len(ids) > 1:
            profiles[row, 20:] = np.bincount(20 * ids[:-1] + ids[1:], minlength=400) / (len(ids) - 1)
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    return profiles / np.maximum(norms, 1e-12)


def merge_field_neighbours(per_field: list[list[list[dict]]], n_queries: int) -> list[list[dict]]:
    """Join per-field neighbour lists (`F` lists of `Q` lists) into `Q = n_queries` lists, field by field: a protein
    found for several fields appears once, where first found, with the annotations of all of them."""
    merged: list[list[dict]] = [[] for _ in range(n_queries)]
    for field_lists in per_field:
        for row, neighbours in zip(merged, field_lists):
            for neighbour in neighbours:
                known = next((n for n in row if n["id"] == neighbour["id"]), None)
                if known is None:
                    row.append({**neighbour, "annotations": dict(neighbour["annotations"])})
                else:
                    known["annotations"].update(neighbour["annotations"])
    return merged


class RetrievalDatabase:
    """Known proteins with annotations, searched by homology (and, optionally, by composition when none is found).

    Args:
        entries: dicts `{"id", "sequence", "annotations": {field: text}}` (+ optional `cluster`, `source`); ids unique.
        config: search and rendering settings (`k`, `max_evalue`, `max_annotation_chars`, `threads`, `fallback`,
            `per_field`, `task_fields`) and facts for the card (`sources`, `training`), saved to `retrieval_config.json`.
    """

    def __init__(self, entries: list[dict], config: dict | None = None):
        self.config = {"format_version": FORMAT_VERSION, "k": 3, "max_evalue": 0.01, "max_annotation_chars": 160,
                       "tool": "pyswrd (SWORD filter + Smith-Waterman, BLOSUM62, gap 10/1)", **(config or {})}
        seen = set()
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not entry.get("id") or not entry.get("sequence"):
                raise RetrievalError(f"database entry {index}: needs a non-empty `id` and `sequence`, got {entry!r:.120}")
            if entry["id"] in seen:
                raise RetrievalError(f"database entry {index}: duplicate id {entry['id']!r}")
            seen.add(entry["id"])
        if self.config.get("fallback") not in FALLBACKS:
            raise RetrievalError(f"retrieval config: fallback must be one of {FALLBACKS}, got {self.config['fallback']!r}")
        if not isinstance(self.config.get("per_field", False), bool):
            raise RetrievalError(f"retrieval config: per_field must be true or false, got {self.config['per_field']!r}")
        task_fields = self.config.get("task_fields") or {}
        if not isinstance(task_fields, dict) or not all(isinstance(t, str) and isinstance(f, str) for t, f in task_fields.items()):
            raise RetrievalError(f"retrieval config: task_fields must map task names to field names, got {task_fields!r}")
        self.entries = list(entries)
        self._targets = None
        self._profiles = None  # composition profiles of the entries, computed on the first fallback
        # Search results per (query, settings): an exhaustive Smith-Waterman search costs ~0.1-0.3 s of CPU per query
        # on a few thousand proteins, and evaluation asks again for the same proteins (the shuffled control).
        self._found: dict[tuple, list[dict]] = {}
        self._field_views: dict[str, "RetrievalDatabase"] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"RetrievalDatabase({len(self)} proteins, k={self.config['k']})"

    # ----- files -----------------------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write `retrieval_config.json` and `database.jsonl` into `directory` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / DATABASE_FILE, "w") as handle:
            for entry in self.entries:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
        config = {**self.config, "size": len(self), "fields": self.field_counts()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> "RetrievalDatabase":
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise RetrievalError(f"{directory / CONFIG_FILE}: format_version {config.get('format_version')!r}, "
                                 f"this code reads {FORMAT_VERSION}")
        entries = []
        with open(directory / DATABASE_FILE) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise RetrievalError(f"{directory / DATABASE_FILE} line {number}: {error}") from None
        config.pop("size", None)
        config.pop("fields", None)
        return cls(entries, config)

    @classmethod
    def from_pretrained(cls, name_or_path, **hub_kwargs) -> "RetrievalDatabase | None":
        """The database of a model folder or Hub repository, or None when it carries none."""
        local = Path(str(name_or_path)) / DATABASE_DIR
        if Path(str(name_or_path)).is_dir():
            return cls.load(local) if (local / CONFIG_FILE).is_file() else None
        from huggingface_hub import hf_hub_download

        keep = {k: hub_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in hub_kwargs}
        try:
            config_path = hf_hub_download(str(name_or_path), f"{DATABASE_DIR}/{CONFIG_FILE}", **keep)
            hf_hub_download(str(name_or_path), f"{DATABASE_DIR}/{DATABASE_FILE}", **keep)
        except Exception:  # the repository has no database (or cannot be reached): the model runs without retrieval
            return None
        return cls.load(Path(config_path).parent)

    def field_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            for field in entry.get("annotations") or {}:
                counts[field] = counts.get(field, 0) + 1
        return dict(sorted(counts.items()))

    # ----- search ----------------------------------------------------------------------------------------

    def field_views(self) -> dict[str, "RetrievalDatabase"]:
        """`{field: database of the proteins carrying it, each with that one annotation}`, in prompt order."""
        if self._field_views is None:
            config = {**self.config, "per_field": False}
            self._field_views = {
                field: RetrievalDatabase([{**entry, "annotations": {field: entry["annotations"][field]}}
                                          for entry in self.entries if field in (entry.get("annotations") or {})], config)
                for field in _in_prompt_order(self.field_counts())}
        return self._field_views

    def field_view(self, field: str) -> "RetrievalDatabase":
        """The proteins carrying `field`, each with that one annotation; an error names the fields there are."""
        views = self.field_views()
        if field not in views:
            raise RetrievalError(f"retrieval field {field!r}: no database protein carries it "
                                 f"(fields: {', '.join(views) or 'none'})")
        return views[field]

    def field_for_task(self, task: str | None) -> str | None:
        """The field whose carriers answer questions of `task` (config `task_fields`), or None: the closest overall."""
        return (self.config.get("task_fields") or {}).get(task)

    def find(self, sequences: list[str], k: int | None = None, field: str | None = None) -> list[list[dict]]:
        """What the prompt shows: `search`, then `composition_neighbours` for queries with no homolog when the config
        has `"fallback": "composition"`; with `"per_field": true`, that for each field's view (`field_views`), merged
        by `merge_field_neighbours`; with `field`, that in the view of `field` alone. Returns `Q` lists of neighbours
        (see `search` and `composition_neighbours`)."""
        if field is not None:
            return self.field_view(field).find(sequences, k=k)
        if self.config.get("per_field"):
            return merge_field_neighbours([view.find(sequences, k=k) for view in self.field_views().values()], len(sequences))
        found = self.search(sequences, k=k)
        if self.config.get("fallback") == "composition":
            empty = [i for i, neighbours in enumerate(found) if not neighbours]
            for i, neighbours in zip(empty, self.composition_neighbours([sequences[i] for i in empty], k=k)):
                found[i] = neighbours
        return found

    def composition_neighbours(self, sequences: list[str], k: int | None = None, exclude=None) -> list[list[dict]]:
        """Top-`k` database proteins by composition similarity (cosine of `composition_profiles`), best first.

        Args:
            sequences: `Q` protein sequences.
            exclude: optional, per query, a collection of database ids never returned.
        Returns: `Q` lists of `{"id", "method": "composition", "similarity", "annotations"}`.
        """
        k = self.config["k"] if k is None else k
        if not sequences or not self.entries or k <= 0:
            return [[] for _ in sequences]
        if self._profiles is None:
            self._profiles = composition_profiles([entry["sequence"] for entry in self.entries])
        similarity = composition_profiles(sequences) @ self._profiles.T  # (Q, N)
        index = {entry["id"]: i for i, entry in enumerate(self.entries)} if exclude is not None else {}
        results = []
        for q in range(len(sequences)):
            row = similarity[q]
            for excluded in (exclude[q] if exclude is not None else ()):
                if excluded in index:
                    row[index[excluded]] = -np.inf
            top = [int(i) for i in np.argsort(-row, kind="stable")[:k] if np.isfinite(row[i])]
            results.append([{"id": self.entries[i]["id"], "method": "composition", "similarity": round(float(row[i]), 4),
                             "annotations": dict(self.entries[i].get("annotations") or {})} for i in top])
        return results

    def search(self, sequences: list[str], k: int | None = None, threads: int | None = None) -> list[list[dict]]:
        """Top-`k` homologs of each query sequence (Smith-Waterman E-value <= `max_evalue`), best E-value first.

        Args:
            sequences: `Q` protein sequences.
        Returns: `Q` lists of `{"id", "identity", "evalue", "score", "coverage", "annotations"}`.
        """
        if pyswrd is None:
            raise ImportError("retrieval needs the `pyswrd` package (pip install pyswrd); or pass "
                              "retrieval=False / your own neighbours blocks")
        k = self.config["k"] if k is None else k
        results: list[list[dict]] = [[] for _ in sequences]
        if not sequences or not self.entries or k <= 0:
            return results
        if self._targets is None:
            self._targets = pyswrd.Sequences([entry["sequence"] for entry in self.entries])
        queries = [str(s).strip().upper() for s in sequences]
        keys = [(query, k, float(self.config["max_evalue"])) for query in queries]
        first_index: dict[tuple, int] = {}  # one search per distinct query, even when a batch repeats a protein
        for i, key in enumerate(keys):
            if key not in self._found:
                first_index.setdefault(key, i)
        todo = sorted(first_index.values(), key=lambda i: keys[i])
        if todo:
            threads = threads or int(self.config.get("threads") or os.environ.get("OMP_NUM_THREADS", 1) or 1)
            hits = pyswrd.search([queries[i] for i in todo], self._targets, max_alignments=k,
                                 max_evalue=float(self.config["max_evalue"]), threads=threads)
            found_todo: list[list[dict]] = [[] for _ in todo]
            for hit in hits:
                entry = self.entries[hit.target_index]
                found_todo[hit.query_index].append({
                    "id": entry["id"], "identity": float(hit.result.identity()), "evalue": float(hit.evalue),
                    "score": int(hit.score), "coverage": round(float(hit.result.coverage("query")), 3),
                    "annotations": dict(entry.get("annotations") or {})})
            for i, found in zip(todo, found_todo):
                found.sort(key=lambda n: (n["evalue"], -n["score"]))
                self._found[keys[i]] = found[:k]
        return [[{**n, "annotations": dict(n["annotations"])} for n in self._found[key]] for key in keys]

    # ----- prompts ---------------------------------------------------------------------------------------

    def neighbours_block(self, neighbours: list[dict]) -> dict:
        """A content block carrying `neighbours` and their rendered text (the text is what the model reads)."""
        return {"type": "neighbours", "neighbours": neighbours,
                "text": render_neighbours(neighbours, self.config["max_annotation_chars"])}

    def augment(self, conversations: list[list[dict]], field: str | list | None = None) -> list[list[dict]]:
        """Copies of `conversations` with a neighbours block after every protein block of a message that has none.

        `field`: None (the closest proteins), a field name, or one of these per conversation (see `find`). All proteins
        asking for one field are searched in one call. Messages with any neighbours block are left as given.
        """
        fields = list(field) if isinstance(field, (list, tuple)) else [field] * len(conversations)
        if len(fields) != len(conversations):
            raise RetrievalError(f"{len(fields)} retrieval fields for {len(conversations)} conversations")
        todo = []  # (conversation, message, block position, sequence)
        for c, messages in enumerate(conversations):
            for m, message in enumerate(messages):
                content = message.get("content")
                if isinstance(content, str) or not content:
                    continue
                if any(block.get("type") == "neighbours" for block in content):
                    continue
                for b, block in enumerate(content):
                    if block.get("type") == "protein" and block.get("sequence"):
                        todo.append((c, m, b, block["sequence"]))
        if not todo:
            return conversations
        found: list[list[dict]] = [[] for _ in todo]
        for asked in dict.fromkeys(fields[item[0]] for item in todo):
            rows = [i for i, item in enumerate(todo) if fields[item[0]] == asked]
            for i, neighbours in zip(rows, self.find([todo[i][3] for i in rows], field=asked)):
                found[i] = neighbours
        out = [[dict(message) for message in messages] for messages in conversations]
        inserts: dict[tuple[int, int], dict[int, dict]] = {}
        for (c, m, b, _), neighbours in zip(todo, found):
            inserts.setdefault((c, m), {})[b] = self.neighbours_block(neighbours)
        for (c, m), after in inserts.items():
            content = []
            for b, block in enumerate(out[c][m]["content"]):
                content.append(block)
                if b in after:
                    content.append(after[b])
            out[c][m]["content"] = content
        return out


__all__ = ["RetrievalDatabase", "RetrievalError", "render_neighbours", "render_block", "composition_profiles",
           "NO_NEIGHBOURS_TEXT", "DATABASE_DIR"]
