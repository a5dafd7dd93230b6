"""Plan before you spend: a memory and time estimator, auto-fit, and the fit check before loading.

    estimate.py    peak GPU memory by part (weights, adapters, gradients, optimizer, activations, logits),
                   calibrated against measured peaks
    timing.py      time from FLOPs at a stated MFU
    suggest.py     the changes that make a run fit a GPU it does not
    generation_plan.py  the memory of a stage that generates: weights + the engine's KV cache and buffers
    profile.py     a stage's data read cheaply: row count and a sample of token lengths
    hardware.py    the GPU table, the headroom a run needs, the GPU this process has
    autofit.py     `per_device_train_batch_size: auto` / `gradient_checkpointing: auto` and the GPU probe step
    stage_plan.py  one plan per training stage (what `lmpipeline estimate` prints), and the fit check that
                   runs before any weight loads

Presets and model architectures are config (lmpipeline/config/presets.py). A stage is planned with its
method's estimator terms (lmpipeline/methods: Method.terms), so the plan never asks a method's name.

`lmpipeline estimate CONFIG [--gpu NAME]` (lmpipeline/commands/estimate_cmd.py) prints the estimate.
"""
