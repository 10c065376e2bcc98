"""Streaming readers: every reader yields canonical protein dicts (see :mod:`data.builders`) one at a
time, so memory does not grow with the file. Gzipped inputs (``.gz``) are opened transparently.

Malformed input is never silently dropped: pass a :class:`data.builders.BuildStats` as ``stats``
and every skipped line/record is counted (``malformed:<reader>``).

Swiss-Prot flat files are parsed by our own line-code parser (no Biopython dependency): only the
line types we need (ID, AC, DT, DE, GN, OS, OX, CC FUNCTION/CATALYTIC ACTIVITY, DR GO/AlphaFoldDB,
KW, SQ) are interpreted; everything else is skipped line by line.
"""

from __future__ import annotations

import csv
import gzip
import zlib
import io
import json
import re
from pathlib import Path
from typing import Iterator

from .builders import BuildStats

_DUMMY = BuildStats()


class DataFileError(ValueError):
    """A data file that cannot be read as a whole (truncated or corrupt gzip); the message names the file."""


class _TextFile:
    """A text file (gzip by suffix) whose read errors name the file instead of surfacing as gzip's bare EOFError."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.suffix == ".gz":
            self._handle = io.TextIOWrapper(gzip.open(self.path, "rb"), encoding="utf-8", errors="replace")
        else:
            self._handle = open(self.path, encoding="utf-8", errors="replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def _guard(self, method, *args):
        try:
            return method(*args)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise DataFileError(f"{self.path}: corrupt or truncated file ({error})") from error

    def read(self, size=-1):
        return self._guard(self._handle.read, size)

    def readline(self):
        return self._guard(self._handle.readline)

    def __iter__(self):
        while line := self.readline():
            yield line


def open_text(path) -> _TextFile:
    return _TextFile(path)


def protein(accession, sequence, **kw) -> dict:
    if not isinstance(accession, str) or not isinstance(sequence, str):
        raise TypeError(f"accession and sequence must be strings, got {type(accession).__name__} / {type(sequence).__name__}")
    p = {"accession": accession, "sequence": sequence, "name": None, "description": None, "ec": [],
         "reactions": {}, "go": {}, "keywords": [], "structure": None, "chain": None, "date": None,
         "organism": None, "source": None}
    p.update(kw)
    return p


# --------------------------------------------------------------------------- JSONL (shared data)


def read_jsonl(path, stats: BuildStats = _DUMMY, reader: str = "jsonl") -> Iterator[dict]:
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats.add(f"malformed:{reader}", f"{Path(path).name}:{n}")
                continue
            if not isinstance(obj, dict):
                stats.add(f"malformed:{reader}", f"{Path(path).name}:{n}")
                continue
            yield obj


def _proteins_from_jsonl(path, stats: BuildStats, reader: str, to_protein) -> Iterator[dict]:
    """`to_protein(row)` for each JSONL row with an accession and a sequence; rows without them, or whose fields
    have the wrong types (well-formed JSON, so a malformed record rather than a crash), count as `malformed:<reader>`."""
    for r in read_jsonl(path, stats, reader):
        if "accession" not in r or "sequence" not in r:
            stats.add(f"malformed:{reader}", str(r)[:60])
            continue
        try:
            p = to_protein(r)
        except (TypeError, AttributeError, ValueError):
            stats.add(f"malformed:{reader}", str(r)[:60])
            continue
        yield p


def read_yeast_function(path, stats: BuildStats = _DUMMY, source: str = "yeast_function") -> Iterator[dict]:
    """../shared/data/function/yeast_function.jsonl (UniProt UP000002311 + SGD descriptions)."""
    return _proteins_from_jsonl(path, stats, "yeast_function", lambda r: protein(
        r["accession"], r["sequence"], name=r.get("protein_name"), description=r.get("description"),
        ec=list(r.get("ec") or []), reactions=dict(r.get("reactions") or {}), split=r.get("split"),
        organism="Saccharomyces cerevisiae", source=source, gene=r.get("gene"),
        orf_qualifier=r.get("orf_qualifier"), cluster=r.get("cluster")))


def read_clean_ec(path, stats: BuildStats = _DUMMY, source: str | None = None, split: str | None = None) -> Iterator[dict]:
    """CLEAN EC sets (clean_split10.jsonl, new392.jsonl): accession, ec list, reactions, sequence."""
    src = source or Path(path).name.split(".")[0]
    return _proteins_from_jsonl(path, stats, "clean_ec", lambda r: protein(
        r["accession"], r["sequence"], ec=list(r.get("ec") or []), reactions=dict(r.get("reactions") or {}),
        source=src, split=split))


def read_go_jsonl(path, stats: BuildStats = _DUMMY, source: str = "fapm_go") -> Iterator[dict]:
    """GO sets (go/fapm_val.jsonl): accession, sequence, go {MF/BP/CC: [{id, name, definition}]}."""

    def to_protein(r):
        go = {a: [{"id": t.get("id"), "name": t.get("name")} for t in (r.get("go") or {}).get(a, [])]
              for a in ("MF", "BP", "CC") if (r.get("go") or {}).get(a)}
        return protein(r["accession"], r["sequence"], go=go, source=source, organism=r.get("organism_genus"),
                       split=r.get("split"))

    return _proteins_from_jsonl(path, stats, "go", to_protein)


# --------------------------------------------------------------------------- FASTA


_UNIPROT_HDR = re.compile(r"^(sp|tr)\|([^|]+)\|(\S+)\s*(.*)$")
_FIELD = re.compile(r"\s(OS|OX|GN|PE|SV)=")


def parse_fasta_header(header: str) -> dict:
    """UniProt FASTA header -> {db, accession, entry_name, name, organism, gene, ...}; else id only."""
    header = header.strip()
    m = _UNIPROT_HDR.match(header)
    if not m:
        ident = header.split()[0] if header else ""
        return {"accession": ident, "name": header[len(ident):].strip() or None}
    db, acc, entry, rest = m.groups()
    rest = " " + rest
    parts = _FIELD.split(rest)
    name = parts[0].strip()
    fields = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    for k in ("SV", "PE"):  # trailing tokens such as "Split=0" in mmseqs example data
        if k in fields:
            fields[k] = fields[k].split()[0] if fields[k] else fields[k]
    return {"db": db, "accession": acc, "entry_name": entry, "name": name or None,
            "organism": fields.get("OS"), "gene": fields.get("GN"), "pe": fields.get("PE")}


def read_fasta(path, stats: BuildStats = _DUMMY, source: str | None = None) -> Iterator[dict]:
    """Streaming FASTA; UniProt headers (``>sp|ACC|NAME_ORG Name OS=... GN=...``) are parsed."""
    src = source or Path(path).name
    header, chunks = None, []

    def emit():
        h = parse_fasta_header(header)
        seq = "".join(chunks)
        name = h.get("name")
        fragment = False
        if name and name.endswith("(Fragment)"):
            name, fragment = name[: -len("(Fragment)")].strip(), True
        return protein(h["accession"], seq, name=name, organism=h.get("organism"), source=src,
                       db=h.get("db"), entry_name=h.get("entry_name"), gene=h.get("gene"), fragment=fragment)

    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n\r")
            if line.startswith(">"):
                if header is not None:
                    yield emit()
                header, chunks = line[1:], []
            elif header is None:
                if line.strip():
                    stats.add("malformed:fasta", f"{Path(path).name}:{n} sequence before header")
            else:
                chunks.append(line.strip())
        if header is not None:
            yield emit()


# --------------------------------------------------------------------------- UniProt flat file


_EC_RE = re.compile(r"EC=([0-9n.\-]+)")
_GO_RE = re.compile(r"^GO; (GO:\d+); ([CFP]):(.*?);")
_MONTHS = {m: i for i, m in enumerate(
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1)}


def _dt_to_iso(s: str) -> str | None:
    m = re.match(r"(\d{2})-([A-Z]{3})-(\d{4})", s)
    if not m:
        return None
    return f"{m.group(3)}-{_MONTHS.get(m.group(2), 0):02d}-{m.group(1)}"


def _finish_flat(rec: dict, stats: BuildStats, src: str) -> dict | None:
    if not rec.get("acc") or not rec.get("seq_chunks"):
        stats.add("malformed:swissprot", rec.get("id") or "?")
        return None
    cc = rec["cc"]
    function = " ".join(t for topic, t in cc if topic == "FUNCTION") or None
    if function:
        function = re.sub(r"\s*\{ECO:[^}]*\}", "", function).strip()
        function = re.sub(r"\s*\(PubMed:[^)]*\)", "", function).strip()
    reactions: dict[str, list[str]] = {}
    for topic, t in cc:
        if topic == "CATALYTIC ACTIVITY":
            m = re.search(r"Reaction=(.*?);", t)
            e = re.search(r"EC=([0-9.\-n]+)", t)
            if m:
                reactions.setdefault(e.group(1) if e else "", []).append(m.group(1))
    kw = [k.strip() for k in " ".join(rec["kw"]).rstrip(".").split(";") if k.strip()]
    kw = [re.sub(r"\s*\{ECO:[^}]*\}", "", k) for k in kw]
    return protein(rec["acc"][0], "".join(rec["seq_chunks"]).replace(" ", ""), name=rec.get("name"),
                   description=function, ec=rec["ec"], reactions=reactions, go=rec["go"], keywords=kw,
                   date=rec.get("date"), organism=rec.get("os"), source=src, entry_name=rec.get("id"),
                   secondary_accessions=rec["acc"][1:], alphafold=rec.get("afdb"))


def read_swissprot_dat(path, stats: BuildStats = _DUMMY, source: str | None = None) -> Iterator[dict]:
    """Stream UniProtKB flat-file records (``uniprot_sprot.dat(.gz)``), one dict per ``//``-terminated entry.

    Fields: accession (first AC), name (DE RecName Full=), description (CC -!- FUNCTION, evidence
    tags stripped), ec (DE EC=), reactions (CC CATALYTIC ACTIVITY), go (DR GO, names), keywords
    (KW), date (first DT line = integration date, ISO), organism (OS).
    """
    src = source or Path(path).name

    def new():
        return {"acc": [], "ec": [], "go": {}, "kw": [], "cc": [], "seq_chunks": [], "in_seq": False,
                "os_parts": []}

    rec = new()
    cur_topic = None
    with open_text(path) as fh:
        for line in fh:
            code = line[:2]
            body = line[5:].rstrip("\n")
            if code == "//":
                if rec["os_parts"]:
                    rec["os"] = " ".join(rec["os_parts"]).rstrip(".")
                out = _finish_flat(rec, stats, src)
                if out is not None:
                    yield out
                rec, cur_topic = new(), None
                continue
            if rec["in_seq"]:
                rec["seq_chunks"].append(line.strip().replace(" ", ""))
                continue
            if code == "ID":
                rec["id"] = body.split()[0] if body.split() else None
            elif code == "AC":
                rec["acc"].extend(a.strip() for a in body.split(";") if a.strip())
            elif code == "DT":
                if "date" not in rec:
                    rec["date"] = _dt_to_iso(body)
            elif code == "DE":
                b = body.strip()
                if "name" not in rec and b.startswith("RecName: Full="):
                    rec["name"] = re.sub(r"\s*\{ECO:[^}]*\}", "", b[len("RecName: Full="):]).rstrip(";").strip()
                elif "name" not in rec and b.startswith("SubName: Full="):
                    rec["name"] = re.sub(r"\s*\{ECO:[^}]*\}", "", b[len("SubName: Full="):]).rstrip(";").strip()
                for e in _EC_RE.findall(b):
                    e = e.rstrip(".;")
                    if e not in rec["ec"]:
                        rec["ec"].append(e)
            elif code == "OS":
                rec["os_parts"].append(body.strip())
            elif code == "CC":
                b = body.strip()
                if b.startswith("-!- "):
                    topic, _, text = b[4:].partition(":")
                    cur_topic = topic.strip()
                    rec["cc"].append((cur_topic, text.strip()))
                elif b.startswith("-----") or b.startswith("Copyrighted") or b.startswith("Distributed"):
                    cur_topic = None
                elif cur_topic and rec["cc"]:
                    t, text = rec["cc"][-1]
                    rec["cc"][-1] = (t, (text + " " + b).strip())
            elif code == "DR":
                b = body.strip()
                m = _GO_RE.match(b)
                if m:
                    aspect = {"F": "MF", "P": "BP", "C": "CC"}[m.group(2)]
                    rec["go"].setdefault(aspect, []).append({"id": m.group(1), "name": m.group(3)})
                elif b.startswith("AlphaFoldDB;"):
                    rec["afdb"] = b.split(";")[1].strip()
            elif code == "KW":
                rec["kw"].append(body.strip())
            elif code == "SQ":
                rec["in_seq"] = True
        if rec["acc"] or rec["seq_chunks"]:
            stats.add("malformed:swissprot", "truncated final record (no //)")


def format_swissprot_record(p: dict, entry_name: str | None = None) -> str:
    """Write a protein dict as a minimal UniProtKB flat-file entry (for tests and benchmarks)."""
    acc = p["accession"]
    seq = p["sequence"]
    lines = [f"ID   {entry_name or acc + '_HUMAN'}             Reviewed;         {len(seq)} AA.",
             f"AC   {acc};", "DT   21-JUL-1986, integrated into UniProtKB/Swiss-Prot."]
    if p.get("name"):
        lines.append(f"DE   RecName: Full={p['name']};")
    for e in p.get("ec") or []:
        lines.append(f"DE            EC={e};")
    lines.append(f"OS   {p.get('organism') or 'Saccharomyces cerevisiae'}.")
    if p.get("description"):
        words = f"-!- FUNCTION: {p['description']}".split()
        cur = ""
        first = True
        for w in words:
            if len(cur) + len(w) + 1 > 70:
                lines.append("CC   " + ("" if first else "    ") + cur)
                cur, first = w, False
            else:
                cur = f"{cur} {w}".strip()
        if cur:
            lines.append("CC   " + ("" if first else "    ") + cur)
    for ec, rxs in (p.get("reactions") or {}).items():
        for rx in rxs:
            lines.append(f"CC   -!- CATALYTIC ACTIVITY:")
            lines.append(f"CC       Reaction={rx}; EC={ec};")
    for a, code in (("MF", "F"), ("BP", "P"), ("CC", "C")):
        for t in (p.get("go") or {}).get(a, []):
            lines.append(f"DR   GO; {t['id']}; {code}:{t['name']}; IDA:UniProtKB.")
    if p.get("keywords"):
        lines.append("KW   " + "; ".join(p["keywords"]) + ".")
    lines.append(f"SQ   SEQUENCE   {len(seq)} AA;  0 MW;  0000000000000000 CRC64;")
    for i in range(0, len(seq), 60):
        chunk = seq[i:i + 60]
        lines.append("     " + " ".join(chunk[j:j + 10] for j in range(0, len(chunk), 10)))
    lines.append("//")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- UniProt TSV / JSON


_TSV_COLS = {
    "accession": ("Entry", "accession"), "name": ("Protein names", "protein_name"),
    "sequence": ("Sequence", "sequence"), "description": ("Function [CC]", "cc_function"),
    "ec": ("EC number", "ec"), "go": ("Gene Ontology (GO)", "go"), "keywords": ("Keywords", "keyword"),
    "date": ("Date of creation", "date_created"), "organism": ("Organism", "organism_name"),
    "reaction": ("Catalytic activity", "cc_catalytic_activity"),
}


def _col(row: dict, key: str):
    for c in _TSV_COLS[key]:
        if c in row and row[c] not in (None, ""):
            return row[c]
    return None


def read_uniprot_tsv(path, stats: BuildStats = _DUMMY, source: str | None = None) -> Iterator[dict]:
    """UniProt REST/website TSV export (``format=tsv``), with either display or field-name headers."""
    src = source or Path(path).name
    with open_text(path) as fh:
        for n, row in enumerate(csv.DictReader(fh, delimiter="\t"), 2):
            acc, seq = _col(row, "accession"), _col(row, "sequence")
            if not acc or not seq or None in row:
                stats.add("malformed:uniprot_tsv", f"{Path(path).name}:{n}")
                continue
            name = _col(row, "name")
            if name:  # "Full name (Short) (EC 1.2.3.4) (Alt name)" -> first name
                name = re.split(r" \((?![^()]*\)\))", name, maxsplit=1)[0].strip()
            func = _col(row, "description")
            if func:
                func = re.sub(r"^FUNCTION:\s*", "", func)
                func = re.sub(r"\s*\{ECO:[^}]*\}", "", func).strip()
                func = re.sub(r"\s*\(PubMed:[^)]*\)", "", func).strip()
            ec = [e.strip() for e in (_col(row, "ec") or "").split(";") if e.strip()]
            go = {}
            for term in (_col(row, "go") or "").split(";"):
                m = re.match(r"\s*(.*?) \[(GO:\d+)\]", term)
                if m:
                    go.setdefault("GO", []).append({"id": m.group(2), "name": m.group(1)})
            kws = [k.strip() for k in (_col(row, "keywords") or "").split(";") if k.strip()]
            reactions: dict[str, list[str]] = {}
            for m in re.finditer(r"Reaction=(.*?);(?:.*?EC=([0-9.\-n]+))?", _col(row, "reaction") or ""):
                reactions.setdefault(m.group(2) or "", []).append(m.group(1))
            yield protein(acc, seq, name=name, description=func, ec=ec, go=go, keywords=kws,
                          date=_col(row, "date"), organism=_col(row, "organism"), reactions=reactions, source=src)


def _json_entry(e: dict, src: str) -> dict | None:
    acc = e.get("primaryAccession")
    seq = (e.get("sequence") or {}).get("value")
    if not acc or not seq:
        return None
    desc = e.get("proteinDescription") or {}
    rn = desc.get("recommendedName") or (desc.get("submissionNames") or [{}])[0]
    name = ((rn or {}).get("fullName") or {}).get("value")
    ec = [x.get("value") for x in (rn or {}).get("ecNumbers", []) if x.get("value")]
    func, reactions = [], {}
    for c in e.get("comments", []) or []:
        if c.get("commentType") == "FUNCTION":
            func.extend(t.get("value", "") for t in c.get("texts", []))
        elif c.get("commentType") == "CATALYTIC ACTIVITY":
            r = c.get("reaction") or {}
            reactions.setdefault(r.get("ecNumber", ""), []).append(r.get("name"))
    go: dict[str, list] = {}
    for x in e.get("uniProtKBCrossReferences", []) or []:
        if x.get("database") == "GO":
            props = {p.get("key"): p.get("value") for p in x.get("properties", [])}
            term = props.get("GoTerm", "")
            aspect = {"F": "MF", "P": "BP", "C": "CC"}.get(term[:1], "GO")
            go.setdefault(aspect, []).append({"id": x.get("id"), "name": term[2:] if ":" in term[:2] else term})
    kws = [k.get("name") for k in e.get("keywords", []) or [] if k.get("name")]
    date = (e.get("entryAudit") or {}).get("firstPublicDate")
    org = (e.get("organism") or {}).get("scientificName")
    return protein(acc, seq, name=name, description=" ".join(func) or None, ec=ec, go=go, keywords=kws,
                   date=date, organism=org, reactions=reactions, source=src, entry_name=e.get("uniProtkbId"))


def read_uniprot_json(path, stats: BuildStats = _DUMMY, source: str | None = None) -> Iterator[dict]:
    """UniProt REST JSON: either ``{"results": [entry, ...]}`` (loaded whole: use JSONL or TSV for
    very large exports) or JSON Lines with one entry per line (streamed)."""
    src = source or Path(path).name
    with open_text(path) as fh:
        first = fh.read(1)
        while first and first.isspace():
            first = fh.read(1)
        rest = fh.read() if first == "{" and not _looks_jsonl(path) else None
    if rest is not None:
        try:
            obj = json.loads(first + rest)
        except json.JSONDecodeError:
            obj = None  # not one document (e.g. JSON Lines with a torn first line): read it line by line
        if obj is not None:
            entries = obj.get("results", [obj]) if isinstance(obj, dict) else obj
            if not isinstance(entries, list):
                stats.add("malformed:uniprot_json", Path(path).name)
                return
            for e in entries:
                p = _safe_json_entry(e, src)
                if p is None:
                    stats.add("malformed:uniprot_json", str(e)[:60])
                else:
                    yield p
            return
    for e in read_jsonl(path, stats, "uniprot_json"):
        p = _safe_json_entry(e, src)
        if p is None:
            stats.add("malformed:uniprot_json", str(e)[:60])
        else:
            yield p


def _safe_json_entry(e, src: str) -> dict | None:
    """`_json_entry`, with None (counted as malformed) for entries whose fields have unexpected types."""
    if not isinstance(e, dict):
        return None
    try:
        return _json_entry(e, src)
    except (TypeError, AttributeError, ValueError):
        return None


def _looks_jsonl(path) -> bool:
    with open_text(path) as fh:
        line = fh.readline().strip()
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "results" not in obj


# --------------------------------------------------------------------------- instruction formats


_SEQ_IN_TEXT = re.compile(r"[ACDEFGHIKLMNPQRSTVWYBXZUO]{10,}")


def extract_sequence(text: str) -> tuple[str | None, str]:
    """Longest run of >=10 protein letters in ``text`` (OPI/Mol-Instructions put it in ``input``,
    often wrapped in ``` fences). Returns (sequence or None, text with the sequence removed)."""
    text = text or ""
    runs = _SEQ_IN_TEXT.findall(text.replace("\n", ""))
    if not runs:
        return None, text
    seq = max(runs, key=len)
    rest = text.replace(seq, "").replace("```", "").strip()
    return seq, rest


def read_instruction_file(path, stats: BuildStats = _DUMMY, task: str | None = None, source: str | None = None,
                          split: str = "train") -> Iterator[dict]:
    """Alpaca-style instruction data (OPI, Mol-Instructions protein tasks, OPI-Struc).

    Accepts a JSON list or JSON Lines of ``{"instruction", "input", "output"}``; the protein
    sequence is taken from ``input`` (falls back to ``instruction``). Yields *records* in the shared
    row schema directly. OPI-Struc (assumed format, documented): the same fields plus an accession
    (``id`` / ``uniprot_id`` / ``accession``) and optionally ``structure`` (path to a PDB/CIF file),
    used as the protein block's structure. Records without a sequence are counted
    (``malformed:instruction_no_sequence``).
    """
    from .builders import make_record

    src = source or Path(path).name
    tsk = task or Path(path).stem
    with open_text(path) as fh:
        head = fh.read(64).lstrip()
    items = None
    if head.startswith("["):
        try:
            with open_text(path) as fh:
                items = json.load(fh)  # a JSON list must be parsed whole; prefer JSONL for big files
        except json.JSONDecodeError:
            items = None  # JSON Lines whose first line happens to start with '['
        if items is not None and not isinstance(items, list):
            items = [items]
    if items is None:
        items = read_jsonl(path, stats, "instruction")
    for n, r in enumerate(items):
        if not isinstance(r, dict) or "output" not in r:
            stats.add("malformed:instruction", f"{Path(path).name}:{n}")
            continue
        try:
            seq, rest_input = extract_sequence(r.get("input") or "")
            instruction = (r.get("instruction") or "").strip()
        except (TypeError, AttributeError):
            stats.add("malformed:instruction", f"{Path(path).name}:{n}")
            continue
        if seq is None:
            seq, instruction = extract_sequence(instruction)
        if seq is None:
            stats.add("malformed:instruction_no_sequence", f"{Path(path).name}:{n}")
            continue
        if rest_input:
            instruction = f"{instruction}\n{rest_input}".strip()
        acc = str(r.get("accession") or r.get("uniprot_id") or r.get("id") or f"{Path(path).stem}-{n}")
        prot = {"accession": acc, "sequence": seq, "structure": r.get("structure")}
        yield make_record(id=f"{acc}|{tsk}|{n}", task=tsk, source=src, split=r.get("split") or split, protein=prot,
                          instruction=instruction, answer=str(r["output"]), meta={"format": "alpaca"})


def read_sepit_jsonl(path, coord_dir=None, stats: BuildStats = _DUMMY, source: str | None = None,
                     split: str = "train") -> Iterator[dict]:
    """SEPIT-style conversation JSONL (assumed LLaVA-like format, documented here):

    ``{"id": ACC, "sequence": SEQ, "conversations": [{"from": "human", "value": "<protein>\\n Q"},
    {"from": "gpt", "value": "A"}, ...], "task"?: str}``. Each human/gpt pair becomes one record.
    ``coord_dir``: the coordinate store, a directory holding one structure per protein named
    ``<id>.pdb``/``.cif``/``.pdb.gz``/``.npy`` (N x 3 or N x 4 x 3 backbone coordinates); its path is
    attached as the protein's structure, a missing file is counted (``missing_structure``).
    """
    from .builders import make_record

    src = source or Path(path).name
    for n, r in enumerate(read_jsonl(path, stats, "sepit")):
        acc, seq, conv = r.get("id") or r.get("accession"), r.get("sequence"), r.get("conversations")
        if not acc or not seq or not isinstance(conv, list):
            stats.add("malformed:sepit", str(r)[:60])
            continue
        structure = None
        if coord_dir is not None:
            for ext in (".pdb", ".cif", ".pdb.gz", ".cif.gz", ".npy"):
                f = Path(coord_dir) / f"{acc}{ext}"
                if f.exists():
                    structure = str(f)
                    break
            if structure is None:
                stats.add("missing_structure", acc)
        prot = {"accession": acc, "sequence": seq, "structure": structure}
        rows = []
        try:  # a record whose fields have the wrong types is counted as malformed as a whole
            if not isinstance(seq, str):
                raise TypeError("sequence is not a string")
            for k in range(0, len(conv) - 1, 2):
                q, a = conv[k], conv[k + 1]
                if q.get("from") not in ("human", "user") or a.get("from") not in ("gpt", "assistant"):
                    stats.add("malformed:sepit_turn", f"{acc}:{k}")
                    continue
                text = (q.get("value") or "").replace("<protein>", "").strip()
                ans = str(a.get("value") or "")
                task = r.get("task") or ("yes_no" if ans.strip().lower().rstrip(".") in ("yes", "no") else "sepit")
                rows.append(make_record(id=f"{acc}|sepit|{n}|{k // 2}", task=task, source=src,
                                        split=r.get("split") or split, protein=prot, instruction=text, answer=ans,
                                        meta={"format": "sepit"}))
        except (TypeError, AttributeError, ValueError):
            stats.add("malformed:sepit", str(r)[:60])
            continue
        yield from rows


# --------------------------------------------------------------------------- structures


_AF_RE = re.compile(r"^AF-([A-Za-z0-9]+)-F1-model_v(\d+)\.(pdb|cif)(\.gz)?$")


def structure_index(directory=None, mapping_tsv=None) -> dict[str, str]:
    """accession -> structure path, from a directory of ``AF-<acc>-F1-model_v*.pdb|cif[.gz]`` files
    (highest model version wins) and/or a TSV ``accession<TAB>path[<TAB>chain]`` (relative paths are
    resolved against the TSV's folder; a third column gives the chain as ``path#chain``)."""
    idx: dict[str, tuple[int, str]] = {}
    if directory is not None:
        for f in Path(directory).iterdir():
            m = _AF_RE.match(f.name)
            if m:
                v = int(m.group(2))
                if m.group(1) not in idx or idx[m.group(1)][0] < v:
                    idx[m.group(1)] = (v, str(f))
    out = {k: v for k, (_, v) in idx.items()}
    if mapping_tsv is not None:
        base = Path(mapping_tsv).parent
        with open_text(mapping_tsv) as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 2 or parts[0].startswith("#") or parts[0].lower() == "accession":
                    continue
                p = Path(parts[1])
                p = p if p.is_absolute() else base / p
                out[parts[0]] = str(p) + (f"#{parts[2]}" if len(parts) > 2 and parts[2] else "")
    return out


def attach_structures(proteins, index: dict[str, str], stats: BuildStats = _DUMMY) -> Iterator[dict]:
    """Set ``structure`` (and ``chain`` from ``path#chain``) from ``index``; count ``missing_structure``
    (no entry) and ``missing_structure_file`` (entry whose file does not exist)."""
    for p in proteins:
        ref = index.get(p["accession"])
        if ref is None:
            stats.add("missing_structure", p["accession"])
        else:
            path, _, chain = ref.partition("#")
            if not Path(path).exists():
                stats.add("missing_structure_file", path)
            else:
                p = dict(p, structure=path, chain=chain or p.get("chain"))
        yield p
