"""SEPIT stage 0: the encoder warm-up (contrastive + coordinate denoising + masked LM)."""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..model_classes import messages_for
from ..parameter_groups import is_new_warmup_module
from .data import rows_to_messages

logger = logging.getLogger("protllm.train")


class WarmupHeads(nn.Module):
    """Training-only heads of SEPIT's stage-0 encoder warm-up.

    - contrastive: mean-pooled residue states and caption embeddings, each projected to `proj_dim`, CLIP loss
      with a learnable temperature;
    - denoising: an E(3)-equivariant head predicts the Gaussian noise added to CA coordinates as a weighted sum of
      relative position vectors, weights from residue-pair features (invariant), so rotating the input rotates
      the prediction. The pair map is computed `chunk_size` query rows at a time (re-computed in backward), so its
      memory is `P x chunk_size x R x pair_dim`, not `P x R x R x pair_dim` (6-8 GB at P=16, R=1024);
    - masked LM: ESM's own LM head (`EsmForMaskedLM.lm_head`: dense -> GELU -> LayerNorm -> decoder tied to the
      encoder's word embeddings + bias). `load_pretrained_mlm_head` fills it from the encoder checkpoint when that
      has one; otherwise it keeps ESM's initialisation (tied decoder, zero bias).
    """

    def __init__(self, protein_config, text_width: int, proj_dim: int = 512, pair_dim: int = 32, chunk_size: int = 128):
        super().__init__()
        from transformers.models.esm.modeling_esm import EsmLMHead

        protein_width = protein_config.hidden_size
        self.protein_proj = nn.Linear(protein_width, proj_dim)
        self.text_proj = nn.Linear(text_width, proj_dim)
        # shape (1,), not a 0-dim scalar: DeepSpeed ZeRO-3 cannot partition a 0-dim parameter
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.pair_query = nn.Linear(protein_width, pair_dim)
        self.pair_key = nn.Linear(protein_width, pair_dim)
        self.distance_weight = nn.Sequential(nn.Linear(1, pair_dim), nn.GELU(), nn.Linear(pair_dim, 1))
        self.mlm_head = EsmLMHead(protein_config)
        std = protein_config.initializer_range  # as EsmPreTrainedModel._init_weights
        nn.init.normal_(self.mlm_head.dense.weight, std=std)
        nn.init.zeros_(self.mlm_head.dense.bias)
        nn.init.ones_(self.mlm_head.layer_norm.weight)
        nn.init.zeros_(self.mlm_head.layer_norm.bias)
        nn.init.zeros_(self.mlm_head.bias)
        self.chunk_size = chunk_size

    def tie_mlm_decoder(self, word_embeddings: nn.Embedding):
        """ESM ties the MLM decoder to the input embeddings: the same Parameter, trained once."""
        self.mlm_head.decoder.weight = word_embeddings.weight

    def contrastive_loss(self, protein_pooled, text_pooled):
        p = F.normalize(self.protein_proj(protein_pooled), dim=-1)
        t = F.normalize(self.text_proj(text_pooled), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * p @ t.T
        targets = torch.arange(len(p), device=p.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def _noise_chunk(self, query_states, states, ca_rows, ca, mask_rows, mask):
        relative = ca_rows.unsqueeze(2) - ca.unsqueeze(1)  # (P, c, R, 3)
        distance = relative.norm(dim=-1, keepdim=True)
        weights = torch.einsum("prd,psd->prs", self.pair_query(query_states), self.pair_key(states)) / math.sqrt(self.pair_query.out_features)
        weights = weights.unsqueeze(-1) + self.distance_weight(distance)  # (P, c, R, 1); pair_dim lives in the MLP
        pair_mask = (mask_rows.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(-1)
        weights = weights * pair_mask
        return (weights * relative).sum(dim=2) / pair_mask.sum(dim=2).clamp(min=1)

    def predict_noise(self, states, ca, mask):
        """states `(P, R, D)`, noisy CA `(P, R, 3)`, mask `(P, R)` -> predicted noise `(P, R, 3)`, `chunk_size`
        query rows at a time."""
        from torch.utils.checkpoint import checkpoint

        out = []
        for start in range(0, states.shape[1], self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            args = (states[:, rows], states, ca[:, rows], ca, mask[:, rows], mask)
            if torch.is_grad_enabled():
                out.append(checkpoint(self._noise_chunk, *args, use_reentrant=False))
            else:
                out.append(self._noise_chunk(*args))
        return torch.cat(out, dim=1)


def load_pretrained_mlm_head(heads: WarmupHeads, protein_config) -> bool:
    """Copy ESM's pretrained MLM head (`lm_head.dense`, `lm_head.layer_norm`, `lm_head.bias`) from the encoder
    checkpoint `protein_config._name_or_path` when it has one (EsmForMaskedLM checkpoints such as
    facebook/esm2_t33_650M_UR50D do). Reads only those tensors. Returns whether it did."""
    source = getattr(protein_config, "_name_or_path", "") or ""
    if not source:
        return False
    from safetensors import safe_open
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return False
    if path is None:
        return False
    wanted = {"lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
              "lm_head.bias"}
    with safe_open(path, framework="pt") as handle:
        found = {key: handle.get_tensor(key) for key in handle.keys() if key in wanted}
    if set(found) != wanted:
        return False
    state = {key.removeprefix("lm_head."): value for key, value in found.items()}
    missing, _ = heads.mlm_head.load_state_dict(state, strict=False)
    return all(key == "decoder.weight" for key in missing)


def bert_corrupt(ids: torch.Tensor, candidates: torch.Tensor, mask_ratio: float, mask_token_id: int):
    """BERT's 80/10/10 rule on residue positions `candidates` `(P, T)` bool: `mask_ratio` of them are selected;
    of those 80% become the mask token, 10% a random residue (drawn from the batch's own residues, i.e. the
    empirical amino-acid distribution, whatever the vocabulary) and 10% stay unchanged.

    Returns `(corrupted_ids, selected)` with `selected` `(P, T)` bool: the positions the MLM loss scores."""
    draw = torch.rand(ids.shape, device=ids.device)
    selected = candidates & (draw < mask_ratio)
    action = torch.rand(ids.shape, device=ids.device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    corrupted = ids.masked_fill(to_mask, mask_token_id)
    if to_random.any():
        pool = ids[candidates]
        picks = pool[torch.randint(len(pool), (int(to_random.sum()),), device=ids.device)]
        corrupted = corrupted.masked_scatter(to_random, picks)
    return corrupted, selected


class WarmupModel(nn.Module):
    """SEPIT stage 0 on the protein encoder: contrastive + coordinate denoising + masked LM, weights configurable.

    Wraps the ProtLLM and the training-only `WarmupHeads` in one module so the Trainer (and DDP) sees every
    trained parameter. Captions are embedded by the frozen LLM input embeddings, mean-pooled: the offline
    default text encoder.
    """

    def __init__(self, protllm, heads: WarmupHeads, loss_weights: dict, noise_std: float = 0.2, mask_ratio: float = 0.15):
        super().__init__()
        self.protllm = protllm
        self.heads = heads
        self.loss_weights = loss_weights
        self.noise_std = noise_std
        self.mask_ratio = mask_ratio
        self.loss_parts = Counter()
        self.contrastive_record = []  # (loss, ln(pairs)) per batch: chance level is ln of the batch's caption pairs
        self.pretrained_mlm_head = False  # set by run_stage when ESM's pretrained head was loaded
        encoder = protllm.model.protein_encoder
        heads.to(dtype=next(encoder.parameters()).dtype)  # one dtype with the encoder (AMP upcasts trained ones)
        if encoder.backend == "esm":
            heads.tie_mlm_decoder(encoder.esm.embeddings.word_embeddings)

    # The Trainer turns on gradient checkpointing through these (`gradient_checkpointing: true` in a recipe): the
    # warm-up trains the encoder only, so it is the encoder's layers that recompute.
    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        encoder = self.protllm.model.protein_encoder
        if not hasattr(encoder.esm, "activation_checkpointing_enable"):
            raise ValueError(f"gradient_checkpointing: the {encoder.backend} encoder backend does not support it; "
                             "set `gradient_checkpointing: false` for the warm-up stage")
        encoder.esm.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):  # the transformers 4 name
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        encoder = self.protllm.model.protein_encoder
        if hasattr(encoder.esm, "activation_checkpointing_disable"):
            encoder.esm.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.protllm.model.protein_encoder.esm, "is_activation_checkpointing", False))

    def forward(self, protein_input_ids, protein_attention_mask, caption_input_ids=None, caption_attention_mask=None,
                protein_coords=None, protein_coord_mask=None, **kwargs):
        model = self.protllm
        encoder = model.model.protein_encoder
        ids, attention = protein_input_ids, protein_attention_mask
        losses = {}

        residue_positions = attention.bool().clone()
        residue_positions[:, 0] = False
        residue_positions[torch.arange(len(ids)), attention.sum(1) - 1] = False
        mask_token = model.config.protein_config.mask_token_id
        if self.loss_weights.get("mlm", 0):
            corrupted, masked = bert_corrupt(ids, residue_positions, self.mask_ratio, mask_token)
        else:
            corrupted, masked = ids, torch.zeros_like(residue_positions)
        noisy_coords, noise = protein_coords, None
        if protein_coords is not None and self.loss_weights.get("denoise", 0):
            noise = torch.randn_like(protein_coords[..., 1, :]) * self.noise_std
            noisy_coords = protein_coords + noise.unsqueeze(-2)  # the whole residue moves with its CA noise
        states, residue_mask = encoder(corrupted, attention, noisy_coords, protein_coord_mask)
        if self.loss_weights.get("mlm", 0) and masked.any():
            logits = self.heads.mlm_head(states.to(self.heads.mlm_head.dense.weight.dtype))
            targets = ids[:, 1:-1].masked_fill(~masked[:, 1:-1], -100)
            losses["mlm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        captioned = kwargs.get("caption_present")  # (P,) bool: MLM-only sequences (no caption) sit out the contrastive loss
        if captioned is not None and int(captioned.sum()) < len(ids):
            keep = captioned.bool()
            states_c, residue_mask_c = states[keep], residue_mask[keep]
            caption_input_ids = caption_input_ids[keep] if caption_input_ids is not None else None
            caption_attention_mask = caption_attention_mask[keep] if caption_attention_mask is not None else None
        else:
            states_c, residue_mask_c = states, residue_mask
        if self.loss_weights.get("contrastive", 0) and len(states_c) > 1 and caption_input_ids is not None:
            pooled = (states_c * residue_mask_c.unsqueeze(-1)).sum(1) / residue_mask_c.sum(1, keepdim=True).clamp(min=1)
            with torch.no_grad():
                caption = model.get_input_embeddings()(caption_input_ids).float()
                caption_mask = caption_attention_mask.unsqueeze(-1).float()
                text_pooled = (caption * caption_mask).sum(1) / caption_mask.sum(1).clamp(min=1)
            head_dtype = self.heads.protein_proj.weight.dtype
            losses["contrastive"] = self.heads.contrastive_loss(pooled.to(head_dtype), text_pooled.to(head_dtype))
            self.contrastive_record.append((float(losses["contrastive"].detach()), math.log(len(pooled))))
        if noise is not None:
            residues = states.shape[1]
            ca_mask = protein_coord_mask[:, :residues].bool() & residue_mask
            head_dtype = self.heads.pair_query.weight.dtype
            predicted = self.heads.predict_noise(states.to(head_dtype), noisy_coords[:, :residues, 1].to(head_dtype), ca_mask)
            error = ((predicted.float() - noise[:, :residues].float()) ** 2).sum(-1)
            losses["denoise"] = error[ca_mask].mean() if ca_mask.any() else predicted.sum() * 0
        if not losses:
            raise ValueError("warm-up has no loss to compute: enable mlm, contrastive (batch > 1) or denoise (structures)")
        for name, value in losses.items():
            self.loss_parts[name] += float(value.detach())
        loss = sum(self.loss_weights[name] * value for name, value in losses.items())
        return {"loss": loss}


def _unique_tensors(state_dict: dict) -> tuple[dict, set[str]]:
    """`state_dict` with each tensor once (the first name of tensors shared under several names), and the names dropped."""
    unique, seen, dropped = {}, set(), set()
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            dropped.add(name)
            continue
        seen.add(key)
        unique[name] = tensor
    return unique, dropped


def make_warmup_trainer(warmup_model: WarmupModel, args, train_dataset, collator, new_module_lr_multiplier: float = 10.0,
                        callbacks=None):
    """A Trainer on the warm-up losses; new modules (structure bias, heads) at `new_module_lr_multiplier` x the LR."""

    from .trainers import RemoveFailedCheckpoint

    class ProtLLMWarmupTrainer(RemoveFailedCheckpoint, Trainer):
        def _save(self, output_dir=None, state_dict=None):
            # The wrapper is not a PreTrainedModel, so Trainer writes its raw state dict with safetensors, which
            # refuses tensors shared under two names (an LLM's lm_head tied to embed_tokens). Keep each tensor once:
            # the resume loads it with strict=False, and the tie fills the other name.
            if state_dict is None:
                state_dict, _ = _unique_tensors(self.model.state_dict())
            return super()._save(output_dir, state_dict=state_dict)

        def _issue_warnings_after_load(self, load_result):
            _, tied_names = _unique_tensors(self.model.state_dict())
            missing = [name for name in load_result.missing_keys if name not in tied_names]
            if missing or load_result.unexpected_keys:
                logger.warning("checkpoint load: missing keys %s, unexpected keys %s", missing, load_result.unexpected_keys)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                lr = self.args.learning_rate
                pretrained, new = [], []
                pretrained_head = getattr(self.model, "pretrained_mlm_head", False)
                for name, param in self.model.named_parameters():
                    if param.requires_grad:
                        # ESM's pretrained MLM head is not new: it trains at the encoder's LR.
                        is_new = is_new_warmup_module(name) and not (pretrained_head and ".mlm_head." in name)
                        (new if is_new else pretrained).append(param)
                self.optimizer = torch.optim.AdamW(
                    [{"params": pretrained, "lr": lr}, {"params": new, "lr": lr * new_module_lr_multiplier}],
                    lr=lr, weight_decay=self.args.weight_decay,
                )
            return self.optimizer

    return ProtLLMWarmupTrainer(model=warmup_model, args=args, train_dataset=train_dataset, data_collator=collator,
                                callbacks=callbacks)


class WarmupCollator:
    """Rows -> protein inputs (+ coordinates) and caption token ids (the assistant answer) for the warm-up."""

    def __init__(self, processor, max_caption_tokens: int = 64, max_residues: int | None = None):
        self.processor = processor
        self.max_caption_tokens = max_caption_tokens
        # The stage's `mlm_window`: attention costs grow with the square of the length, so shorter proteins buy more
        # steps in the same time. None: the processor's `max_protein_length`.
        self.max_residues = max_residues or getattr(processor, "max_protein_length", None)
        self.cropped = 0  # sequence-only proteins cut to max_residues here (one log line, not one warning each)

    def _crop(self, protein):
        """A sequence-only protein longer than `max_residues` -> its first `max_residues` residues (the processor's
        own crop when that is `max_protein_length`), counted instead of warned about per protein (proteins with
        structures are left to the processor, which crops the coordinates too)."""
        limit = self.max_residues
        sequence = protein if isinstance(protein, str) else (protein.get("sequence") if isinstance(protein, dict)
                                                             and protein.get("structure") is None else None)
        if not limit or not isinstance(sequence, str) or len(sequence) <= limit:
            return protein
        if self.cropped == 0:
            import logging

            logging.getLogger("protllm.train").info("[warmup] proteins longer than %d residues are cropped to their "
                                                    "first %d (counted in the stage summary)", limit, limit)
        self.cropped += 1
        return sequence[:limit] if isinstance(protein, str) else {**protein, "sequence": sequence[:limit]}

    def __call__(self, rows):
        proteins, captions, captioned = [], [], []
        seen_captions = set()
        for row in rows:
            if "messages" not in row and row.get("sequence"):  # an MLM-only sequence (see `mlm_corpus`)
                proteins.append(row["sequence"])
                captions.append(" ")
                captioned.append(False)
                continue
            messages = messages_for(self.processor, rows_to_messages(row))  # a sequence model: files -> sequences
            _, row_proteins = self.processor.split_messages(messages)
            if not row_proteins:
                raise ValueError(f"warm-up row {row.get('id', '?')} has no protein")
            proteins.append(row_proteins[0])
            answer = next((m for m in messages if m["role"] == "assistant"), None)
            text = answer["content"] if answer and isinstance(answer["content"], str) else " ".join(
                (b.get("text") or "") for b in (answer or {}).get("content", []))
            captions.append(text or " ")
            # A caption already in the batch ("Yes.", a repeated EC number) would be a false negative for the CLIP loss,
            # which takes every other caption of the batch as wrong: its protein joins the MLM-only ones instead.
            key = " ".join(text.lower().split())
            captioned.append(bool(key) and key not in seen_captions)
            seen_captions.add(key)
        proteins = [self._crop(p) for p in proteins]
        prepared = [self.processor.prepare_protein(p, i) for i, p in enumerate(proteins)]
        batch = {k: torch.as_tensor(v) for k, v in self.processor._protein_tensors(prepared).items()}
        caption = self.processor.tokenizer(captions, padding=True, truncation=True, max_length=self.max_caption_tokens,
                                           return_tensors="pt", add_special_tokens=False)
        batch["caption_input_ids"] = caption["input_ids"]
        batch["caption_attention_mask"] = caption["attention_mask"]
        if not all(captioned):
            batch["caption_present"] = torch.tensor(captioned)
        return batch




# ----- the masked-LM corpus and its perplexity ------------------------------------------------------------------


def read_sequences(paths) -> list[str]:
    """Every protein sequence of JSONL files (a row's `sequence`, or the `sequence` of each of its `proteins`),
    upper-cased and de-duplicated in file order. Raises `FileNotFoundError` naming a missing file."""
    import json
    from pathlib import Path

    seen: dict[str, None] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"masked-LM corpus: no such file {path}")
        with open(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: {error}") from None
                found = [row.get("sequence")] + [p.get("sequence") for p in row.get("proteins") or [] if isinstance(p, dict)]
                for sequence in found:
                    if isinstance(sequence, str) and sequence.strip():
                        seen.setdefault(sequence.strip().upper(), None)
    return list(seen)


def mlm_corpus(paths, exclude_paths=(), max_length: int | None = None, seed: int = 0) -> tuple[list[dict], list[str]]:
    """`(rows, held_out)`: warm-up rows `{"sequence"}` for every sequence of `paths` not in `exclude_paths`, and the
    excluded sequences (held out: the perplexity is measured on them). Sequences longer than `max_length` become
    a seeded random window of that length (the whole protein is covered across windows, and no crop warning)."""
    import random

    held_out = read_sequences(exclude_paths)
    excluded = set(held_out)
    rng = random.Random(seed)
    rows = []
    for sequence in read_sequences(paths):
        if sequence in excluded:
            continue
        if max_length and len(sequence) > max_length:
            start = rng.randrange(len(sequence) - max_length + 1)
            sequence = sequence[start:start + max_length]
        rows.append({"sequence": sequence})
    return rows, held_out


def mix_captioned_rows(captioned: list[dict], mlm_only: list[dict], caption_share: float | None,
                       seed: int = 0) -> list[dict]:
    """The warm-up's rows: `captioned` training rows beside the `mlm_only` corpus. With `caption_share` (0 < s < 1)
    the captioned rows are repeated (each pass in a new seeded order) until they make up that share of the rows,
    so a shuffled batch of B rows holds about s*B captioned proteins. Why: the corpus is ~25x larger than the
    captioned rows, so a plain concatenation leaves ~1 captioned protein per batch and the contrastive loss,
    which needs two or more, almost never runs. `None` keeps the plain concatenation."""
    import random

    if not caption_share or not captioned or not mlm_only:
        return list(captioned) + list(mlm_only)
    if not 0 < caption_share < 1:
        raise ValueError(f"warm-up `caption_share` must lie strictly between 0 and 1, got {caption_share}")
    wanted = max(len(captioned), math.ceil(caption_share / (1 - caption_share) * len(mlm_only)))
    rng = random.Random(seed)
    repeated = []
    while len(repeated) < wanted:
        order = list(captioned)
        rng.shuffle(order)
        repeated.extend(order[: wanted - len(repeated)])
    return repeated + list(mlm_only)


@torch.no_grad()
def mlm_perplexity(warmup_model: WarmupModel, processor, sequences: list[str], batch_size: int = 32,
                   mask_ratio: float = 0.15, seed: int = 0, max_length: int | None = None) -> dict:
    """Masked-LM perplexity of the encoder on `sequences`: `exp(mean cross-entropy)` over a seeded `mask_ratio` of
    residues replaced by the mask token (the same positions every call, so before/after are comparable).
    Sequences are cut to their first `max_length` residues. Returns `{"perplexity", "masked_residues", "sequences"}`."""
    model = warmup_model.protllm
    encoder = model.model.protein_encoder
    heads = warmup_model.heads
    mask_token = model.config.protein_config.mask_token_id
    generator = torch.Generator().manual_seed(seed)
    was_training = warmup_model.training
    warmup_model.eval()
    total, count = 0.0, 0
    device = next(encoder.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = [s[:max_length] if max_length else s for s in sequences[start:start + batch_size]]
        prepared = [processor.prepare_protein(s, i) for i, s in enumerate(chunk)]
        batch = processor._protein_tensors(prepared)
        ids = torch.as_tensor(batch["protein_input_ids"])
        attention = torch.as_tensor(batch["protein_attention_mask"])
        residues = attention.bool().clone()
        residues[:, 0] = False
        residues[torch.arange(len(ids)), attention.sum(1) - 1] = False
        masked = residues & (torch.rand(ids.shape, generator=generator) < mask_ratio)
        corrupted = ids.masked_fill(masked, mask_token)
        states, _ = encoder(corrupted.to(device), attention.to(device), None, None)
        logits = heads.mlm_head(states.to(heads.mlm_head.dense.weight.dtype)).float()
        targets = ids[:, 1:-1].masked_fill(~masked[:, 1:-1], -100).to(device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                       reduction="sum"))
        count += int((targets != -100).sum())
    warmup_model.train(was_training)
    return {"perplexity": round(math.exp(total / max(count, 1)), 3), "masked_residues": count, "sequences": len(sequences)}


def unigram_perplexity(train_sequences, held_out: list[str]) -> float:
    """Perplexity of `held_out` residues under the residue frequencies of `train_sequences` (add-one smoothed): what
    an encoder that ignores context scores, the bar a masked LM has to go below to have learned anything else."""
    counts = Counter()
    for sequence in train_sequences:
        counts.update(sequence)
    total = sum(counts.values()) + len(counts) + 1
    log_sum, n = 0.0, 0
    for sequence in held_out:
        for residue in sequence:
            log_sum -= math.log((counts.get(residue, 0) + 1) / total)
            n += 1
    return round(math.exp(log_sum / max(n, 1)), 3)
