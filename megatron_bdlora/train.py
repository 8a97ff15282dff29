"""Fine-tune a LoRA / BD-LoRA adapter:
`torchrun --nproc_per_node N -m megatron_bdlora.train --config C.yaml [k.sub=v ...]`.

TP x DP over the launched ranks (gloo on CPU, nccl on GPU); configuration errors exit non-zero before any
process group is created. `python -m megatron_bdlora.train --config C.yaml --dry-run [--json]` checks a job
on any machine (no process group, no weights read) and prints its plan, sizes and collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_bdlora.parallel import destroy_parallel
from megatron_bdlora.training.config import ConfigError, check_run_files, load_config
from megatron_bdlora.training.dry_run import default_world_size, dry_run, format_report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in checkpoint.dir")
    p.add_argument(
        "--dry-run", action="store_true",
        help="check the config and print what the job would do (model shape, sharding plan, adapter parameters, "
        "per-rank memory, collectives per step, batch layout), reading only the base's config.json; no process "
        "group, no weights, no training",
    )
    p.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
    p.add_argument(
        "--world-size", type=int, metavar="N",
        help="with --dry-run: the number of ranks the job will get (default: $WORLD_SIZE, else parallel.tp x "
        "parallel.dp)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.rank=16 parallel.tp=2")
    args = p.parse_args(argv)
    if (args.json or args.world_size is not None) and not args.dry_run:
        p.error("--json and --world-size only apply with --dry-run")
    return args


def _dry_run(args: argparse.Namespace) -> int:
    """Print the job's plan (text or JSON); configuration errors exit 2 like a real run's."""
    try:
        cfg = load_config(args.config, args.overrides)
        report = dry_run(cfg, args.world_size or default_world_size(cfg))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else f"dry run of {args.config}\n{format_report(report)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.dry_run:
        return _dry_run(args)
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_files(cfg, world_size, args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # lazy: the trainer's imports (megatron-core, transformers) take seconds; they load once the config and its
    # files are checked
    from megatron_bdlora.training.loop import Trainer, prepare_run

    try:
        run = prepare_run(cfg, world_size, rank, args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = Trainer(run)
    if args.resume and not trainer.resume() and trainer.info.rank == 0:
        print("no complete checkpoint found: starting from step 0", file=sys.stderr)
    history = trainer.run()
    if trainer.info.rank == 0 and history:
        last = history[-1]
        valid = f" valid ppl {last['valid_ppl']:.3f}" if "valid_ppl" in last else ""
        print(f"done: step {last['step']} loss {last['loss']:.4f}" + valid)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
