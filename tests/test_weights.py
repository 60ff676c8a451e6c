"""Weights root, manifest and offline resolution (metrics.weights)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket

import pytest

from senseflow.metrics import weights
from senseflow.metrics.weights import (
    MANIFEST,
    WEIGHTS_ENV,
    WeightEntry,
    WeightsMismatchError,
    WeightsNotFoundError,
    resolve,
    sha256_file,
    weights_root,
)

# Relative paths the evaluation spec (§10) names, by logical name.
SPEC_PATHS = {
    "fid.inception": "fid/inception-2015-12-05.pt",
    "clip.vit_g14.open_clip": "clip/ViT-g-14-laion2b_s12b_b42k/open_clip_pytorch_model.bin",
    "hps.v2.0": "hps/HPS_v2_compressed.pt",
    "hps.v2.1": "hps/HPS_v2.1_compressed.pt",
    "pickscore.model": "pickscore/PickScore_v1/",
    "pickscore.processor": "pickscore/CLIP-ViT-H-14-processor/",
    "imagereward.model": "imagereward/ImageReward.pt",
    "imagereward.med_config": "imagereward/med_config.json",
    "tokenizer.bert_base_uncased": "tokenizers/bert-base-uncased/",
    "compbench.blip_vqa": "compbench/blip-vqa-capfilt-large/",
    "compbench.clip_vit_b32": "compbench/clip-vit-base-patch32/",
}


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights resolution tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def toy_entry(monkeypatch, tmp_path):
    """A manifest entry with a known size and hash, and a root holding the matching file."""
    data = b"inception, but tiny"
    root = tmp_path / "root"
    (root / "fid").mkdir(parents=True)
    (root / "fid" / "toy.pt").write_bytes(data)
    entry = WeightEntry(
        name="test.toy",
        relpath="fid/toy.pt",
        upstream="https://example.invalid/toy.pt",
        licence="test",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(MANIFEST, entry.name, entry)
    return entry, root


def test_manifest_lists_the_spec_entries():
    for name, relpath in SPEC_PATHS.items():
        assert MANIFEST[name].relpath == relpath, name
    for entry in MANIFEST.values():
        assert entry.upstream and entry.licence
        assert not entry.relpath.startswith("/") and ".." not in entry.relpath.split("/")
        assert entry.sha256 is None or len(entry.sha256) == 64
        assert not (entry.is_dir and entry.sha256)
    helper = MANIFEST["fid.inception_fid_helper"]
    assert helper.size == 87_335_461 and helper.format == "fid_helper_torchscript"
    assert MANIFEST["fid.inception"].format == "nvidia_torchscript"


def test_root_from_argument_or_environment(monkeypatch, tmp_path):
    assert weights_root() is None
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env"))
    assert weights_root() == tmp_path / "env"
    assert weights_root(tmp_path / "cfg") == tmp_path / "cfg"  # config beats the environment


def test_resolve_under_root_verifies_size_and_hash(toy_entry, no_network):
    entry, root = toy_entry
    resolved = resolve("test.toy", root=root)
    assert resolved.path == root / "fid" / "toy.pt"
    assert resolved.verified and resolved.sha256 == entry.sha256
    assert os.fspath(resolved) == str(root / "fid" / "toy.pt")


def test_resolve_from_environment_explicit_path_and_overrides(toy_entry, monkeypatch, tmp_path):
    _, root = toy_entry
    monkeypatch.setenv(WEIGHTS_ENV, str(root))
    assert resolve("test.toy").path == root / "fid" / "toy.pt"
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes((root / "fid" / "toy.pt").read_bytes())
    assert resolve("test.toy", elsewhere).path == elsewhere
    assert resolve("test.toy", overrides={"test.toy": elsewhere}).path == elsewhere
    assert resolve("test.toy", "fid/toy.pt").path == root / "fid" / "toy.pt"  # relative to the root
    assert resolve("test.toy", elsewhere, overrides={"test.toy": "nope"}).path == elsewhere


def test_missing_file_is_one_clear_error(toy_entry, no_network, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve("test.toy", root=empty)
    message = str(info.value)
    assert "'test.toy'" in message and str(empty / "fid" / "toy.pt") in message
    assert "https://example.invalid/toy.pt" in message and "Nothing is downloaded" in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(WeightsNotFoundError, match=WEIGHTS_ENV):
        resolve("fid.inception")  # no root, no path
    with pytest.raises(WeightsNotFoundError, match="nvlabs-fi-cdn"):
        resolve("fid.inception", root=empty)


def test_hash_and_size_mismatch_are_clear_errors(toy_entry, tmp_path):
    entry, _ = toy_entry
    same_size = tmp_path / "same_size.pt"
    same_size.write_bytes(b"x" * entry.size)
    with pytest.raises(WeightsMismatchError) as info:
        resolve("test.toy", same_size)
    assert entry.sha256 in str(info.value) and sha256_file(same_size) in str(info.value)
    assert str(same_size) in str(info.value)
    other_size = tmp_path / "other.pt"
    other_size.write_bytes(b"short")
    with pytest.raises(WeightsMismatchError, match="bytes"):
        resolve("test.toy", other_size)
    unchecked = resolve("test.toy", same_size, verify=False)
    assert not unchecked.verified and unchecked.sha256 == sha256_file(same_size)


def test_unknown_hash_is_logged_not_verified(monkeypatch, tmp_path, caplog):
    entry = WeightEntry(name="test.unknown", relpath="x/w.bin", upstream="somewhere", licence="test")
    monkeypatch.setitem(MANIFEST, entry.name, entry)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "w.bin").write_bytes(b"abc")
    with caplog.at_level(logging.INFO, logger=weights.__name__):
        resolved = resolve("test.unknown", root=tmp_path)
    assert not resolved.verified
    assert resolved.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert resolved.sha256 in caplog.text and "unverified" in caplog.text
    assert resolve("test.unknown", root=tmp_path, hash_unverified=False).sha256 is None


def test_folder_entries_check_required_files(tmp_path):
    folder = tmp_path / "compbench" / "blip-vqa-capfilt-large"
    folder.mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match=r"config\.json"):
        resolve("compbench.blip_vqa", root=tmp_path)
    (folder / "config.json").write_text("{}")
    resolved = resolve("compbench.blip_vqa", root=tmp_path)
    assert resolved.path == folder and resolved.sha256 is None
    with pytest.raises(WeightsNotFoundError, match="Salesforce/blip-vqa-capfilt-large"):
        resolve("compbench.blip_vqa", root=tmp_path / "nowhere")


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match=r"fid\.inception"):
        resolve("fid.inceptoin")


def test_sha256_file_matches_hashlib_and_tracks_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    path.write_bytes(b"b" * 10)
    assert sha256_file(path) == hashlib.sha256(b"b" * 10).hexdigest()
