"""Auto-fit with a mocked device: `auto` resolves from the estimate for the GPU's memory, keeps the global
batch, falls back to the defaults without a GPU, and a stage that cannot fit fails before any loading."""

import json

import pytest
import torch

from lmpipeline.config.schema import DPOConfig, SFTConfig
from lmpipeline.errors import UserError
from lmpipeline.methods import method_for
from lmpipeline.plan import autofit, hardware, stage_plan
from lmpipeline.plan.estimate import setup_from_stage, estimate_memory
from lmpipeline.config.presets import load_shipped


def gpu(gib: float) -> hardware.GPU:
    return hardware.GPU("test-gpu", f"test GPU {gib} GiB", gib, 100.0)


def stage(**kw):
    base = dict(stage_name="sft", per_device_train_batch_size="auto", gradient_checkpointing="auto", bf16=True,
                max_seq_length=2048, lora_r=16)
    return SFTConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def arch():
    return load_shipped("llama-3.2-3b")


def test_no_gpu_resolves_to_the_defaults(arch):
    cfg, derived, messages = autofit.resolve_auto(stage(gradient_accumulation_steps=2), method_for("sft"), arch, None)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing) == (4, 2, False)
    assert derived == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "gradient_checkpointing": False}
    assert any("no CUDA GPU" in m for m in messages)


def test_values_without_auto_are_left_alone(arch):
    s = SFTConfig(stage_name="sft", per_device_train_batch_size=3, gradient_checkpointing=True, bf16=False)
    assert autofit.resolve_auto(s, method_for("sft"), arch, gpu(80)) == (s, {}, [])


@pytest.mark.parametrize("gib", [12, 16, 24, 40, 80])
def test_auto_picks_the_largest_fitting_batch_and_keeps_the_global_batch(arch, gib):
    s = stage(gradient_accumulation_steps=4, use_liger_kernel=True)
    cfg, derived, _ = autofit.resolve_auto(s, method_for("sft"), arch, gpu(gib))
    b, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    assert b * ga == 16 and isinstance(cfg.gradient_checkpointing, bool)
    assert derived["per_device_train_batch_size"] == b and derived["gradient_checkpointing"] == cfg.gradient_checkpointing
    peak = estimate_memory(arch, setup_from_stage(cfg, method_for("sft"))).peak
    assert hardware.required_bytes(peak) <= gpu(gib).memory_bytes
    if b < 16:  # the next larger divisor of 16 would not have fitted with the same checkpointing choice
        bigger = cfg.model_copy(update={"per_device_train_batch_size": b * 2, "gradient_accumulation_steps": ga // 2})
        assert not hardware.fits(estimate_memory(arch, setup_from_stage(bigger, method_for("sft"))).peak, gpu(gib))


def test_more_memory_never_makes_the_choice_worse(arch):
    """With more memory the share of layers recomputed never grows and the estimated speed never falls."""
    from lmpipeline.plan.estimate import checkpointed_layers
    from lmpipeline.plan.timing import estimate_time

    recomputed, speeds = [], []
    for g in (12, 16, 24, 40, 80):
        cfg = autofit.resolve_auto(stage(use_liger_kernel=True, gradient_accumulation_steps=4), method_for("sft"), arch, gpu(g))[0]
        setup = setup_from_stage(cfg, method_for("sft"))
        recomputed.append(checkpointed_layers(arch.num_layers, setup))
        speeds.append(estimate_time(arch, setup, gpu(g)).tokens_per_second)
    assert recomputed == sorted(recomputed, reverse=True) and recomputed[0] > recomputed[-1] == 0
    assert speeds == sorted(speeds) and speeds[0] < speeds[-1]


def test_partial_checkpointing_when_it_is_the_fastest_fit(arch):
    """24 GiB: all layers checkpointed would allow a larger micro-batch, but a quarter of them already fits
    a full 4,096-token micro-batch, which the time estimate makes faster."""
    cfg, derived, messages = autofit.resolve_auto(stage(use_liger_kernel=True, gradient_accumulation_steps=4), method_for("sft"), arch,
                                                  gpu(24))
    assert cfg.gradient_checkpointing is True and 0 < cfg.gradient_checkpointing_fraction < 1
    assert derived["gradient_checkpointing_fraction"] == cfg.gradient_checkpointing_fraction
    assert any("gradient_checkpointing_fraction ->" in m for m in messages)
    full = cfg.model_copy(update={"gradient_checkpointing_fraction": 1.0})
    assert estimate_memory(arch, setup_from_stage(full, method_for("sft"))).peak < estimate_memory(arch, setup_from_stage(cfg, method_for("sft"))).peak


def test_checkpointing_only_when_needed(arch):
    small = stage(per_device_train_batch_size=1, use_liger_kernel=True)
    assert autofit.resolve_auto(small, method_for("sft"), arch, gpu(80))[0].gradient_checkpointing is False
    big = stage(per_device_train_batch_size=8, use_liger_kernel=True)
    assert autofit.resolve_auto(big, method_for("sft"), arch, gpu(24))[0].gradient_checkpointing is True


def test_global_batch_size_target(arch):
    cfg, _, _ = autofit.resolve_auto(stage(global_batch_size=24, use_liger_kernel=True), method_for("sft"), arch, gpu(80))
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 24
    assert cfg._auto == {"per_device_train_batch_size": True, "gradient_checkpointing": True, "target": 24}
    with pytest.raises(ValueError, match="global_batch_size"):
        SFTConfig(global_batch_size=24, per_device_train_batch_size=4, gradient_accumulation_steps=2)


def test_dpo_auto_fits_pairs(arch):
    d = DPOConfig(stage_name="dpo", per_device_train_batch_size="auto", gradient_checkpointing="auto", bf16=True,
                  max_seq_length=1024, gradient_accumulation_steps=4)
    cfg, derived, _ = autofit.resolve_auto(d, method_for("dpo"), arch, gpu(24))
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 16
    setup = setup_from_stage(cfg, method_for("dpo"))
    assert setup.rows == 2 * cfg.per_device_train_batch_size  # a pair is a chosen and a rejected row
    assert hardware.fits(estimate_memory(arch, setup).peak, gpu(24))


def test_nothing_fits_is_reported_before_loading(arch):
    s = stage(gradient_accumulation_steps=4)
    cfg, _, messages = autofit.resolve_auto(s, method_for("sft"), arch, gpu(4))
    assert cfg.per_device_train_batch_size == 1 and cfg.gradient_checkpointing is True
    assert any("nothing fits" in m for m in messages)
    with pytest.raises(UserError) as e:
        stage_plan.prepare_stage(s, method_for("sft"), model="meta-llama/Llama-3.2-3B-Instruct", device=gpu(4))
    msg = str(e.value)
    assert "stage `sft` needs about" in msg and "test GPU 4 GiB" in msg and "weights" in msg
    assert "use_4bit: true (QLoRA)" in msg and "smallest that fits" in msg


def test_prepare_stage_summary_and_fixed_values(arch):
    s = SFTConfig(stage_name="sft", per_device_train_batch_size=2, gradient_accumulation_steps=4, use_4bit=True,
                  bf16=True, gradient_checkpointing=True)
    cfg, derived, summary = stage_plan.prepare_stage(s, method_for("sft"), model="meta-llama/Llama-3.2-3B-Instruct",
                                                  device=hardware.gpu("a10-24gb"))
    assert cfg is s and derived == {}
    assert summary["gpu"]["fits"] is True and summary["memory"]["peak_gib"] > 2
    assert summary["model"]["name"] == "llama-3.2-3b"
    json.dumps(summary)
    # Without a GPU and without auto values there is nothing to do (and nothing is estimated).
    assert stage_plan.prepare_stage(s, method_for("sft"), model="x", detect=False) == (s, {}, None)


def test_unknown_architecture_resolves_auto_to_defaults():
    cfg, derived, summary = stage_plan.prepare_stage(stage(), method_for("sft"), model="org/unknown-model", device=gpu(80))
    assert cfg.per_device_train_batch_size == 4 and summary is None


def test_probe_backs_off_on_out_of_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    peak = {"v": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak["v"])
    tried = []
    gc_on = []

    def step(b, gc):
        tried.append((b, gc))
        if b > 4 or (b == 4 and not gc):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        peak["v"] = b * 2**30

    out = autofit.probe_micro_batch(step, 16, 1, target=16, gradient_checkpointing=False, gc_auto=True,
                                    enable_gc=lambda: gc_on.append(True))
    assert tried == [(16, False), (16, True), (8, True), (4, True)]
    assert out == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
                   "gradient_checkpointing_fraction": 1.0, "probe_peak_gib": 4.0}
    assert gc_on == [True]
    # auto chose a share of the layers: out of memory first checkpoints them all, then halves the batch
    tried.clear()
    out = autofit.probe_micro_batch(step, 16, 1, target=16, gradient_checkpointing=True, fraction=0.25, gc_auto=True,
                                    enable_gc=lambda: gc_on.append(True))
    assert tried == [(16, True), (16, True), (8, True), (4, True)] and len(gc_on) == 2
    assert out["gradient_checkpointing_fraction"] == 1.0 and out["per_device_train_batch_size"] == 4
    # the budget counts the optimizer state that does not exist yet during the probe
    out = autofit.probe_micro_batch(step, 4, 4, target=16, gradient_checkpointing=True, gc_auto=False,
                                    budget_bytes=5 * 2**30, extra_bytes=2 * 2**30)
    assert out["per_device_train_batch_size"] == 2
    with pytest.raises(UserError, match="does not fit"):
        autofit.probe_micro_batch(step, 8, 1, target=None, gradient_checkpointing=True, gc_auto=False)


def test_pipeline_fails_before_loading_when_a_gpu_cannot_hold_the_stage(tmp_path, monkeypatch):
    from lmpipeline.config.loader import load_config
    from lmpipeline.pipeline import run_pipeline

    monkeypatch.setattr(hardware, "detect_gpu", lambda: hardware.gpu("t4-16gb"))
    import lmpipeline.models.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("weights or tokenizer loaded before the fit check")
    monkeypatch.setattr(loading, "load_tokenizer", no_loading)
    monkeypatch.setattr(loading, "load_model", no_loading)
    p = tmp_path / "c.yaml"
    p.write_text(f"""
model_name_or_path: meta-llama/Llama-3.1-70B-Instruct
output_dir: {tmp_path / 'out'}
stages: [sft]
stage_configs:
  sft:
    dataset_name_or_path: d.jsonl
    bf16: true
""")
    with pytest.raises(UserError) as e:
        run_pipeline(load_config(p), config_path=str(p))
    assert "NVIDIA T4 16 GB" in str(e.value) and "no single GPU in the table fits it" in str(e.value)


def test_pipeline_records_resolved_auto_values(tmp_path, monkeypatch):
    from lmpipeline.pipeline import _fit_stage
    from lmpipeline.config.loader import load_config

    monkeypatch.setattr(hardware, "detect_gpu", lambda: hardware.gpu("h100-80gb"))
    p = tmp_path / "c.yaml"
    p.write_text("""
preset: llama-3.2-3b
output_dir: out
stages: [sft]
stage_configs:
  sft:
    dataset_name_or_path: d.jsonl
    per_device_train_batch_size: auto
    use_liger_kernel: true
""")
    cfg = load_config(p)
    record, entry = {"derived": dict(cfg._derived)}, {}
    resolved = _fit_stage(cfg.stage("sft"), method_for("sft"), cfg, record, entry)
    assert isinstance(resolved.per_device_train_batch_size, int) and isinstance(resolved.gradient_checkpointing, bool)
    d = record["derived"]
    assert d["stage_configs.sft.per_device_train_batch_size"] == resolved.per_device_train_batch_size
    assert d["stage_configs.sft.gradient_checkpointing"] == resolved.gradient_checkpointing
    assert (d["stage_configs.sft.per_device_train_batch_size"] * d["stage_configs.sft.gradient_accumulation_steps"]
            == 16)  # the preset's GA 4 x the default micro-batch 4
    assert entry["estimate"]["gpu"]["name"] == "h100-80gb" and entry["estimate"]["gpu"]["fits"] is True


def test_skip_env_turns_the_fit_error_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(autofit.SKIP_ENV, "1")
    cfg, _, summary = stage_plan.prepare_stage(stage(gradient_accumulation_steps=4), method_for("sft"),
                                            model="meta-llama/Llama-3.2-3B-Instruct", device=gpu(4))
    assert summary["gpu"]["fits"] is False and "starting anyway" in caplog.text
