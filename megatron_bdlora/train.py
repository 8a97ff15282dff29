"""Fine-tune a LoRA / BD-LoRA adapter: `torchrun --nproc_per_node N -m megatron_bdlora.train --config C.yaml [k.sub=v ...]`.

TP x DP over the launched ranks (gloo on CPU, nccl on GPU); configuration errors exit non-zero before any
process group is created.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_bdlora.training.config import ConfigError, load_config


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in checkpoint.dir")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.rank=16 parallel.tp=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from megatron_bdlora.parallel import silence_expected_warnings

    silence_expected_warnings()
    from megatron_bdlora.training.loop import Trainer, prepare_run

    try:
        cfg = load_config(args.config, args.overrides)
        run = prepare_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = Trainer(run)
    if args.resume and not trainer.resume() and trainer.info.rank == 0:
        print("no complete checkpoint found: starting from step 0", file=sys.stderr)
    history = trainer.run()
    if trainer.info.rank == 0 and history:
        last = history[-1]
        print(f"done: step {last['step']} loss {last['loss']:.4f}" + (f" valid ppl {last['valid_ppl']:.3f}" if "valid_ppl" in last else ""))
    from megatron_bdlora.parallel import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
