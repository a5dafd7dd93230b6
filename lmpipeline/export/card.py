"""The model card (README.md) of a package: Hub front matter, what was trained, numbers, usage code.

Front matter follows the Hub's model-card metadata: base_model (only when it is a Hub id; a local path
is not valid there and is named in the text instead), library_name (peft for adapters, transformers
for full weights), pipeline_tag, tags, license when known, datasets when they are Hub names.
The usage code loads what the archive holds: one adapter on its base (PeftModel.from_pretrained, as
a TRL-style script shows), a chain of adapters merged in order, or full weights with AutoModelForCausalLM.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from lmpipeline.numbers import fmt_number


def looks_like_hub_id(name: str | None) -> bool:
    if not name or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def front_matter(meta: dict, *, tags: list[str], license: str | None) -> dict:
    fm: dict = {}
    if looks_like_hub_id(meta.get("base_model")):
        fm["base_model"] = meta["base_model"]
    fm["library_name"] = "peft" if meta["content"] in ("adapter", "adapter_chain") else "transformers"
    fm["pipeline_tag"] = "text-generation"
    fm["tags"] = tags
    if license:
        fm["license"] = license
    datasets = sorted({d for d in meta.get("datasets", []) if looks_like_hub_id(d) and "." not in Path(d).name})
    if datasets:
        fm["datasets"] = datasets
    return fm


def card_tags(meta: dict, extra: list[str]) -> list[str]:
    tags = ["lmpipeline"]
    for s in meta.get("stages", []):  # the training methods the model went through, in order
        if s.get("trained") and s["kind"] not in tags:
            tags.append(s["kind"])
    if meta["content"] in ("adapter", "adapter_chain") or any(s.get("adapter") for s in meta.get("stages", [])):
        tags.append("lora")
    if any((s.get("hyperparameters") or {}).get("use_4bit") for s in meta.get("stages", [])):
        tags.append("qlora")
    for t in extra:
        if t not in tags:
            tags.append(t)
    return tags


def _num(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return fmt_number(v)


GENERATE_CODE = (
    'messages = [{"role": "user", "content": "Explain machine learning in one paragraph."}]\n'
    "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
    "                                       return_dict=True).to(model.device)\n"
    "outputs = model.generate(**inputs, max_new_tokens=256)\n"
    'print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
)


def usage_code(meta: dict, location: str, *, subfolder_arg: bool) -> str:
    """Python that loads the packaged model from `location` (a folder or a Hub id)."""
    base = meta.get("base_model") or "BASE_MODEL"
    content = meta["content"]
    gen = GENERATE_CODE
    if content == "adapter":
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f'base_model = AutoModelForCausalLM.from_pretrained("{base}", device_map="auto")\n'
            f'model = PeftModel.from_pretrained(base_model, "{location}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n\n' + gen
        )
    if content == "adapter_chain":
        folders = [a["folder"] for a in meta["adapters"]]
        if subfolder_arg:
            load = (f'    model = PeftModel.from_pretrained(model, "{location}", subfolder=folder)\n')
            tok = f'tokenizer = AutoTokenizer.from_pretrained("{location}", subfolder="{folders[-1]}")\n'
        else:
            load = f'    model = PeftModel.from_pretrained(model, f"{location}/{{folder}}")\n'
            tok = f'tokenizer = AutoTokenizer.from_pretrained("{location}/{folders[-1]}")\n'
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{base}", device_map="auto")\n'
            "# Each adapter was trained on top of the previous one: apply them in this order.\n"
            f"for folder in {folders!r}:\n" + load +
            "    model = model.merge_and_unload()\n" + tok + "\n" + gen
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{location}", device_map="auto")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n\n' + gen
    )


def render_card(meta: dict, *, tags: list[str] | None = None, license: str | None = None,
                description: str | None = None, hub_repo_id: str | None = None) -> str:
    """README.md text for a package described by `meta` (package.collect_metadata's dict)."""
    tags = card_tags(meta, tags or [])
    fm = front_matter(meta, tags=tags, license=license)
    lines = ["---", yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    name = meta.get("name", "model")
    lines.append(f"# {name}")
    lines.append("")
    what = {"adapter": "a LoRA adapter", "adapter_chain": "a chain of LoRA adapters (apply in order)",
            "merged": "full weights (LoRA adapters merged into the base)", "full": "full weights"}[meta["content"]]
    chain = " → ".join(f"{s['name']} ({s['kind']})" for s in meta.get("stages", []))
    lines.append(description or f"Post-trained from `{meta.get('base_model')}` with lmpipeline: {chain or 'no stage record'}.")
    lines.append("")
    lines.append(f"This package holds {what}, in `{meta['model_dir']}/`.")
    lines.append("")
    for w in meta.get("warnings", []):
        lines.append(f"> **Note:** {w}")
        lines.append("")

    lines += ["## Usage", ""]
    if hub_repo_id:
        lines += ["From the Hub:", "", "```python",
                  usage_code(meta, hub_repo_id, subfolder_arg=True).rstrip(), "```", ""]
    lines += ["From the extracted archive (`lmpipeline package --verify` checks it first):", "", "```python",
              usage_code(meta, f"./{name}/{meta['model_dir']}", subfolder_arg=False).rstrip(), "```", "",
              f"Or chat with it: `lmpipeline chat ./{name}` (the extracted folder; adapters are applied as above)", ""]

    stages = meta.get("stages", [])
    if stages:
        lines += ["## Training", "", "| stage | kind | steps | adapter | data fingerprint |", "|---|---|---|---|---|"]
        for s in stages:
            fp = (s.get("data_fingerprint") or "-")
            lines.append(f"| {s['name']} | {s['kind']} | {s.get('global_step', '-')} | {'yes' if s.get('adapter') else 'no'} "
                         f"| `{fp[:16]}` |")
        lines.append("")
        for s in stages:
            hp = s.get("hyperparameters") or {}
            if hp:
                lines += [f"<details><summary>{s['name']} hyper-parameters</summary>", "", "```yaml",
                          yaml.safe_dump(hp, sort_keys=True, allow_unicode=True).rstrip(), "```", "", "</details>", ""]
    ev = meta.get("evaluation") or []
    if ev:
        cols = [c for c in ("eval_loss", "eval_perplexity", "exact_match", "rouge_l", "bleu", "gen_tokens_mean")
                if any(c in r for r in ev)]
        lines += ["## Evaluation", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in ev:
            lines.append(f"| {r.get('name')} | " + " | ".join(_num(r.get(c, '-')) for c in cols) + " |")
        lines.append("")
    lines += ["## Files", "", "`metadata.json` lists the base model, every stage's hyper-parameters, data fingerprints, "
              "metrics, package versions and the sha256 of every file; `requirements.txt` the packages to load it.", ""]
    return "\n".join(lines)




# ------------------------------------------------------------------------------------------------
# The card of a training stage's own output folder (<run>/<stage>/final/README.md), written in place of
# PEFT's empty template: what was trained, on what data, with what result, and how to load it.

# Every training stage's card shows these; its method adds its own keys (Method.card_keys).
COMMON_CARD_KEYS = ("use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_4bit", "use_8bit",
                    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "max_seq_length")


def _datasets(params: dict) -> list[str]:
    spec = params.get("dataset_name_or_path")
    if isinstance(spec, str):
        return [spec]
    return [s["path"] if isinstance(s, dict) else str(s) for s in spec or []]


def _stage_usage(final_dir: Path, base: str, chain: list[str], adapter: bool, model_class: str = "AutoModelForCausalLM",
                 example: str | None = None, model_kwargs: str = "") -> str:
    """How to load a stage's final folder: `model_class`, `model_kwargs` (more from_pretrained arguments; they
    may read `tokenizer`) and `example` (what to do with the model) are its method's; the defaults load a
    causal LM and generate."""
    location = str(final_dir)
    causal = model_class == "AutoModelForCausalLM" and example is None and not model_kwargs
    if causal and (not adapter or len(chain) <= 1):
        return usage_code({"content": "adapter" if adapter else "full", "base_model": base}, location,
                          subfolder_arg=False)
    example = GENERATE_CODE if example is None else example
    tokenizer = f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n'
    before, after = ("", tokenizer + "\n") if causal else (tokenizer, "\n")

    def load(where: str) -> str:
        return f'model = {model_class}.from_pretrained("{where}", device_map="auto"{model_kwargs})\n'

    head = f"from transformers import {model_class}, AutoTokenizer\n"
    if not adapter:
        return head + "\n" + before + load(location) + after + example
    if len(chain) <= 1:
        return (head + "from peft import PeftModel\n\n" + before + load(base) +
                f'model = PeftModel.from_pretrained(model, "{location}")\n' + after + example)
    if causal:
        imports, apply = "from peft import PeftModel\n\n", "    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()\n"
    else:  # earlier causal-LM adapters on another head: the plain PeftModel (no generation wrapper)
        imports = "from peft import PeftConfig, PeftModel\n\n"
        apply = ("    config = PeftConfig.from_pretrained(adapter)\n"
                 "    config.task_type = None\n"
                 "    model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()\n")
    return (head + imports + before + load(base) +
            "# This adapter was trained on top of the earlier stages' adapters: apply them in this order.\n"
            f"for adapter in {chain!r}:\n" + apply + after + example)


def render_stage_card(final_dir: Path, *, stage_name: str, kind: str, base_model: str, params: dict, data: dict,
                      metrics: dict, global_step: int | None, adapter: bool, chain: list[str] | None = None,
                      method_title: str | None = None, shown_keys: tuple[str, ...] = (),
                      model_class: str = "AutoModelForCausalLM", usage_example: str | None = None,
                      model_kwargs: str = "", includes: list[str] | None = None) -> str:
    """README.md of a training stage's output folder. `chain`: the adapter folders to apply in order (the
    earlier stages' and this one) when the stage trained on top of earlier adapters; `method_title` and
    `shown_keys`: how the stage's method names itself and the config keys of its own the card shows;
    `model_class`, `model_kwargs` and `usage_example`: how its model loads and is used (a causal LM that
    generates); `includes`: the earlier stages whose adapters are summed into this one (one adapter to load)."""
    datasets = _datasets(params)
    meta = {"base_model": base_model, "content": "adapter" if adapter else "full", "datasets": datasets,
            "stages": [{"kind": kind, "adapter": adapter, "hyperparameters": params}]}
    fm = front_matter(meta, tags=card_tags(meta, []), license=None)
    chain = [str(c) for c in (chain or [final_dir])]
    what = "a LoRA adapter" if adapter else "full model weights"
    lines = ["---", yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {Path(final_dir).parent.name}: {what} for {base_model}", "",
             f"Trained with lmpipeline by {method_title or kind} from `{base_model}`"
             + (f", on top of the earlier stages' adapters ({' -> '.join(Path(c).parent.name for c in chain[:-1])})"
                if len(chain) > 1 else "")
             + (f", on top of the earlier stages' adapters ({' -> '.join(includes)}), summed with its own into this "
                "one adapter" if includes else "")
             + f"; stage `{stage_name}`, {fmt_number(global_step or 0)} optimizer steps.",
             "", "## Data", ""]
    for d in datasets:
        lines.append(f"- training: `{d}`" + (f" ({params.get('dataset_format')} rows)" if params.get("dataset_format") else ""))
    if params.get("eval_dataset_name_or_path"):
        lines.append(f"- evaluation: `{params['eval_dataset_name_or_path']}`")
    facts = {k: data[k] for k in ("formats", "train_examples", "train_pairs", "eval_examples", "eval_pairs",
                                  "trained_tokens", "fingerprint") if data.get(k) not in (None, [], "")}
    lines += [f"- {k.replace('_', ' ')}: {', '.join(v) if isinstance(v, list) else fmt_number(v)}" for k, v in facts.items()]
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_number(params[k]) if not isinstance(params[k], list) else ', '.join(map(str, params[k]))} |"
              for k in COMMON_CARD_KEYS + tuple(shown_keys) if k in params and params[k] is not None]
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if shown:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt_number(v)} |" for k, v in shown.items()]
    lines += ["", "## How to load it", "", "```python", _stage_usage(Path(final_dir), base_model, chain, adapter, model_class,
                                                                usage_example, model_kwargs).rstrip(),
              "```", "", "The run folder's `run.json` holds the whole resolved config, the data fingerprints and the "
              "package versions; `lmpipeline package` bundles this model with its card for sharing.", ""]
    return "\n".join(lines)



__all__ = ["render_card", "usage_code", "front_matter", "card_tags", "looks_like_hub_id", "render_stage_card"]
