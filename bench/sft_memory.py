"""SFT on random Llama-3.2-3B, our loop, fused LM-head loss on vs off (same call, same data, same seed).

The anchor setting of ../shared/bench/sft_anchor_bench.py: bf16 LoRA r16/alpha 16 on the 7
projections, batch 2 x GA 4, lengths lognormal (median 200, sigma 0.7, clipped 16..2048), padded
(no packing), gradient checkpointing, adamw_8bit; 25 steps, the first 5 excluded from the timing.
Tokens/s count real (non-padding) tokens. Writes $OUT/sft_memory.jsonl.

    python3 bench/sft_memory.py [bf16_fused bf16_full qlora_fused]
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, str(Path(__file__).parent))
out = Path(os.environ.get("OUT", "/tmp/out"))
out.mkdir(parents=True, exist_ok=True)
d = Path("/tmp/llama3b")
if not (d / "config.json").exists():
    from anchor_model import make_model

    make_model(d)

from transformers import AutoTokenizer  # noqa: E402

from lmpipeline.config.schema import SFTConfig  # noqa: E402
from lmpipeline.data.build import SFTData, make_batch_plans  # noqa: E402
from lmpipeline.data.types import DataReport, TokenizedExample  # noqa: E402
from lmpipeline.methods.sft import SFTObjective  # noqa: E402
from lmpipeline.models import loading  # noqa: E402
from lmpipeline.train.loop import train  # noqa: E402
from lmpipeline.train.runtime import make_accelerator  # noqa: E402

rng = np.random.default_rng(0)
lengths = np.clip(rng.lognormal(np.log(200), 0.7, 25 * 8 + 64), 16, 2048).astype(int)
examples = []
for n in lengths:
    ids = rng.integers(5, 127990, n).tolist()
    labels = [-100] * (n // 3) + ids[n // 3:]  # a masked prompt, a trained answer
    examples.append(TokenizedExample(ids, labels))
data = SFTData(examples, None, DataReport())
tok = AutoTokenizer.from_pretrained(d)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one(name, fused, **kw):
    cfg = SFTConfig(stage_name="sft", output_dir=f"/tmp/s_{name}", per_device_train_batch_size=2,
                    gradient_accumulation_steps=4, learning_rate=2e-4, max_seq_length=2048, bf16=True,
                    gradient_checkpointing=True, optim="adamw_8bit", lora_r=16, lora_alpha=16, lora_dropout=0.0,
                    lora_target_modules=TARGETS, max_steps=25, logging_steps=1, save_strategy="no", seed=3407,
                    attn_implementation="sdpa", **kw)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = loading.load_model(str(d), cfg, torch_dtype="bfloat16")
    model = loading.apply_lora(model, cfg)
    loading.enable_gradient_checkpointing(model)
    acc = make_accelerator(cfg, Path(cfg.output_dir))
    tp, _ = make_batch_plans(cfg, data, tok)
    stamps, tokens = [], []

    def clock(step):
        torch.cuda.synchronize()
        stamps.append(time.time())

    train(model=model, cfg=cfg, objective=SFTObjective(fused=fused), train_plan=tp, eval_plan=None,
          output_dir=Path(cfg.output_dir), accelerator=acc, tokenizer=tok, on_step_end=clock)
    lines = [json.loads(line) for line in open(Path(cfg.output_dir) / "metrics.jsonl")]
    # real tokens of steps 6..25 from the plan itself (the same batches the loop consumed)
    batches = tp.epoch_batches(0)
    real = sum(len(examples[i]) for b in batches[5 * 4:25 * 4] for i in b)
    secs = stamps[-1] - stamps[4]
    res = dict(name=name, fused=fused, tokens_per_s=real / secs, s_per_step=secs / 20,
               peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
               first_loss=lines[0]["loss"], last_loss=lines[-1]["loss"], **{k: str(v) for k, v in kw.items()})
    print("RESULT", json.dumps(res), flush=True)
    with open(out / "sft_memory.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    del model, acc
    import gc

    gc.collect()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


RUNS = {"bf16_fused": (True, {}), "bf16_full": (False, {}), "qlora_fused": (True, {"use_4bit": True})}
for name, (fused, kw) in RUNS.items():
    if name in sys.argv[1:] or len(sys.argv) == 1:
        one(name, fused, **kw)
