"""Old import paths (`lmpipeline.algorithms.trl_sft`), kept working with a warning."""
