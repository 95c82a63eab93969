"""The one exception type for mistakes a user can fix (bad params, missing files, failed downloads)."""


class UserError(Exception):
    """A problem in the user's input or environment, reported as one line without a traceback.

    Stages catch it in `itm.stage_runner.run_stage`, print `error: <message>` and exit non-zero. The message must
    name the offending value and, where there is a closed set, the valid choices.
    """
