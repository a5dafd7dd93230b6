"""Run by torchrun (2 CPU processes, gloo) from test_distributed.py: FSDP2-sharded LoRA training,
checkpointed with lmpipeline.train.sharded and resumed into a freshly built model, must continue
exactly like the uninterrupted run. argv: tiny model folder, work folder. Writes result.json (rank 0)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from lmpipeline.train import sharded
from lmpipeline.train import checkpoint as ckpt_io

model_dir, work = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
torch.use_deterministic_algorithms(True)


def build(seed):
    torch.manual_seed(seed)  # the LoRA init: a resumed model must get its weights from the checkpoint
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def batch(step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 200, (2, 24), generator=g)
    return ids


def train(model, opt, sched, steps):
    out = []
    for step in steps:
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        out.append(t.item() / world)
    return out


reference = train(*build(0), range(4))

model, opt, sched = build(0)
first = train(model, opt, sched, range(2))
m, o = sharded.gathered(model, opt)
if rank == 0:
    ckpt_io.save_checkpoint(work / "ckpt", 2, model=m, optimizer=o, scheduler=sched, trainer_state={"global_step": 2})
dist.barrier()
model, opt, sched = build(123)
state = sharded.load_checkpoint(work / "ckpt" / "checkpoint-2", model=model, optimizer=opt, scheduler=sched)
resumed = first + train(model, opt, sched, range(2, 4))
if rank == 0:
    files = sorted(p.name for p in (work / "ckpt" / "checkpoint-2").iterdir())
    (work / "result.json").write_text(json.dumps({"reference": reference, "resumed": resumed, "state": state,
                                                   "files": files}))
dist.destroy_process_group()
