"""Configs of the stages that follow training: eval, merge and package.

They follow schema.py's rules: every field documented, unknown keys are errors (extra="forbid"),
`stage_name` and `output_dir` are set by the pipeline. None of them trains, so none of them carries
the optimisation fields of TrainStageConfig.

    eval     loss/perplexity on held-out data, greedy generation on a golden set, base vs each tuned
             stage side by side (lmpipeline/evaluate/stage.py)
    merge    LoRA adapter(s) merged into the base in chain order (lmpipeline/export/merge.py)
    package  a verified .tar.gz with metadata, model card and requirements; opt-in Hub push and GGUF
             (lmpipeline/export/package.py)
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
METRIC_NAMES = ("exact_match", "rouge_l", "bleu")


class _Strict(BaseModel):
    # Same behaviour as schema._Strict (kept local so this module depends on pydantic only).
    # allow_inf_nan=False: a NaN or infinite number is never a usable setting (a NaN learning rate
    # trains a no-op that reports "done"), so every float key refuses one at validation.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class _LifecycleStage(_Strict):
    stage_name: Optional[str] = Field(None, description="Name of the stage (set by the pipeline).")
    output_dir: Optional[str] = Field(
        None, description="Where this stage writes; the pipeline sets <output_dir>/<stage>."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model repo.")
    allow_pickle_weights: bool = Field(
        False, description="Load base weights from pickle files (pytorch_model.bin) when there are no "
        ".safetensors (unpickling can run code), as the training stages' key of the same name."
    )


class EvalConfig(_LifecycleStage):
    """Evaluate the base model and every trained stage on the same data and prompts."""

    golden_set: Optional[str] = Field(
        None,
        description="JSONL of prompts for generation: {prompt: str or messages, reference?: str}, or any "
        "SFT format (alpaca, messages, ...) whose last assistant turn is the reference.",
    )
    eval_dataset: Optional[str] = Field(
        None,
        description="Data for loss and perplexity (any SFT format); unset: the golden set's rows that "
        "have a reference.",
    )
    dataset_format: Optional[str] = Field(None, description="Format of eval_dataset; detected when unset.")
    max_samples: Optional[int] = Field(None, gt=0, description="Use at most this many golden prompts.")
    max_eval_samples: Optional[int] = Field(None, gt=0, description="Use at most this many loss rows.")
    max_seq_length: int = Field(2048, gt=0, description="Longest loss example in tokens (longer: truncated).")
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Tokens the loss is measured on for chat rows: assistant turns, or all."
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Batch size of the loss pass.")
    generation_batch_size: int = Field(8, gt=0, description="Prompts generated together (the engine's slots).")
    max_new_tokens: int = Field(256, gt=0, description="Longest generated answer, in tokens.")
    metrics: list[Literal["exact_match", "rouge_l", "bleu"]] = Field(
        list(METRIC_NAMES), description="Reference metrics (rows without a reference are skipped)."
    )
    compare_base: bool = Field(True, description="Also evaluate the untrained base model.")
    models: Optional[list[str]] = Field(
        None, description="Stages to evaluate (default: every sft/dpo stage that ran before this one)."
    )
    chat_template: Optional[str] = Field(
        None,
        description="Template for every model (built-in name or Jinja); unset: the latest trained "
        "stage's tokenizer template, so base and tuned see the same prompt.",
    )
    chat_template_path: Optional[str] = Field(None, description="A Jinja file with the template to use.")
    system_prompt: Optional[str] = Field(None, description="System message put before every golden prompt.")
    num_print_samples: int = Field(3, ge=0, description="Sample generations printed to the log.")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype to load models in (auto: bf16 on a GPU that has it, else float32)."
    )

    @model_validator(mode="after")
    def _one_template(self):
        if self.chat_template and self.chat_template_path:
            raise ValueError("chat_template and chat_template_path are exclusive: pick one")
        return self


class MergeConfig(_LifecycleStage):
    """Merge the LoRA adapter chain (e.g. SFT then DPO) into the base and save full weights."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the merged weights (auto: the base checkpoint's dtype, else float32)."
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard, e.g. 2GB or 500MB.")
    base_model: Optional[str] = Field(
        None, description="Base to merge into, if not the one the adapters name (e.g. a local copy)."
    )
    stage: Optional[str] = Field(
        None, description="Merge the chain ending at this stage (default: the latest trained stage)."
    )
    safe_merge: bool = Field(True, description="Check merged weights for NaN/inf before keeping them.")
    quantized_base: Literal["original", "dequantized"] = Field(
        "original",
        description="For adapters trained on a 4-bit base: merge into the original weights (default), or "
        "into the 4-bit round trip of them (what training saw; needs a GPU and bitsandbytes).",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where merging runs: cpu needs host memory for the whole model, cuda GPU memory."
    )

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", v, flags=re.IGNORECASE):
            raise ValueError(f"max_shard_size `{v}` is not a size like 5GB or 500MB")
        return v.strip()


class PackageConfig(_LifecycleStage):
    """Package a trained or merged model into a verified archive with metadata and a model card."""

    source: Literal["auto", "adapter", "merged"] = Field(
        "auto", description="What to package: auto = the merged model when a merge stage ran, else the "
        "latest trained stage (adapter or full weights)."
    )
    model_name: Optional[str] = Field(None, description="Name used for the archive and card title.")
    license: Optional[str] = Field(None, description="License id for the model card (e.g. apache-2.0).")
    tags: list[str] = Field(default_factory=list, description="Extra Hub tags for the model card.")
    description: Optional[str] = Field(None, description="A paragraph for the model card.")
    compress_level: int = Field(
        6, ge=0, le=9, description="gzip level of the archive (0 = store; weights compress little)."
    )
    push_to_hub: bool = Field(False, description="Upload to the Hub (token from HF_TOKEN only).")
    hub_repo_id: Optional[str] = Field(None, description="Hub repository, e.g. user/my-model.")
    hub_private: bool = Field(True, description="Create the Hub repository as private.")
    gguf: bool = Field(False, description="Also export GGUF with llama.cpp's convert_hf_to_gguf.py.")
    gguf_outtype: Literal["f32", "f16", "bf16", "q8_0", "auto"] = Field(
        "f16", description="GGUF tensor type passed to convert_hf_to_gguf.py --outtype."
    )
    llama_cpp_convert: Optional[str] = Field(
        None, description="Path to convert_hf_to_gguf.py (else it is looked up on PATH)."
    )

    @model_validator(mode="after")
    def _hub(self):
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub needs hub_repo_id (e.g. your-name/model-name)")
        if self.hub_repo_id and self.hub_repo_id.count("/") != 1:
            raise ValueError(f"hub_repo_id `{self.hub_repo_id}` must look like owner/name")
        return self


LIFECYCLE_CONFIG_CLASSES: dict[str, type[_LifecycleStage]] = {
    "eval": EvalConfig,
    "merge": MergeConfig,
    "package": PackageConfig,
}

__all__ = ["EvalConfig", "MergeConfig", "PackageConfig", "LIFECYCLE_CONFIG_CLASSES"]
