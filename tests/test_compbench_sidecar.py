"""The T2I-CompBench linguistic sidecar: rules over hand-tagged tokens, file format, loader checks.

Tokens and tags here are written by hand (no spaCy at test time), for synthetic prompts.
"""

from __future__ import annotations

import json

import pytest

from senseflow.metrics.compbench.sidecar import (
    PromptAnalysis,
    Token,
    build_sidecar,
    complex_objects,
    entry_from_analysis,
    load_sidecar,
    noun_chunk_texts,
    simple_objects,
    span_text,
    text_without_adjectives,
    write_sidecar,
)


def tag(spec: str) -> tuple[Token, ...]:
    """``"a/DET red/ADJ kite/NOUN ./PUNCT"`` → tokens; ``~`` before a token means no space before it."""
    tokens: list[Token] = []
    for item in spec.split():
        glue = item.startswith("~")
        text, pos = item.lstrip("~").rsplit("/", 1)
        if glue and tokens:
            tokens[-1] = Token(tokens[-1].text, tokens[-1].pos, "")
        tokens.append(Token(text, pos, " "))
    tokens[-1] = Token(tokens[-1].text, tokens[-1].pos, "")
    return tuple(tokens)


def test_span_text_keeps_inner_whitespace_only():
    toks = tag("a/DET teal/ADJ teapot/NOUN ~./PUNCT")
    assert span_text(toks, 0, 3) == "a teal teapot"
    assert span_text(toks, 2, 4) == "teapot."
    assert span_text(toks, 3, 9) == "."  # slices past the end shorten, as spaCy's do
    assert span_text(toks, 4, 9) == ""


def test_noun_chunks_and_adjective_free_text():
    toks = tag("a/DET teal/ADJ teapot/NOUN and/CCONJ an/DET amber/ADJ lantern/NOUN")
    analysis = PromptAnalysis(toks, ((0, 3), (4, 7)))
    assert noun_chunk_texts(analysis) == ("a teal teapot", "an amber lantern")
    assert text_without_adjectives(toks) == "a teapot and an lantern"
    with pytest.raises(ValueError, match="outside"):
        noun_chunk_texts(PromptAnalysis(toks, ((5, 9),)))


def test_simple_objects_first_and_last_noun():
    assert simple_objects(
        tag("a/DET wooden/ADJ chair/NOUN on/ADP the/DET left/NOUN of/ADP a/DET statue/NOUN")
    ) == (
        "chair",
        "statue",
    )
    assert simple_objects(tag("Oslo/PROPN near/ADP Bergen/PROPN")) is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # two-token preposition; nearest noun before, first noun after
        (
            "the/DET sleepy/ADJ fox/NOUN sits/VERB next/ADV to/ADP the/DET old/ADJ barn/NOUN "
            "and/CCONJ a/DET crow/NOUN watches/VERB",
            ("fox", "barn"),
        ),
        # three-token "on the left" also matches "on the left of"; scanning resumes after "left"
        ("a/DET bird/NOUN on/ADP the/DET left/NOUN of/ADP a/DET tree/NOUN", ("bird", "tree")),
        ("a/DET mug/NOUN on/ADP top/NOUN of/ADP a/DET shelf/NOUN", ("mug", "shelf")),
        # a proper noun counts before the preposition
        ("Rex/PROPN sleeps/VERB near/ADP a/DET kennel/NOUN", ("Rex", "kennel")),
        # no noun after: the last token of a proper-noun run, if it is not the prompt's last token
        ("a/DET lantern/NOUN hangs/VERB near/ADP Lake/PROPN Geneva/PROPN ~./PUNCT", ("lantern", "Geneva")),
        ("a/DET lantern/NOUN hangs/VERB near/ADP Geneva/PROPN", None),  # Geneva is the last token
        ("a/DET lantern/NOUN hangs/VERB near/ADP", None),  # nothing after
        # two prepositions give four objects: none
        ("a/DET cup/NOUN near/ADP a/DET plate/NOUN next/ADV to/ADP a/DET fork/NOUN", None),
        # no preposition at all
        ("a/DET cup/NOUN and/CCONJ a/DET plate/NOUN", None),
        # "on the top of" is not a complex preposition ("on top of" is)
        ("a/DET cup/NOUN on/ADP the/DET top/NOUN of/ADP a/DET box/NOUN", None),
    ],
)
def test_complex_objects(spec, expected):
    assert complex_objects(tag(spec)) == expected


class FakeSpan:
    def __init__(self, start, end):
        self.start, self.end = start, end


class FakeDoc:
    """Quacks like a spaCy Doc: iterable tokens with text/pos_/whitespace_, and noun_chunks."""

    def __init__(self, tokens, spans):
        self._tokens = [type("T", (), {"text": t.text, "pos_": t.pos, "whitespace_": t.ws})() for t in tokens]
        self.noun_chunks = [FakeSpan(s, e) for s, e in spans]

    def __iter__(self):
        return iter(self._tokens)


HAND_TAGGED = {
    "a teal teapot on the left of a brass bell": (
        tag("a/DET teal/ADJ teapot/NOUN on/ADP the/DET left/NOUN of/ADP a/DET brass/NOUN bell/NOUN"),
        ((0, 3), (4, 6), (7, 10)),
    ),
    "a girl next to a striped umbrella": (
        tag("a/DET girl/NOUN next/ADV to/ADP a/DET striped/ADJ umbrella/NOUN"),
        ((0, 2), (4, 7)),
    ),
}


class FakeNlp:
    def __init__(self):
        self.meta = {"lang": "en", "name": "hand_tagged", "version": "0.0"}

    def __call__(self, text):
        return FakeDoc(*HAND_TAGGED[text])


def test_build_write_load_round_trip(tmp_path):
    data = build_sidecar(list(HAND_TAGGED) * 2, nlp=FakeNlp())
    assert data["analyser"]["model"] == "en_hand_tagged" and data["analyser"]["model_version"] == "0.0"
    entry = data["prompts"]["a teal teapot on the left of a brass bell"]
    assert entry["noun_chunks"] == ["a teal teapot", "the left", "a brass bell"]
    assert entry["objects_simple"] == ["teapot", "bell"]
    assert entry["objects_complex"] == ["teapot", "brass"]  # first noun after the preposition
    assert entry["prompt_without_adj"] == "a teapot on the left of a brass bell"
    sidecar = load_sidecar(write_sidecar(tmp_path / "s.json", data))
    assert len(sidecar) == 2
    girl = sidecar["a girl next to a striped umbrella"]
    assert girl.objects_simple == ("girl", "umbrella") and girl.objects_complex == ("girl", "umbrella")
    assert girl.prompt_without_adj == "a girl next to a umbrella"
    assert sidecar.label == f"{data['analyser']['spacy']}/en_hand_tagged-0.0"
    with pytest.raises(KeyError, match="rebuild the sidecar"):
        sidecar["an unknown prompt"]


def test_loader_refuses_fields_that_disagree_with_tokens(tmp_path):
    data = build_sidecar(
        list(HAND_TAGGED), nlp=FakeNlp(), analyser={"spacy": "x", "model": "y", "model_version": "z"}
    )
    data["prompts"]["a girl next to a striped umbrella"]["objects_simple"] = ["girl", "parasol"]
    path = write_sidecar(tmp_path / "s.json", data)
    with pytest.raises(ValueError, match="objects_simple"):
        load_sidecar(path)
    assert load_sidecar(path, verify=False)["a girl next to a striped umbrella"].objects_simple == (
        "girl",
        "parasol",
    )


def test_hand_written_sidecar_without_tokens(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text(
        json.dumps(
            {
                "schema": "senseflow.compbench.sidecar/1",
                "analyser": {"spacy": None, "model": "hand", "model_version": None},
                "prompts": {
                    "a cobalt vase near a wicker basket": {
                        "noun_chunks": ["a cobalt vase", "a wicker basket"],
                        "objects_simple": ["vase", "basket"],
                        "objects_complex": None,
                        "prompt_without_adj": "a vase near a basket",
                    }
                },
            }
        )
    )
    entry = load_sidecar(path)["a cobalt vase near a wicker basket"]
    assert entry.noun_chunks == ("a cobalt vase", "a wicker basket")
    assert entry.objects_complex is None
    bad = json.loads(path.read_text())
    bad["prompts"]["a cobalt vase near a wicker basket"]["objects_simple"] = ["vase"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="two strings"):
        load_sidecar(path)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a T2I-CompBench sidecar"):
        load_sidecar(path)
    with pytest.raises(FileNotFoundError, match="spaCy"):
        load_sidecar(tmp_path / "missing.json")


def test_entry_from_analysis_matches_pieces():
    toks, spans = HAND_TAGGED["a girl next to a striped umbrella"]
    entry = entry_from_analysis(PromptAnalysis(toks, spans))
    assert entry.noun_chunks == ("a girl", "a striped umbrella")
