"""Hostile inputs end as a clear message (exit != 0, naming file:line or the config key) or as a
counted skip, never as a traceback, a hang or silently lost rows. Everything goes through the CLI.

Decisions recorded here:
- Data paths (dataset_name_or_path, eval data) are the user's own: any path they write is read,
  `..` included, relative to the current directory (the config is trusted like a script is). The
  message for a missing one shows the path as resolved.
- Archives are not trusted: `lmpipeline package --verify` reports members with `..`, absolute
  paths or links out of the package (exit 1), and extraction refuses them.
- YAML is read with the safe loader: Python tags are refused, in the file and in --set.
- Remote code runs only with trust_remote_code: true; weights load from safetensors only, pickle
  (pytorch_model.bin) only with allow_pickle_weights: true (and even then through torch's
  weights_only unpickler).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch

from tests.trust._util import run_cli, write_config

pytestmark = pytest.mark.integration

GOOD = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]}


def _jsonl(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="surrogateescape")
    return path


def _good(n=1):
    return [json.dumps(GOOD)] * n


# (name, file suffix, bad lines after one good line, fragments the message must hold)
BAD_ROWS = [
    ("truncated_json", ".jsonl", [json.dumps(GOOD)[:30]], [":2: not valid JSON"]),
    ("wrong_types", ".jsonl",
     [json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
      json.dumps({"messages": "hello"})],
     [":2: messages turn 1 content must be a string", ":3: 'messages' must be a list"]),
    ("ten_mb_line", ".jsonl", [json.dumps({"messages": "a" * 10_000_000})], [":2: 'messages' must be a list"]),
    ("nul_bytes", ".jsonl", [json.dumps(GOOD).replace("2 plus", "2\x00plus")], [":2: not valid JSON: Invalid control character"]),
    ("deep_nesting", ".jsonl", ["[" * 10_000 + "]" * 10_000], [":2: nested too deeply"]),
    ("deep_nesting_in_row", ".jsonl", ['{"messages": ' + "[" * 10_000 + "]" * 10_000 + "}"], [":2: nested too deeply"]),
    ("wrong_role", ".jsonl",
     [json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]})],
     [":2: messages turn 1 has unknown role 'wizard'"]),
    ("empty_strings", ".jsonl",
     [json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}),
      json.dumps({"messages": []}), "", json.dumps({})],
     [":2: messages turn 1 (user) is empty", ":3: 'messages' has no turns", ":5:"]),
    ("invalid_utf8", ".jsonl", [json.dumps(GOOD).replace("plus", "pl\udcff\udcfeus")], [":2: invalid UTF-8 (byte 0xff"]),
    ("text_with_nul", ".txt", ["a line with a \x00 NUL byte"], [":2: line contains NUL bytes"]),
]


@pytest.mark.parametrize("name,suffix,bad,expect", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_stop_with_file_and_line(tmp_path, tiny_model, capsys, name, suffix, bad, expect):
    first = "a good plain line" if suffix == ".txt" else json.dumps(GOOD)
    data = _jsonl(tmp_path / f"{name}{suffix}", first, *bad)
    cfg = write_config(tmp_path, tiny_model, data)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2, out
    assert "stage_configs.sft.dataset_name_or_path" in out
    for fragment in expect:
        assert f"{data}{fragment}" in out, out[:2000]
    assert "Traceback" not in out
    assert len(out) < 20_000, "the message must not echo the row"
    assert not (tmp_path / "run" / "sft" / "final").exists()


def test_deeply_nested_json_array_file(tmp_path, tiny_model, capsys):
    data = tmp_path / "deep.json"
    data.write_text("[" + json.dumps(GOOD) + ", " + "[" * 10_000 + "]" * 10_000 + "]")
    code, out = run_cli(["run", str(write_config(tmp_path, tiny_model, data))], capsys)
    assert code == 2 and f"{data}:1: nested too deeply" in out and "Traceback" not in out


def test_every_bad_row_is_a_counted_skip_with_on_invalid_skip(tmp_path, tiny_model, capsys):
    """All of the above in one file with on_invalid: skip: the run trains on the good rows and counts the rest."""
    bad = [line for case in BAD_ROWS if case[1] == ".jsonl" for line in case[2] if line]
    data = _jsonl(tmp_path / "mixed.jsonl", *_good(8), *bad)
    cfg = write_config(tmp_path, tiny_model, data, on_invalid="skip", max_steps=1, max_samples=None)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    stats = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["sft"]["data"]
    assert stats["rows_read"] == 8 + len(bad) == 20
    assert stats["invalid_skipped"] == len(bad) and stats["train_examples"] == 8


@pytest.mark.timeout(120)
def test_100k_turn_conversation_does_not_hang(tmp_path, tiny_model, capsys):
    turns = [{"role": r, "content": f"turn {i}"} for i in range(50_000) for r in ("user", "assistant")]
    data = _jsonl(tmp_path / "long.jsonl", *_good(3), json.dumps({"messages": turns}))
    cfg = write_config(tmp_path, tiny_model, data, max_steps=1, max_samples=None)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    stats = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["sft"]["data"]
    assert stats["truncated"] == 1 and stats["train_examples"] == 4

    cfg = write_config(tmp_path / "strict", tiny_model, data, max_steps=1, max_samples=None, on_overlong="error")
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2 and f"{data}:4: example has " in out and "+ tokens, over max_seq_length=64" in out
    assert "stage_configs.sft.on_overlong" in out and "Traceback" not in out


def test_long_conversation_is_cut_without_changing_the_trained_tokens(tiny_model):
    """The cut that keeps long conversations linear gives exactly the tokens and labels of the whole one."""
    from transformers import AutoTokenizer

    from lmpipeline.data import masking
    from lmpipeline.data.build import _head_of_long_chat
    from lmpipeline.data.types import ChatExample

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "system", "content": "Be brief."}] + [
        {"role": r, "content": f"{r} message {i}"} for i in range(100) for r in ("user", "assistant")]
    ex = ChatExample(msgs)
    whole = masking.tokenize_chat(ex, tok, tok.chat_template, loss_on="assistant")
    for max_tokens in (64, 300):
        head = _head_of_long_chat(ex, tok, tok.chat_template, max_tokens)
        assert len(head.messages) < len(msgs)
        cut = masking.tokenize_chat(head, tok, tok.chat_template, loss_on="assistant")
        assert len(cut) > max_tokens
        assert cut.input_ids[:max_tokens] == whole.input_ids[:max_tokens]
        assert cut.labels[:max_tokens] == whole.labels[:max_tokens]


# ------------------------------------------------------------------------------------- config


def test_yaml_python_tags_are_refused_and_never_run(tmp_path, tiny_model, quickstart_data, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'model_name_or_path: !!python/object/apply:os.system ["touch {marker}"]\nstages: [sft]\n')
    for command in ("validate", "run"):
        code, out = run_cli([command, str(cfg)], capsys)
        assert code == 2 and f"{cfg}:1: invalid YAML" in out and "Python tags are refused" in out
        assert "Traceback" not in out
    good = write_config(tmp_path / "ok", tiny_model, quickstart_data / "sft_train.jsonl")
    tagged = f'model_name_or_path=!!python/object/apply:os.system ["touch {marker}"]'
    code, out = run_cli(["validate", str(good), "--config-only", "--set", tagged], capsys)
    assert code == 0, out  # --set reads it as plain text, never as a Python object
    code, out = run_cli(["validate", str(good), "--set", tagged], capsys)
    assert code == 2 and "model_name_or_path" in out and "does not exist" in out and "Traceback" not in out
    assert not marker.exists()


def test_data_paths_with_dotdot_are_the_users_choice(tmp_path, tiny_model, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "train.jsonl", *_good(4))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = write_config(tmp_path / "cfg", tiny_model, "../data/train.jsonl")
    code, out = run_cli(["validate", str(cfg)], capsys)
    assert code == 0 and "validate: OK" in out, out
    cfg = write_config(tmp_path / "cfg2", tiny_model, "../nowhere/train.jsonl")
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2 and "stage_configs.sft.dataset_name_or_path" in out
    assert str(tmp_path / "nowhere" / "train.jsonl") in out and "Traceback" not in out  # resolved path shown


# ------------------------------------------------------------------------------------ archives


def _archive(path, members):
    """A tar.gz with a valid-looking package (metadata.json) plus `members`: (TarInfo, bytes)."""
    with tarfile.open(path, "w:gz") as tar:
        meta = json.dumps({"format": "lmpipeline-package/1", "files": {}}).encode()
        info = tarfile.TarInfo("pkg/metadata.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, b"" if kind != tarfile.REGTYPE else b"x"


@pytest.mark.parametrize("member,expect", [
    (_member("pkg/../../evil.sh"), "climbs out of the extraction folder"),
    (_member("/etc/cron.d/evil"), "has an absolute path"),
    (_member("pkg/model/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link pointing outside the package"),
    (_member("pkg/model/up", tarfile.SYMTYPE, "../../x"), "is a link pointing outside the package"),
    (_member("pkg/dev", tarfile.CHRTYPE), "is a device file"),
], ids=["dotdot", "absolute", "symlink_absolute", "symlink_dotdot", "device"])
def test_package_verify_refuses_unsafe_members(tmp_path, capsys, member, expect):
    archive = _archive(tmp_path / "evil.tar.gz", [member])
    code, out = run_cli(["package", "--verify", str(archive)], capsys)
    assert code == 1 and "FAILED" in out and f"unsafe member: `{member[0].name}` {expect}" in out, out
    assert "Traceback" not in out

    from lmpipeline.errors import UserError
    from lmpipeline.export.package import extract_package

    with pytest.raises(UserError, match="refusing to extract"):
        extract_package(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.sh").exists()


def test_package_verify_on_garbage_is_a_message(tmp_path, capsys):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 50)
    code, out = run_cli(["package", "--verify", str(junk)], capsys)
    assert code == 1 and "damaged" in out and "Traceback" not in out


# ---------------------------------------------------------------------------------- model code


def test_loader_defaults_refuse_remote_code_and_pickle(monkeypatch, tiny_model):
    """load_model passes trust_remote_code=False and use_safetensors=True unless the config says otherwise;
    load_tokenizer passes trust_remote_code=False."""
    import transformers

    from lmpipeline.config.schema import SFTConfig
    from lmpipeline.models import loading

    seen = {}

    def record(name, **kwargs):
        seen.update(kwargs)
        raise OSError("recorded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(record))
    with pytest.raises(Exception, match="recorded"):
        loading.load_tokenizer(str(tiny_model))
    assert seen == {"trust_remote_code": False}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(record))
    for cfg, remote, safe in ((SFTConfig(), False, True), (SFTConfig(trust_remote_code=True), True, True),
                              (SFTConfig(allow_pickle_weights=True), False, None)):
        seen.clear()
        with pytest.raises(Exception, match="recorded"):
            loading.load_model(str(tiny_model), cfg)
        assert seen["trust_remote_code"] is remote and seen["use_safetensors"] is safe


def _model_copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_remote_code_in_a_model_folder_does_not_run_by_default(tmp_path, tiny_model, quickstart_data, capsys):
    model = _model_copy(tiny_model, tmp_path / "model")
    marker = tmp_path / "code_ran"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    for name, cls in (("configuration_evil", "LlamaConfig as EvilConfig"), ("modeling_evil", "LlamaForCausalLM as EvilModel")):
        (model / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import {cls}\n")
    cfg = write_config(tmp_path, model, quickstart_data / "sft_train.jsonl", max_steps=1, max_samples=8)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out
    assert not marker.exists(), "model code ran without trust_remote_code"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, tiny_model, quickstart_data, capsys):
    from safetensors.torch import load_file

    model = _model_copy(tiny_model, tmp_path / "model")
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    cfg = write_config(tmp_path / "a", model, quickstart_data / "sft_train.jsonl", max_steps=1, max_samples=8)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 2 and "stage_configs.sft.allow_pickle_weights" in out and "pickle" in out, out
    assert "Traceback" not in out

    cfg = write_config(tmp_path / "b", model, quickstart_data / "sft_train.jsonl", max_steps=1, max_samples=8,
                       allow_pickle_weights=True)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code == 0, out

    # Even with the opt-in, a pickle that runs code is refused (torch's weights_only unpickler).
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _Evil(str(marker))}, model / "pytorch_model.bin")
    cfg = write_config(tmp_path / "c", model, quickstart_data / "sft_train.jsonl", max_steps=1, max_samples=8,
                       allow_pickle_weights=True)
    code, out = run_cli(["run", str(cfg)], capsys)
    assert code != 0 and "Traceback" not in out and not marker.exists(), out


def test_lifecycle_commands_refuse_pickle_weights_like_training(tmp_path, tiny_model, capsys):
    """generate / chat / eval / merge load base weights through the same check as training: a pickle-only
    folder is refused with the key and flag to name, and loads with --allow-pickle-weights."""
    from safetensors.torch import load_file

    model = _model_copy(tiny_model, tmp_path / "model")
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    out_file = tmp_path / "out.jsonl"
    args = ["generate", str(model), "--prompts", str(prompts), "--output", str(out_file), "--max-new-tokens", "2"]
    code, out = run_cli(args, capsys)
    assert code == 2 and "allow_pickle_weights" in out and "--allow-pickle-weights" in out, out
    assert "Traceback" not in out and not out_file.exists()
    code, out = run_cli(args + ["--allow-pickle-weights"], capsys)
    assert code == 0 and out_file.exists(), out
    # As in training, the opt-in still refuses a pickle that runs code, with a message, not a traceback.
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _Evil(str(marker))}, model / "pytorch_model.bin")
    code, out = run_cli(args + ["--allow-pickle-weights"], capsys)
    assert code != 0 and "Traceback" not in out and not marker.exists(), out


def test_pipeline_eval_and_merge_inherit_the_training_stages_pickle_opt_in():
    from lmpipeline.config.schema import PipelineConfig

    run = PipelineConfig(stages=["sft", "eval", "merge"], stage_configs={"sft": {"allow_pickle_weights": True}})
    assert run.stage("eval").allow_pickle_weights and run.stage("merge").allow_pickle_weights
    run = PipelineConfig(stages=["sft", "eval"], stage_configs={"sft": {"allow_pickle_weights": True},
                                                               "eval": {"allow_pickle_weights": False}})
    assert not run.stage("eval").allow_pickle_weights  # the stage's own word wins
    assert not PipelineConfig(stages=["sft", "eval"]).stage("eval").allow_pickle_weights
