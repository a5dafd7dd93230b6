"""DPO throughput of lmpipeline on the anchor setup of ../shared/bench/dpo_anchor_bench.py (TRL 2.06 pairs/s
QLoRA, 2.55 bf16 LoRA on H100): random Llama-3.2-3B, batch 2 x GA 4, LoRA r16/a32 on 7 projections, beta 0.1,
lr 5e-5, max length 1024, gradient checkpointing, adamw_8bit, bf16; 25 steps, first 5 excluded."""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, os.getcwd())
out = Path(os.environ.get("OUT", "/tmp/out")); out.mkdir(parents=True, exist_ok=True)
d = Path("/tmp/llama3b")
if not (d / "config.json").exists():
    sys.path.insert(0, str(Path(__file__).parent))
    from anchor_model import make_model
    make_model(d)
from lmpipeline.config.schema import DPOConfig
from lmpipeline.data.types import DataReport, TokenizedPair
from lmpipeline.data.preference import PreferenceData, fit_pair, make_pair_plans
from lmpipeline.methods.dpo import DPOObjective, disable_dropout, compute_reference_logps
from lmpipeline.models import loading
from lmpipeline.train.loop import train
from lmpipeline.train.runtime import make_accelerator
from transformers import AutoTokenizer

rng = np.random.default_rng(0)
def ids(median, lo, hi):
    return rng.integers(5, 127990, int(np.clip(rng.lognormal(np.log(median), 0.7), lo, hi))).tolist()
pairs = [fit_pair(TokenizedPair(ids(150, 8, 512), ids(220, 8, 511) + [128009], ids(220, 8, 511) + [128009]), 1024, None)[0]
         for _ in range(25 * 8 + 64)]
data = PreferenceData(pairs, None, DataReport())
tok = AutoTokenizer.from_pretrained(d)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def one(name, cast_bf16=False, **kw):
    cfg = DPOConfig(stage_name="dpo", output_dir=f"/tmp/b_{name}", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                    learning_rate=5e-5, beta=0.1, max_seq_length=1024, bf16=True, gradient_checkpointing=True,
                    optim="adamw_8bit", lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=TARGETS,
                    max_steps=25, logging_steps=1, save_strategy="no", seed=3407, attn_implementation="sdpa", **kw)
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model = loading.load_model(str(d), cfg, torch_dtype="bfloat16")
    model = loading.apply_lora(model, cfg)
    if cast_bf16:  # undo prepare_model_for_kbit_training's fp32 upcast of embeddings/norms/head (as TRL's DPO does)
        for n, p in model.named_parameters():
            if p.dtype == torch.float32 and "lora_" not in n:
                p.data = p.data.to(torch.bfloat16)
    print(name, "param dtypes", sorted({(str(p.dtype), p.requires_grad) for p in model.parameters()}), flush=True)
    disable_dropout(model)
    loading.enable_gradient_checkpointing(model)
    acc = make_accelerator(cfg, Path(cfg.output_dir))
    obj = DPOObjective.from_config(cfg, reference="adapter_disabled")
    ref = None
    t0 = time.time()
    if cfg.precompute_ref_log_probs:
        ref = compute_reference_logps(obj, model, data.train, cfg, tok, acc)
        obj.reference = "precomputed"
    pre_s = time.time() - t0
    tp, _ = make_pair_plans(cfg, data, tok, ref_train=ref)
    stamps = []
    def clock(step):
        torch.cuda.synchronize(); stamps.append(time.time())
    train(model=model, cfg=cfg, objective=obj, train_plan=tp, eval_plan=None, output_dir=Path(cfg.output_dir),
          accelerator=acc, tokenizer=tok, on_step_end=clock)
    sps = (stamps[-1] - stamps[4]) / (len(stamps) - 5)
    lines = [json.loads(l) for l in open(Path(cfg.output_dir) / "metrics.jsonl")]
    res = dict(name=name, s_per_step=sps, pairs_per_s=8 / sps, peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
               precompute_s=pre_s, first_loss=lines[0]["loss"], last=lines[-1])
    print("RESULT", json.dumps(res), flush=True)
    with open(out / "bench.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    del model, obj, acc
    import gc; gc.collect()
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)

for name, kw in [("qlora_bf16cast", dict(use_4bit=True, cast_bf16=True)), ("qlora", dict(use_4bit=True)), ("bf16_lora", {}), ("qlora_precomputed", dict(use_4bit=True, precompute_ref_log_probs=True))]:
    if name in sys.argv[1:] or len(sys.argv) == 1:
        one(name, **kw)
