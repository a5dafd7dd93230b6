"""lmpipeline: post-train Hugging Face causal LMs (SFT, DPO; LoRA, QLoRA, full) from one YAML config.

Python API:

    from lmpipeline import SFTConfig, SFTStage
    result = SFTStage(SFTConfig(output_dir="out/sft", dataset_name_or_path="data.jsonl")).execute(model, tokenizer)
"""

__version__ = "0.1.0"

from lmpipeline.config.loader import load_config  # noqa: E402
from lmpipeline.config.schema import DPOConfig, PipelineConfig, SFTConfig  # noqa: E402
# The method table registers every training method's stage names and config class with the config
# layer; loading it here means a config can name any method however lmpipeline was imported.
from lmpipeline import methods  # noqa: E402,F401


def __getattr__(name):
    # Stages import torch/transformers; keep `import lmpipeline` light until they are asked for.
    if name in ("SFTStage", "StageResult"):
        from lmpipeline.methods import sft

        return getattr(sft, name)
    if name == "DPOStage":
        from lmpipeline.methods.dpo import DPOStage

        return DPOStage
    if name == "run_pipeline":
        from lmpipeline.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(name)


__all__ = ["load_config", "PipelineConfig", "SFTConfig", "DPOConfig", "SFTStage", "DPOStage", "StageResult", "run_pipeline"]
