"""DatasetDict assembly, atomic save, dataset card (huggingface_hub.DatasetCard) and push_to_hub."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import datasets
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

_BLOCK = {k: datasets.Value("string") for k in ("type", "text", "sequence", "structure", "chain")}

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "task": datasets.Value("string"),
    "source": datasets.Value("string"),
    "split": datasets.Value("string"),
    "messages": [{"role": datasets.Value("string"), "content": [_BLOCK]}],
    "proteins": [{"accession": datasets.Value("string"), "sequence": datasets.Value("string"),
                  "structure": datasets.Value("string")}],
    "answer": datasets.Value("string"),
    "meta": datasets.Value("string"),
})


def to_dataset_dict(records_by_split: dict[str, list[dict]]) -> datasets.DatasetDict:
    """Rows (see :func:`data.builders.make_record`) -> DatasetDict with one fixed schema."""
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(rows, features=FEATURES) for split, rows in records_by_split.items()
    })


def save_atomic(dd: datasets.DatasetDict, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None,
                _fail_after_write: bool = False, **save_kwargs) -> Path:
    """``save_to_disk`` into a temp dir next to ``out_dir``, add ``extra_files`` (name -> text), then rename.

    An existing ``out_dir`` is replaced only after the new one is complete; on any error the temp
    dir is removed and ``out_dir`` is left as it was (absent or the previous build).
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        dd.save_to_disk(str(tmp / "ds"), **save_kwargs)  # num_proc, max_shard_size
        final_tmp = tmp / "ds"
        for name, text in (extra_files or {}).items():
            (final_tmp / name).write_text(text)
        if _fail_after_write:
            raise RuntimeError("simulated failure before rename")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(final_tmp, out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and out.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out


def task_counts(dd: datasets.DatasetDict) -> dict[str, dict[str, int]]:
    out = {}
    for split, ds in dd.items():
        c: dict[str, int] = {}
        # column batches, not rows: a row-by-row walk of a 2M-row dataset took minutes
        for batch in ds.select_columns(["task"]).iter(batch_size=10_000):
            for t in batch["task"]:
                c[t] = c.get(t, 0) + 1
        out[split] = dict(sorted(c.items()))
    return out


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return name
    return "n>1M"


def make_card(
    dd: datasets.DatasetDict,
    *,
    pretty_name: str,
    sources: list[dict],
    split_method: str,
    mmseqs_version: str | None,
    summary: dict | None = None,
    identity: dict | None = None,
    command: str | None = None,
    licence: str = "cc-by-4.0",
    extra: str = "",
) -> DatasetCard:
    """Dataset card: YAML metadata + sources/licences, tasks and sizes, split method, build summary.

    ``sources``: ``[{"name", "version", "licence", "url"}]``.
    """
    n = sum(len(d) for d in dd.values())
    data = DatasetCardData(
        pretty_name=pretty_name, license=licence, language=["en"],
        task_categories=["text-generation", "question-answering"],
        tags=["protein", "biology", "instruction-tuning", "multimodal"],
        size_categories=[_size_category(n)],
    )
    counts = task_counts(dd)
    tasks = sorted({t for c in counts.values() for t in c})
    lines = [f"# {pretty_name}", "", "Protein instruction dataset built by ProtLLM's `data` package.", ""]
    lines += ["## Sources and licences", "", "| source | version | licence | url |", "|---|---|---|---|"]
    for s in sources:
        lines.append(f"| {s.get('name','')} | {s.get('version','')} | {s.get('licence','')} | {s.get('url','')} |")
    lines += ["", "## Tasks and sizes", "", "| split | " + " | ".join(tasks) + " | total |",
              "|---|" + "---|" * (len(tasks) + 1)]
    for split, c in counts.items():
        lines.append(f"| {split} | " + " | ".join(str(c.get(t, 0)) for t in tasks) + f" | {sum(c.values())} |")
    lines += ["", "## Split method", "", split_method, "", f"MMseqs2 version: {mmseqs_version or 'not used'}", ""]
    if identity:
        ident = {k: v for k, v in identity.items() if k != "per_protein"}
        lines += ["## Test-to-train sequence identity", "", "```json", json.dumps(ident, indent=1), "```", ""]
    if summary:
        lines += ["## Build summary (skipped / odd inputs, all counted)", "", "```json",
                  json.dumps(summary, indent=1, sort_keys=True), "```", ""]
    lines += ["## Row schema", "",
              "`id, task, source, split, messages (chat; user content = [protein block, text block]), "
              "proteins [{accession, sequence, structure}], answer, meta (JSON string)`.", ""]
    if command:
        lines += ["## How it was built", "", "```bash", command, "```", ""]
    if extra:
        lines += [extra, ""]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def push_to_hub(local_dir: str | os.PathLike, repo_id: str, private: bool = True, token: str | None = None,
                commit_message: str = "Upload dataset built with ProtLLM data") -> str:
    """Create the dataset repo (if needed) and upload a saved dataset folder (Arrow + README.md card)."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(local_dir), repo_id=repo_id, repo_type="dataset",
                      commit_message=commit_message)
    return repo_id
