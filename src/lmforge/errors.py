"""Errors a user can act on. Each carries one sentence naming the problem and the fix; the CLI
prints it without a traceback (exit status 2)."""


class UserError(Exception):
    """Base of every error whose message is meant for the user."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: missing, corrupt, unsupported, or not matching the model."""
