"""Packaging: archive contents, metadata, card, verification, safe extraction, Hub and GGUF opt-ins."""

import gzip
import io
import json
import os
import stat
import tarfile

import pytest
import yaml

from lmpipeline.config.lifecycle import PackageConfig
from lmpipeline.errors import UserError
from lmpipeline.export import package as pkg
from lmpipeline.export.merge import merge_model
from lmpipeline.evaluate import generation as gen


@pytest.fixture(scope="module")
def built(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg")
    return pkg.build_package(run_dir, out, PackageConfig(license="apache-2.0", tags=["demo"], compress_level=1))


def _members(archive):
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_archive_holds_model_card_metadata_requirements(built):
    names = _members(built.archive)
    top = built.archive.name.removesuffix(".tar.gz")
    for f in ("README.md", "metadata.json", "requirements.txt", "model/01_sft/adapter_model.safetensors",
              "model/02_dpo/adapter_config.json", "model/02_dpo/lmpipeline_chain.json"):
        assert f"{top}/{f}" in names, f
    assert all(m.isfile() and m.mtime == 0 and m.uid == 0 for m in names.values())
    assert (built.archive.parent / (built.archive.name + ".sha256")).read_text().startswith(built.sha256)


def test_metadata_records_chain_hyperparameters_fingerprints_versions_and_hashes(built, tiny_llama):
    meta = built.metadata
    assert meta["content"] == "adapter_chain" and meta["base_model"] == str(tiny_llama)
    assert [s["name"] for s in meta["stages"]] == ["sft", "dpo"]
    assert meta["stages"][0]["hyperparameters"]["lora_r"] == 4
    assert meta["data_fingerprints"] == {"sft": "abc123", "dpo": "def456"}
    assert meta["metrics"]["dpo"]["rewards/accuracies"] == 0.9
    assert "torch" in meta["versions"]["packaging"] and "torch" in meta["versions"]["training"]
    assert len(meta["files"]) >= 10 and all(len(v["sha256"]) == 64 for v in meta["files"].values())


def test_model_card_front_matter_and_usage(built):
    card = (built.folder / "README.md").read_text()
    fm = yaml.safe_load(card.split("---")[1])
    assert fm["library_name"] == "peft" and fm["license"] == "apache-2.0"
    assert {"lmpipeline", "sft", "dpo", "lora", "demo"} <= set(fm["tags"])
    assert "base_model" not in fm  # a local path is not a Hub id
    assert "PeftModel.from_pretrained" in card and "merge_and_unload" in card


def test_card_uses_hub_base_model_and_single_adapter_snippet():
    from lmpipeline.export.card import render_card

    meta = {"name": "m", "content": "adapter", "model_dir": "model", "base_model": "meta-llama/Llama-3.2-3B",
            "adapters": [{"stage": "sft", "folder": "model"}], "stages": [{"name": "sft", "kind": "sft", "adapter": True}],
            "datasets": ["tatsu-lab/alpaca", "data/local.jsonl"]}
    card = render_card(meta, hub_repo_id="me/m")
    fm = yaml.safe_load(card.split("---")[1])
    assert fm["base_model"] == "meta-llama/Llama-3.2-3B" and fm["datasets"] == ["tatsu-lab/alpaca"]
    assert 'PeftModel.from_pretrained(base_model, "me/m")' in card


def test_verify_passes_on_a_fresh_archive(built):
    report = pkg.verify_archive(built.archive)
    assert report.ok, report.summary()
    assert report.files_checked == len(built.metadata["files"])


def _rewrite(src, dst, change):
    """Copy a tar.gz member by member, letting `change(info, data)` return (info, data) or None."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz", compresslevel=1) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            out = change(m, data)
            if out is None:
                continue
            info, data = out
            if data is not None:
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)


def test_verify_fails_on_a_changed_byte(built, tmp_path):
    def flip(info, data):
        if info.name.endswith("01_sft/adapter_model.safetensors"):
            data = bytearray(data)
            data[-1] ^= 0x01
            data = bytes(data)
        return info, data

    tampered = tmp_path / "tampered.tar.gz"
    _rewrite(built.archive, tampered, flip)
    report = pkg.verify_archive(tampered)
    assert not report.ok
    assert any("changed file: model/01_sft/adapter_model.safetensors" in p for p in report.problems)
    with pytest.raises(UserError, match="fails verification"):
        pkg.extract_package(tampered, tmp_path / "x")


def test_verify_fails_on_a_damaged_archive(built, tmp_path):
    raw = bytearray(built.archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(bytes(raw))
    assert not pkg.verify_archive(damaged).ok


def test_missing_and_extra_files_are_reported(built, tmp_path):
    def rename(info, data):
        if info.name.endswith("requirements.txt"):
            info.name = info.name.replace("requirements.txt", "extra.txt")
        return info, data

    out = tmp_path / "t.tar.gz"
    _rewrite(built.archive, out, rename)
    problems = pkg.verify_archive(out).problems
    assert "missing file: requirements.txt" in problems and "unlisted file: extra.txt" in problems


def _evil_archive(path, member: tarfile.TarInfo, data: bytes | None = b"x"):
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("pkg/metadata.json")
        meta = json.dumps({"format": pkg.PACKAGE_FORMAT, "files": {}}).encode()
        ok.size = len(meta)
        tar.addfile(ok, io.BytesIO(meta))
        if data is not None and member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _sym(name, target):
    m = tarfile.TarInfo(name)
    m.type = tarfile.SYMTYPE
    m.linkname = target
    return m


def _dev(name):
    m = tarfile.TarInfo(name)
    m.type = tarfile.CHRTYPE
    m.devmajor, m.devminor = 1, 3
    return m


@pytest.mark.parametrize("member, why", [
    (tarfile.TarInfo("/etc/evil"), "absolute path"),
    (tarfile.TarInfo("pkg/../../evil"), "`..`"),
    (_sym("pkg/link", "/etc/passwd"), "outside the package"),
    (_sym("pkg/link", "../../outside"), "outside the package"),
    (_dev("pkg/null"), "device file"),
])
def test_unsafe_members_are_refused(tmp_path, member, why):
    archive = _evil_archive(tmp_path / "evil.tar.gz", member)
    report = pkg.verify_archive(archive)
    assert not report.ok and any(why in p for p in report.problems), report.problems
    with pytest.raises(UserError, match="refusing to extract"):
        pkg.extract_package(archive, tmp_path / "dest", verify=False)
    assert not (tmp_path / "dest").exists() and not (tmp_path.parent / "evil").exists()


def test_extract_gives_a_loadable_package(built, tmp_path):
    folder = pkg.extract_package(built.archive, tmp_path / "x")
    assert (folder / "README.md").is_file()
    spec = gen.resolve_model(folder)  # the extracted package folder, as the card's chat line says
    assert [a.name for a in spec.adapters] == ["01_sft", "02_dpo"]
    assert gen.resolve_model(folder / "model" / "02_dpo").adapters == spec.adapters


def test_archive_is_deterministic(run_dir, tmp_path):
    a = pkg.build_package(run_dir / "sft", tmp_path / "a", PackageConfig(model_name="same", compress_level=0))
    b = pkg.build_package(run_dir / "sft", tmp_path / "b", PackageConfig(model_name="same", compress_level=0))
    assert a.sha256 == b.sha256 and a.metadata["content"] == "adapter"


def test_merged_model_package_and_source_choice(run_dir, tmp_path):
    merged = tmp_path / "merged"
    merge_model(gen.resolve_model(run_dir / "sft"), merged, dtype="float32")
    res = pkg.build_package(merged, tmp_path / "out", PackageConfig(compress_level=0))
    assert res.metadata["content"] == "merged" and res.metadata["merge"]["stages"] == ["sft"]
    card = (res.folder / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
    with pytest.raises(UserError, match="no finished merge stage"):
        pkg.build_package(run_dir, tmp_path / "o2", PackageConfig(source="merged"))


def test_push_to_hub_needs_hf_token_and_never_writes_it(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = PackageConfig(push_to_hub=True, hub_repo_id="me/model")
    with pytest.raises(UserError, match="HF_TOKEN"):
        pkg.build_package(run_dir / "sft", tmp_path / "a", cfg)

    cfg = cfg.model_copy(update={"compress_level": 0})
    secret = "hf_SECRETtokenVALUE123"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kw):
            calls["repo"] = repo_id

        def create_commit(self, repo_id, operations, commit_message):
            calls["paths"] = sorted(op.path_in_repo for op in operations)
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    res = pkg.build_package(run_dir / "sft", tmp_path / "b", cfg)
    assert calls["token"] == secret and calls["repo"] == "me/model"
    assert "adapter_model.safetensors" in calls["paths"] and "README.md" in calls["paths"]
    assert res.hub_url.endswith("/commit/1")
    for f in (tmp_path / "b").rglob("*"):
        if f.is_file():
            data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
            assert secret.encode() not in data, f


def test_push_refused_when_offline(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        pkg.build_package(run_dir / "sft", tmp_path, PackageConfig(push_to_hub=True, hub_repo_id="me/m"))


def test_package_config_rules():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="hub_repo_id"):
        PackageConfig(push_to_hub=True)
    with pytest.raises(ValidationError):
        PackageConfig(hub_repo_id="no-owner")
    assert all(f.description for f in PackageConfig.model_fields.values())


def test_gguf_missing_converter_is_a_message_not_a_failure(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    res = pkg.build_package(run_dir / "sft", tmp_path / "a", PackageConfig(gguf=True, compress_level=0))
    assert res.gguf["status"] == "skipped" and "merge" in res.gguf["reason"]  # an adapter cannot become GGUF


def test_gguf_runs_the_converter_on_full_weights(tiny_llama, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "convert_hf_to_gguf.py"
    fake.parent.mkdir()
    fake.write_text("import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\nopen(out, 'wb').write(b'GGUF')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake.parent) + os.pathsep + os.environ["PATH"])
    res = pkg.build_package(tiny_llama, tmp_path / "out", PackageConfig(gguf=True, compress_level=0))
    assert res.gguf["status"] == "written" and (tmp_path / "out" / f"{res.folder.name}.gguf").read_bytes() == b"GGUF"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = pkg.build_package(tiny_llama, tmp_path / "out2", PackageConfig(gguf=True, compress_level=0))
    assert res.gguf["status"] == "skipped" and "convert_hf_to_gguf.py" in res.gguf["reason"]
    with pytest.raises(UserError, match="not found"):
        pkg.build_package(tiny_llama, tmp_path / "o3", PackageConfig(gguf=True, compress_level=0, llama_cpp_convert=str(tmp_path / "no.py")))
