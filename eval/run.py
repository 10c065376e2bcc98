"""`run_evaluation`: evaluate predictors on a data file, write the report, return the metrics.

The function a script calls; `python -m eval` parses its flags into these arguments and calls it.

    from eval.run import run_evaluation
    metrics = run_evaluation("data/demo/test.jsonl", ["outputs/demo/model", "retrieval", "most_common"], "outputs/ev",
                             train="data/demo/train.jsonl", shuffled_proteins=True, no_retrieval=True)
    metrics["tasks"]["protein_name"]["predictors"]["model"]["metrics"]["rougeL"]   # {"value", "ci_low", "ci_high"}

Predictors: a model folder (ProtLLM contract: with its own retrieval database when the folder has `retrieval/`),
`most_common`, `retrieval` (MMseqs2 top-k neighbours in `train`, combined: eval.baselines.Retrieval),
`retrieval_top1` (the top hit's answer), either with `_composition` (a no-hit copies the answer of the training protein
closest in composition instead of the most common one) or `file:PRED.jsonl`.

`split="temporal"`: the EC number and reaction tasks are evaluated on the temporal test set (New-392: Swiss-Prot
entries newer than CLEAN split10's release) with CLEAN split10 as training / retrieval database, whatever `data`
and `train` hold for them; other tasks use `data` / `train` as given. The split used is in `metrics.json`
(`header.split`, `tasks.<task>.split`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RETRIEVAL_PREDICTORS = ("retrieval", "retrieval_top1", "retrieval_composition", "retrieval_top1_composition")
TEMPORAL_TASKS = ("ec_number", "reaction")
TEMPORAL_SPLIT = ("temporal: New-392 (Swiss-Prot entries newer than the CLEAN split10 release) as test, "
                  "CLEAN split10 as train / retrieval database")


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _check_examples(examples: list[dict], path, on_bad_rows: str, stats: dict, notes: list[str], what: str = "--data"):
    """Every example whose protein cannot be read (empty, invalid residue...), named by id and file line: stop before
    any predictor runs (BadRowsError, a ValueError) or skip them, counted in `stats["bad_rows"]` and a note."""
    import json

    from data.readers import open_text
    from data.validation import BadRow, apply_policy, find_bad_rows

    from .data import _row_id

    bad = find_bad_rows(examples, ids=[ex["id"] for ex in examples])
    if not bad:
        return examples
    lines: dict[str, int] = {}
    if Path(path).is_file():
        with open_text(path) as handle:
            index = 0
            for number, line in enumerate(handle, 1):
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    lines.setdefault(_row_id(row, index), number)
                    index += 1
    bad_rows = [BadRow(row.id, lines.get(row.id), row.reason) for _, row in bad]
    apply_policy(bad_rows, on_bad_rows, f"{path} ({what})")
    stats["bad_rows"] = stats.get("bad_rows", 0) + len(bad_rows)
    notes.append(f"{len(bad_rows)} bad rows of {what} skipped (--on_bad_rows skip): "
                 + "; ".join(str(row) for row in bad_rows[:10]) + (" ..." if len(bad_rows) > 10 else ""))
    skipped = {index for index, _ in bad}
    return [ex for index, ex in enumerate(examples) if index not in skipped]


def _first_sequence(ex):
    return ex["proteins"][0]["sequence"] if ex["proteins"] and ex["proteins"][0].get("sequence") else None


def _identity_bins(exs, train_examples, task, threads, sensitivity, retrieval_search) -> tuple[dict, str]:
    """({test id: max identity to any training protein of `task`, None when the search finds none}, the tool), by
    the retrieval baseline's search: MMseqs2 misses most homologs below 30% identity, which would put them in "no
    hit". Sequences are read as the baseline reads them (`baselines._first_seq`), so both ask for the same search."""
    from .baselines import _first_seq, _search, search_tool

    queries = {e["id"]: s for e in exs if (s := _first_seq(e))}
    targets = {e["id"]: s for e in train_examples if e["task"] == task and (s := _first_seq(e))}
    tool = search_tool(retrieval_search, len(targets))
    best: dict[str, float | None] = dict.fromkeys(queries)
    for hit in _search(queries, targets, threads, sensitivity, tool) if queries and targets else []:
        if hit["target"] != hit["query"] and (best[hit["query"]] is None or hit["identity"] > best[hit["query"]]):
            best[hit["query"]] = hit["identity"]
    return best, tool


def per_task_numbers(value, what: str, default):
    """`(default, {task: n})` from an int, a mapping `{"default": n, task: n}` or the CLI's `"32,yes_no=4"`: one
    number for every task, and the tasks that differ. `what` names the setting in errors (an unknown task, or a
    number that is not a positive integer, is refused by name); `default` applies when the value names none."""
    from .data import TASKS

    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        numbers: dict = {}
        for part in parts:
            key, _, number = part.rpartition("=")
            numbers[key or "default"] = number
        value = numbers
    if not isinstance(value, dict):
        value = {"default": value}
    out = {}
    for key, number in value.items():
        if key != "default" and key not in TASKS:
            raise ValueError(f"{what}: unknown task {key!r} (tasks: {', '.join(TASKS)})")
        try:
            whole = int(number)
        except (TypeError, ValueError):
            whole = 0
        if whole < 1 or isinstance(number, bool) or isinstance(number, float) and number != whole:
            raise ValueError(f"{what}: {key} must be a positive integer, got {number!r}")
        out[key] = whole
    return out.pop("default", default), out


def generation_limits(max_new_tokens) -> tuple[int, dict[str, int]]:
    """`(default, {task: limit})` of new tokens, see `per_task_numbers`.

    Short answers (yes/no, names, EC numbers) need few tokens; one row that rambles keeps its whole batch
    decoding up to the limit, so a per-task limit is what makes an evaluation cheaper.
    """
    return per_task_numbers(max_new_tokens, "max_new_tokens", 128)


def example_limits(limit) -> dict | None:
    """`--limit` -> `{"default": n or None, task: n}`: the first n examples of each task, e.g. `"24,yes_no=72"`
    (short answers are cheap to generate: their tasks can afford more rows and tighter intervals). None: all."""
    if limit is None:
        return None
    if isinstance(limit, str) and limit.strip().lstrip("-").isdigit():
        limit = int(limit)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 1:
        raise ValueError(f"--limit must be a positive number of examples per task, got {limit}")
    default, per_task = per_task_numbers(limit, "--limit", None)
    return {"default": default, **per_task}


def run_evaluation(
    data,
    predictors: list[str],
    out,
    *,
    task: str = "auto",
    split: str | None = None,
    train=None,
    train_split: str | None = None,
    holdout: float | None = None,
    holdout_by: str = "id",
    seed: int = 0,
    limit: int | str | dict | None = None,
    batch_size: int = 8,
    max_new_tokens: int | dict | str = 128,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    shuffled_proteins: bool = False,
    no_retrieval: bool = False,
    bootstrap: int = 1000,
    bertscore_model: str | None = None,
    meteor: bool = True,
    identity: bool = True,
    threads: int = 1,
    sensitivity: float | None = 7.5,
    retrieval_k: int = 10,
    retrieval_text: str = "top1",
    retrieval_search: str = "auto",
    go_obo=None,
    temporal_test=None,
    temporal_train=None,
    examples_shown: int = 5,
    progress: bool = True,
    command: str | None = None,
    on_bad_rows: str = "stop",
) -> dict:
    """Evaluate `predictors` on `data`; write `report.md`, `metrics.json`, `predictions.jsonl` under `out`.

    Returns the `metrics.json` payload: `{"header": {...}, "tasks": {task: {"predictors": {name: {"metrics":
    {metric: {"value", "ci_low", "ci_high"}}, "primary", "counts", ...}}, "family", "n"}}}`.
    `max_new_tokens`: an int, or per task (`{"default": 32, "yes_no": 4}`, see `generation_limits`); `limit` the
    first examples of each task, an int or per task in the same forms (`example_limits`).
    `shuffled_proteins` adds `<model>+shuffled_proteins` for each model folder (proteins deranged across examples
    before the model, so before its retrieval too); `no_retrieval` adds `<model>+no_retrieval` (the prompt says no
    similar protein is known: the encoder path alone). `retrieval_k` / `retrieval_text` set the `retrieval`
    predictor (top-k neighbours; free text by 'top1' or 'medoid'); `retrieval_search` its search ("auto": exhaustive
    Smith-Waterman for databases up to 50,000 proteins, else MMseqs2; or "mmseqs2" / "smith-waterman"). `go_obo`: an OBO file to propagate GO terms to
    their ancestors (eval/go.py). `split="temporal"`: see the module docstring; `temporal_test` / `temporal_train`
    default to ../shared/data/ec/new392.jsonl and clean_split10.jsonl. Raises `ValueError` when `data` yields no
    examples.
    """
    from .baselines import describe_search
    from .data import first_examples_per_task, holdout_split, load_examples
    from .generate import FilePredictor, ModelPredictor, run_generation
    from .report import paired_difference, score_predictor, task_scorer, write_report

    t0 = time.time()
    out = Path(out)
    max_new_tokens, task_token_limits = generation_limits(max_new_tokens)
    # Inputs are checked before anything is written: a typo in a path must not leave an empty output folder behind.
    temporal = split == "temporal"
    if temporal:
        if holdout:
            raise ValueError("--split temporal and --holdout exclude each other (the temporal split has its own train)")
        split = None
        from data import SHARED_DATA

        temporal_test = Path(temporal_test or SHARED_DATA / "ec" / "new392.jsonl")
        temporal_train = Path(temporal_train or SHARED_DATA / "ec" / "clean_split10.jsonl")
    for flag, path in (("--data", data), ("--train", train), ("--go_obo", go_obo),
                       ("temporal test set", temporal_test if temporal else None),
                       ("temporal train set", temporal_train if temporal else None)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{flag} {path}: no such file")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (it will hold report.md, metrics.json, predictions/)")
    limit = example_limits(limit)
    for spec in predictors:
        if spec not in ("most_common", *RETRIEVAL_PREDICTORS) and not spec.startswith("file:") and Path(spec).is_dir() \
                and not (Path(spec) / "config.json").is_file():
            raise ValueError(f"predictor {spec}: the folder has no config.json, so it is not a model folder "
                             "(an unfinished save or the wrong path?)")
    out.mkdir(parents=True, exist_ok=True)
    data_stats: dict = {}
    notes: list[str] = []
    train_examples = None
    if holdout:
        every = load_examples(data, task, split=split, stats=data_stats)
        every = _check_examples(every, data, on_bad_rows, data_stats, notes)
        if holdout_by == "cluster":
            from data.mmseqs import easy_cluster

            seqs = {ex["id"]: s for ex in every if (s := _first_sequence(ex))}
            clusters = easy_cluster(seqs, min_seq_id=0.3, coverage=0.5, threads=threads)
            for ex in every:
                ex["meta"]["cluster"] = clusters.get(ex["id"], ex["id"])
        train_examples, examples = holdout_split(every, holdout, seed, key="cluster" if holdout_by == "cluster" else "id")
        unit = "<MMseqs2 cluster representative, 30% identity / 50% coverage>" if holdout_by == "cluster" else "<id>"
        notes.append(f"Seeded holdout of --data: an example is test when sha256('{seed}:{unit}') maps below "
                     f"{holdout} (train {len(train_examples)}, test {len(examples)}).")
        if limit:
            examples = first_examples_per_task(examples, limit)
    else:
        examples = load_examples(data, task, split=split, limit=limit, stats=data_stats)
        examples = _check_examples(examples, data, on_bad_rows, data_stats, notes)
        if train:
            tsplit = train_split or ("train" if _same_file(train, data) else None)
            tasks = sorted({ex["task"] for ex in examples}) or [task]
            train_examples = load_examples(train, ",".join(tasks), split=tsplit)
            train_examples = _check_examples(train_examples, train, on_bad_rows, {}, notes, what="--train")
            test_ids = {ex["id"] for ex in examples}
            overlap = sum(1 for ex in train_examples if ex["id"] in test_ids)
            if overlap:
                notes.append(f"{overlap} training examples share an id with a test example (leakage check).")
    split_of_task: dict[str, str] = {}
    if temporal:
        from .data import canonical_task

        asked = {canonical_task(t.strip()) for t in task.split(",") if t.strip()}
        swapped = [t for t in TEMPORAL_TASKS if "auto" in asked or t in asked]
        if not swapped:
            raise ValueError(f"--split temporal changes the tasks {', '.join(TEMPORAL_TASKS)}; --task {task} has none")
        examples = [ex for ex in examples if ex["task"] not in swapped]
        extra = load_examples(temporal_test, ",".join(swapped), limit=limit, stats=data_stats.setdefault("temporal", {}))
        examples += _check_examples(extra, temporal_test, on_bad_rows, data_stats, notes, what="temporal test set")
        temporal_rows = load_examples(temporal_train, ",".join(swapped))
        temporal_rows = _check_examples(temporal_rows, temporal_train, on_bad_rows, {}, notes, what="temporal train set")
        train_examples = [ex for ex in train_examples or [] if ex["task"] not in swapped] + temporal_rows
        split_of_task = {t: TEMPORAL_SPLIT for t in swapped}
        notes.append(f"--split temporal: {', '.join(swapped)} evaluated on {temporal_test} "
                     f"against {temporal_train} as training / retrieval database.")
    if not examples:
        raise ValueError(f"no examples for task {task!r} in {data} (split {split})")
    by_task: dict[str, list] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append(ex)

    identities: dict[str, dict] = {}  # task -> {test id: max identity to its training proteins, None: no hit}
    identity_tools: dict[str, str] = {}
    runs = []  # (predictor, batch size)
    names_seen: set = set()
    for spec in predictors:
        if spec == "most_common":
            from .baselines import MostCommon

            if not train_examples:
                raise ValueError("most_common needs --train or --holdout")
            p, bs = MostCommon(train_examples), 10**9
        elif spec in RETRIEVAL_PREDICTORS:
            from .baselines import Retrieval

            if not train_examples:
                raise ValueError(f"{spec} needs --train or --holdout")
            p = Retrieval(train_examples, threads=threads, sensitivity=sensitivity, combine=not spec.startswith("retrieval_top1"),
                          k=retrieval_k, text_combine=retrieval_text, search=retrieval_search,
                          fallback="composition" if spec.endswith("_composition") else "most_common")
            bs = 10**9
        elif spec.startswith("file:"):
            p, bs = FilePredictor(spec[5:]), 10**9
        elif Path(spec).is_dir():
            p = ModelPredictor(spec, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed,
                               temperature=temperature, top_p=top_p, device=device, dtype=dtype)
            bs = batch_size
        else:
            raise ValueError(f"unknown predictor {spec!r}: not a folder, most_common, {', '.join(RETRIEVAL_PREDICTORS)} "
                             "or file:PATH")
        base = p.name
        k = 2
        while p.name in names_seen:
            p.name = f"{base}_{k}"
            k += 1
        names_seen.add(p.name)
        runs.append((p, bs))
        if isinstance(p, ModelPredictor):
            if shuffled_proteins:
                from .baselines import ShuffledProteins

                runs.append((ShuffledProteins(p, seed=seed).fit(examples), bs))
            if no_retrieval:
                runs.append((p.without_retrieval(), bs))

    go_vocabulary = None
    if "go_terms" in by_task:
        from .go import load_vocabulary

        go_vocabulary = load_vocabulary(examples + list(train_examples or []), go_obo)
    default_split = (f"seeded holdout of --data ({holdout} to test, by {holdout_by})" if holdout
                     else f"rows of --data with split={split}" if split else "all rows of --data")
    split_of_task = {name: split_of_task.get(name, default_split) for name in by_task}
    results: dict = {}
    predictions: dict = {}
    for name, exs in by_task.items():
        if train_examples and identity:
            # Computed task by task, right before the predictors: the retrieval baseline then reuses this search
            # (baselines._search keeps the last one) instead of repeating it.
            identities[name], identity_tools[name] = _identity_bins(exs, train_examples, name, threads, sensitivity,
                                                                    retrieval_search)
        results[name] = {"predictors": {}}
        predictions[name] = {}
        scorers = {}  # predictor name -> its TaskScorer on this task's rows (scores, and pairs of them)
        for p, bs in runs:
            model = getattr(p, "inner", p)  # the shuffled-protein control generates with its model
            if isinstance(model, ModelPredictor):
                model.max_new_tokens = task_token_limits.get(name, max_new_tokens)
            path = out / "predictions" / name / f"{p.name}.jsonl"
            preds = run_generation(p, exs, path, batch_size=bs, progress=progress)
            extra = {}
            if isinstance(p, FilePredictor):
                extra = {"extra_ids_in_file": p.extra_ids(examples), "missing_predictions_in_file": sum(
                    1 for e in exs if e["id"] not in p.preds), "invalid_lines": p.info["invalid_lines"],
                    "duplicate_ids_in_file": p.info["duplicate_ids"]}
            # p.neighbour is filled when it predicted; on a resumed run (predictions read back) it is empty
            if getattr(p, "no_hit", None) is not None and p.name in RETRIEVAL_PREDICTORS \
                    and all(e["id"] in p.neighbour for e in exs):
                no_hit = sum(1 for e in exs if p.neighbour[e["id"]] is None)
                extra["retrieval_no_hit"] = no_hit
                answer = ("the answer of the training protein closest in composition" if p.no_hit_fallback == "composition"
                          else f"the most-common training answer ({p.fallback.answers.get(name, '')[:80]!r})")
                notes.append(f"{name}: {p.name} found no hit ({describe_search(p.tools[name], sensitivity)}) for "
                             f"{no_hit} of {len(exs)} test proteins; a no-hit predicts {answer}.")
            scorers[p.name] = task_scorer(name, exs, preds, meteor=meteor, bertscore_model=bertscore_model,
                                          go_vocabulary=go_vocabulary)
            res = score_predictor(name, exs, preds, identities.get(name), bootstrap=bootstrap, seed=seed,
                                  extra_counts=extra, scorer=scorers[p.name])
            results[name]["predictors"][p.name] = res
            predictions[name][p.name] = preds
        # Each model against every other predictor on the same rows: the paired bootstrap CI of the difference.
        models = [p.name for p, _ in runs if isinstance(p, ModelPredictor) and p.retrieval]
        results[name]["paired_differences"] = {
            model: {other: paired_difference(scorers[model], scorers[other], bootstrap=bootstrap, seed=seed)
                    for other in scorers if other != model}
            for model in models if model in scorers}
        results[name]["family"] = next(iter(results[name]["predictors"].values()))["family"]
        results[name]["n"] = len(exs)
        results[name]["split"] = split_of_task[name]

    with open(out / "predictions.jsonl", "w") as fh:
        for name, exs in by_task.items():
            for ex in exs:
                fh.write(json.dumps({"task": name, "id": ex["id"], "reference": ex["reference"],
                                     "nearest_identity": identities.get(name, {}).get(ex["id"]),
                                     "predictions": {n: predictions[name][n].get(ex["id"]) for n in predictions[name]}})
                         + "\n")
    header = {
        "command": command or f"run_evaluation({str(data)!r}, {predictors!r}, {str(out)!r})",
        "data": str(data), "split": "temporal" if temporal else split, "train": None if train is None else str(train),
        "temporal_test": str(temporal_test) if temporal else None,
        "temporal_train": str(temporal_train) if temporal else None, "go_obo": None if go_obo is None else str(go_obo),
        "train_split": train_split or ("train" if train and _same_file(train, data) else None),
        "holdout": holdout, "seed": seed, "bootstrap": bootstrap, "limit": limit,
        "max_new_tokens": {"default": max_new_tokens, **task_token_limits} if task_token_limits else max_new_tokens,
        "data_stats": data_stats, "n_train": len(train_examples) if train_examples else None,
        "identity": None if not identities else (
            "max identity over the alignment to any training protein of the task (" + ", ".join(sorted(
                {describe_search(tool, sensitivity) for tool in identity_tools.values()}))
            + "); no hit = nothing found by that search"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": None, "notes": notes,
    }
    header["seconds"] = round(time.time() - t0, 1)
    write_report(out, results, by_task, predictions, header, n_examples_shown=examples_shown, identities=identities)
    print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'predictions.jsonl'} "
          f"({header['seconds']} s)", file=sys.stderr)
    return json.loads((out / "metrics.json").read_text())  # exactly what the file holds (NaN cleaned)
