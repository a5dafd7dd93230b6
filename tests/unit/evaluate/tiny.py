"""Tiny random models, LoRA adapters and run folders for the eval/merge/package/report tests.

Everything is built in a temporary folder from a real tokenizer (Qwen2.5's, with its chat template,
read from ../shared/data); nothing is downloaded. Models have 2 layers of width 32, so a forward pass
takes milliseconds; the vocabulary is the tokenizer's (151,665), embeddings tied to keep files small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

QWEN = "tokenizers/qwen2.5-0.5b-instruct"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def make_tiny_model(out: Path, shared_data: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(shared_data / QWEN)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    # Random init of this size gives near-uniform logits; a wider spread makes greedy outputs varied.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    copy_tokenizer(shared_data / QWEN, out)
    return out


def copy_tokenizer(src: Path, dst: Path) -> None:
    # The original vocab/merges files load in ~0.6 s; a re-saved 11 MB tokenizer.json takes ~3-6 s.
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.name in TOKENIZER_FILES:
            shutil.copyfile(f, dst / f.name)


def make_adapter(base_dir: Path, out: Path, seed: int, *, base_name: str | None = None, r: int = 4) -> Path:
    """A LoRA adapter with random non-zero A and B (init_lora_weights=False), saved with a tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    if base_name is not None:
        path = out / "adapter_config.json"
        data = json.loads(path.read_text())
        data["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(data))
    copy_tokenizer(base_dir, out)
    return out


def merged_reference(base_dir: Path, adapters: list[Path]):
    """base + adapters (all but the last merged, the last running unmerged): the model to match."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for i, a in enumerate(adapters):
        model = PeftModel.from_pretrained(model, str(a))
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


def write_metrics(path: Path, steps: int = 20, dpo: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            rec = {"step": s, "epoch": s / steps, "loss": 2.5 - s * 0.05, "learning_rate": 1e-4 * (1 - s / steps),
                   "grad_norm": 1.0 / s, "tokens_per_second": 1000.0 + s, "peak_memory_gib": 1.5}
            if dpo:
                rec.update({"rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s, "rewards/accuracies": 0.5 + s / 50,
                            "rewards/margins": 0.02 * s, "logps/chosen": -50.0 + s, "logps/rejected": -50.0 - s})
            f.write(json.dumps(rec) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "eval_loss": 2.4 - s * 0.04, "eval_perplexity": 10.0}) + "\n")


def make_run(root: Path, base_dir: Path, *, dpo: bool = True, quantized: bool = False) -> Path:
    """A finished run folder: sft (LoRA) then, optionally, dpo (LoRA on the merged sft), as the pipeline writes it."""
    run = root
    run.mkdir(parents=True, exist_ok=True)
    sft_final = make_adapter(base_dir, run / "sft" / "final", seed=1)
    write_metrics(run / "sft" / "metrics.jsonl")
    stages = {"sft": {"kind": "sft", "status": "done", "model": str(base_dir), "final_dir": str(sft_final),
                      "adapter": True, "global_step": 20, "metrics": {"eval_loss": 2.0},
                      "data": {"fingerprint": "abc123", "formats": ["messages"]}, "next_model": str(sft_final)}}
    names = ["sft"]
    if dpo:
        dpo_final = make_adapter(base_dir, run / "dpo" / "final", seed=2)
        write_metrics(run / "dpo" / "metrics.jsonl", dpo=True)
        stages["dpo"] = {"kind": "dpo", "status": "done", "model": str(sft_final), "final_dir": str(dpo_final),
                         "adapter": True, "global_step": 20, "metrics": {"rewards/accuracies": 0.9},
                         "data": {"fingerprint": "def456"}}
        names.append("dpo")
    config = {"model_name_or_path": str(base_dir), "output_dir": str(run), "stages": names,
              "stage_configs": {"sft": {"dataset_name_or_path": "data.jsonl", "lora_r": 4, "learning_rate": 2e-4,
                                        "use_4bit": quantized}}}
    if dpo:
        config["stage_configs"]["dpo"] = {"dataset_name_or_path": "pref.jsonl", "beta": 0.1}
    (run / "run.json").write_text(json.dumps({"created": "2026-01-01T00:00:00+00:00", "config": config,
                                              "versions": {"torch": torch.__version__}, "stages": stages}, indent=2))
    return run


def write_golden(path: Path, n: int = 4) -> Path:
    rows = [{"prompt": "What is 2+2?", "reference": "4"},
            {"prompt": [{"role": "user", "content": "Name a colour."}], "reference": "Blue"},
            {"prompt": "Say hello in French.", "reference": "Bonjour"},
            {"prompt": "Write one word.", "reference": None}]
    with open(path, "w") as f:
        for r in rows[:n]:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return path


def write_chain_file(adapter: Path, base: Path, earlier: list[tuple[str, Path]], name: str) -> None:
    """lmpipeline_chain.json as the DPO stage writes it (paths relative to the adapter folder)."""
    import os

    entries = [{"stage": n, "path": os.path.relpath(p.resolve(), adapter.resolve()), "abs_path": str(p.resolve())}
               for n, p in earlier]
    entries.append({"stage": name, "path": ".", "abs_path": str(adapter.resolve())})
    (adapter / "lmpipeline_chain.json").write_text(json.dumps(
        {"format": "lmpipeline-adapter-chain/1", "base_model": str(base), "adapters": entries}))


def tiny_run(root: Path, base_dir: Path, **kw) -> Path:
    """make_run, with the DPO adapter's chain file written as the DPO stage does."""
    run = make_run(root, base_dir, **kw)
    if (run / "dpo" / "final").is_dir():
        write_chain_file(run / "dpo" / "final", base_dir, [("sft", run / "sft" / "final")], "dpo")
    return run


_BUILT: dict[str, Path] = {}


def cached_tiny_model(tmp_path_factory, shared_data: Path) -> Path:
    """One tiny model per test session, whichever test folder asks first (fixtures cannot be shared
    between sibling test folders without a common conftest)."""
    if "model" not in _BUILT:
        with one_thread():
            _BUILT["model"] = make_tiny_model(tmp_path_factory.mktemp("tiny") / "base", shared_data)
    return _BUILT["model"]


def cached_run(tmp_path_factory, base_dir: Path) -> Path:
    if "run" not in _BUILT:
        with one_thread():
            _BUILT["run"] = tiny_run(tmp_path_factory.mktemp("run") / "run", base_dir)
    return _BUILT["run"]


class one_thread:
    """One torch thread inside the block: on a busy 2-core machine, thread hand-offs make tiny
    matmuls up to 1000x slower. Fixtures of module or session scope use it themselves, because they
    are set up before the function-scoped autouse fixture that does the same for test bodies."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
