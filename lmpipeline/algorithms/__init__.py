"""Old import paths of seed 001 (`lmpipeline.algorithms.trl_sft`), kept working with a warning."""
