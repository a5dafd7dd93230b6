"""More hostile and careless inputs, across config, data, model files, output paths and CLI flags.

Each case asserts the exit code, that the message names the key or the file:line, that no traceback
reaches the console, and that every input (config, data, model folder, run folder) is byte-identical
afterwards. Cases are (name, how to build the inputs, the command, the fragments the message holds);
a builder gets the test's folder and returns the files the command reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.trust._util import run_cli, train_tiny_run, tree_hashes, write_config

pytestmark = pytest.mark.integration

GOOD_ROW = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]}


@pytest.fixture()
def trained(trained_run):
    return trained_run


class Case:
    """The inputs of one hostile case, built in `root`; `argv` and `expect` may use {placeholders}."""

    def __init__(self, root: Path, tiny_model: Path, data: Path, trained: Path):
        self.root, self.tiny_model, self.data, self.trained = root, tiny_model, data, trained
        self.inputs: list[Path] = []
        self.values: dict[str, str] = {"root": str(root), "trained": str(trained)}

    def data_file(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        self.inputs.append(path)
        return path

    def model_copy(self, change=None) -> Path:
        model = self.root / "model"
        shutil.copytree(self.tiny_model, model)
        if change:
            change(model)
        self.inputs.append(model)
        return model

    def config(self, *, model=None, data=None, raw_stage: str = "", **sft) -> Path:
        cfg = write_config(self.root, model or self.tiny_model, data or self.data, **sft)
        if raw_stage:
            cfg.write_text(cfg.read_text() + raw_stage)
        self.inputs.append(cfg)
        self.values["cfg"] = str(cfg)
        return cfg

    def line(self, text: str) -> int:
        cfg = Path(self.values["cfg"])
        return next(i for i, line in enumerate(cfg.read_text().splitlines(), 1) if line.strip().startswith(text))


def _truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _widen_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))


def _run(case: Case) -> list[str]:
    return ["run", case.values["cfg"]]


# ----------------------------------------------------------------------------------- the cases


def empty_dataset_path(c):
    c.config(dataset_name_or_path="")
    return _run(c), [f"{c.values['cfg']}:{c.line('dataset_name_or_path:')}: stage_configs.sft.dataset_name_or_path: "
                     "is an empty path"]


def stages_not_a_list(c):
    cfg = c.config()
    cfg.write_text(cfg.read_text().replace("stages:\n- sft", "stages: sft"))
    return _run(c), [f"{cfg}:{c.line('stages:')}: stages: Input should be a valid list"]


def batch_size_not_a_number(c):
    c.config(per_device_train_batch_size="four")
    return _run(c), [f":{c.line('per_device_train_batch_size:')}: stage_configs.sft.per_device_train_batch_size: "
                     "expected a positive integer or `auto`, got 'four'"]


def broken_chat_template_file(c):
    template = c.data_file("broken.jinja", "{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    c.config(chat_template_path=str(template))
    return _run(c), [f"stage_configs.sft.chat_template_path: {template}:2: the chat template is not valid Jinja"]


def output_dir_inside_tokenizer_folder(c):
    tokenizer = c.model_copy()
    cfg = c.config()
    raw = yaml.safe_load(cfg.read_text())
    raw.update(tokenizer_name_or_path=str(tokenizer), output_dir=str(tokenizer / "run"))
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return _run(c), [f"is inside the input tokenizer_name_or_path ({tokenizer.resolve()})"]


def eval_data_inside_output_dir(c):
    (c.root / "run").mkdir()
    held_out = c.data_file("run/held_out.jsonl", json.dumps(GOOD_ROW) + "\n")
    c.config(eval_dataset_name_or_path=str(held_out))
    return _run(c), [f"contains the input stage_configs.sft.eval_dataset_name_or_path ({held_out.resolve()})"]


def output_dir_holds_the_config(c):
    cfg = c.config()
    raw = yaml.safe_load(cfg.read_text())
    raw["output_dir"] = str(c.root)
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return ["run", str(cfg), "--overwrite"], [f"contains the input the config file ({cfg.resolve()})"]


# Data files: (name, file name, contents, extra stage keys, what the message holds; {data} is the file).
_NULL_ROLE = {"messages": [{"role": None, "content": "hi"}, {"role": "assistant", "content": "x"}]}
_BOOL_WEIGHT = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "x", "loss_weight": True}]}
DATA_CASES = [
    ("csv_with_a_header_only", "rows.csv", "instruction,output\n", {},
     "stage_configs.sft.dataset_name_or_path: {data} holds no rows"),
    ("json_empty_list", "rows.json", "[]\n", {}, "{data} holds no rows"),
    ("text_field_not_a_string", "text.jsonl", json.dumps({"text": 5}) + "\n", {"dataset_format": "text"},
     "{data}:1: 'text' must be a string, found a number (5)"),
    ("role_null", "roles.jsonl", json.dumps(GOOD_ROW) + "\n" + json.dumps(_NULL_ROLE) + "\n", {},
     "{data}:2: messages turn 1 'role' must be a string (user, assistant, system, tool), found null"),
    ("alpaca_output_a_list", "alpaca.jsonl", json.dumps({"instruction": "a", "output": ["x"]}) + "\n", {},
     "{data}:1: 'output' must be a string, found a list"),
    ("loss_weight_true", "weights.jsonl", json.dumps(_BOOL_WEIGHT) + "\n", {},
     "{data}:1: messages turn 2 loss_weight must be 0 (not trained) or 1 (trained), found a boolean"),
]


def _data_case(name, file_name, text, sft, expect):
    def build(c):
        data = c.data_file(file_name, text)
        c.config(data=data, **sft)
        return _run(c), [expect.format(data=data)]

    build.__name__ = name
    return build


def truncated_weights(c):
    model = c.model_copy(_truncate_weights)
    c.config(model=model)
    return _run(c), [f"model_name_or_path: cannot load model `{model}`", "damaged or incomplete"]


def weights_do_not_match_config(c):
    model = c.model_copy(_widen_config)
    c.config(model=model)
    return _run(c), [f"cannot load model `{model}`: its weights do not match its config.json"]


def model_path_is_a_file(c):
    model = c.data_file("model.safetensors", "not a model")
    c.config(model=model)
    return _run(c), [f"model_name_or_path: `{model}` is a file; a model folder"]


def merge_onto_its_own_adapter(c):
    run = c.root / "run"
    shutil.copytree(c.trained, run)
    c.inputs.append(run)
    return (["merge", str(run), "--output", str(run / "sft" / "final"), "--overwrite"],
            [f"--output: the output folder {(run / 'sft' / 'final').resolve()} is the input adapter"])


def generate_over_a_model_file(c):
    model = c.model_copy()
    prompts = c.data_file("prompts.jsonl", json.dumps({"prompt": "hi"}) + "\n")
    return (["generate", str(model), "--prompts", str(prompts), "--output", str(model / "config.json")],
            [f"--output: the output file {(model / 'config.json').resolve()} is inside the input PATH"])


def report_over_run_json(c):
    run = c.root / "run"
    shutil.copytree(c.trained, run)
    c.inputs.append(run)
    return (["report", str(run), "--output", str(run / "run.json")],
            [f"--output: {run / 'run.json'} exists and is not a report lmpipeline wrote"])


def allow_changed_config_without_resume(c):
    c.config()
    return ["run", c.values["cfg"], "--allow-changed-config"], ["--allow-changed-config: applies only with --resume"]


def resume_into_a_users_folder(c):
    folder = c.root / "run"
    folder.mkdir()
    c.data_file("run/results.csv", "a,b\n")
    c.config()
    return ["run", c.values["cfg"], "--resume"], [f"`{folder}` is not empty and is not a run folder lmpipeline created"]


def set_a_non_finite_beta(c):
    c.config()
    return (["run", c.values["cfg"], "--set", "stage_configs.sft.adam_beta2=inf"],
            ["--set: stage_configs.sft.adam_beta2: Input should be a finite number"])


CASES = [empty_dataset_path, stages_not_a_list, batch_size_not_a_number, broken_chat_template_file,
         output_dir_inside_tokenizer_folder, eval_data_inside_output_dir, output_dir_holds_the_config,
         *(_data_case(*case) for case in DATA_CASES), truncated_weights, weights_do_not_match_config, model_path_is_a_file,
         merge_onto_its_own_adapter, generate_over_a_model_file, report_over_run_json,
         allow_changed_config_without_resume, resume_into_a_users_folder, set_a_non_finite_beta]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_case(tmp_path, tiny_model, quickstart_data, trained, capsys, build):
    case = Case(tmp_path, tiny_model, quickstart_data / "sft_train.jsonl", trained)
    argv, expect = build(case)
    inputs = [*case.inputs, quickstart_data / "sft_train.jsonl", tiny_model]
    before = tree_hashes(*inputs)
    code, out = run_cli(argv, capsys)
    assert code == 2, out[-3000:]
    for fragment in expect:
        assert fragment in out, out[-3000:]
    assert "Traceback" not in out
    assert tree_hashes(*inputs) == before
