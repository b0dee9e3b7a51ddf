"""One rule for where W&B logs, shared by training runs and the study report: online when credentials exist
(`WANDB_API_KEY` or a `wandb login` entry in ~/.netrc), otherwise offline; `WANDB_MODE` overrides both."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_is_online() -> bool:
    """True when W&B credentials exist (env var or `wandb login`); otherwise runs are logged offline."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode() -> str:
    """'online', 'offline' or 'disabled': `WANDB_MODE` if set (and not empty), else by `wandb_is_online`."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_is_online() else "offline")


def wandb_project() -> str:
    """The W&B project every run and report logs to: `WANDB_PROJECT`, else 'qreg'."""
    return os.environ.get("WANDB_PROJECT", "qreg")
