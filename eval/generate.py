"""Generation runner: batched, length-sorted, resumable predictions for any :class:`Predictor`.

A predictor is any object with ``predict(examples: list[dict]) -> list[str]`` (one answer per
example, same order) and, optionally, ``name`` and ``settings() -> dict``. :class:`ModelPredictor`
wraps a ProtLLM model folder (``AutoProcessor`` + ``AutoModelForCausalLM``, ``trust_remote_code``),
baselines live in :mod:`eval.baselines`.

:func:`run_generation` writes one JSON line per example as soon as its batch is done (flush +
fsync), so a killed run loses at most one batch; a rerun reads the file, drops a torn last line,
skips ids already present and never writes an id twice. The exact settings are saved next to the
predictions (``<predictions>.settings.json``); resuming with different settings is refused.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

from .data import example_length


@runtime_checkable
class Predictor(Protocol):
    def predict(self, examples: list[dict]) -> list[str]: ...


def predictor_name(p) -> str:
    return getattr(p, "name", None) or type(p).__name__


def predictor_settings(p) -> dict:
    s = p.settings() if hasattr(p, "settings") else {}
    return {"predictor": predictor_name(p), **s}


def read_predictions(path) -> tuple[dict[str, str], dict]:
    """``{id: prediction}`` from a predictions JSONL; torn/invalid lines and duplicates are counted
    (first occurrence wins)."""
    preds: dict[str, str] = {}
    info = {"invalid_lines": 0, "duplicate_ids": 0}
    p = Path(path)
    if not p.exists():
        return preds, info
    with open(p) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key = str(obj["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                info["invalid_lines"] += 1
                continue
            if key in preds:
                info["duplicate_ids"] += 1
                continue
            pred = obj.get("prediction")
            preds[key] = "" if pred is None else str(pred)
    return preds, info


def _repair(path: Path) -> None:
    """Rewrite the file keeping only complete, valid, first-seen lines (after a kill mid-write)."""
    if not path.exists():
        return
    good, seen, changed = [], set(), False
    with open(path) as fh:
        for line in fh:
            try:
                obj = json.loads(line)
                key = str(obj["id"])
                ok = line.endswith("\n") and key not in seen
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if ok:
                seen.add(key)
                good.append(line)
            else:
                changed = changed or bool(line.strip()) or not line.endswith("\n")
    if changed:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(good)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def model_fingerprint_of(settings: dict) -> str | None:
    """The model fingerprint in a predictor's settings: its own, or its wrapped predictor's (a control such as the
    shuffled-protein one records the model's settings under `inner`); None for a predictor without a model."""
    while isinstance(settings, dict):
        if "model_fingerprint" in settings:
            return settings["model_fingerprint"]
        settings = settings.get("inner")
    return None


def run_generation(
    predictor,
    examples: list[dict],
    out_path,
    batch_size: int = 8,
    progress: bool = True,
    settings: dict | None = None,
    allow_settings_change: bool = False,
) -> dict[str, str]:
    """Predict every example not yet in ``out_path``; return ``{id: prediction}`` for all examples.

    Examples are sorted by :func:`eval.data.example_length` (longest first: memory errors show up
    in the first batch, and batches hold similar lengths so little padding is wasted).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {**predictor_settings(predictor), **(settings or {}), "batch_size": batch_size}
    settings_path = out_path.with_name(out_path.name + ".settings.json")
    if settings_path.exists() and out_path.exists() and out_path.stat().st_size > 0:
        old = json.loads(settings_path.read_text())
        if model_fingerprint_of(settings) is not None and model_fingerprint_of(old) != model_fingerprint_of(settings):
            # Another model (retrained into the same folder): its predictions are stale, not resumable.
            stale = out_path.with_name(out_path.name + ".stale")
            os.replace(out_path, stale)
            print(f"{out_path}: written by another model (weights or config changed since); predicting again "
                  f"(old predictions kept in {stale})", file=sys.stderr)
            old = settings
        diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings)
                if k not in ("batch_size",) and old.get(k) != settings.get(k)}
        if diff and not allow_settings_change:
            raise ValueError(
                f"{out_path} was produced with other settings {diff}; use a new output directory "
                "or delete the file to start over"
            )
    settings_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    _repair(out_path)
    done, _ = read_predictions(out_path)
    todo = [ex for ex in examples if ex["id"] not in done]
    # de-duplicate ids within this call
    seen, uniq = set(done), []
    for ex in todo:
        if ex["id"] not in seen:
            seen.add(ex["id"])
            uniq.append(ex)
    todo = sorted(uniq, key=example_length, reverse=True)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"predict {predictor_name(predictor)}", unit="ex", file=sys.stderr,
                   initial=0)
    with open(out_path, "a") as fh:
        for i in range(0, len(todo), max(1, batch_size)):
            batch = todo[i : i + batch_size]
            answers = list(predictor.predict(batch))
            if len(answers) != len(batch):
                raise RuntimeError(f"predictor returned {len(answers)} answers for {len(batch)} examples")
            for ex, ans in zip(batch, answers):
                fh.write(json.dumps({"id": ex["id"], "prediction": "" if ans is None else str(ans)}) + "\n")
                done[ex["id"]] = "" if ans is None else str(ans)
            fh.flush()
            os.fsync(fh.fileno())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return {ex["id"]: done.get(ex["id"], "") for ex in examples}


class FilePredictor:
    """Predictions read from an existing JSONL (``{"id", "prediction"}``): score external outputs.
    Ids missing from the file answer ``""`` (scored wrong, counted as ``missing_predictions``)."""

    def __init__(self, path):
        self.path = str(path)
        self.name = Path(path).stem
        self.preds, self.info = read_predictions(path)
        self.missing = 0

    def predict(self, examples):
        out = []
        for ex in examples:
            if ex["id"] not in self.preds:
                self.missing += 1
            out.append(self.preds.get(ex["id"], ""))
        return out

    def settings(self):
        return {"file": self.path}

    def extra_ids(self, examples) -> int:
        ids = {ex["id"] for ex in examples}
        return sum(1 for k in self.preds if k not in ids)


def build_messages(ex: dict, no_neighbours: bool = False) -> list[dict]:
    """Chat messages of the model folder contract for one example.

    `no_neighbours=True` puts an empty neighbours block after each protein: the prompt says that no similar protein
    is known (what a retrieval model saw in training for proteins without neighbours), so the answer rests on the
    protein tokens alone.
    """
    content = []
    for p in ex.get("proteins") or []:
        block = {"type": "protein", "sequence": p.get("sequence") or ""}
        if p.get("structure"):
            block["structure"] = p["structure"]
        content.append(block)
        if no_neighbours:
            content.append({"type": "neighbours", "neighbours": []})
    content.append({"type": "text", "text": ex.get("question") or ""})
    return [{"role": "user", "content": content}]


class ModelPredictor:
    """A ProtLLM model folder used through the processor's chat template and ``model.generate``.

    Greedy by default; ``do_sample=True`` seeds torch (``seed``) before every batch so a rerun of
    the same batch gives the same text. KV cache on. Left padding (set on the tokenizer here too).
    """

    def __init__(self, model_dir, max_new_tokens: int = 128, do_sample: bool = False, seed: int = 0,
                 temperature: float | None = None, top_p: float | None = None, num_beams: int = 1,
                 device: str | None = None, dtype: str | None = None, model=None, processor=None,
                 name: str | None = None, retrieval: bool = True):
        self.model_dir = str(model_dir)
        self.name = name or Path(self.model_dir.rstrip("/")).name or "model"
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.seed = seed
        self.temperature = temperature
        self.top_p = top_p
        self.num_beams = num_beams
        self.device = device
        self.dtype = dtype
        self._model, self._proc = model, processor
        if model is None or processor is None:
            from protllm.remote_code import check_auto_map

            # Before transformers reads the folder: trust_remote_code runs whatever its auto_map names.
            check_auto_map(self.model_dir)
        self.retrieval = retrieval
        self._fingerprint = None  # of the folder's weights and config, computed once (`settings`)
        self.cropped_proteins = 0  # proteins longer than the processor's max_protein_length, cropped by it

    def without_retrieval(self) -> "ModelPredictor":
        """The same model (shared weights) answering without its retrieval database, named `<name>+no_retrieval`."""
        twin = copy.copy(self)
        twin.retrieval = False
        twin.name = f"{self.name}+no_retrieval"
        return twin

    def _database(self):
        self._load()
        return getattr(self._proc, "retrieval_database", None)

    def _load(self):
        if self._model is not None and self._proc is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        kw = {"trust_remote_code": True}
        if self.dtype:
            kw["dtype"] = getattr(torch, self.dtype)
        self._proc = self._proc or AutoProcessor.from_pretrained(self.model_dir, trust_remote_code=True)
        self._model = self._model or AutoModelForCausalLM.from_pretrained(self.model_dir, **kw)
        self._model.to(device).eval()
        self.device = device

    def generation_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "use_cache": True,
              "num_beams": self.num_beams}
        if self.do_sample:
            if self.temperature is not None:
                kw["temperature"] = self.temperature
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        return kw

    def settings(self):
        database = self._database() if self.model_dir and Path(self.model_dir).is_dir() or self._proc is not None else None
        if self._fingerprint is None and Path(self.model_dir).is_dir():
            self._fingerprint = model_fingerprint(self.model_dir)
        return {"model_dir": self.model_dir, "model_fingerprint": self._fingerprint, **self.generation_kwargs(),
                "seed": self.seed if self.do_sample else None, "dtype": self.dtype, "padding_side": "left",
                "retrieval": bool(self.retrieval and database is not None),
                "retrieval_database_size": None if database is None else len(database),
                "retrieval_task_fields": self._task_fields() if self.retrieval else None}

    def _task_fields(self) -> dict:
        """`{task: field}` the model's database was trained with (questions of a task see carriers of that field)."""
        database = getattr(self._proc, "retrieval_database", None)
        return dict((database.config.get("task_fields") or {}) if database is not None else {})

    def predict(self, examples):
        """Answers for ``examples``; a batch that runs out of memory is split in halves and retried (an example
        that does not fit on its own still raises). Greedy answers do not depend on the batch (left padding)."""
        try:
            return self._predict_batch(examples)
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if len(examples) < 2 or not _is_out_of_memory(error):
                raise
        _free_accelerator_memory()
        half = len(examples) // 2
        return self.predict(examples[:half]) + self.predict(examples[half:])

    def _predict_batch(self, examples):
        import torch

        self._load()
        tok = getattr(self._proc, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        # Without retrieval, a model that has a database is told "none found" (as in training); one without sees no block.
        no_neighbours = not self.retrieval and getattr(self._proc, "retrieval_database", None) is not None
        msgs = [build_messages(ex, no_neighbours=no_neighbours) for ex in examples]
        from protllm.cropping import counted_crops
        from protllm.model_classes import messages_for

        msgs = [messages_for(self._proc, m) for m in msgs]  # a sequence model: structure files -> sequences
        # A model trained with task_fields is asked as it was trained: an EC question sees proteins with EC numbers.
        task_fields = self._task_fields() if self.retrieval else {}
        fields = [task_fields.get(ex.get("task")) for ex in examples]
        # Only when a field is asked: the processor of a folder saved before task_fields takes no `retrieval_field`.
        field_kwargs = {"retrieval_field": fields} if any(fields) else {}
        with counted_crops() as crops:  # one line for cropped proteins, not one per protein
            inputs = self._proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                    return_tensors="pt", padding=True, **field_kwargs)
        if crops and not self.cropped_proteins:
            print(f"{self.name}: proteins longer than max_protein_length={getattr(self._proc, 'max_protein_length', '?')} "
                  "are cropped to it (counted, not listed)", file=sys.stderr)
        self.cropped_proteins += len(crops)
        dev = getattr(self._model, "device", self.device)
        inputs = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if self.do_sample:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            out = self._model.generate(**inputs, **self.generation_kwargs())
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self._proc.batch_decode(new, skip_special_tokens=True)]


FINGERPRINT_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json")


def model_fingerprint(model_dir) -> str:
    """sha256 over a model folder's config and weight files (names and contents): the resume key of its predictions.

    Retraining into the same folder (another seed, more steps) changes it, so predictions of the previous model are
    never reused for the new one. Hashing reads every weight byte once (about a second per GB).
    """
    import hashlib

    digest = hashlib.sha256()
    folder = Path(model_dir)
    files = sorted({path for pattern in FINGERPRINT_FILES for path in folder.glob(pattern) if path.is_file()})
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
