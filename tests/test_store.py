"""Model names by Ollama's rules, and the Ollama on-disk layout the bridge keeps."""

import hashlib
import json

import pytest

from ollama_ft.errors import OllamaError
from ollama_ft.ollama.names import InvalidName, parse_name
from ollama_ft.serve.store import DigestMismatch, NotFound, Store


@pytest.mark.parametrize("name,short", [
    ("my-ft", "my-ft:latest"), ("My-FT:v1.2", "My-FT:v1.2"), ("me/my_ft:q4", "me/my_ft:q4"),
    ("localhost:5000/me/m:t", "localhost:5000/me/m:t"), ("_x", "_x:latest")])
def test_valid_names(name, short):
    assert parse_name(name).short == short


@pytest.mark.parametrize("name", ["", "bad name", "-x", "a/b/c/d", "m:", "m:-t", "n.s/m", "x" * 81])
def test_invalid_names(name):
    with pytest.raises(InvalidName, match="invalid model name"):
        parse_name(name)


def test_blobs_manifests_copy_delete_prune(tmp_path):
    store = Store(tmp_path)
    data = b"GGUF fake weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert not store.has_blob(digest)
    with pytest.raises(DigestMismatch):
        store.write_blob([data], "sha256:" + "0" * 64)
    assert list(store.blobs.iterdir()) == []  # nothing half-written left
    assert store.write_blob([data[:5], data[5:]], digest) == (digest, len(data))
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(data)}
    m = store.write_manifest("My-Model", {"model_format": "gguf"}, [layer])
    assert m.name.short == "My-Model:latest"
    assert store.get("my-model:latest").digest == m.digest  # case-insensitive lookup
    raw = (store.manifests / "registry.ollama.ai/library/My-Model/latest").read_bytes()
    assert json.loads(raw)["layers"] == [layer] and hashlib.sha256(raw).hexdigest() == m.digest
    store.copy("my-model", "other:v2")
    assert sorted(x.name.short for x in store.list()) == ["My-Model:latest", "other:v2"]
    store.delete("My-Model")
    assert store.has_blob(digest)  # still used by the copy
    store.delete("other:v2")
    assert not store.has_blob(digest) and store.list() == []
    with pytest.raises(NotFound, match="model 'gone' not found"):
        store.get("gone")
    with pytest.raises(OllamaError, match="invalid digest"):
        store.blob_path("sha256:XYZ")


def test_delete_keeps_blobs_uploaded_for_a_create_still_to_come(tmp_path):
    """The register flow uploads first and creates after: deleting another model meanwhile
    must not take that upload (it once pruned every unreferenced blob)."""
    store = Store(tmp_path)
    old, pending = b"GGUF old model", b"GGUF uploaded, create not yet sent"
    d_old, _ = store.write_blob([old])
    d_pending, _ = store.write_blob([pending])
    store.write_manifest("old", {"model_format": "gguf"},
                         [{"mediaType": "application/vnd.ollama.image.model", "digest": d_old,
                           "size": len(old)}])
    store.delete("old")
    assert not store.has_blob(d_old)  # the deleted model's own layer goes
    assert store.has_blob(d_pending)  # the upload stays
