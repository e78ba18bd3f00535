"""The package's one error hierarchy: every mistake a user can make raises a GensarError.

Entry points (gin_utils.run) print a GensarError as one line, `error: <message>`, and exit
with code 2; anything else is a bug and keeps its traceback. The message names what is
wrong and where (file, row, field, flag), because it is all the user sees. GensarError is a
ValueError, so code that guards a call with `except ValueError` keeps working.
"""
from __future__ import annotations


class GensarError(ValueError):
  """Base of every user-facing error of gensar-jax (exit code 2 in the CLIs)."""


class DataError(GensarError):
  """Bad input data. The message names the file, the line or row, and the field."""


class CheckpointError(DataError):
  """A checkpoint (of a run, a sentence encoder or pretrained weights) that cannot be used
  or does not fit the run, with the path and the reason."""


# The trainer's exit code after a preemption (SIGTERM, or JAX's preemption notice on a
# pod): the current step is saved and complete, so the launcher should recreate the slice
# if it is gone and rerun the same command, which resumes from that step. 75 is EX_TEMPFAIL
# of sysexits.h ("temporary failure; the user is invited to retry"): no other exit of the
# trainer uses it, and it is not 128 + a signal, so it cannot be mistaken for a kill.
PREEMPTED_EXIT_CODE = 75


class DiskFullError(GensarError):
  """MODEL_DIR's disk (or bucket quota) is full: the message says what was kept."""
