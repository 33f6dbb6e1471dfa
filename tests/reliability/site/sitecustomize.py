"""Loaded by the action processes that the reliability suite starts (it is first on their
PYTHONPATH): compresses botocore's retry backoff by K3S_TEST_BACKOFF_SCALE so that a call
retried six times does not spend up to 31 s asleep. Which errors are retried, and how many
times, stays botocore's own decision; only the length of its sleeps changes."""

import os

_scale = float(os.environ.get("K3S_TEST_BACKOFF_SCALE") or "1")
if _scale != 1:
    from botocore.retries import standard

    _delay = standard.ExponentialBackoff.delay_amount

    def _scaled(self, context):  # type: ignore[no-untyped-def]
        return _delay(self, context) * _scale

    standard.ExponentialBackoff.delay_amount = _scaled
