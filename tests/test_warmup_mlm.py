"""The warm-up's masked-LM corpus (every real sequence, test proteins held out) and its perplexity."""

import json

import torch

from protllm.testing import build_tiny_protllm
from protllm.training.warmup import WarmupCollator, WarmupHeads, WarmupModel, mlm_corpus, mlm_perplexity, read_sequences

SHARED = "../shared/data"


def test_corpus_reads_every_sequence_holds_out_test_proteins_and_crops(tmp_path):
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    long = "M" + "ACDEFGHIKLMNPQRSTVWY" * 30  # 601 residues
    train.write_text("\n".join(json.dumps(r) for r in [
        {"sequence": "mkvl"}, {"sequence": "MKVL"}, {"proteins": [{"sequence": "MAAA"}, {"sequence": long}]},
        {"sequence": "MTEST"}, {"description": "no sequence"}]) + "\n")
    test.write_text(json.dumps({"proteins": [{"sequence": "MTEST"}]}) + "\n")
    assert read_sequences([train]) == ["MKVL", "MAAA", long, "MTEST"]
    rows, held_out = mlm_corpus([train], [test], max_length=256, seed=0)
    assert held_out == ["MTEST"]
    assert [r["sequence"] for r in rows[:2]] == ["MKVL", "MAAA"] and "MTEST" not in {r["sequence"] for r in rows}
    window = rows[2]["sequence"]
    assert len(window) == 256 and window in long
    missing = tmp_path / "nope.jsonl"
    try:
        read_sequences([missing])
    except FileNotFoundError as error:
        assert "nope.jsonl" in str(error)
    else:
        raise AssertionError("a missing corpus file must be refused by name")


def test_real_corpus_is_every_shared_sequence():
    sequences = read_sequences([f"{SHARED}/function/yeast_function.jsonl", f"{SHARED}/ec/clean_split10.jsonl"])
    assert len(sequences) > 10_000 and all(s.isalpha() and s.isupper() for s in sequences[:100])


def test_mlm_perplexity_is_seeded_and_falls_when_the_encoder_learns():
    """Same masks every call (before/after comparable); a few MLM steps on the corpus lower the held-out perplexity."""
    torch.manual_seed(0)
    model, processor = build_tiny_protllm()
    config = model.config.protein_config
    heads = WarmupHeads(config, model.config.text_config.hidden_size, proj_dim=16)
    wrapper = WarmupModel(model, heads, {"mlm": 1.0, "contrastive": 0.0, "denoise": 0.0})
    # A low-entropy "family": the encoder can learn its residue statistics in a few steps.
    motif = "MKKLLAAGLLEEKKAA"
    corpus = [{"sequence": (motif * 4)[i:i + 48]} for i in range(16)]
    held_out = [(motif * 4)[i:i + 48] for i in (1, 3, 5, 7, 9, 11)]
    before = mlm_perplexity(wrapper, processor, held_out, seed=0)
    assert before == mlm_perplexity(wrapper, processor, held_out, seed=0) and before["masked_residues"] > 0
    collator = WarmupCollator(processor)
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    wrapper.train()
    for step in range(40):
        batch = collator(corpus[(step * 8) % 16:(step * 8) % 16 + 8])
        assert not batch["caption_present"].any()  # sequence-only rows sit out the contrastive loss
        loss = wrapper(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = mlm_perplexity(wrapper, processor, held_out, seed=0)
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)


def test_unigram_reference_perplexity():
    """Residue frequencies alone (add-one smoothed): A 3x, B 1x -> P(A) = 4/7, P(B) = 2/7 -> ppl("AB") = 7 / sqrt(8)."""
    from protllm.training.warmup import unigram_perplexity

    assert abs(unigram_perplexity(["AAAB"], ["AB"]) - 7 / 8 ** 0.5) < 1e-3


def test_warmup_collator_crops_long_sequences_quietly():
    import warnings

    _, processor = build_tiny_protllm()
    processor.max_protein_length = 64
    collator = WarmupCollator(processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-protein crop warning
        batch = collator([{"sequence": "MKV" * 40}, {"sequence": "MKVL"}])
    assert collator.cropped == 1 and batch["protein_input_ids"].shape[1] == 64 + 2  # + cls/eos


def test_mlm_window_crops_captioned_proteins_and_is_a_checked_recipe_key():
    """`mlm_window: 32` cuts sequence-only proteins of the warm-up batch to 32 residues (a protein already within it
    is untouched), below the model's `max_protein_length`; a recipe with a window that is not a whole number of
    residues is refused naming the key."""
    import pytest

    from protllm.training.recipe import RecipeError, validate_recipe

    _, processor = build_tiny_protllm()
    processor.max_protein_length = 64
    collator = WarmupCollator(processor, max_residues=32)
    batch = collator([{"sequence": "MKV" * 20}, {"sequence": "MKVL"}])
    assert collator.cropped == 1 and batch["protein_input_ids"].shape[1] == 32 + 2  # + cls/eos
    assert int(batch["protein_attention_mask"][1].sum()) == 4 + 2
    recipe = {"model": {}, "stages": [{"name": "warmup", "mlm_window": 128}]}
    validate_recipe(recipe, "demo.yaml")
    for bad in (0, 12.5, "128", True):
        recipe["stages"][0]["mlm_window"] = bad
        with pytest.raises(RecipeError, match=r"demo.yaml: `stages\[0\].mlm_window` must be a whole number"):
            validate_recipe(recipe, "demo.yaml")


def test_caption_share_repeats_captioned_rows_so_batches_hold_caption_pairs():
    """A corpus 25x the captioned rows: a plain mix leaves ~1 captioned protein per batch of 32 (no contrastive pair);
    `caption_share: 0.5` repeats captioned rows (each pass reshuffled, seeded) to half the rows, and the contrastive
    loss then runs on shuffled batches."""
    import random

    from protllm.training.warmup import mix_captioned_rows

    captioned = [{"messages": [f"row {i}"]} for i in range(40)]
    corpus = [{"sequence": f"M{i}"} for i in range(1000)]
    assert mix_captioned_rows(captioned, corpus, None) == captioned + corpus
    mixed = mix_captioned_rows(captioned, corpus, 0.5, seed=3)
    assert mixed == mix_captioned_rows(captioned, corpus, 0.5, seed=3)  # seeded
    repeated = [r for r in mixed if "messages" in r]
    assert len(repeated) == 1000 and mixed[1000:] == corpus
    # every captioned row is used, each about equally often (whole passes, the last one partial)
    counts = {r["messages"][0]: repeated.count(r) for r in captioned}
    assert set(counts.values()) <= {25}
    random.Random(0).shuffle(mixed)
    per_batch = [sum("messages" in r for r in mixed[i:i + 32]) for i in range(0, 2000 - 31, 32)]
    assert min(per_batch) >= 2 and 12 <= sum(per_batch) / len(per_batch) <= 20
    for bad in (0.0, 1.0, 1.5):
        if bad:
            try:
                mix_captioned_rows(captioned, corpus, bad)
            except ValueError as error:
                assert "caption_share" in str(error)
            else:
                raise AssertionError(f"caption_share {bad} must be refused")


def test_caption_share_is_a_recipe_key():
    from protllm.training.recipe import STAGE_KEYS

    assert "caption_share" in STAGE_KEYS


def test_warmup_collator_keeps_a_repeated_caption_out_of_the_contrastive_loss():
    """Two proteins captioned "Yes." in one batch would each be the other's false negative under the CLIP loss: the
    second one (case and spacing aside) is MLM-only; distinct captions stay paired."""
    _, processor = build_tiny_protllm()
    collator = WarmupCollator(processor)

    def row(sequence, answer):
        return {"id": sequence, "messages": [
            {"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": "Is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    batch = collator([row("MKVL", "Yes."), row("MAAG", "Kinase."), row("MTTE", " yes. "), {"sequence": "MQQR"}])
    assert batch["caption_present"].tolist() == [True, True, False, False]
    assert "caption_present" not in collator([row("MKVL", "Yes."), row("MAAG", "No.")])


def test_warmup_stage_trains_on_the_corpus_windows_and_reports_held_out_perplexity(tmp_path):
    """The warm-up stage as a recipe runs it: `mlm_sequences` (a held-out file excluded), `mlm_window` residues per
    protein, `caption_share`; the stage summary records the corpus, its window, and the held-out perplexity before
    and after beside the residue-frequency reference."""
    import pytest

    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from protllm.training.stages import run_stage

    residues = "ACDEFGHIKLMNPQRSTVWY"
    corpus, test = tmp_path / "corpus.jsonl", tmp_path / "test.jsonl"
    corpus.write_text("".join(json.dumps({"sequence": "M" + "".join(residues[(i * j) % 20] for j in range(90))}) + "\n"
                              for i in range(1, 13)))
    test.write_text(json.dumps({"sequence": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"}) + "\n")
    captioned = Dataset.from_list([{"id": f"R{i}", "messages": [
        {"role": "user", "content": [{"type": "protein", "sequence": "MKV" * 20 + residues[i]},
                                     {"type": "text", "text": "What does it do?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"Function number {i}."}]}]} for i in range(4)])
    model, processor = build_tiny_protllm()
    args = SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
                     use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, disable_tqdm=True)
    stage = {"name": "warmup", "mlm_sequences": [str(corpus), str(test)], "mlm_exclude": [str(test)], "mlm_window": 40,
             "caption_share": 0.5}
    _, _, summary = run_stage(model, processor, stage, captioned, args, tmp_path)
    assert summary["steps"] == 3
    assert summary["mlm_corpus"]["sequences"] == 12 and summary["mlm_corpus"]["window"] == 40
    perplexity = summary["mlm_perplexity"]
    assert perplexity["before"]["sequences"] == 1 and perplexity["before"]["masked_residues"] > 0
    assert perplexity["after"]["masked_residues"] == perplexity["before"]["masked_residues"]  # the same masks
    assert perplexity["unigram_reference"] > 1
    assert summary["cropped_proteins"] > 0  # the 61-residue captioned proteins were cut to the window
