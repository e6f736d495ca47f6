"""The toy language the model is pretrained on, its exact entropy, and its character vocabulary.

A tiny probabilistic grammar writes short English-like sentences such as

    the red cat chases two mice.
    some children sleep near a big box.

    sentence     -> subject verb_phrase "."
    subject      -> noun_phrase                 (the verb agrees with its number)
    verb_phrase  -> transitive_verb noun_phrase
                  | intransitive_verb [preposition noun_phrase]
    noun_phrase  -> determiner [adjective] noun (singular or plural)

Every word list is disjoint from every other, so a string has exactly one
derivation and P(sentence) is the product of the probabilities of the choices
that made it. That is what lets us compute the entropy of the language exactly,
and so know the lowest loss any model could reach, before training anything.

The corpus is sentences, each followed by "\\n", written in a fixed 96-symbol
vocabulary, VOCAB: newline plus printable ASCII. tokenizer.CharTokenizer reads
it one character per token (the entropy floor below is per character).
"""

import bisect
import math
from dataclasses import dataclass

import numpy as np

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
NEWLINE_ID = 0


def out_of_vocab_report(text):
    """Describe the characters of text outside VOCAB, or return None if there are none."""
    bad = sorted({ch for ch in text if ch not in VOCAB})
    if not bad:
        return None
    first = min(text.index(ch) for ch in bad)
    line = text.count("\n", 0, first) + 1
    column = first - (text.rfind("\n", 0, first) + 1) + 1
    shown = ", ".join(repr(ch) for ch in bad[:10]) + (", ..." if len(bad) > 10 else "")
    return (
        f"{len(bad)} distinct character(s) outside the vocabulary (newline + printable ASCII): "
        f"{shown}; the first, {text[first]!r}, is at index {first} (line {line}, column {column})"
    )


def load_text_file(path, problem=out_of_vocab_report):
    """Read a user's plain-text file for pretraining.

    Inputs:
    - path: str or os.PathLike of a UTF-8 text file. Windows line endings are
      read as "\\n" (Python's universal newlines).
    - problem: problem(text) -> why the run's tokenizer cannot encode text, or
      None (tokenizer.problem); by default, the characters outside VOCAB.

    Returns:
    - text: str, every character of it encodable.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"load_text_file: cannot read path {str(path)!r} as UTF-8 text: {e}") from e
    if not text:
        raise ValueError(f"load_text_file: path {str(path)!r} is empty; expected some text to train on")
    report = problem(text)
    if report is not None:
        raise ValueError(f"load_text_file: path {str(path)!r} has {report}")
    return text


@dataclass(frozen=True)
class Grammar:
    """The probability tables of the toy language. Every table's probabilities sum to 1."""

    p_plural: float  # P(a noun phrase is plural); each noun phrase decides on its own
    singular_determiners: tuple  # ((word, probability), ...), used when the noun is singular
    plural_determiners: tuple  # ((word, probability), ...), used when the noun is plural
    p_adjective: float  # P(a noun phrase has an adjective)
    adjectives: tuple  # ((word, probability), ...)
    nouns: tuple  # ((singular, plural, kind, probability), ...)
    p_transitive: float  # P(the verb phrase is transitive verb + object)
    transitive_verbs: tuple  # ((form after a singular subject, after a plural one, probability), ...)
    intransitive_verbs: tuple  # same layout as transitive_verbs
    p_place: float  # P(an intransitive verb is followed by preposition + noun phrase)
    prepositions: tuple  # ((word, probability), ...)

    def __post_init__(self):
        for name in ("p_plural", "p_adjective", "p_transitive", "p_place"):
            p = getattr(self, name)
            if not 0.0 < p < 1.0:
                raise ValueError(f"Grammar: {name} must be strictly between 0 and 1, got {p}")
        for name in ("singular_determiners", "plural_determiners", "adjectives", "nouns",
                     "transitive_verbs", "intransitive_verbs", "prepositions"):
            probs = [row[-1] for row in getattr(self, name)]
            if not probs or min(probs) <= 0.0 or abs(sum(probs) - 1.0) > 1e-9:
                raise ValueError(f"Grammar: {name} must have positive probabilities summing to 1, got {probs}")
        # A word may sit in two tables only as a determiner ("the" is singular and
        # plural); the noun's form then settles the number, so parses stay unique.
        determiners = {w for w, _ in self.singular_determiners + self.plural_determiners}
        categories = [
            determiners,
            [w for w, _ in self.adjectives],
            [form for s, p, _, _ in self.nouns for form in (s, p)],
            [form for s, p, _ in self.transitive_verbs + self.intransitive_verbs for form in (s, p)],
            [w for w, _ in self.prepositions],
        ]
        words = [w for category in categories for w in category]
        repeated = sorted({w for w in words if words.count(w) > 1})
        if repeated:
            raise ValueError(f"Grammar: every word must belong to one category in one form, got repeats {repeated}")
        if any(not w or not set(w) <= set("abcdefghijklmnopqrstuvwxyz") for w in words):
            raise ValueError(f"Grammar: words must be non-empty lowercase ASCII letters, got {words}")


GRAMMAR = Grammar(
    p_plural=0.4,
    singular_determiners=(("the", 0.4), ("a", 0.3), ("my", 0.2), ("one", 0.1)),
    plural_determiners=(("the", 0.4), ("some", 0.3), ("my", 0.2), ("two", 0.1)),
    p_adjective=0.5,
    adjectives=(
        ("red", 0.2), ("big", 0.15), ("small", 0.15), ("new", 0.1),
        ("wet", 0.1), ("dark", 0.1), ("hot", 0.1), ("tall", 0.1),
    ),
    nouns=(
        ("cat", "cats", "animal", 0.10),
        ("dog", "dogs", "animal", 0.08),
        ("fox", "foxes", "animal", 0.06),
        ("mouse", "mice", "animal", 0.05),
        ("goose", "geese", "animal", 0.04),
        ("boy", "boys", "person", 0.10),
        ("girl", "girls", "person", 0.08),
        ("man", "men", "person", 0.06),
        ("woman", "women", "person", 0.05),
        ("child", "children", "person", 0.04),
        ("ball", "balls", "thing", 0.11),
        ("box", "boxes", "thing", 0.08),
        ("cup", "cups", "thing", 0.06),
        ("hat", "hats", "thing", 0.05),
        ("key", "keys", "thing", 0.04),
    ),
    p_transitive=0.5,
    transitive_verbs=(
        ("sees", "see", 0.3), ("likes", "like", 0.25), ("finds", "find", 0.2),
        ("chases", "chase", 0.15), ("holds", "hold", 0.1),
    ),
    intransitive_verbs=(("runs", "run", 0.4), ("sleeps", "sleep", 0.3), ("sits", "sit", 0.2), ("waits", "wait", 0.1)),
    p_place=0.5,
    prepositions=(("on", 0.3), ("in", 0.3), ("near", 0.2), ("by", 0.2)),
)

# Choice points per sentence: 5 per noun phrase (number, determiner, has-adjective,
# adjective, noun) times 2 noun phrases, plus transitive?, verb, place? and the
# preposition. Each sentence reads a fixed block of uniforms (unused ones are
# skipped), so a whole corpus is drawn with one rng.random call and sentence i
# depends only on block i.
_UNIFORMS_PER_SENTENCE = 14


def _cumulative(table):
    """(words, cumulative probabilities) of a table whose rows end in a probability."""
    return [row[:-1] for row in table], np.cumsum([row[-1] for row in table]).tolist()


def _pick(table, u):
    """Inverse-CDF sampling: the row whose cumulative-probability interval holds u in [0, 1)."""
    rows, cdf = table
    return rows[min(bisect.bisect_right(cdf, u), len(rows) - 1)]


def _sampling_tables(grammar):
    return {name: _cumulative(getattr(grammar, name)) for name in (
        "singular_determiners", "plural_determiners", "adjectives", "nouns",
        "transitive_verbs", "intransitive_verbs", "prepositions")}


def _derive_noun_phrase(u, grammar, tables):
    """Sample a noun phrase from the 5 uniforms u; see sample_sentence for the fields."""
    plural = bool(u[0] < grammar.p_plural)
    (determiner,) = _pick(tables["plural_determiners" if plural else "singular_determiners"], u[1])
    adjective = _pick(tables["adjectives"], u[3])[0] if u[2] < grammar.p_adjective else None
    singular, plural_form, kind = _pick(tables["nouns"], u[4])
    return {"determiner": determiner, "adjective": adjective, "noun": singular, "plural_noun": plural_form,
            "plural": plural, "word": plural_form if plural else singular, "kind": kind}


def _derive_sentence(u, grammar, tables):
    subject = _derive_noun_phrase(u[0:5], grammar, tables)
    transitive = bool(u[5] < grammar.p_transitive)
    verb_forms = _pick(tables["transitive_verbs" if transitive else "intransitive_verbs"], u[6])
    derivation = {"subject": subject, "verb": verb_forms[1] if subject["plural"] else verb_forms[0],
                  "transitive": transitive, "object": None, "preposition": None, "place": None}
    if transitive:
        derivation["object"] = _derive_noun_phrase(u[8:13], grammar, tables)
    elif u[7] < grammar.p_place:
        # The place reuses the object's uniforms: the two never occur together.
        (derivation["preposition"],) = _pick(tables["prepositions"], u[13])
        derivation["place"] = _derive_noun_phrase(u[8:13], grammar, tables)
    derivation["text"] = render(derivation)
    return derivation


def render(derivation):
    """The sentence a derivation spells, e.g. "the red cat chases two mice." (no newline)."""
    def phrase(np_):
        return " ".join(w for w in (np_["determiner"], np_["adjective"], np_["word"]) if w is not None)

    words = [phrase(derivation["subject"]), derivation["verb"]]
    if derivation["object"] is not None:
        words.append(phrase(derivation["object"]))
    if derivation["place"] is not None:
        words += [derivation["preposition"], phrase(derivation["place"])]
    return " ".join(words) + "."


def sample_sentences(n, rng, grammar=GRAMMAR):
    """Draw n independent sentences with their derivations.

    Inputs:
    - n: int >= 0, number of sentences.
    - rng: numpy.random.Generator.
    - grammar: the Grammar to sample from.

    Returns a list of n derivations; each is a dict with
    - "text": the sentence, ending in "." (no newline);
    - "subject", "object", "place": noun phrases (object and place may be None), each a dict
      with "determiner", "adjective" (or None), "noun" (singular form), "plural_noun",
      "plural" (bool), "word" (the noun as written) and "kind" ("animal", "person", "thing");
    - "verb" (as written), "transitive" (bool), "preposition" (or None).
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"sample_sentences: n must be an int >= 0, got {n!r}")
    tables = _sampling_tables(grammar)
    uniforms = rng.random((int(n), _UNIFORMS_PER_SENTENCE)).tolist()
    return [_derive_sentence(u, grammar, tables) for u in uniforms]


def sample_sentence(rng, grammar=GRAMMAR):
    """One sentence's derivation; the same dict as an element of sample_sentences."""
    return sample_sentences(1, rng, grammar)[0]


def make_text(n_sentences, seed, grammar=GRAMMAR):
    """
    Inputs:
    - n_sentences: int >= 0.
    - seed: int (or SeedSequence) for numpy.random.default_rng.

    Returns:
    - text: str, the sentences each followed by "\\n".
    """
    sentences = sample_sentences(n_sentences, np.random.default_rng(seed), grammar)
    return "".join(s["text"] + "\n" for s in sentences)


def train_val_text(n_train=50_000, n_val=2_000, seed=0, grammar=GRAMMAR):
    """Training and validation text drawn from two independent random streams.

    Inputs:
    - n_train, n_val: number of sentences in each.
    - seed: int; SeedSequence(seed).spawn(2) gives the two streams, so the
      validation text does not depend on n_train.

    Returns:
    - (train_text, val_text): str, str.
    """
    train_seed, val_seed = np.random.SeedSequence(seed).spawn(2)
    return make_text(n_train, train_seed, grammar), make_text(n_val, val_seed, grammar)


class NotASentence(ValueError):
    """The text is not a sentence of the toy language (sentence_log_prob says where it fails)."""


def _parse_noun_phrase(words, i, grammar, where):
    """Parse the noun phrase starting at words[i]; return (log P(choices), number_is_plural, next i)."""
    determiners = {"singular": dict(grammar.singular_determiners), "plural": dict(grammar.plural_determiners)}
    adjectives = dict(grammar.adjectives)
    nouns = {}
    for singular, plural, _, p in grammar.nouns:
        nouns[singular] = (False, p)
        nouns[plural] = (True, p)
    if i + 1 >= len(words):
        raise NotASentence(f"{where}: a noun phrase is cut short after {' '.join(words[i:])!r}")
    determiner, i = words[i], i + 1
    log_p = 0.0
    if words[i] in adjectives:
        log_p += math.log(grammar.p_adjective) + math.log(adjectives[words[i]])
        i += 1
    else:
        log_p += math.log(1.0 - grammar.p_adjective)
    if i >= len(words) or words[i] not in nouns:
        raise NotASentence(f"{where}: expected a noun after {' '.join(words[:i])!r}")
    plural, p_noun = nouns[words[i]]
    number = "plural" if plural else "singular"
    if determiner not in determiners[number]:
        raise NotASentence(f"{where}: {determiner!r} is not a determiner for the {number} noun {words[i]!r}")
    p_number = grammar.p_plural if plural else 1.0 - grammar.p_plural
    log_p += math.log(p_number) + math.log(determiners[number][determiner]) + math.log(p_noun)
    return log_p, plural, i + 1


def sentence_log_prob(text, grammar=GRAMMAR):
    """The exact natural-log probability of one sentence of the language.

    Inputs:
    - text: str, one sentence ending in "." and without the newline, e.g. "the cat runs."

    Returns:
    - log_p: float, log P(text) = the sum of the logs of the choices in its one derivation.
    """
    where = f"sentence_log_prob: expected a sentence of the toy language, got {text!r}"
    if not isinstance(text, str) or not text.endswith(".") or "\n" in text:
        raise NotASentence(f"{where}; a sentence ends in '.' and holds no newline")
    words = text[:-1].split(" ")
    log_p, subject_plural, i = _parse_noun_phrase(words, 0, grammar, where)
    verbs = {}
    for transitive, table in ((True, grammar.transitive_verbs), (False, grammar.intransitive_verbs)):
        for singular, plural, p in table:
            verbs[singular] = (transitive, False, p)
            verbs[plural] = (transitive, True, p)
    if i >= len(words) or words[i] not in verbs:
        raise NotASentence(f"{where}; expected a verb after {' '.join(words[:i])!r}")
    transitive, verb_plural, p_verb = verbs[words[i]]
    if verb_plural != subject_plural:
        raise NotASentence(f"{where}; the verb {words[i]!r} does not agree in number with the subject")
    i += 1
    log_p += math.log(p_verb)
    if transitive:
        log_p += math.log(grammar.p_transitive)
        object_log_p, _, i = _parse_noun_phrase(words, i, grammar, where)
        log_p += object_log_p
    else:
        log_p += math.log(1.0 - grammar.p_transitive)
        prepositions = dict(grammar.prepositions)
        if i == len(words):
            log_p += math.log(1.0 - grammar.p_place)
        elif words[i] in prepositions:
            log_p += math.log(grammar.p_place) + math.log(prepositions[words[i]])
            place_log_p, _, i = _parse_noun_phrase(words, i + 1, grammar, where)
            log_p += place_log_p
        else:
            raise NotASentence(f"{where}; expected '.' or a preposition after {' '.join(words[:i])!r}")
    if i != len(words):
        raise NotASentence(f"{where}; unexpected words after the sentence ends: {' '.join(words[i:])!r}")
    return log_p


def _entropy(probs):
    """H(p) = -sum p log p, in nats."""
    return -sum(p * math.log(p) for p in probs)


def _mean_length(table, column=0):
    """E[len(word)] under a table's probabilities, for the word in the given column."""
    return sum(row[-1] * len(row[column]) for row in table)


def expected_sentence_length(grammar=GRAMMAR):
    """E[len(sentence)] in characters, counting the final "." but not the newline."""
    q = grammar.p_plural
    determiner = (1 - q) * _mean_length(grammar.singular_determiners) + q * _mean_length(grammar.plural_determiners)
    noun = (1 - q) * _mean_length(grammar.nouns, 0) + q * _mean_length(grammar.nouns, 1)
    adjective = grammar.p_adjective * (_mean_length(grammar.adjectives) + 1)  # word and its space
    noun_phrase = determiner + 1 + adjective + noun
    # The verb's form follows the subject's number, which is plural with probability q.
    t = grammar.p_transitive
    verb = sum(
        weight * (t * _mean_length(grammar.transitive_verbs, column)
                  + (1 - t) * _mean_length(grammar.intransitive_verbs, column))
        for weight, column in ((1 - q, 0), (q, 1)))
    place = grammar.p_place * (1 + _mean_length(grammar.prepositions) + 1 + noun_phrase)
    return noun_phrase + 1 + verb + t * (1 + noun_phrase) + (1 - t) * place + 1


def sentence_entropy(grammar=GRAMMAR):
    """H(sentence) in nats: the expected sum of the entropies of the choices made."""
    def probs(table):
        return [row[-1] for row in table]

    def binary(p):
        return _entropy([p, 1.0 - p])

    q = grammar.p_plural
    noun_phrase = (binary(q) + (1 - q) * _entropy(probs(grammar.singular_determiners))
                   + q * _entropy(probs(grammar.plural_determiners))
                   + binary(grammar.p_adjective) + grammar.p_adjective * _entropy(probs(grammar.adjectives))
                   + _entropy(probs(grammar.nouns)))
    t = grammar.p_transitive
    transitive = _entropy(probs(grammar.transitive_verbs)) + noun_phrase
    place = _entropy(probs(grammar.prepositions)) + noun_phrase
    intransitive = _entropy(probs(grammar.intransitive_verbs)) + binary(grammar.p_place) + grammar.p_place * place
    return noun_phrase + binary(t) + t * transitive + (1 - t) * intransitive


def entropy_per_char(grammar=GRAMMAR):
    """The exact entropy rate of the corpus stream, in nats per character.

    The stream is independent sentences, each followed by "\\n". A sentence has one
    derivation, so H(sentence) is the expected sum of the entropies of its choices,
    and it is spelled in len(sentence) + 1 characters. Over a long stream the
    characters therefore carry

        H = H(sentence) / E[len(sentence) + 1]  nats per character.

    This is the floor for the loss: a model's mean cross-entropy on fresh text is
    H plus the KL divergence between the true next-character distribution and the
    model's, and a KL divergence is never negative. A model that sees only a finite
    window (and so misses the start of the sentence at its first positions) sits a
    little above H even when it is perfect.

    Returns:
    - H: float, nats per character.
    """
    return sentence_entropy(grammar) / (expected_sentence_length(grammar) + 1.0)


def longest_sentence_length(grammar=GRAMMAR):
    """The length in characters of the longest sentence the grammar can produce (with its ".")."""
    def longest(table, column=0):
        return max(len(row[column]) for row in table)

    noun_phrase = (max(longest(grammar.singular_determiners), longest(grammar.plural_determiners))
                   + 1 + longest(grammar.adjectives) + 1 + max(longest(grammar.nouns, 0), longest(grammar.nouns, 1)))
    verb = max(longest(grammar.transitive_verbs, c) for c in (0, 1))
    intransitive = max(longest(grammar.intransitive_verbs, c) for c in (0, 1)) + 1 + longest(grammar.prepositions)
    return noun_phrase + 1 + max(verb, intransitive) + 1 + noun_phrase + 1


def bigram_loss(train_text, val_text, smoothing=0.1):
    """Mean validation loss of a character bigram model fit on the training text.

    P(b | a) = (count(a b) + k) / (count(a) + k V), add-k smoothing over the V
    characters of VOCAB, so no pair has probability zero.

    Inputs:
    - train_text, val_text: str of at least 2 characters, all in VOCAB.
    - smoothing: k > 0.

    Returns:
    - loss: float, mean -log P(next char | previous char) over the len(val_text) - 1
      predictions, in nats per character.
    """
    if not smoothing > 0:
        raise ValueError(f"bigram_loss: smoothing must be > 0, got {smoothing!r}")
    for name, text in (("train_text", train_text), ("val_text", val_text)):
        if not isinstance(text, str) or len(text) < 2:
            raise ValueError(f"bigram_loss: {name} must be a str of at least 2 characters, got {text!r:.40}")
        report = out_of_vocab_report(text)
        if report is not None:
            raise ValueError(f"bigram_loss: {name} has {report}")
    V = len(VOCAB)
    # character c is row VOCAB.index(c): the ids the character tokenizer gives it
    train, val = (np.array([VOCAB.index(c) for c in text], dtype=np.int64) for text in (train_text, val_text))
    counts = np.bincount(train[:-1] * V + train[1:], minlength=V * V).reshape(V, V).astype(np.float64)
    probs = (counts + smoothing) / (counts.sum(axis=1, keepdims=True) + smoothing * V)  # (V, V), rows sum to 1
    return float(-np.log(probs[val[:-1], val[1:]]).mean())
