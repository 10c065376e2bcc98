"""Frozen-encoder feature cache: per-protein encoder states computed once, stored as safetensors.

At paper scale (ESM-2 650M, ~250k Swiss-Prot proteins) the fill is the expensive part, so it runs on the training
device, in the encoder's dtype (bf16 states: half the disk of fp32), on batches of proteins of similar length (no
compute on padding), sharded over processes (process i fills every i-th length bucket), and resumable (a protein
whose file exists is skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .collator import ProtLLMDataCollator


def encoder_fingerprint(model) -> str:
    """Hash of everything that determines the encoder's residue states: weights, config, feature layer."""
    encoder = model.get_base_model().model.protein_encoder if hasattr(model, "get_base_model") else model.model.protein_encoder
    digest = hashlib.sha256()
    config = model.config
    digest.update(json.dumps({
        "protein_config": config.protein_config.to_dict(), "feature_layer": config.protein_feature_layer,
        "backend": config.protein_encoder_backend, "structure": config.use_structure_bias,
        "dtype": str(next(encoder.parameters()).dtype),
    }, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureCache:
    """Per-protein encoder residue states stored as safetensors files, keyed by protein tokens (+ coordinates)
    under a folder named by the encoder fingerprint, so a changed encoder never reads stale features.

    Files are written to a temporary name and renamed (atomic on POSIX): a killed writer leaves no file a later
    run trusts, and two processes writing the same key both write the same content.
    """

    def __init__(self, root, model):
        self.model = model
        self.fingerprint = encoder_fingerprint(model)
        self.directory = Path(root) / self.fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    @staticmethod
    def key(ids: torch.Tensor, coords: torch.Tensor | None, coord_mask: torch.Tensor | None) -> str:
        digest = hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes())
        if coords is not None:
            digest.update(coords.to(torch.float32).cpu().numpy().tobytes())
            digest.update(coord_mask.to(torch.bool).cpu().numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """A hit is a regular file written here: a planted symlink (file or sub-folder) is a miss, then replaced."""
        path = self.path(key)
        return not path.parent.is_symlink() and not path.is_symlink() and path.is_file()

    def _rows(self, batch):
        for index in range(batch["protein_input_ids"].shape[0]):
            length = int(batch["protein_attention_mask"][index].sum())
            ids = batch["protein_input_ids"][index, :length]
            coords = mask = None
            if "protein_coords" in batch:
                residues = length - 2
                coords = batch["protein_coords"][index, :residues]
                mask = batch["protein_coord_mask"][index, :residues]
            yield index, ids, coords, mask

    def _write(self, key: str, states: torch.Tensor):
        from safetensors.torch import save_file

        target = self.path(key)
        if target.parent.is_symlink():
            target.parent.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"states": states.contiguous().cpu()}, temporary, metadata={"fingerprint": self.fingerprint})
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @property
    def encoder(self):
        return self.model.model.protein_encoder

    @torch.no_grad()
    def _encode(self, ids, attention, coords=None, coord_mask=None):
        """Run the encoder on its own device and dtype; returns `(P, R, D_p)` states and the `(P, R)` mask on CPU."""
        encoder = self.encoder
        device = next(encoder.parameters()).device
        to = lambda tensor: None if tensor is None else tensor.to(device, non_blocking=True)  # noqa: E731
        states, mask = encoder(to(ids), to(attention), to(coords), to(coord_mask))
        return states.cpu(), mask.cpu()

    @torch.no_grad()
    def fill(self, batch):
        """Compute and store the states of every protein of a collated batch not yet in the cache."""
        todo = {}
        for index, ids, coords, mask in self._rows(batch):
            key = self.key(ids, coords, mask)
            if key not in todo and not self.has(key):  # a protein repeated in a batch is computed once
                todo[key] = index
        todo = [(index, key) for key, index in todo.items()]
        if not todo:
            return 0
        rows = [i for i, _ in todo]
        states, mask = self._encode(
            batch["protein_input_ids"][rows], batch["protein_attention_mask"][rows],
            batch["protein_coords"][rows] if "protein_coords" in batch else None,
            batch["protein_coord_mask"][rows] if "protein_coord_mask" in batch else None,
        )
        for position, (_, key) in enumerate(todo):
            self._write(key, states[position, : int(mask[position].sum())])
        return len(todo)

    def swap_in(self, batch):
        """Replace protein token inputs by cached states `(P, R, D_p)` + mask `(P, R)`. Missing entries are computed."""
        from safetensors.torch import load_file

        rows = list(self._rows(batch))
        states = []
        for index, ids, coords, mask in rows:
            key = self.key(ids, coords, mask)
            path = self.path(key)
            if not self.has(key):
                self.misses += 1
                self.fill({k: v[index : index + 1] for k, v in batch.items() if k.startswith("protein_")})
            else:
                self.hits += 1
            states.append(load_file(path)["states"])
        longest = max(s.shape[0] for s in states)
        embeds = states[0].new_zeros(len(states), longest, states[0].shape[1])
        embeds_mask = torch.zeros(len(states), longest, dtype=torch.bool)
        for i, s in enumerate(states):
            embeds[i, : s.shape[0]] = s
            embeds_mask[i, : s.shape[0]] = True
        out = {k: v for k, v in batch.items() if not k.startswith("protein_")}
        out["protein_embeds"] = embeds
        out["protein_embeds_mask"] = embeds_mask
        return out

    def precompute(self, dataset, collator, batch_size: int = 16, state=None):
        """Fill the cache for every protein of `dataset` not yet stored. Returns the number this process wrote.

        Proteins are gathered (keys only: tokenising is cheap), de-duplicated, sorted by length and cut into
        buckets of `batch_size` proteins of similar length; process `i` of `n` (accelerate `PartialState`) encodes
        buckets `i, i + n, ...`, then every process waits for the others, so all of them see a full cache.
        """
        from accelerate import PartialState
        from tqdm.auto import tqdm

        state = state or PartialState()
        plain = ProtLLMDataCollator(collator.processor, None, None)
        proteins = {}  # key -> (length, ids, coords, coord_mask)
        for start in range(0, len(dataset), 64):
            batch = plain([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
            if "protein_input_ids" not in batch:
                continue
            for _, ids, coords, mask in self._rows(batch):
                key = self.key(ids, coords, mask)
                if key not in proteins:
                    proteins[key] = (len(ids), ids, coords, mask)
        # Buckets over every protein, stored or not: every process cuts the same buckets whatever the others wrote.
        ordered = sorted((length, key) for key, (length, *_) in proteins.items())
        buckets = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        mine = buckets[state.process_index :: state.num_processes]
        written = 0
        for bucket in tqdm(mine, desc="encoder feature cache", unit="batch", disable=not state.is_local_main_process):
            missing = [key for _, key in bucket if not self.path(key).is_file()]  # resumable: stored ones are skipped
            if missing:
                written += self._fill_bucket([proteins[key] for key in missing], missing)
        state.wait_for_everyone()
        return written

    def _fill_bucket(self, entries, keys) -> int:
        """Encode proteins of similar length as one right-padded batch and store each one's states."""
        pad = self.model.config.protein_config.pad_token_id or 0
        longest = max(length for length, *_ in entries)
        ids = torch.full((len(entries), longest), pad, dtype=torch.long)
        attention = torch.zeros(len(entries), longest, dtype=torch.long)
        coords = coord_mask = None
        with_coords = [entry[2] for entry in entries if entry[2] is not None]
        if with_coords:  # proteins without coordinates get an all-False mask: no bias, as with coords=None
            coords = torch.zeros(len(entries), longest - 2, *with_coords[0].shape[1:], dtype=with_coords[0].dtype)
            coord_mask = torch.zeros(len(entries), longest - 2, dtype=torch.bool)
        for row, (length, row_ids, row_coords, row_mask) in enumerate(entries):
            ids[row, :length] = row_ids
            attention[row, :length] = 1
            if row_coords is not None:
                coords[row, : row_coords.shape[0]] = row_coords
                coord_mask[row, : row_mask.shape[0]] = row_mask.bool()
        states, mask = self._encode(ids, attention, coords, coord_mask)
        for row, key in enumerate(keys):
            self._write(key, states[row, : int(mask[row].sum())])
        return len(keys)
