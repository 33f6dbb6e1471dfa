"""The deploy, as one linear story: render, check the images, find the targets, stage, send,
wait, read the results, roll back what could not report, clean up, conclude. The transport
(transport.py: one master or a fleet through SSM, or the local script) does each step its own
way; this module tells the story once for all of them.
"""

from __future__ import annotations

from deploykit import build, command, fleet, progress, registry, report, stage, wait
from deploykit.awsapi import AwsClients
from deploykit.contract import Status
from deploykit.errors import DeployError, JobCancelled, StagingError
from deploykit.github import Workflow
from deploykit.inputs import Settings
from deploykit.render import Bundle, add_options, build_bundle
from deploykit.report import Outcome
from deploykit.results import TargetResult, conclude
from deploykit.run import Clock, Files, Run
from deploykit.transport import Transport, transport_for


def deploy(
    settings: Settings, aws: AwsClients, gh: Workflow, outcome: Outcome, clock: Clock | None = None
) -> None:
    """Run the whole deploy; fills `outcome`; raises DeployError when the deploy fails."""
    run = Run(settings, aws, gh, outcome, clock or Clock())
    outcome.dry_run = settings.dry_run
    bundle = build_bundle(
        settings.manifests,
        settings.workspace,
        settings.images,
        command.bundle_options(settings),
        release_id=settings.release_id() if settings.prune != "false" else "",
    )
    _log_bundle(gh, settings, bundle)
    # Images before any AWS change: a tag that was never pushed stops the deploy here, not as
    # pods in ImagePullBackOff minutes later.
    pushed = build.build_images(
        settings.builds,
        gh,
        login=settings.registry,
        build_args=settings.build_args,
        cache=settings.build_cache,
    )
    to_deploy = registry.images_in(bundle.manifests)
    outcome.images = registry.check_images(
        to_deploy, settings.registry, gh, verify=settings.verify_images, known=pushed
    )

    transport = transport_for(run)
    if settings.ssm_document != command.RUN_SHELL_SCRIPT:
        # Before anything is staged: a stale document would refuse the command's parameters.
        # (inputs.py refuses `ssm-document` with `transport: local`.)
        command.check_document(aws.ssm, settings.ssm_document)
    transport.find_targets()
    files = Files(command.deploy_script(), bundle.data, bundle.sha256)
    staging: stage.Staging | None = None
    results: list[TargetResult] = []
    try:
        if transport.stages:
            staging = _stage(run)
            files = _with_progress(run, transport, bundle, files, staging)
            stage.upload(aws.s3, staging, command.SCRIPT_NAME, files.script)
            stage.upload(aws.s3, staging, command.BUNDLE_NAME, files.bundle)
        transport.send(files, staging)
        transport.wait()
        results = transport.results()
        # Where the script could not say what it changed (killed, stopped, cut off), the action
        # runs its rollback entry point: it undoes only what that deploy recorded.
        unreported = [r for r in results if r.needs_rollback] if run.rolls_back else []
        if unreported:
            transport.roll_back(unreported)
    except JobCancelled:
        # The runner kills the step about 10 s after its first signal: short timeouts from here.
        aws.hurry()
        outcome.status = Status.CANCELLED
        outcome.message = "The job was cancelled."
        transport.cancel()
        raise
    finally:
        transport.close()
        _record_targets(outcome, transport)
        if staging is not None:
            _clean_up(run, staging, master_may_put=run.progress is not None and _may_still_run(transport))
    _warn_prune_left(gh, results, many=transport.many)
    conclude(outcome, results, many=transport.many, dry_run=settings.dry_run, failure=transport.failure)


def _with_progress(
    run: Run, transport: Transport, bundle: Bundle, files: Files, staging: stage.Staging
) -> Files:
    """Live progress (input `progress`): where the script puts its step lines goes into the
    bundle's options (known only now: the staging area's name and the instances), and the
    reader that shows them is set up. Returns the files to stage."""
    settings, gh = run.settings, run.gh
    if not settings.progress or settings.transport == "local":
        return files
    lifetime = 0
    if settings.delivery == "presigned":
        # Until the last wave of a fleet may have ended; a URL signed with temporary
        # credentials still dies with them (the script then says that progress is off).
        ids = transport.candidates()
        waves = (
            fleet.delivery_timeout(len(ids), settings.max_concurrency, command.execution_timeout(settings))
            if transport.many
            else command.DELIVERY_TIMEOUT
        )
        lifetime = min(waves + command.execution_timeout(settings) + 60, fleet.MAX_PRESIGNED_SECONDS)
    options = progress.script_options(
        delivery=settings.delivery,
        region=settings.aws_region,
        staging=staging,
        s3_presign=run.aws.s3_presign if settings.delivery == "presigned" else None,
        instance_ids=transport.candidates(),
        lifetime=lifetime,
    )
    for name, value in options.items():
        if name.startswith("progress-url-"):
            gh.mask(value)  # it lets anyone put that object: hidden wherever it shows up
    if not options:
        gh.log(
            "Live progress is off for this deploy: the staging area, region or instances are not "
            "ones the deploy script accepts; the master's output follows when it ends"
        )
        return files
    bundle = add_options(bundle, options)
    run.progress = progress.Reader(
        run.aws.s3_light, staging, gh, many=transport.many, clock=run.clock.monotonic
    )
    gh.log(
        f"Live progress: the master's step lines appear here while it runs (from "
        f"s3://{staging.bucket}/{progress.folder(staging)}); bundle sha256 {bundle.sha256[:16]} "
        "with that option"
    )
    return Files(files.script, bundle.data, bundle.sha256)


def _warn_prune_left(gh: Workflow, results: list[TargetResult], *, many: bool) -> None:
    """A prune that could not finish leaves the deploy a success (the release is healthy), with
    a warning that names what remains."""
    for result in results:
        left = report.prune_left(result.report) if result.status == Status.SUCCESS else ""
        if left:
            where = f"{result.instance_id}: " if many else ""
            gh.warning(f"{where}{left}", title="Prune incomplete")


def _record_targets(outcome: Outcome, transport: Transport) -> None:
    """The outputs' instance ids and command ids (and fleet mode's results), as far as known."""
    targets = transport.targets
    outcome.instance_id = ",".join(t.instance_id for t in targets if t.instance_id)
    outcome.command_id = ",".join(dict.fromkeys(t.command_id for t in targets if t.command_id))
    if transport.many:
        outcome.results = [t.as_output() for t in targets]


def _log_bundle(gh: Workflow, settings: Settings, bundle: Bundle) -> None:
    gh.log(
        f"Bundle: {len(bundle.manifests)} objects from "
        f"{settings.manifests.relative_to(settings.workspace).as_posix() or '.'}, "
        f"{len(bundle.workloads)} workloads to watch, {len(bundle.data):,} bytes, "
        f"sha256 {bundle.sha256[:16]}"
    )
    for ref in settings.images:
        gh.log(f"Pinned {ref.repository} to {ref}")


def _stage(run: Run) -> stage.Staging:
    """The staging area: a new bucket, or a prefix of the given one."""
    settings, aws, gh, deploy_id, clock = run.settings, run.aws, run.gh, run.deploy_id, run.clock
    account = stage.caller_account(aws.sts)
    if settings.bucket:
        stage.check_given_bucket(aws.s3, settings.bucket, account)
        staging = stage.Staging(settings.bucket, f"{stage.PREFIX_ROOT}/{deploy_id}/", account, False)
    else:
        name = stage.new_bucket_name(clock.utcnow())
        # Recorded before creating it: the post-entrypoint deletes it if this run cannot.
        gh.save_state("bucket", name)
        staging = stage.Staging(name, "", account, True)
        try:
            stage.create_bucket(aws.s3, settings.aws_region, account, name, deploy_id, clock.utcnow())
        except StagingError:
            gh.save_state("bucket", "")  # the name was taken already: never touch that bucket
            raise
        except BaseException as exc:
            # Stopped half-way (a failed call, or a cancel): the bucket may exist, untagged.
            if isinstance(exc, JobCancelled):
                aws.hurry()
            _delete_half_made(aws, gh, staging)
            raise
    gh.save_state("prefix", staging.prefix)
    gh.log(f"Staging in {staging.where()}")
    run.outcome.bucket = staging.bucket
    return staging


def _may_still_run(transport: Transport) -> bool:
    """Whether a command that went out was not seen to end (a cancel, or SSM that stopped
    answering): its script may still be running, and putting its live progress."""
    return any(
        target.sent and not target.never_started and target.ssm_status.split(" ", 1)[0] not in wait.TERMINAL
        for target in transport.targets
    )


def _clean_up(run: Run, staging: stage.Staging, *, master_may_put: bool = False) -> None:
    """Delete the staging area. With `master_may_put`, a master may still put its live progress
    after this (its script ends seconds after a cancel): the post step's state is kept, so that
    the post step, which runs after this step ends, deletes what came in late."""
    settings, aws, gh = run.settings, run.aws, run.gh
    if not settings.cleanup:
        gh.log(f"Leaving {staging.where()} in place (input 'cleanup' is false)")
        return
    cancelled: JobCancelled | None = None
    try:
        try:
            stage.delete_staged(aws.s3, staging)
        except JobCancelled as exc:
            # Cancelled while deleting: finish it (later signals are ignored), then stop.
            cancelled = exc
            aws.hurry()
            stage.delete_staged(aws.s3, staging)
        if master_may_put:
            gh.log(
                f"Deleted {staging.where()}; the post step looks again for live progress that the "
                "master may still put while its script stops"
            )
        else:
            gh.log(f"Deleted {staging.where()}")
            # Nothing left for the post-entrypoint to delete.
            gh.save_state("bucket", "")
            gh.save_state("prefix", "")
    except DeployError as exc:
        gh.warning(
            f"{exc.message}. Left behind: {staging.where()}; delete it by hand or with "
            f"`python -m deploykit sweep --delete`." + (f" {exc.fix}" if exc.fix else ""),
            title="Cleanup incomplete",
        )
    if cancelled is not None:
        raise cancelled


def _delete_half_made(aws: AwsClients, gh: Workflow, staging: stage.Staging) -> None:
    """Delete a bucket whose creation did not finish (ExpectedBucketOwner: only ours)."""
    try:
        stage.delete_staged(aws.s3, staging)
    except DeployError as exc:
        gh.warning(
            f"Creating bucket {staging.bucket} did not finish and it could not be deleted "
            f"({exc.message}); if it exists, delete it by hand.",
            title="Cleanup incomplete",
        )
