"""Typed errors. Each carries a title for the `::error` annotation and, where we know one, the fix.

`main()` in cli.py is the only place that turns them into output and an exit code.
"""

from __future__ import annotations


class DeployError(Exception):
    """Something stopped the deploy; the message says what and, with `fix`, what to do."""

    title = "Deploy failed"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


class InputError(DeployError):
    title = "Invalid input"


class ManifestError(DeployError):
    title = "Invalid manifests"


class TargetNotFound(DeployError):
    title = "K3s master not found"


class TargetNotReady(DeployError):
    title = "K3s master not reachable through SSM"


class AwsCallFailed(DeployError):
    title = "AWS call failed"


class StagingError(DeployError):
    title = "Could not stage the bundle in S3"


class RemoteCommandFailed(DeployError):
    title = "Deploy command failed on the master"


class LocalScriptFailed(RemoteCommandFailed):
    title = "Deploy script failed"


class BuildFailed(DeployError):
    title = "Image build failed"


class PushFailed(DeployError):
    title = "Image push failed"


class RegistryLoginFailed(DeployError):
    title = "Registry login failed"


class RegistryUnavailable(DeployError):
    title = "Registry unreachable"


class ImageMissing(DeployError):
    title = "Image not found in its registry"


class ImageUnverified(DeployError):
    """verify-images: true, and a registry answers only clients with a login this step lacks."""

    title = "Image not verified"


class JobCancelled(BaseException):
    """Raised by the SIGINT/SIGTERM handler. A BaseException so no `except Exception` eats it."""


# Fixes users will search for. Shown after the error that names them.
FIX_CREDENTIALS = (
    "Check the AWS credentials of the job: with OIDC, the aws-actions/configure-aws-credentials "
    "step and the role's trust policy; with static keys, the AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY secrets."
)
FIX_SSM_AGENT = (
    "On the master: `sudo systemctl status amazon-ssm-agent`; the instance role needs the "
    "AmazonSSMManagedInstanceCore policy; the instance needs a route to the SSM endpoints."
)
FIX_K3S_UNRESPONSIVE = (
    "The K3s API did not answer in time. On the master: `sudo systemctl restart k3s`, then "
    "`kubectl get --raw=/readyz`. On a small instance, check memory with `free -m`."
)
FIX_TLS_TIMEOUT = (
    "TLS handshake timeouts mean an overloaded K3s API: keep `kubectl-validate: false` and raise "
    "`request-timeout` (e.g. 120s); check `kubectl top nodes`."
)
FIX_IMAGE_PULL = (
    "The cluster cannot pull an image: check that the image and tag were pushed "
    "(`docker pull IMAGE:TAG`), the registry credentials (imagePullSecrets), and "
    "`kubectl describe pod -n NAMESPACE POD`."
)
FIX_MISSING_TOOL = (
    "Install on the master what the message names (the deploy script needs bash 4.4+, "
    "coreutils, tar, gzip and kubectl), or set the `kubectl` input to the command that runs "
    "kubectl there (e.g. `k3s kubectl`); SSM runs the script as root, with a short PATH."
)
# With transport local the script runs in the action's container against the job's kubeconfig.
FIX_MISSING_TOOL_LOCAL = (
    "The action's image has bash, coreutils, tar, gzip and kubectl: set the `kubectl` input to a "
    "command the image has (`kubectl`), or run the job's own kubectl with transport ssm."
)
FIX_KUBE_API_LOCAL = (
    "The cluster's API did not answer: check the kubeconfig (`kubectl --kubeconfig FILE get "
    "--raw=/readyz`), and that its server address is reachable from the action's container."
)
FIX_BUNDLE_REJECTED = (
    "Nothing was changed. Fix the manifest the message names: on the master, "
    "`kubectl apply --dry-run=server -f FILE` shows the same error; an object's namespace must "
    "exist or be in the manifests."
)
FIX_CHECKSUM = (
    "Nothing ran. Run the deploy again; if it happens again, find out what else can write to "
    "the staging bucket (its bucket policy, and the `bucket` input when it is set)."
)
FIX_LOCK = (
    "Wait for the deploy named in the message to finish, or raise `lock-timeout`; a "
    "`concurrency` group in the workflow keeps a second run from starting meanwhile."
)
FIX_JOB_FAILED = (
    "A migration Job failed or did not finish (its pod's log is above); no Deployment or "
    "DaemonSet was changed. Fix the Job and deploy again: the failed Job stays in the cluster "
    "for `kubectl describe job -n NAMESPACE NAME`, and the next deploy replaces it."
)
FIX_ROLLOUT_STUCK = (
    "A rollout did not become ready: check `kubectl describe pod -n NAMESPACE POD`, "
    "`kubectl logs -n NAMESPACE POD`, readiness probes, and node resources with "
    "`kubectl top nodes`."
)
