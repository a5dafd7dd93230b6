"""Plan before you spend (seed 002): presets, a memory and time estimator, and auto-fit.

    presets.py     `model_size: 7b|13b|70b` and `preset: <family>` config fragments (presets/*.yaml), applied
                   by the config loader where the user left keys out, each recorded as a derived value;
                   the architecture of a model (local config.json, or a shipped one in model_configs/)
    estimate.py    peak GPU memory by part (weights, adapters, gradients, optimizer, activations, logits),
                   time from FLOPs, the smallest GPU that fits; calibrated against the bench's H100 peaks
    hardware.py    the GPU table, the headroom a run needs, the GPU this process has
    autofit.py     `per_device_train_batch_size: auto` / `gradient_checkpointing: auto`, the fit check that
                   runs before any weight loads, and the GPU probe step

`lmpipeline estimate CONFIG [--gpu NAME]` (lmpipeline/commands/estimate_cmd.py) prints the estimate.
"""
