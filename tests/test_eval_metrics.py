"""Every metric against values computed by hand on small real examples (yeast SGD descriptions,
New-392 / CLEAN EC numbers, GO terms of Swiss-Prot P84782 / Q59087)."""

import math

import numpy as np
import pytest

from eval import scoring as S


# ---- free text ------------------------------------------------------------------------------
REF = "Ribosomal 60S subunit protein L36B"  # yeast O14455, first clause of its SGD description
PRED = "Ribosomal 60S subunit protein L36A"


def test_word_tokens_lowercase_nltk():
    assert S.word_tokens("Ribosomal 60S subunit protein L36B; binds to 5.8 S rRNA") == [
        "ribosomal", "60s", "subunit", "protein", "l36b", ";", "binds", "to", "5.8", "s", "rrna"]
    assert S.word_tokens(None) == []


def test_bleu_hand_computed():
    # 5 tokens each; matches: 1-gram 4/5, 2-gram 3/4, 3-gram 2/3, 4-gram 1/2; brevity penalty 1
    st = S.bleu_stats(S.word_tokens(PRED), S.word_tokens(REF))
    assert S.bleu_from_stats(st, 2) == pytest.approx(math.sqrt(0.8 * 0.75))
    assert S.bleu_from_stats(st, 4) == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)


def test_bleu_matches_nltk_corpus_bleu_and_brevity():
    from nltk.translate.bleu_score import corpus_bleu

    refs = [REF, "ATP phosphoribosyltransferase; a hexameric enzyme, catalyzes the first step in histidine biosynthesis"]
    preds = [PRED, "ATP phosphoribosyltransferase; catalyzes the first step in histidine biosynthesis"]
    st = np.array([S.bleu_stats(S.word_tokens(p), S.word_tokens(r)) for p, r in zip(preds, refs)]).sum(0)
    R = [[S.word_tokens(r)] for r in refs]
    H = [S.word_tokens(p) for p in preds]
    assert S.bleu_from_stats(st, 2) == pytest.approx(corpus_bleu(R, H, weights=(0.5, 0.5)))
    assert S.bleu_from_stats(st, 4) == pytest.approx(corpus_bleu(R, H))
    # a short hypothesis pays the brevity penalty exp(1 - r/h): 1 token vs 5 -> exp(-4)
    st1 = S.bleu_stats(["ribosomal"], S.word_tokens(REF))
    assert S.bleu_from_stats(st1, 1) == pytest.approx(math.exp(-4))


def test_rouge_and_exact_hand_computed():
    r = S.rouge_per_example([PRED, ""], [REF, REF])
    assert r["rouge1"][0] == pytest.approx(0.8)  # 4 of 5 unigrams both ways
    assert r["rouge2"][0] == pytest.approx(0.75)  # 3 of 4 bigrams
    assert r["rougeL"][0] == pytest.approx(0.8)  # LCS 4
    assert r["rougeL"][1] == 0.0  # empty prediction scored as wrong
    # stemmer: "binds" vs "binding" share the stem "bind"
    assert S.rouge_per_example(["binding zinc"], ["binds zinc"])["rouge1"][0] == pytest.approx(1.0)


def test_text_metrics_identity_and_sacrebleu():
    import sacrebleu

    refs = [REF, "Putative protein of unknown function"]
    preds = [PRED, "Protein of unknown function"]
    res = S.text_metrics(preds, refs, meteor=False)
    assert res["sacrebleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    same = S.text_metrics(refs, refs, meteor=False)
    for k in ("bleu2", "bleu4", "sacrebleu", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert same[k] == pytest.approx(1.0), k
    assert any("BERTScore skipped" in n for n in res["notes"])


def test_meteor_with_wordnet_or_clear_message():
    ok, msg = S.meteor_available()
    if not ok:
        assert "METEOR unavailable" in msg and "wordnet" in msg.lower()
        res = S.text_metrics([PRED], [REF])
        assert "meteor" not in res and any("METEOR unavailable" in n for n in res["notes"])
        pytest.skip(msg)
    from nltk.translate.meteor_score import meteor_score

    m = S.meteor_per_example([PRED, "", REF], [REF, REF, REF])
    # hand: 4 exact matches of 5/5 tokens, 1 chunk: P=R=0.8, Fmean=0.8, penalty 0.5*(1/4)^3
    assert m[0] == pytest.approx(0.8 * (1 - 0.5 * (1 / 4) ** 3))
    assert m[1] == 0.0 and m[2] == pytest.approx(meteor_score([S.word_tokens(REF)], S.word_tokens(REF), wordnet=S.load_wordnet()))
    # WordNet synonyms count ("car" / "auto" share a synset, "enzyme" / "auto" do not)
    syn, non = S.meteor_per_example(["the car", "the enzyme"], ["the auto", "the auto"])
    assert syn > non


# ---- EC ----------------------------------------------------------------------------------------
# New-392 E0VIU9 (2.3.2.31), CLEAN Q838J7 (4.2.1.113), CLEAN C7C422 (3.5.2.6)
EC_REFS = ["2.3.2.31", "4.2.1.113", "3.5.2.6"]
EC_PREDS = ["EC 2.3.2.31", "The enzyme is EC 4.2.1.20.", "I don't know"]


def test_parse_ec():
    assert S.parse_ec("EC 1.1.1.1; EC:2.7.-.- and 3.5.1.n3, 1.1.1.1") == ["1.1.1.1", "2.7.-.-", "3.5.1.n3"]
    assert S.parse_ec("version 1.2.3 of 10.1.2.3.4") == []  # 3 fields / 5 fields are not EC numbers
    assert S.parse_ec(["2.3.2.31", "4.2.1.113"]) == ["2.3.2.31", "4.2.1.113"]
    assert S.parse_ec(None) == []


def test_ec_metrics_hand_computed():
    r = S.ec_metrics(EC_PREDS, EC_REFS)
    # micro: tp 1, predicted 2, true 3
    assert r["micro_precision"] == pytest.approx(0.5)
    assert r["micro_recall"] == pytest.approx(1 / 3)
    assert r["micro_f1"] == pytest.approx(0.4)
    # CLEAN weighted by true support: only 2.3.2.31 is right (P=R=F=1) out of 3 supported labels
    assert r["clean_precision"] == pytest.approx(1 / 3)
    assert r["clean_recall"] == pytest.approx(1 / 3)
    assert r["clean_f1"] == pytest.approx(1 / 3)
    assert r["exact_match"] == pytest.approx(1 / 3)
    assert [r[f"level{k}_accuracy"] for k in range(1, 5)] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert r["unparseable"] == 1


def test_clean_weighted_multilabel():
    # multi-label reference; a false positive on a label with no true support does not lower
    # weighted precision (sklearn semantics, as CLEAN reports)
    r = S.ec_metrics(["1.1.1.1; 9.9.9.9"], ["1.1.1.1; 2.7.11.1"])
    assert r["clean_precision"] == pytest.approx(0.5)
    assert r["clean_recall"] == pytest.approx(0.5)
    assert r["micro_precision"] == pytest.approx(0.5) and r["micro_recall"] == pytest.approx(0.5)
    assert r["exact_match"] == 0.0
    assert r["level1_accuracy"] == 0.0  # prefixes {1, 9} != {1, 2}


# ---- label sets ----------------------------------------------------------------------------------
GO_REF_1 = ("defense response to Gram-negative bacterium; defense response to Gram-positive bacterium; "
            "negative regulation of cell population proliferation; serine-type endopeptidase inhibitor activity")
GO_REF_2 = "3,4-dihydroxybenzoate biosynthetic process; 3-dehydroquinate dehydratase activity"


def test_label_set_f1_hand_computed():
    pred1 = "Defense response to Gram-negative bacterium; serine-type endopeptidase inhibitor activity; cytoplasm."
    one = S.label_set_metrics([pred1], [GO_REF_1])
    assert one["precision"] == pytest.approx(2 / 3) and one["recall"] == pytest.approx(0.5)
    assert one["f1"] == pytest.approx(4 / 7)
    both = S.label_set_metrics([pred1, ""], [GO_REF_1, GO_REF_2])  # commas inside names stay
    assert both["precision"] == pytest.approx(2 / 3) and both["recall"] == pytest.approx(1 / 3)
    assert both["f1"] == pytest.approx(4 / 9)
    assert both["empty_predictions"] == 1 and both["exact_match"] == 0.0
    assert S.split_labels("a; B ;a;\nc") == ["a", "b", "c"]


# ---- evaluate modules --------------------------------------------------------------------------
def test_evaluate_modules_load_offline():
    from eval.metrics import load

    r = load("protein_text").compute(predictions=[PRED, None], references=[REF, REF], meteor=False)
    assert r["rougeL"] == pytest.approx(0.4)
    r = load("ec_metrics").compute(predictions=EC_PREDS, references=EC_REFS)
    assert r["micro_f1"] == pytest.approx(0.4)
    r = load("choice_accuracy").compute(predictions=["The answer is (B).", "maybe", "Yes."], references=["B", "C", "A"])
    assert r["accuracy"] == pytest.approx(1 / 3) and r["unparseable"] == 2
    r = load("choice_accuracy").compute(predictions=["Yes, it does.", "No"], references=["yes", "yes"], kind="yes_no")
    assert r["accuracy"] == pytest.approx(0.5)
    r = load("label_set_f1").compute(predictions=["a; b"], references=["b; c"])
    assert r["f1"] == pytest.approx(0.5)


def test_weighted_prf_fast_path_equals_matrix_form_on_resamples():
    ps = [["1.1.1.1", "9.9.9.9"], ["2.7.11.1"], [], ["3.5.2.6", "1.1.1.1"]]
    ts = [["1.1.1.1", "2.7.11.1"], ["2.7.11.1"], ["4.2.1.1"], ["3.5.2.6"]]
    P, T, _ = S._binarize([set(p) for p in ps], [set(t) for t in ts])
    fast = S.WeightedPRF(ps, ts)
    assert fast() == pytest.approx(S.weighted_prf(P, T))
    idx = np.array([0, 0, 2, 3, 3, 3])
    assert fast(idx) == pytest.approx(S.weighted_prf(P[idx], T[idx]))
