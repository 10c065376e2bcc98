"""Training pieces behind train_sft.py: data collation, the frozen-encoder feature cache, the trainers of
each stage (SEPIT warm-up, STELLA align / instruct, SEPIT MoE) and the loss-curve plot.

Stages (each starts from the previous stage's saved model folder):
    warmup    encoder only: CLIP-style contrastive (protein vs caption), coordinate denoising, masked LM
    align     projector only (encoder and LLM frozen)
    instruct  projector + LLM (full or LoRA), encoder frozen; per-part learning rates
    moe       LLM feed-forward blocks upcycled to experts; router balancing loss through TRL's own path
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

logger = logging.getLogger("protllm.training")

STAGES = ("warmup", "align", "instruct", "moe")


# ----- data ------------------------------------------------------------------------------------------------

def rows_to_messages(row: dict) -> list[dict]:
    """A training row -> chat messages with protein content blocks.

    Accepts dataset rows with `messages` (the data package's schema) and Alpaca / OPI records
    (`instruction`, `input` holding the sequence, `output`).
    """
    if row.get("messages"):
        return row["messages"]
    if "instruction" in row and "output" in row:
        from data.readers import extract_sequence

        sequence, rest = extract_sequence(row.get("input") or "")
        if not sequence:
            raise ValueError(f"record {row.get('id', '?')}: no protein sequence found in its `input` field")
        question = "\n".join(part for part in (row["instruction"], rest) if part)
        return [
            {"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["output"]}]},
        ]
    raise ValueError(f"record {row.get('id', '?')}: expected `messages` or Alpaca fields instruction/input/output")


def load_rows(source: str, split: str | None = None, limit: int | None = None, tasks: list[str] | None = None):
    """Training rows as a `datasets.Dataset`: `demo`, a JSONL/JSON file (rows or Alpaca records) or a saved dataset."""
    import datasets

    if source == "demo":
        from data import load_demo_dataset

        dataset = load_demo_dataset()[split or "train"]
    elif Path(source).is_dir():
        loaded = datasets.load_from_disk(source)
        dataset = loaded[split or "train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset("json", data_files=str(source), split="train")
        if split and "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
    if tasks and "task" in dataset.column_names:
        dataset = dataset.filter(lambda row: row["task"] in tasks)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


class ProtLLMDataCollator:
    """Rows -> padded model inputs with `labels` on assistant answers only.

    Truncation never cuts a protein span: a row longer than `max_length` loses the end of its answer when every
    protein fits, and is dropped otherwise. Both are counted in `stats`. With a `FeatureCache`, protein tokens are
    replaced by the cached encoder states (`protein_embeds`, `protein_embeds_mask`).
    """

    def __init__(self, processor, max_length: int | None = None, feature_cache: "FeatureCache | None" = None):
        self.processor = processor
        self.max_length = max_length
        self.feature_cache = feature_cache
        self.stats = Counter()

    def __call__(self, rows: list[dict]) -> dict:
        conversations = [rows_to_messages(row) for row in rows]
        batch = self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors="pt",
            return_assistant_tokens_mask=True, padding=True, padding_side="right",
        )
        labels = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        batch["labels"] = labels
        self.stats["examples"] += len(rows)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            batch = self._truncate(batch)
        if self.feature_cache is not None and "protein_input_ids" in batch:
            batch = self.feature_cache.swap_in(batch)
        return dict(batch)

    def _truncate(self, batch):
        proc = self.processor
        keep_rows, keep_proteins, first_protein = [], [], 0
        for row in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][row]
            length = int(batch["attention_mask"][row].sum())
            starts = (ids == proc.protein_start_token_id).nonzero().flatten()
            ends = (ids == proc.protein_end_token_id).nonzero().flatten()
            proteins = list(range(first_protein, first_protein + len(starts)))
            first_protein += len(starts)
            if len(ends) and int(ends.max()) >= self.max_length:
                self.stats["dropped_examples"] += 1
                continue
            if length > self.max_length:
                self.stats["truncated_examples"] += 1
                self.stats["truncated_answer_tokens"] += int((batch["labels"][row, self.max_length:] != -100).sum())
            keep_rows.append(row)
            keep_proteins.extend(proteins)
        if not keep_rows:
            raise ValueError(f"every row of this batch has a protein span beyond max_length={self.max_length}; raise max_length "
                             "or lower the processor's max_protein_length")
        out = {}
        for key, value in batch.items():
            if key.startswith("protein_"):
                out[key] = value[keep_proteins]
            else:
                out[key] = value[keep_rows, : self.max_length]
        return out


# ----- frozen-encoder feature cache -------------------------------------------------------------------------

def encoder_fingerprint(model) -> str:
    """Hash of everything that determines the encoder's residue states: weights, config, feature layer."""
    encoder = model.get_base_model().model.protein_encoder if hasattr(model, "get_base_model") else model.model.protein_encoder
    digest = hashlib.sha256()
    config = model.config
    digest.update(json.dumps({
        "protein_config": config.protein_config.to_dict(), "feature_layer": config.protein_feature_layer,
        "backend": config.protein_encoder_backend, "structure": config.use_structure_bias,
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
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"states": states.contiguous().cpu()}, temporary, metadata={"fingerprint": self.fingerprint})
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @torch.no_grad()
    def fill(self, batch):
        """Compute and store the states of every protein of a collated batch not yet in the cache."""
        todo = {}
        for index, ids, coords, mask in self._rows(batch):
            key = self.key(ids, coords, mask)
            if key not in todo and not self.path(key).is_file():  # a protein repeated in a batch is computed once
                todo[key] = index
        todo = [(index, key) for key, index in todo.items()]
        if not todo:
            return 0
        rows = [i for i, _ in todo]
        encoder = self.model.model.protein_encoder
        states, mask = encoder(
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
            path = self.path(self.key(ids, coords, mask))
            if not path.is_file():
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

    def precompute(self, dataset, collator, batch_size: int = 16):
        """Fill the cache for every protein of `dataset` (collated without the cache), with a progress bar."""
        from tqdm.auto import tqdm

        plain = ProtLLMDataCollator(collator.processor, None, None)
        written = 0
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoder feature cache", unit="batch"):
            batch = plain([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            if "protein_input_ids" in batch:
                written += self.fill(batch)
        return written


# ----- trainers -----------------------------------------------------------------------------------------------

def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def part_of(name: str) -> str:
    if "protein_encoder" in name:
        return "protein_encoder"
    if "projector" in name:
        return "projector"
    return "language_model"


def build_optimizer(model, args, part_learning_rates: dict[str, float]):
    """AdamW with one parameter group per part (encoder / projector / LLM), each with its learning rate."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((part_of(name), decay), []).append(param)
    param_groups = [
        {"params": params, "lr": part_learning_rates.get(part, args.learning_rate),
         "weight_decay": args.weight_decay if decay else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def make_sft_trainer(model, processor, args, train_dataset, collator, part_learning_rates=None, eval_dataset=None,
                     callbacks=None, fused_lm_head: bool | None = None):
    """TRL's SFTTrainer with our collator and per-part learning rates.

    `fused_lm_head` (default: on when training on a GPU) keeps TRL's own loss: its chunked LM-head kernel, with the
    MoE router loss added from the router logits our model exposes. Off the GPU that kernel scores every position in
    Python tiles and was 4x slower than plain logits here (tiny model, 49k vocabulary: 11.1 s vs 2.9 s per step), so
    on CPU the model's own forward computes the loss (LM loss + router loss, the same functions) via
    `Trainer.compute_loss`; TRL's entropy / token-accuracy metrics are then not logged.
    """
    from transformers import Trainer as HFTrainer
    from trl import SFTTrainer

    class ProtLLMSFTTrainer(SFTTrainer):
        use_fused_lm_head = fused_lm_head

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = build_optimizer(self.model, self.args, part_learning_rates or {})
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fused = self.use_fused_lm_head
            if fused is None:
                fused = self.args.device.type == "cuda"
            if fused:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            return HFTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return ProtLLMSFTTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=processor.tokenizer, callbacks=callbacks,
    )


class WarmupHeads(nn.Module):
    """Training-only heads of SEPIT's stage-0 encoder warm-up.

    - contrastive: mean-pooled residue states and caption embeddings, each projected to `proj_dim`, CLIP loss
      with a learnable temperature;
    - denoising: an E(3)-equivariant head predicts the Gaussian noise added to CA coordinates as a weighted sum of
      relative position vectors, weights from residue-pair features (invariant), so rotating the input rotates
      the prediction;
    - masked LM: a linear head over the encoder vocabulary on masked residues.
    """

    def __init__(self, protein_width: int, text_width: int, vocab_size: int, proj_dim: int = 512, pair_dim: int = 32):
        super().__init__()
        self.protein_proj = nn.Linear(protein_width, proj_dim)
        self.text_proj = nn.Linear(text_width, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.pair_query = nn.Linear(protein_width, pair_dim)
        self.pair_key = nn.Linear(protein_width, pair_dim)
        self.distance_weight = nn.Sequential(nn.Linear(1, pair_dim), nn.GELU(), nn.Linear(pair_dim, 1))
        self.mlm_head = nn.Linear(protein_width, vocab_size)

    def contrastive_loss(self, protein_pooled, text_pooled):
        p = F.normalize(self.protein_proj(protein_pooled), dim=-1)
        t = F.normalize(self.text_proj(text_pooled), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * p @ t.T
        targets = torch.arange(len(p), device=p.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def predict_noise(self, states, ca, mask):
        """states `(P, R, D)`, noisy CA `(P, R, 3)`, mask `(P, R)` -> predicted noise `(P, R, 3)`."""
        relative = ca.unsqueeze(2) - ca.unsqueeze(1)  # (P, R, R, 3)
        distance = relative.norm(dim=-1, keepdim=True)
        weights = torch.einsum("prd,psd->prs", self.pair_query(states), self.pair_key(states)) / math.sqrt(self.pair_query.out_features)
        weights = weights.unsqueeze(-1) + self.distance_weight(distance)
        pair_mask = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(-1)
        weights = weights * pair_mask
        return (weights * relative).sum(dim=2) / pair_mask.sum(dim=2).clamp(min=1)


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

    def forward(self, protein_input_ids, protein_attention_mask, caption_input_ids=None, caption_attention_mask=None,
                protein_coords=None, protein_coord_mask=None, **kwargs):
        model = self.protllm
        encoder = model.model.protein_encoder
        ids, attention = protein_input_ids, protein_attention_mask
        losses = {}

        residue_positions = attention.bool().clone()
        residue_positions[:, 0] = False
        residue_positions[torch.arange(len(ids)), attention.sum(1) - 1] = False
        masked = residue_positions & (torch.rand(ids.shape, device=ids.device) < self.mask_ratio)
        noisy_coords, noise = protein_coords, None
        if protein_coords is not None and self.loss_weights.get("denoise", 0):
            noise = torch.randn_like(protein_coords[..., 1, :]) * self.noise_std
            noisy_coords = protein_coords + noise.unsqueeze(-2)  # the whole residue moves with its CA noise
        mask_token = model.config.protein_config.mask_token_id
        states, residue_mask = encoder(ids.masked_fill(masked, mask_token), attention, noisy_coords, protein_coord_mask)
        if self.loss_weights.get("mlm", 0) and masked.any():
            logits = self.heads.mlm_head(states)
            targets = ids[:, 1:-1].masked_fill(~masked[:, 1:-1], -100)
            losses["mlm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if self.loss_weights.get("contrastive", 0) and len(ids) > 1 and caption_input_ids is not None:
            pooled = (states * residue_mask.unsqueeze(-1)).sum(1) / residue_mask.sum(1, keepdim=True).clamp(min=1)
            with torch.no_grad():
                caption = model.get_input_embeddings()(caption_input_ids).float()
                caption_mask = caption_attention_mask.unsqueeze(-1).float()
                text_pooled = (caption * caption_mask).sum(1) / caption_mask.sum(1).clamp(min=1)
            losses["contrastive"] = self.heads.contrastive_loss(pooled.float(), text_pooled)
        if noise is not None:
            residues = states.shape[1]
            ca_mask = protein_coord_mask[:, :residues].bool() & residue_mask
            predicted = self.heads.predict_noise(states.float(), noisy_coords[:, :residues, 1].float(), ca_mask)
            error = ((predicted - noise[:, :residues]) ** 2).sum(-1)
            losses["denoise"] = error[ca_mask].mean() if ca_mask.any() else predicted.sum() * 0
        if not losses:
            raise ValueError("warm-up has no loss to compute: enable mlm, contrastive (batch > 1) or denoise (structures)")
        for name, value in losses.items():
            self.loss_parts[name] += float(value.detach())
        loss = sum(self.loss_weights[name] * value for name, value in losses.items())
        return {"loss": loss}


def make_warmup_trainer(warmup_model: WarmupModel, args, train_dataset, collator, new_module_lr_multiplier: float = 10.0,
                        callbacks=None):
    """A Trainer on the warm-up losses; new modules (structure bias, heads) at `new_module_lr_multiplier` x the LR."""

    class ProtLLMWarmupTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                lr = self.args.learning_rate
                pretrained, new = [], []
                for name, param in self.model.named_parameters():
                    if param.requires_grad:
                        (new if ("structure_bias" in name or name.startswith("heads.")) else pretrained).append(param)
                self.optimizer = torch.optim.AdamW(
                    [{"params": pretrained, "lr": lr}, {"params": new, "lr": lr * new_module_lr_multiplier}],
                    lr=lr, weight_decay=self.args.weight_decay,
                )
            return self.optimizer

    return ProtLLMWarmupTrainer(model=warmup_model, args=args, train_dataset=train_dataset, data_collator=collator,
                                callbacks=callbacks)


class WarmupCollator:
    """Rows -> protein inputs (+ coordinates) and caption token ids (the assistant answer) for the warm-up."""

    def __init__(self, processor, max_caption_tokens: int = 64):
        self.processor = processor
        self.max_caption_tokens = max_caption_tokens

    def __call__(self, rows):
        proteins, captions = [], []
        for row in rows:
            messages = rows_to_messages(row)
            _, row_proteins = self.processor.split_messages(messages)
            if not row_proteins:
                raise ValueError(f"warm-up row {row.get('id', '?')} has no protein")
            proteins.append(row_proteins[0])
            answer = next((m for m in messages if m["role"] == "assistant"), None)
            text = answer["content"] if answer and isinstance(answer["content"], str) else " ".join(
                (b.get("text") or "") for b in (answer or {}).get("content", []))
            captions.append(text or " ")
        prepared = [self.processor.prepare_protein(p, i) for i, p in enumerate(proteins)]
        batch = {k: torch.as_tensor(v) for k, v in self.processor._protein_tensors(prepared).items()}
        caption = self.processor.tokenizer(captions, padding=True, truncation=True, max_length=self.max_caption_tokens,
                                           return_tensors="pt", add_special_tokens=False)
        batch["caption_input_ids"] = caption["input_ids"]
        batch["caption_attention_mask"] = caption["attention_mask"]
        return batch


# ----- observing ------------------------------------------------------------------------------------------------

class CollatorStatsCallback(TrainerCallback):
    """Logs the collator's truncation counts (what was dropped or shortened) with the training loss."""

    def __init__(self, collator):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            for key in ("truncated_examples", "truncated_answer_tokens", "dropped_examples"):
                logs[f"collator/{key}"] = self.collator.stats.get(key, 0)


def plot_loss_curves(histories: dict[str, list[dict]], path) -> Path | None:
    """One PNG with the training loss of every stage (x: step within the stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for stage, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker=".", label=stage)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step (per stage)")
    ax.set_ylabel("training loss")
    ax.set_title("ProtLLM training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
