"""User-facing errors: one paragraph that names the problem and the fix."""

from __future__ import annotations


class FtuneError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    The message names what is wrong and how to fix it. The CLI prints it as one paragraph
    and exits with status 2 (or 1 for failures during training); `verbose=true` adds the traceback.
    """

    exit_code = 2


class MethodNotApplicable(FtuneError):
    """A method cannot be applied to the chosen model or task."""


class TrainingFailed(FtuneError):
    """Training stopped (for example the loss became NaN); the last good checkpoint is kept."""

    exit_code = 1


class TrainingInterrupted(TrainingFailed):
    """Training stopped on a signal (Ctrl-C, SIGTERM); a checkpoint was saved to resume from."""
