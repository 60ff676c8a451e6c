"""The linguistic sidecar: per-prompt noun chunks, spatial objects and adjective-free text, precomputed once.

The official T2I-CompBench evaluators run spaCy ``en_core_web_sm`` while scoring. Here the analysis is
done once, in an environment that has spaCy (reference: spaCy 3.5.3 with ``en_core_web_sm`` 3.5.0), and
stored as JSON; scoring reads the JSON and never imports spaCy.

What is derived from a prompt's tokens (text, coarse part of speech, trailing whitespace) and noun-chunk
spans, by the rules of the official scripts re-implemented here:

* ``noun_chunks``: the text of each noun chunk, in order (BLIP-VQA questions; the exclusion list is
  applied at scoring time, not here).
* ``objects_simple``: first and last ``NOUN`` token (simple spatial prompts); ``None`` when the prompt
  has no noun (the official script crashes there).
* ``objects_complex``: for every occurrence of one of :data:`COMPLEX_PREPOSITIONS` (matched on 3-, 2- or
  1-token spans, longest first), the nearest ``NOUN``/``PROPN`` before it and the first ``NOUN`` after
  it; when no noun follows, the first ``PROPN`` after it that is the last of a run of ``PROPN`` tokens
  and not the last token of the prompt. Exactly two objects overall, else ``None``.
* ``prompt_without_adj``: the texts of the tokens that are not ``ADJ``, joined by single spaces (the
  complex-category CLIP text).

Mapping ``girl``/``boy``/``man``/``woman`` to ``person`` happens at scoring time
(:mod:`senseflow.metrics.compbench.spatial`), so the sidecar keeps the words of the prompt.

File format (``schema: senseflow.compbench.sidecar/1``)::

    {"schema": "senseflow.compbench.sidecar/1",
     "analyser": {"spacy": "3.5.3", "model": "en_core_web_sm", "model_version": "3.5.0"},
     "created": "<ISO-8601>",
     "prompts": {"<prompt>": {"noun_chunks": ["a red car", "a tree"],
                              "objects_simple": ["car", "tree"],
                              "objects_complex": null,
                              "prompt_without_adj": "a car near a tree",
                              "tokens": [["a", "DET", " "], ["red", "ADJ", " "], ...],
                              "noun_chunk_spans": [[0, 3], [4, 6]]}}}

``tokens`` and ``noun_chunk_spans`` are optional (hand-written sidecars leave them out); when present,
the loader recomputes the derived fields from them and refuses a file whose stored fields disagree.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

SIDECAR_SCHEMA = "senseflow.compbench.sidecar/1"

# Prepositions the complex-category spatial rule looks for (token spans of up to three tokens).
COMPLEX_PREPOSITIONS = (
    "on top of",
    "on bottom of",
    "on the left",
    "on the right",
    "next to",
    "on side of",
    "near",
)


@dataclass(frozen=True)
class Token:
    """One analysed token: its text, coarse part-of-speech tag (spaCy ``pos_``) and trailing whitespace."""

    text: str
    pos: str
    ws: str = " "


@dataclass(frozen=True)
class PromptAnalysis:
    """A prompt's tokens and noun-chunk spans (token index ranges ``[start, end)``)."""

    tokens: tuple[Token, ...]
    noun_chunk_spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class SidecarEntry:
    """What the scorers need from one prompt (see the module docstring)."""

    noun_chunks: tuple[str, ...]
    objects_simple: tuple[str, str] | None
    objects_complex: tuple[str, str] | None
    prompt_without_adj: str | None


def span_text(tokens: Sequence[Token], start: int, end: int) -> str:
    """Text of ``tokens[start:end]`` as spaCy's ``Span.text`` gives it (inner whitespace kept, none after)."""
    part = tokens[start:end]
    if not part:
        return ""
    return "".join(t.text + t.ws for t in part[:-1]) + part[-1].text


def noun_chunk_texts(analysis: PromptAnalysis) -> tuple[str, ...]:
    n = len(analysis.tokens)
    for start, end in analysis.noun_chunk_spans:
        if not 0 <= start < end <= n:
            raise ValueError(f"noun chunk span {(start, end)} outside the {n} tokens of the prompt")
    return tuple(span_text(analysis.tokens, s, e) for s, e in analysis.noun_chunk_spans)


def simple_objects(tokens: Sequence[Token]) -> tuple[str, str] | None:
    """First and last ``NOUN`` of a simple spatial prompt, or None when it has no noun."""
    nouns = [t.text for t in tokens if t.pos == "NOUN"]
    if not nouns:
        return None
    return nouns[0], nouns[-1]


def complex_objects(tokens: Sequence[Token]) -> tuple[str, str] | None:
    """The two objects around the spatial preposition of a complex prompt, or None (see module doc)."""
    n = len(tokens)
    objects: list[str] = []
    for i in range(n):
        k = 0
        for width in (3, 2, 1):
            if span_text(tokens, i, i + width) in COMPLEX_PREPOSITIONS:
                k = width
                break
        if not k:
            continue
        for j in range(i - 1, -1, -1):
            if tokens[j].pos in ("NOUN", "PROPN"):
                objects.append(tokens[j].text)
                break
        after = range(i + k, n)
        noun_after = next((tokens[j].text for j in after if tokens[j].pos == "NOUN"), None)
        if noun_after is not None:
            objects.append(noun_after)
        elif len(after):  # searched to the end of the prompt without a noun: proper-noun fallback
            for j in after:
                if j + 1 < n and tokens[j].pos == "PROPN" and tokens[j + 1].pos != "PROPN":
                    objects.append(tokens[j].text)
                    break
    if len(objects) != 2:
        return None
    return objects[0], objects[1]


def text_without_adjectives(tokens: Sequence[Token]) -> str:
    return " ".join(t.text for t in tokens if t.pos != "ADJ")


def entry_from_analysis(analysis: PromptAnalysis) -> SidecarEntry:
    return SidecarEntry(
        noun_chunks=noun_chunk_texts(analysis),
        objects_simple=simple_objects(analysis.tokens),
        objects_complex=complex_objects(analysis.tokens),
        prompt_without_adj=text_without_adjectives(analysis.tokens),
    )


def analysis_from_doc(doc: Any) -> PromptAnalysis:
    """Convert a spaCy ``Doc`` (or anything with the same attributes) into a :class:`PromptAnalysis`."""
    tokens = tuple(Token(t.text, t.pos_, t.whitespace_) for t in doc)
    spans = tuple((int(c.start), int(c.end)) for c in doc.noun_chunks)
    return PromptAnalysis(tokens, spans)


# --------------------------------------------------------------------------- building (needs spaCy)


def spacy_pipeline(model: str = "en_core_web_sm") -> Any:
    """Load the spaCy pipeline the official evaluators use. Only the sidecar build needs spaCy."""
    try:
        import spacy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building the T2I-CompBench sidecar needs spaCy and its en_core_web_sm model (reference: "
            "spacy==3.5.3 with en_core_web_sm 3.5.0 from the spaCy GitHub releases); run the build in an "
            "environment that has them. Scoring needs only the JSON it writes."
        ) from exc
    return spacy.load(model)


def analyser_info(nlp: Any) -> dict[str, str | None]:
    """Versions of spaCy and of the pipeline, for the sidecar header."""
    meta = getattr(nlp, "meta", {}) or {}
    try:
        import spacy

        spacy_version: str | None = spacy.__version__
    except ImportError:
        spacy_version = None
    lang, name = meta.get("lang"), meta.get("name")
    model = f"{lang}_{name}" if lang and name else name
    return {"spacy": spacy_version, "model": model, "model_version": meta.get("version")}


def build_sidecar(
    prompts: Iterable[str], nlp: Any | None = None, analyser: Mapping[str, str | None] | None = None
) -> dict[str, Any]:
    """Analyse ``prompts`` with ``nlp`` (default: spaCy ``en_core_web_sm``) into a JSON-ready sidecar."""
    if nlp is None:
        nlp = spacy_pipeline()
    info = dict(analyser) if analyser is not None else analyser_info(nlp)
    entries: dict[str, Any] = {}
    for prompt in prompts:
        if prompt in entries:
            continue
        analysis = analysis_from_doc(nlp(prompt))
        entries[prompt] = _entry_to_json(entry_from_analysis(analysis), analysis)
    return {
        "schema": SIDECAR_SCHEMA,
        "analyser": info,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "prompts": entries,
    }


def write_sidecar(path: str | PathLike, sidecar: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _entry_to_json(entry: SidecarEntry, analysis: PromptAnalysis | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "noun_chunks": list(entry.noun_chunks),
        "objects_simple": list(entry.objects_simple) if entry.objects_simple else None,
        "objects_complex": list(entry.objects_complex) if entry.objects_complex else None,
        "prompt_without_adj": entry.prompt_without_adj,
    }
    if analysis is not None:
        out["tokens"] = [[t.text, t.pos, t.ws] for t in analysis.tokens]
        out["noun_chunk_spans"] = [list(s) for s in analysis.noun_chunk_spans]
    return out


# --------------------------------------------------------------------------- loading (no spaCy)


class Sidecar:
    """A loaded sidecar: ``sidecar[prompt]`` gives the :class:`SidecarEntry` of a prompt."""

    def __init__(self, entries: Mapping[str, SidecarEntry], analyser: Mapping[str, Any] | None = None):
        self.entries = dict(entries)
        self.analyser = dict(analyser or {})

    def __getitem__(self, prompt: str) -> SidecarEntry:
        try:
            return self.entries[prompt]
        except KeyError:
            raise KeyError(
                f"prompt {prompt!r} is not in the T2I-CompBench sidecar; rebuild the sidecar from the "
                "prompt files used for generation"
            ) from None

    def __contains__(self, prompt: object) -> bool:
        return prompt in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def label(self) -> str:
        """``"<spacy>/<model>-<model_version>"``, the ``sidecar_spacy`` field of the result record."""
        a = self.analyser
        return f"{a.get('spacy')}/{a.get('model')}-{a.get('model_version')}"


def _pair(value: Any, prompt: str, field: str) -> tuple[str, str] | None:
    if value is None:
        return None
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"sidecar entry {prompt!r}: {field} must be null or two strings, got {value!r}")
    return value[0], value[1]


def entry_from_json(prompt: str, raw: Mapping[str, Any], verify: bool = True) -> SidecarEntry:
    """Parse one sidecar entry; with ``tokens`` present, derive missing fields and check stored ones."""
    analysis = None
    if raw.get("tokens") is not None:
        tokens = tuple(Token(str(t[0]), str(t[1]), str(t[2]) if len(t) > 2 else " ") for t in raw["tokens"])
        spans = tuple((int(s), int(e)) for s, e in raw.get("noun_chunk_spans") or ())
        analysis = PromptAnalysis(tokens, spans)
    derived = entry_from_analysis(analysis) if analysis is not None else None
    if "noun_chunks" in raw:
        chunks = tuple(str(c) for c in raw["noun_chunks"])
    elif derived is not None and raw.get("noun_chunk_spans") is not None:
        chunks = derived.noun_chunks
    else:
        raise ValueError(f"sidecar entry {prompt!r} has no noun_chunks")
    base = derived or SidecarEntry((), None, None, None)
    simple = _pair(raw["objects_simple"], prompt, "objects_simple") if "objects_simple" in raw else None
    complex_ = _pair(raw["objects_complex"], prompt, "objects_complex") if "objects_complex" in raw else None
    entry = SidecarEntry(
        noun_chunks=chunks,
        objects_simple=simple if "objects_simple" in raw else base.objects_simple,
        objects_complex=complex_ if "objects_complex" in raw else base.objects_complex,
        prompt_without_adj=raw.get("prompt_without_adj", base.prompt_without_adj),
    )
    if verify and derived is not None:
        checks = [
            ("objects_simple", entry.objects_simple, derived.objects_simple),
            ("objects_complex", entry.objects_complex, derived.objects_complex),
            ("prompt_without_adj", entry.prompt_without_adj, derived.prompt_without_adj),
        ]
        if raw.get("noun_chunk_spans") is not None:
            checks.append(("noun_chunks", entry.noun_chunks, derived.noun_chunks))
        for field, stored, recomputed in checks:
            if stored != recomputed:
                raise ValueError(
                    f"sidecar entry {prompt!r}: stored {field} {stored!r} disagrees with the value "
                    f"{recomputed!r} derived from its tokens"
                )
    return entry


def sidecar_from_json(data: Mapping[str, Any], verify: bool = True) -> Sidecar:
    if data.get("schema") != SIDECAR_SCHEMA:
        raise ValueError(
            f"not a T2I-CompBench sidecar: schema {data.get('schema')!r}, expected {SIDECAR_SCHEMA!r}"
        )
    prompts = data.get("prompts")
    if not isinstance(prompts, Mapping):
        raise ValueError("sidecar has no 'prompts' mapping")
    entries = {p: entry_from_json(p, raw, verify=verify) for p, raw in prompts.items()}
    return Sidecar(entries, data.get("analyser"))


def load_sidecar(path: str | PathLike, verify: bool = True) -> Sidecar:
    """Read a sidecar JSON file written by :func:`write_sidecar` (or by hand, in the same format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"T2I-CompBench sidecar not found at {path}; build it with the compbench prompt builder in an "
            "environment with spaCy"
        )
    return sidecar_from_json(json.loads(path.read_text(encoding="utf-8")), verify=verify)


def sidecar_to_json(sidecar: Sidecar) -> dict[str, Any]:
    """A loaded (or hand-made) :class:`Sidecar` back to the file format (derived fields only)."""
    return {
        "schema": SIDECAR_SCHEMA,
        "analyser": dict(sidecar.analyser),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "prompts": {p: _entry_to_json(e) for p, e in sidecar.entries.items()},
    }
