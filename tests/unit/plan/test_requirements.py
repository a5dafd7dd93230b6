"""What a run needs from the machine: found by validate, and by run before it tokenises anything."""

import textwrap

import pytest
import torch

from lmpipeline.cli import main
from lmpipeline.config.loader import load_config
from lmpipeline.plan.requirements import missing_requirements

def write(tmp_path, tiny_model, stage: str, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(f"""\
        model_name_or_path: {tiny_model}
        output_dir: {tmp_path / 'run'}
        stages: [sft]
        stage_configs:
          sft:
            dataset_name_or_path: data.jsonl
        """) + textwrap.indent(textwrap.dedent(stage), " " * 4))
    return p


def test_each_need_is_named_with_its_key_line_and_fix(tmp_path, tiny_model):
    p = write(tmp_path, tiny_model, """\
        use_4bit: true
        optim: paged_adamw_8bit
        use_liger_kernel: true
        report_to: [wandb, tensorboard]
        """)
    found = missing_requirements(load_config(p), cuda=False, has_module=lambda module: False)
    text = "\n".join(map(str, found))
    assert f"{p}:7: stage_configs.sft.use_4bit: 4-bit loading (bitsandbytes) needs a CUDA GPU" in text
    assert "set use_4bit: false" in text and "bitsandbytes, which is not installed" in text
    assert f"{p}:8: stage_configs.sft.optim" in text and "set optim: adamw_torch" in text
    assert "liger-kernel, which is not installed" in text and "set use_liger_kernel: false" in text
    assert "pip install wandb" in text and "pip install tensorboard" in text and "nothing would be logged" in text
    assert len(found) == 8  # GPU and package for each of 4-bit, optimizer, Liger; two trackers
    assert missing_requirements(load_config(p), cuda=True, has_module=lambda module: True) == []


def test_a_plain_cpu_config_needs_nothing(tmp_path, tiny_model):
    p = write(tmp_path, tiny_model, "report_to: none\n")
    assert missing_requirements(load_config(p), cuda=False, has_module=lambda module: False) == []


def test_sectioned_form_points_at_its_own_line(repo_root):
    path = repo_root / "examples" / "seed000_config.yaml"
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "load_in_4bit" in text)
    found = missing_requirements(load_config(path), cuda=False, has_module=lambda module: True)
    assert str(found[0]).startswith(f"{path}:{line}: stage_configs.sft.use_4bit")  # model.load_in_4bit's line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_validate_and_run_fail_early_without_cuda(tmp_path, tiny_model, capsys):
    p = write(tmp_path, tiny_model, "use_4bit: true\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "stage_configs.sft.use_4bit" in err and "needs a CUDA GPU" in err and "set use_4bit: false" in err
    assert main(["validate", str(p), "--config-only"]) == 0  # the config itself is fine: a note, not a failure
    assert "note: on this machine" in capsys.readouterr().out
    assert main(["run", str(p)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # before the output folder, the tokeniser or the data
