"""The exit statuses a `cli.py` run ends with: what the study runner reads a cell's outcome from."""

from records.preemption import PREEMPTION_SIGNAL

EXIT_CELLS_FAILED = 1  # a study some of whose cells crashed: resumable, so one line and no traceback
EXIT_USER_ERROR = 2  # a mistake the user can fix (one line on stderr): the study stops and says so
EXIT_DIVERGED = 3  # the loss became NaN/inf: a result, not a crash (a study records it and goes on)
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
EXIT_SIGINT = 130  # 128 + SIGINT (Ctrl-C): a fit saved last.ckpt first, like on SIGTERM
EXIT_PREEMPTED = 128 + int(PREEMPTION_SIGNAL)  # 138: SLURM's preemption signal (SIGUSR1); the job is requeued
