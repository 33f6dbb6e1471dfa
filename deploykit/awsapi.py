"""AWS clients, created once, and the wrapping of AWS errors into messages that say what to do.

Region and credentials come from the standard chain; boto3 itself honours AWS_ENDPOINT_URL
(and AWS_ENDPOINT_URL_<SERVICE>), which is how the tests point the action at a moto server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from deploykit import __version__
from deploykit.errors import FIX_CREDENTIALS, AwsCallFailed

# Tries in all (first call included) for ordinary calls; botocore's standard mode backs off
# exponentially on throttling and 5xx.
MAX_ATTEMPTS = 6

_CREDENTIAL_ERRORS = {
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",  # what EC2 answers a request signed with expired temporary credentials
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "AuthFailure",
    "InvalidAccessKeyId",
}
# S3 answers a HEAD request (HeadBucket) that it cannot authenticate, e.g. signed with an expired
# session token, with a bare 400 and no body: botocore can only report the status code.
_CREDENTIAL_ERRORS_ON_HEAD = {"400"}
_DENIED_ERRORS = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "Forbidden", "403"}


# After a cancel the runner kills the step about 10 s after its first signal: every call made
# then must give up quickly instead of waiting out the ordinary timeouts and retries.
HURRIED_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 3}
HURRIED_MAX_ATTEMPTS = 2


class AwsClients:
    """Lazily created clients: a run that never stages does not build an S3 client."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.hurried = False

    def hurry(self) -> None:
        """From now on, clients with short timeouts and at most two tries (used on cancel)."""
        if self.hurried:
            return
        self.hurried = True
        for name in ("ec2", "ssm", "ssm_send", "s3", "s3_light", "sts"):
            self.__dict__.pop(name, None)  # cached_property: rebuilt on next use

    def _config(self, max_attempts: int = MAX_ATTEMPTS, **extra: Any) -> Any:
        from botocore.config import Config

        timeouts = HURRIED_TIMEOUTS if self.hurried else {"connect_timeout": 10, "read_timeout": 60}
        if self.hurried:
            max_attempts = min(max_attempts, HURRIED_MAX_ATTEMPTS)
        return Config(
            region_name=self.region,
            # total_max_attempts counts the first call; botocore's max_attempts would not.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            user_agent_extra=f"k3s-deploy-action/{__version__}",
            **timeouts,
            **extra,
        )

    @cached_property
    def _session(self) -> Any:
        import boto3

        return boto3.session.Session(region_name=self.region)

    @cached_property
    def ec2(self) -> Any:
        return self._session.client("ec2", config=self._config())

    @cached_property
    def ssm(self) -> Any:
        return self._session.client("ssm", config=self._config())

    @cached_property
    def ssm_send(self) -> Any:
        """SendCommand has no idempotency token: a retried send can start a deploy twice, so
        this client never retries on its own; command.py decides (see send_deploy)."""
        return self._session.client("ssm", config=self._config(max_attempts=1))

    @cached_property
    def s3(self) -> Any:
        return self._session.client(
            "s3", config=self._config(s3={"addressing_style": "path"}, signature_version="s3v4")
        )

    @cached_property
    def s3_light(self) -> Any:
        """For reads that may fail without harm (live progress): two tries, short timeouts, so
        a slow answer never delays noticing that the command ended."""
        config = self._config(max_attempts=2, s3={"addressing_style": "path"}, signature_version="s3v4")
        if not self.hurried:
            config = config.merge(type(config)(connect_timeout=3, read_timeout=5))
        return self._session.client("s3", config=config)

    @cached_property
    def s3_presign(self) -> Any:
        """Signs presigned URLs only (no call): SigV4 and virtual-hosted addressing in the
        bucket's region, which S3 accepts for a new bucket at once (SigV2 URLs on the global
        host answer 307 until the name has spread)."""
        return self._session.client(
            "s3", config=self._config(s3={"addressing_style": "virtual"}, signature_version="s3v4")
        )

    @cached_property
    def sts(self) -> Any:
        return self._session.client("sts", config=self._config())


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def aws_call(what: str, permission: str, resource: str = "*") -> Iterator[None]:
    """Turn botocore errors inside the block into AwsCallFailed naming `what` and the fix.

    `permission` is the IAM action the deploy role needs for this call.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise AwsCallFailed(f"can't {what}: no AWS credentials found", fix=FIX_CREDENTIALS) from None
    except ClientError as exc:
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in _CREDENTIAL_ERRORS or code in _CREDENTIAL_ERRORS_ON_HEAD:
            raise AwsCallFailed(f"can't {what}: {code}: {message}", fix=FIX_CREDENTIALS) from None
        if code in _DENIED_ERRORS:
            raise AwsCallFailed(
                f"can't {what}: {code}",
                fix=f"The deploy role needs {permission} on {resource} (see examples/iam/).",
            ) from None
        raise AwsCallFailed(f"can't {what}: {code}: {message}") from None
    except BotoCoreError as exc:
        raise AwsCallFailed(f"can't {what}: {exc}") from None
