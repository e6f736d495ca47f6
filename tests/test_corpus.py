import itertools
import math

import numpy as np
import pytest

from minilora.corpus import (
    GRAMMAR, NEWLINE_ID, VOCAB, Grammar, bigram_loss, entropy_per_char,
    expected_sentence_length, load_text_file, longest_sentence_length, make_text, render,
    sample_sentence, sample_sentences, sentence_log_prob, train_val_text,
)
from minilora.tokenizer import CharTokenizer

# Small enough to list every sentence (24 noun phrases, 1776 sentences), and "the"
# serves both numbers, as in the full grammar.
TINY = Grammar(
    p_plural=0.3,
    singular_determiners=(("the", 0.7), ("a", 0.3)),
    plural_determiners=(("the", 0.6), ("two", 0.4)),
    p_adjective=0.4,
    adjectives=(("red", 0.8), ("big", 0.2)),
    nouns=(("mouse", "mice", "animal", 0.6), ("box", "boxes", "thing", 0.4)),
    p_transitive=0.45,
    transitive_verbs=(("sees", "see", 1.0),),
    intransitive_verbs=(("runs", "run", 0.7), ("sits", "sit", 0.3)),
    p_place=0.35,
    prepositions=(("on", 1.0),),
)


def enumerate_language(g):
    """Every (sentence, probability) of a grammar, built straight from its tables."""
    noun_phrases = []  # (words, probability, plural)
    for plural, p_number, determiners in ((False, 1 - g.p_plural, g.singular_determiners),
                                          (True, g.p_plural, g.plural_determiners)):
        for (det, p_det), (singular, plural_form, _, p_noun) in itertools.product(determiners, g.nouns):
            noun = plural_form if plural else singular
            p = p_number * p_det * p_noun
            noun_phrases.append((f"{det} {noun}", p * (1 - g.p_adjective), plural))
            for adjective, p_adj in g.adjectives:
                noun_phrases.append((f"{det} {adjective} {noun}", p * g.p_adjective * p_adj, plural))
    for subject, p_subject, plural in noun_phrases:
        for singular_verb, plural_verb, p_verb in g.transitive_verbs:
            verb = plural_verb if plural else singular_verb
            for obj, p_obj, _ in noun_phrases:
                yield f"{subject} {verb} {obj}.", p_subject * g.p_transitive * p_verb * p_obj
        for singular_verb, plural_verb, p_verb in g.intransitive_verbs:
            verb = plural_verb if plural else singular_verb
            p = p_subject * (1 - g.p_transitive) * p_verb
            yield f"{subject} {verb}.", p * (1 - g.p_place)
            for prep, p_prep in g.prepositions:
                for place, p_place, _ in noun_phrases:
                    yield f"{subject} {verb} {prep} {place}.", p * g.p_place * p_prep * p_place


def test_vocab_is_newline_and_printable_ascii():
    tok = CharTokenizer()
    assert tok.vocab_size == len(VOCAB) == 96
    assert VOCAB[NEWLINE_ID] == "\n"
    assert VOCAB[1:] == "".join(chr(c) for c in range(32, 127))


def test_encode_decode_roundtrip():
    tok = CharTokenizer()
    text = VOCAB + make_text(20, seed=0)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert ids[0] == NEWLINE_ID and tok.encode("A")[0] == VOCAB.index("A")


def test_encode_names_out_of_vocabulary_characters():
    with pytest.raises(ValueError) as e:
        CharTokenizer().encode("ok\nca\tt é")
    message = str(e.value)
    assert "2 distinct" in message and "'\\t'" in message and "'é'" in message
    assert "index 5 (line 2, column 3)" in message


def test_decode_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 96\).*96"):
        CharTokenizer().decode([3, 96])


def test_load_text_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(b"hello there.\r\nsecond line\n")
    assert load_text_file(good) == "hello there.\nsecond line\n"

    with pytest.raises(ValueError, match="missing.txt"):
        load_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_text_file(empty)
    fancy = tmp_path / "fancy.txt"
    fancy.write_text("plain\nstill plain\nnaïve “quotes”\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fancy.txt.*3 distinct.*'ï'.*line 3, column 3"):
        load_text_file(fancy)


def test_tiny_language_probabilities_sum_to_one_and_parse_exactly():
    language = list(enumerate_language(TINY))
    texts = [text for text, _ in language]
    assert len(language) == 1776
    assert len(set(texts)) == len(texts)  # one derivation per string
    assert math.fsum(p for _, p in language) == pytest.approx(1.0, abs=1e-12)
    for text, p in language:
        assert sentence_log_prob(text, TINY) == pytest.approx(math.log(p), abs=1e-12)
    assert longest_sentence_length(TINY) == max(len(t) for t in texts)


def test_tiny_language_entropy_rate_matches_enumeration():
    language = list(enumerate_language(TINY))
    entropy = math.fsum(-p * math.log(p) for _, p in language)
    mean_length = math.fsum(p * len(text) for text, p in language)
    assert expected_sentence_length(TINY) == pytest.approx(mean_length, rel=1e-12)
    assert entropy_per_char(TINY) == pytest.approx(entropy / (mean_length + 1), rel=1e-12)


def test_tiny_sampler_hits_only_sentences_of_the_language_at_their_rates():
    rng = np.random.default_rng(0)
    texts = [d["text"] for d in sample_sentences(40_000, rng, TINY)]
    probs = dict(enumerate_language(TINY))
    assert all(t in probs for t in texts)
    # The most common sentence, "the mouse runs.", appears at its rate (4 sigma).
    top, p_top = max(probs.items(), key=lambda item: item[1])
    assert top == "the mouse runs."
    assert abs(texts.count(top) - 40_000 * p_top) < 4 * math.sqrt(40_000 * p_top * (1 - p_top))


def test_entropy_per_char_matches_monte_carlo():
    sentences = sample_sentences(20_000, np.random.default_rng(1))
    neg_log_p = np.array([-sentence_log_prob(s["text"]) for s in sentences])
    lengths = np.array([len(s["text"]) + 1 for s in sentences])
    assert np.isfinite(neg_log_p).all() and (neg_log_p > 0).all()
    assert neg_log_p.mean() / lengths.mean() == pytest.approx(entropy_per_char(), rel=0.01)
    assert lengths.mean() - 1 == pytest.approx(expected_sentence_length(), rel=0.01)
    assert lengths.max() - 1 <= longest_sentence_length()


def test_floor_is_in_range_and_bigram_is_far_worse():
    floor = entropy_per_char()
    assert 0.45 < floor < 1.1
    train, val = train_val_text(n_train=20_000, n_val=2_000, seed=0)
    assert bigram_loss(train, val) >= 1.5 * floor


def test_bigram_loss_of_a_deterministic_text_is_near_zero():
    text = "ab" * 500
    assert bigram_loss(text, text, smoothing=1e-6) < 1e-3
    with pytest.raises(ValueError, match="smoothing"):
        bigram_loss(text, text, smoothing=0)


def test_derivation_fields_match_the_text():
    rng = np.random.default_rng(2)
    for d in sample_sentences(500, rng):
        subject = d["subject"]
        assert render(d) == d["text"]
        assert d["text"].split(" ")[1 if subject["adjective"] is None else 2] == subject["word"]
        assert subject["word"] == (subject["plural_noun"] if subject["plural"] else subject["noun"])
        assert subject["kind"] in ("animal", "person", "thing")
        assert (d["object"] is not None) == d["transitive"]
        assert (d["place"] is not None) == (d["preposition"] is not None) and not (d["transitive"] and d["place"])


def test_sample_sentence_one_at_a_time_matches_bulk():
    rng = np.random.default_rng(3)
    one_by_one = [sample_sentence(rng)["text"] for _ in range(50)]
    assert one_by_one == [d["text"] for d in sample_sentences(50, np.random.default_rng(3))]


def test_make_text_is_seeded_and_every_line_is_a_sentence():
    text = make_text(300, seed=5)
    assert text == make_text(300, seed=5)
    assert text != make_text(300, seed=6)
    assert text.endswith(".\n") and text.count("\n") == 300
    for line in text.splitlines():
        assert math.isfinite(sentence_log_prob(line))


def test_train_and_val_are_independent_draws():
    train, val = train_val_text(n_train=2_000, n_val=500, seed=0)
    assert train.count("\n") == 2_000 and val.count("\n") == 500
    assert not train.startswith(val[:200])
    # The validation stream does not depend on how much training text was drawn.
    assert train_val_text(n_train=10, n_val=500, seed=0)[1] == val
    assert train_val_text(n_train=10, n_val=500, seed=1)[1] != val


@pytest.mark.parametrize("text, reason", [
    ("the cat runs", "ends in '.'"),
    ("the cat runs.\n", "ends in '.'"),
    ("the cats runs.", "agree"),
    ("a cats run.", "not a determiner"),
    ("the cat sees.", "noun phrase"),
    ("the cat runs a ball.", "preposition"),
    ("the cat sees a ball on a hat.", "unexpected words"),
    ("the purple cat runs.", "expected a noun"),
    ("the cat flies.", "expected a verb"),
])
def test_sentence_log_prob_rejects_non_sentences(text, reason):
    with pytest.raises(ValueError, match=reason):
        sentence_log_prob(text)


def test_grammar_rejects_ambiguous_words_and_bad_probabilities():
    with pytest.raises(ValueError, match=r"repeats \['red'\]"):
        Grammar(**{**TINY.__dict__, "nouns": (("red", "reds", "thing", 1.0),)})
    with pytest.raises(ValueError, match="adjectives must have positive probabilities summing to 1"):
        Grammar(**{**TINY.__dict__, "adjectives": (("red", 0.5), ("big", 0.4))})
    with pytest.raises(ValueError, match="p_place"):
        Grammar(**{**TINY.__dict__, "p_place": 1.0})


def test_full_grammar_kinds_are_balanced():
    mass = {}
    for _, _, kind, p in GRAMMAR.nouns:
        mass[kind] = mass.get(kind, 0.0) + p
    assert set(mass) == {"animal", "person", "thing"}
    assert all(abs(m - 1 / 3) < 0.01 for m in mass.values())
