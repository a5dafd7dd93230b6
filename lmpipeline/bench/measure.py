"""One benchmark setting in this process: train for `steps` steps and measure.

Figures (the same for both engines):
- tokens/s: real (non-padding) tokens of steps warmup+1 .. steps over their wall time (ours: the
  per-step "tokens" and "tokens_per_second" of metrics.jsonl; TRL: the anchor's collator count and a
  step-end callback with torch.cuda.synchronize). DPO adds pairs/s = pairs per step / seconds per step.
- peak_alloc_gib: torch.cuda.max_memory_allocated over the whole run (reset after loading for TRL as
  in the anchor; ours from process start, so it also covers a reference precompute pass).
- mfu: tokens/s x k x N / 790 TFLOP/s, N = weights each token multiplies through (Architecture.
  matmul_params), k = 4 for LoRA (forward + backward to activations; recomputation not counted), plus 2
  for a DPO reference forward when it is not precomputed (GUIDE section 5's convention).
- losses: the per-step training loss, for the side-by-side curve.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from lmpipeline.bench import settings as bench_settings
from lmpipeline.bench import workloads

log = logging.getLogger(__name__)

PEAK_TFLOPS = 790.0  # an 8192^3 bf16 matmul on the H100 (GUIDE section 5)


def _gib(x: float) -> float:
    return round(x / 2**30, 3)


def _versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def _peak() -> tuple[float, float]:
    if not torch.cuda.is_available():
        return float("nan"), float("nan")
    return _gib(torch.cuda.max_memory_allocated()), _gib(torch.cuda.max_memory_reserved())


def summarize(step_seconds: list[float], step_tokens: list[float], warmup: int) -> dict:
    """tokens/s and s/step over the steps after `warmup`."""
    secs, toks = step_seconds[warmup:], step_tokens[warmup:]
    if not secs:
        raise ValueError(f"no steps after the {warmup} warm-up steps")
    total = sum(secs)
    return {"tokens_per_s": sum(toks) / total, "s_per_step": total / len(secs), "timed_steps": len(secs)}


def mfu(tokens_per_s: float, model: str, k: int) -> float:
    n = workloads.architecture(model).matmul_params
    return tokens_per_s * k * n / (PEAK_TFLOPS * 1e12)


def for_this_machine(options: dict) -> dict:
    """Off a GPU (smoke runs of the bench itself): torch AdamW, fp32, no Liger; 4-bit cannot run."""
    if torch.cuda.is_available():
        return options
    if options.get("use_4bit"):
        raise RuntimeError("4-bit settings need a CUDA GPU")
    return {**options, "optim": "adamw_torch", "bf16": False, "use_liger_kernel": False}


def _metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"tokens"' in line]


# ----------------------------------------------------------------------------------------------- ours


def run_ours(kind: str, setting: str, model: str, model_dir: Path, lengths: str, steps: int, warmup: int,
             work: Path) -> dict:
    from lmpipeline.data.types import DataReport

    desc, extra = bench_settings.lookup(kind, "ours", setting)
    common = bench_settings.SFT_COMMON if kind == "sft" else bench_settings.DPO_COMMON
    out = work / f"ours-{kind}-{setting}"
    shutil.rmtree(out, ignore_errors=True)  # a rerun in the same work folder would append to metrics.jsonl
    base = dict(stage_name=kind, output_dir=str(out), max_steps=steps, logging_steps=1, save_strategy="no",
                report_to="none", **common)
    if kind == "sft":
        base["max_seq_length"] = workloads.LENGTHS[lengths]["max_seq_length"]
    base.update(extra)
    base = for_this_machine(base)
    t0 = time.perf_counter()
    if kind == "sft":
        from lmpipeline.config.schema import SFTConfig
        from lmpipeline.data.build import SFTData
        from lmpipeline.data.types import TokenizedExample
        from lmpipeline.methods.sft import SFTStage

        cfg = SFTConfig(**base)
        rows = workloads.sft_rows(model, lengths)
        data = SFTData([TokenizedExample(r, list(r)) for r in rows], None, DataReport(), formats=["bench"])
        stage = SFTStage(cfg)
    else:
        from lmpipeline.config.schema import DPOConfig
        from lmpipeline.data.preference import PreferenceData, fit_pair
        from lmpipeline.data.types import TokenizedPair
        from lmpipeline.methods.dpo import DPOStage

        cfg = DPOConfig(**base)
        pairs = [fit_pair(TokenizedPair(p, c, r), cfg.max_seq_length, None)[0]
                 for p, c, r in workloads.preference_rows(model, steps * 8 + 64)]
        data = PreferenceData(pairs, None, DataReport(), formats=["bench"])
        stage = DPOStage(cfg)
    stage.execute(model_name_or_path=str(model_dir), torch_dtype="bfloat16", data=data)
    wall = time.perf_counter() - t0
    lines = _metric_lines(out)
    secs = [r["tokens"] / r["tokens_per_second"] for r in lines]
    res = summarize(secs, [r["tokens"] for r in lines], warmup)
    k = 4
    if kind == "dpo" and not cfg.precompute_ref_log_probs:
        k += 2
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    res.update(engine="ours", kind=kind, setting=setting, description=desc, mfu=mfu(res["tokens_per_s"], model, k),
               losses=[r["loss"] for r in lines], wall_s=round(wall, 1), config=extra)
    if kind == "dpo":
        res["pairs_per_s"] = per_step / res["s_per_step"]
        res["reward_accuracy_last5"] = sum(r.get("rewards/accuracies", 0) for r in lines[-5:]) / 5
    return res


# ------------------------------------------------------------------------------------------------ TRL


def _step_clock(stamps: list[float], step_tokens: list[int], tokens: list[int]):
    """A TrainerCallback recording each step's end time and the tokens collated since the last step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        seen = 0

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            step_tokens.append(tokens[0] - self.seen)
            self.seen = tokens[0]

    return StepClock()


def _trl_model(model_dir: Path, use_4bit: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if use_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": 0} if torch.cuda.is_available() else None
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                device_map=device_map, attn_implementation="sdpa")


def run_trl(kind: str, setting: str, model: str, model_dir: Path, lengths: str, steps: int, warmup: int,
            work: Path) -> dict:
    """TRL's trainer with the setting's options, as ../shared/bench/*_anchor_bench.py runs it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    desc, s = bench_settings.lookup(kind, "trl", setting)
    common = bench_settings.SFT_COMMON if kind == "sft" else bench_settings.DPO_COMMON
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        s = {**s, "liger": False}
        if s.get("use_4bit"):
            raise RuntimeError("4-bit settings need a CUDA GPU")
    args = dict(output_dir=str(work / f"trl-{kind}-{setting}"), max_steps=steps, per_device_train_batch_size=s["batch"],
                gradient_accumulation_steps=s["ga"], learning_rate=common["learning_rate"],
                optim=common["optim"] if on_gpu else "adamw_torch", logging_steps=1, bf16=on_gpu,
                gradient_checkpointing=s.get("gradient_checkpointing", False), report_to="none", save_strategy="no",
                seed=common["seed"], dataset_num_proc=1, use_cpu=not on_gpu)
    peft_config = LoraConfig(r=common["lora_r"], lora_alpha=common["lora_alpha"], lora_dropout=0.0,
                             target_modules=common["lora_target_modules"], task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    model_obj = _trl_model(model_dir, s.get("use_4bit", False))
    tok = AutoTokenizer.from_pretrained(model_dir)
    stamps: list[float] = []
    step_tokens: list[int] = []
    tokens = [0]
    clock = _step_clock(stamps, step_tokens, tokens)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        max_len = workloads.LENGTHS[lengths]["max_seq_length"]
        cfg = SFTConfig(max_length=max_len, packing=s.get("packing", False), use_liger_kernel=s.get("liger", False),
                        **args)
        ds = Dataset.from_dict({"input_ids": workloads.sft_rows(model, lengths)})
        trainer = SFTTrainer(model=model_obj, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                             callbacks=[clock])
    else:
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(beta=common["beta"], max_length=common["max_seq_length"], **args)
        rows = workloads.preference_rows(model, steps * 8 + 64)
        # TRL appends eos to each completion itself: hand it the words without ours.
        ds = Dataset.from_list([{"prompt": workloads.as_text(p), "chosen": workloads.as_text(c[:-1]),
                                 "rejected": workloads.as_text(r[:-1])} for p, c, r in rows])
        trainer = DPOTrainer(model=model_obj, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                             callbacks=[clock])
    collate = trainer.data_collator

    def counting(examples):  # real tokens; TRL's collators take unpadded examples
        for e in examples:
            if "prompt_ids" in e:  # DPO: the prompt goes through the model with each completion
                tokens[0] += 2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
            else:
                tokens[0] += len(e["input_ids"])
        return collate(examples)

    trainer.data_collator = counting
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    secs = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    res = summarize(secs, step_tokens, warmup)
    if kind == "dpo":
        res["pairs_per_s"] = s["batch"] * s["ga"] / res["s_per_step"]
        res["reward_accuracy_last5"] = sum(h.get("rewards/accuracies", 0) for h in logged[-5:]) / 5
    k = 4 + (2 if kind == "dpo" else 0)
    res.update(engine="trl", kind=kind, setting=setting, description=desc, mfu=mfu(res["tokens_per_s"], model, k),
               losses=[h["loss"] for h in logged], wall_s=round(wall, 1), config=s)
    return res


# ------------------------------------------------------------------------------------------------ entry


def run(engine: str, kind: str, setting: str, model: str, model_dir: Path, lengths: str = "alpaca", steps: int = 30,
        warmup: int = 5, work: Path | None = None) -> dict:
    work = Path(work or "/tmp/lmpipeline-bench")
    work.mkdir(parents=True, exist_ok=True)
    fn = run_ours if engine == "ours" else run_trl
    res = fn(kind, setting, model, Path(model_dir), lengths, steps, warmup, work)
    alloc, reserved = _peak()
    res.update(model=model, lengths=lengths if kind == "sft" else "ultrafeedback-like", steps=steps, warmup=warmup,
               peak_alloc_gib=alloc, peak_reserved_gib=reserved, versions=_versions(),
               date=time.strftime("%Y-%m-%d"))
    return res
