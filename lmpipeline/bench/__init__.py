"""`lmpipeline bench sft|dpo|generate`: our pipeline and the peers on the same model, data and seed.

    workloads.py  random-init models from shipped architecture configs (no download) and the
                  synthetic data of the peer measurement (GUIDE section 5, ../shared/bench/)
    settings.py   the named settings each engine runs (ours: lmpipeline's stages; trl: SFTTrainer /
                  DPOTrainer with the peers' best settings)
    measure.py    one setting in one process: tokens/s over real tokens (pairs/s for DPO), peak
                  allocated memory, MFU against 790 TFLOP/s, the loss curve
    worker.py     `python -m lmpipeline.bench.worker`: measure.py in a fresh process (what the command
                  runs per setting, so one setting's memory never shows in another's peak)
    generation.py `bench generate`: lmpipeline's generation engine against model.generate (dynamic and
                  static cache), one path and batch size per process (`python -m lmpipeline.bench.generation`)

The command (lmpipeline/commands/bench_cmd.py) writes bench/results/<date>-<kind>-<model>-<lengths>.json
and prints the table that goes into bench/README.md.
"""
