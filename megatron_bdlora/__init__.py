"""Block-diagonal LoRA (BD-LoRA) under Megatron tensor parallelism."""

from megatron_bdlora.expected_warnings import silence_expected_warnings

__version__ = "0.1.0"

# megatron-core warns on import (no Transformer Engine / Apex): filtered here, before any module of the package can
# import it, so every process (command lines, spawned ranks, scripts) logs only the warnings that matter
silence_expected_warnings()
