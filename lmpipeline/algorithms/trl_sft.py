"""Deprecated path: `from lmpipeline.algorithms.trl_sft import TRLSFTStage, TRLSFTConfig` (an early API's names).

Maps to lmpipeline.SFTStage / lmpipeline.SFTConfig; to be removed in lmpipeline 0.3.0.
"""

import warnings

from lmpipeline.config.schema import SFTConfig as TRLSFTConfig

warnings.warn(
    "lmpipeline.algorithms.trl_sft is deprecated since 0.1.0 and will be removed in 0.3.0: "
    "use `from lmpipeline import SFTStage, SFTConfig`",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name):
    if name == "TRLSFTStage":
        from lmpipeline.methods.sft import SFTStage

        return SFTStage
    raise AttributeError(name)


__all__ = ["TRLSFTConfig", "TRLSFTStage"]
