"""Prompt-set builders on synthetic inputs: COCO-5K selection rules, TSV forms, T2I-CompBench files.

All captions and prompts here are invented for the tests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from senseflow.eval import prompts as P
from senseflow.metrics.compbench.sidecar import load_sidecar


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- COCO-5K


def write_captions(path: Path) -> Path:
    data = {
        "images": [
            {"id": 30, "file_name": "000000000030.jpg"},
            {"id": 7, "file_name": "000000000007.jpg"},
            {"id": 12, "file_name": "000000000012.jpg"},
        ],
        "annotations": [
            {"id": 905, "image_id": 7, "caption": "A  kettle on a\nstove. "},
            {"id": 901, "image_id": 7, "caption": " Two pigeons\ton a ledge"},
            {"id": 950, "image_id": 30, "caption": "a long caption about a tram in fog"},
            {"id": 940, "image_id": 30, "caption": "a tram"},
            {"id": 960, "image_id": 12, "caption": "a red boat"},
            {"id": 961, "image_id": 12, "caption": "a blue boat"},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_normalise_caption():
    assert P.normalise_caption("  A\tkettle \n on a stove.  ") == "A kettle on a stove."


def test_read_coco_captions(tmp_path):
    images, captions = P.read_coco_captions(write_captions(tmp_path / "c.json"))
    assert images[7] == "000000000007.jpg"
    assert [c.ann_id for c in captions[7]] == [901, 905]
    assert captions[7][1].caption == "A kettle on a stove."


def test_build_coco5k_first_rule(tmp_path):
    src = write_captions(tmp_path / "captions_val2017.json")
    rec = P.build_coco5k(src, tmp_path / "data", rule="first", expected_count=3)
    assert rec.tsv.read_text() == "image_id\tcaption\n7\tTwo pigeons on a ledge\n12\ta red boat\n30\ta tram\n"
    prov = json.loads(rec.provenance_path.read_text())
    assert prov["source_sha256"] == sha(src)
    assert prov["file_sha256"] == sha(rec.tsv)
    assert (prov["selection_rule"], prov["selection_model"], prov["count"]) == ("first", None, 3)
    assert prov["text_normalisation"] == "strip+collapse_whitespace"
    with pytest.raises(ValueError, match="expected 5000"):
        P.build_coco5k(src, tmp_path / "data2", rule="first")


def test_build_coco5k_max_clip_rule(tmp_path):
    src = write_captions(tmp_path / "captions_val2017.json")
    images = tmp_path / "val2017"
    images.mkdir()
    for name in ("000000000007.jpg", "000000000012.jpg", "000000000030.jpg"):
        (images / name).write_bytes(b"not read by the stub scorer")
    calls = []

    def scorer(image_path, captions):
        calls.append((image_path.name, list(captions)))
        if image_path.name == "000000000012.jpg":
            return [0.3, 0.3]  # tie: smallest annotation id wins
        return [float(len(c)) for c in captions]  # longest caption wins

    rec = P.build_coco5k(
        src,
        tmp_path / "data",
        rule="max_clip",
        scorer=scorer,
        images_dir=images,
        selection_model="stub-clip",
        selection_model_sha256="0" * 64,
        expected_count=3,
    )
    assert calls[0] == ("000000000007.jpg", ["Two pigeons on a ledge", "A kettle on a stove."])
    table = P.read_prompt_tsv(rec.tsv)
    assert table.source_format == "senseflow"
    assert [(r.image_id, r.caption) for r in table.rows] == [
        (7, "Two pigeons on a ledge"),
        (12, "a red boat"),
        (30, "a long caption about a tram in fog"),
    ]
    prov = rec.provenance
    assert (prov["selection_model"], prov["selection_model_sha256"], prov["ties"]) == (
        "stub-clip",
        "0" * 64,
        1,
    )
    assert prov["file_sha256"] == table.sha256 == sha(rec.tsv)
    with pytest.raises(ValueError, match="needs scorer"):
        P.build_coco5k(src, tmp_path / "x", rule="max_clip", expected_count=3)
    with pytest.raises(ValueError, match="unknown selection rule"):
        P.build_coco5k(src, tmp_path / "x", rule="random", expected_count=3)


def test_build_refuses_output_inside_repository(tmp_path):
    src = write_captions(tmp_path / "c.json")
    repo = Path(P.__file__).resolve().parents[3]
    with pytest.raises(ValueError, match="inside the senseflow repository"):
        P.build_coco5k(src, repo / "runs" / "never_written", rule="first", expected_count=3)
    assert not (repo / "runs" / "never_written").exists()


def test_read_prompt_tsv_other_forms(tmp_path):
    two = tmp_path / "two.tsv"
    two.write_text("5\ta  cat\n9\ta dog\n")
    t = P.read_prompt_tsv(two)
    assert t.source_format == "two_column" and t.prompts == ["a cat", "a dog"]
    mlperf = tmp_path / "captions_source.tsv"
    mlperf.write_text(
        "id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url\n"
        "11\t3\tan owl at dusk\t480\t640\tx.jpg\thttp://example.invalid/x.jpg\n"
    )
    t = P.read_prompt_tsv(mlperf)
    assert t.source_format == "mlperf" and [(r.image_id, r.caption) for r in t.rows] == [
        (3, "an owl at dusk")
    ]
    bad = tmp_path / "bad.tsv"
    bad.write_text("image_id\tcaption\nseven\ta cat\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2"):
        P.read_prompt_tsv(bad)


# --------------------------------------------------------------------------- T2I-CompBench


SYNTHETIC = {
    "color_val.txt": ["a teal teapot and an amber lantern", "a violet kite"],
    "shape_val.txt": ["an oval mirror and a square rug", "a round lantern"],
    "texture_val.txt": ["a velvet cushion", "a glass owl and a tin drum"],
    "spatial_val.txt": ["a heron on the left of a canoe", "a girl next to a tractor"],
    "non_spatial_val.txt": ["a dancer juggles oranges", "a cat reads a map"],
    "complex_val.txt": ["The crimson kite drifts near a lighthouse.", "a bronze robot waters a fern"],
    "complex_val_spatial.txt": ["the crimson kite drifts near a lighthouse"],
    "complex_val_action.txt": ["A bronze robot waters a fern.", "a prompt absent from complex"],
    "complex_val_spatialaction.txt": [],
}
COUNTS = dict.fromkeys(P.COMPBENCH_CATEGORY_FILES, 2)


def write_dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in SYNTHETIC.items():
        (root / name).write_bytes("".join(f"{line}\n" for line in lines).encode())
    return root


def test_read_prompt_lines_rules(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"  a cup \r\na pot\r\n\n\n")
    pf = P.read_prompt_lines(f)
    assert pf.prompts == ("a cup", "a pot") and pf.line_count == 4 and pf.sha256 == sha(f)
    f.write_bytes(b"a cup\n\na pot\n")
    with pytest.raises(ValueError, match="blank line 2"):
        P.read_prompt_lines(f)


def test_read_compbench_dataset_counts_and_hashes(tmp_path):
    root = write_dataset(tmp_path / "dataset")
    files = P.read_compbench_dataset(root, COUNTS)
    assert set(files) == set(P.COMPBENCH_CATEGORY_FILES) | set(P.COMPBENCH_SUBSET_FILES)
    assert files["color"].prompts == tuple(SYNTHETIC["color_val.txt"])
    assert files["complex_spatialaction"].prompts == ()
    for name, file in {**P.COMPBENCH_CATEGORY_FILES, **P.COMPBENCH_SUBSET_FILES}.items():
        assert files[name].sha256 == sha(root / file)
        assert files[name].line_count == len(SYNTHETIC[file])
    with pytest.raises(ValueError, match="2 prompts, expected 300"):
        P.read_compbench_dataset(root)
    assert len(P.read_compbench_dataset(root, strict=False)["shape"].prompts) == 2
    (root / "texture_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"texture_val\.txt"):
        P.read_compbench_dataset(root, COUNTS)


def test_build_compbench_prompts_without_spacy(tmp_path, monkeypatch):
    import senseflow.metrics.compbench.sidecar as sidecar_module

    def no_spacy():
        raise ImportError("spaCy is not installed")

    monkeypatch.setattr(sidecar_module, "spacy_pipeline", no_spacy)
    root = write_dataset(tmp_path / "dataset")
    out = tmp_path / "data" / "compbench"
    prov = P.build_compbench_prompts(root, out, expected_counts=COUNTS)
    assert prov["sidecar"]["built"] is False and "spaCy" in prov["sidecar"]["reason"]
    color = prov["files"]["color"]
    assert (color["source_sha256"], color["line_count"], color["prompt_count"]) == (
        sha(root / "color_val.txt"),
        2,
        2,
    )
    assert color["file_sha256"] == sha(out / "color.txt")
    assert prov["files"]["complex_action"]["not_in_complex"] == 1
    assert prov["files"]["complex_spatial"]["not_in_complex"] == 0
    lists = P.load_compbench_prompts(out)
    assert lists["complex"] == SYNTHETIC["complex_val.txt"]
    (out / "color.txt").write_text("tampered\n")
    with pytest.raises(ValueError, match="changed"):
        P.load_compbench_prompts(out)
    with pytest.raises(ImportError):
        P.build_compbench_prompts(root, tmp_path / "again", sidecar=True, expected_counts=COUNTS)


def test_build_compbench_prompts_with_sidecar(tmp_path):
    class TinyNlp:
        """Tags nouns from a fixed word list; every token is followed by one space."""

        def __init__(self):
            self.meta = {}
            self.nouns = {"teapot", "lantern", "kite", "mirror", "rug", "cushion", "owl", "drum"}
            self.nouns |= {"heron", "canoe", "girl", "tractor"}

        def __call__(self, text):
            words = text.split()
            toks = [
                type("T", (), {"text": w, "pos_": "NOUN" if w in self.nouns else "X", "whitespace_": " "})()
                for w in words
            ]
            toks[-1].whitespace_ = ""
            doc = type("D", (), {"noun_chunks": [], "__iter__": lambda self: iter(toks)})()
            return doc

    root = write_dataset(tmp_path / "dataset")
    out = tmp_path / "cb"
    prov = P.build_compbench_prompts(root, out, nlp=TinyNlp(), expected_counts=COUNTS)
    assert prov["sidecar"]["built"] is True
    sidecar = P.load_sidecar(out / prov["sidecar"]["file"])
    assert sidecar is not None and len(sidecar) == 12  # every category prompt, once
    assert load_sidecar(out / "compbench.sidecar.json")["a heron on the left of a canoe"].objects_simple == (
        "heron",
        "canoe",
    )
