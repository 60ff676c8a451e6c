"""``senseflow eval fetch-weights`` without a network: the URL path through a file:// URL, the Hugging
Face paths through stand-ins of hf_hub_download / snapshot_download recording their arguments."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import huggingface_hub
import pytest

from senseflow.cli import main
from senseflow.eval.fetch import fetch
from senseflow.metrics import weights as w


def test_url_entry_is_downloaded_atomically_and_verified(tmp_path, monkeypatch):
    payload = b"not really inception" * 100
    src = tmp_path / "upstream.pt"
    src.write_bytes(payload)
    entry = dataclasses.replace(
        w.MANIFEST["fid.inception"],
        url=src.as_uri(),
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
    )
    monkeypatch.setitem(w.MANIFEST, "fid.inception", entry)
    (resolved,) = fetch(["fid.inception"], tmp_path / "root")
    assert resolved.verified and resolved.path.read_bytes() == payload
    assert not list((tmp_path / "root" / "fid").glob("*.partial"))
    # Present files are not fetched again.
    src.unlink()
    assert fetch(["fid.inception"], tmp_path / "root")[0].verified


def test_hf_file_and_folder_entries(tmp_path, monkeypatch):
    calls = []

    def file_download(repo, filename, local_dir):
        calls.append(("file", repo, filename))
        path = Path(local_dir) / filename
        path.write_bytes(b"weights")
        return str(path)

    def snapshot(repo, local_dir, allow_patterns):
        calls.append(("snapshot", repo, tuple(allow_patterns)))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in ("preprocessor_config.json", "config.json"):
            (Path(local_dir) / name).write_text("{}")
        return local_dir

    listing = {"yuvalkirstain/PickScore_v1": ["config.json", "pytorch_model.bin"]}
    monkeypatch.setattr(
        huggingface_hub, "list_repo_files", lambda repo: listing.get(repo, ["model.safetensors"])
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", file_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    got = fetch(
        ["hps.v2.1", "pickscore.processor", "pickscore.model", "compbench.blip_vqa"], tmp_path / "root"
    )
    assert calls[0] == ("file", "xswu/HPSv2", "HPS_v2.1_compressed.pt")
    assert calls[1][:2] == ("snapshot", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert "preprocessor_config.json" in calls[1][2]
    assert calls[2] == (
        "snapshot",
        "yuvalkirstain/PickScore_v1",
        ("*.json", "*.txt", "*.safetensors", "pytorch_model*.bin"),
    )
    assert calls[3] == ("snapshot", "Salesforce/blip-vqa-capfilt-large", ("*.json", "*.txt", "*.safetensors"))
    assert got[0].path == tmp_path / "root" / "hps" / "HPS_v2.1_compressed.pt"
    assert got[0].sha256 == hashlib.sha256(b"weights").hexdigest() and not got[0].verified


def test_entries_without_a_source_are_refused_with_where_to_get_them(tmp_path):
    with pytest.raises(ValueError, match=r"compbench\.unidet cannot be fetched.*shikunl/prismer"):
        fetch(["compbench.unidet"], tmp_path)
    with pytest.raises(KeyError, match="no weights named"):
        fetch(["nope"], tmp_path)


def test_cli_needs_a_root(monkeypatch, capsys):
    monkeypatch.delenv(w.WEIGHTS_ENV, raising=False)
    assert main(["eval", "fetch-weights", "hps.v2.1"]) == 2
    assert "--root" in capsys.readouterr().err
