"""Run logs: a tqdm progress bar (loss, lr, tokens/s), a JSONL metrics file and optional TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Writes one JSON line per step to <dir>/metrics.jsonl (rank 0 only: pass enabled=False elsewhere)."""

    def __init__(
        self, log_dir: Path, enabled: bool, tensorboard: bool, progress: bool, total: int, initial: int
    ) -> None:
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run (initial > 0) appends; a fresh one starts the log anew
        self.file = open(log_dir / "metrics.jsonl", "a" if initial else "w", buffering=1)
        if progress:
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:  # lazy: tensorboard is an optional extra (`pip install .[tensorboard]`)
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("logging.tensorboard=true needs the `tensorboard` package installed") from err
            self.tb = SummaryWriter(str(log_dir / "tensorboard"))

    def write(self, record: dict[str, Any], show: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar is not None:
            self.bar.update(1)
            if show:
                post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                        "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "valid_ppl" in record:
                    post["val_ppl"] = f"{record['valid_ppl']:.2f}"
                self.bar.set_postfix(post)

    def close(self) -> None:
        for handle in (self.bar, self.tb, self.file):
            if handle is not None:
                handle.close()
