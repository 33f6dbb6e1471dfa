#!/usr/bin/env bash
# k3s-deploy.sh: applies a manifest bundle to a Kubernetes cluster (the K3s master, reached
# through SSM Run Command, or the runner's kubeconfig with transport `local`), waits for the
# rollout, proves the result healthy, undoes what it changed when the deploy fails, and prints
# a JSON report. docs/internals.md has the contract.
#
# Usage:
#   k3s-deploy.sh deploy   --bundle FILE --deploy-id ID [options]
#   k3s-deploy.sh dry-run  --bundle FILE --deploy-id ID [options]
#   k3s-deploy.sh rollback --deploy-id ID [options]
#
#   deploy    1 tools    checks every command it needs and names a missing one
#             2 api      kubectl get --raw=/readyz
#             3 lock     takes the cluster's deploy lock: Lease kube-system/k3s-deploy-lock,
#                        created atomically; waits up to --lock-timeout while another deploy
#                        holds it; takes over a lease that expired or was released; a
#                        heartbeat renews it while the script runs, and a deploy whose lease
#                        someone else took changes nothing more
#             4 check    client-side dry run of every phase file, every namespace it needs
#                        exists or is in the bundle, then a server-side dry run of the whole
#                        bundle (--server-dry-run): a bad document fails with nothing applied
#             5 apply    records each workload's revision in STATE/ID/revisions.tsv (the
#                        workloads: Deployments, StatefulSets, DaemonSets), applies
#                        the phase files in order, annotates each workload with the commit,
#                        the run URL and the time (its own metadata: the revision stays)
#                        With Jobs (bundle/jobs.tsv): the phases up to the StatefulSets,
#                        which are waited for; then each Job (replaced unless it completed
#                        with the same job-hash), waited for until Complete, failing on
#                        Failed or a pod that cannot start; then the Deployments and
#                        DaemonSets, which a failed Job leaves untouched
#             6 rollout  waits for each workload in apply order (StatefulSets, then the
#                        Deployments and DaemonSets as listed); every 3 s checks its new pods
#                        and stops at once on a container that will not start by itself
#                        (back-off, bad image, config error) or a Deployment past its
#                        progress deadline
#             7 verify   every workload ready == desired (a DaemonSet: ready, updated and
#                        available == desiredNumberScheduled), its pods Running and Ready, no
#                        container waiting in a back-off
#             on failure: undoes only the workloads whose revision changed (rollback),
#                        each only while it still holds the revision this deploy made
#                        (STATE/ID/applied.tsv), each to the exact revision recorded
#   dry-run   steps 1, 2 and 4, then `kubectl diff` of the whole bundle (a Job: whether a
#             deploy would run it); changes nothing and takes no lock. The diff goes to stdout between ===K3S-DEPLOY-DIFF-BEGIN=== and
#             ===K3S-DEPLOY-DIFF-END===.
#   rollback  for the action, after a deploy it could not wait for (timeout, cancel): undoes
#             what that deploy changed, using STATE/ID/revisions.tsv (takes the lock over from
#             that deploy when its process is gone).
#
# Options (on the command line, or as NAME=VALUE lines in the bundle's `options` file, which
# is how the action passes them: the bundle is verified by its sha256 before it runs, and the
# command that starts the script carries no option a narrow SSM document would have to allow;
# the deploy keeps its options in STATE/ID/options for its rollback):
#   --kubectl CMD           kubectl command, may be several words ("k3s kubectl"); default kubectl
#   --namespace NS          namespace whose pods and events are reported (default: the
#                           workloads' namespaces)
#   --timeout SECONDS       budget for the deploy once it holds the lock: API check, checks,
#                           apply, rollout waits, health check (default 600)
#   --rollback true|false   undo changed workloads when the deploy fails (default true)
#   --rollback-timeout S    budget for waiting on undone rollouts (default 120)
#   --lock-timeout S        how long to wait for the deploy lock held by another deploy
#                           (default 300; 0: do not wait)
#   --server-dry-run true|false  server-side dry run of the bundle before applying (default true)
#   --max-diff-bytes N      dry-run: longest diff printed (default 16000: SSM keeps 24,000
#                           characters of stdout)
#   --request-timeout DUR   kubectl --request-timeout (default 60s)
#   --validate true|false   kubectl --validate (default false: schema download is slow on small
#                           masters)
#   --state-dir DIR         where a deploy keeps its revisions until it is over
#                           (default ${K3S_DEPLOY_STATE_DIR:-/var/lib/k3s-deploy})
#   --commit SHA, --run-url URL   written to the workloads and the lock (may be empty)
#   --prune false|true|all  after a healthy deploy, delete what the release's inventory holds
#                           and this bundle (bundle/inventory.tsv) lacks; a dry run lists it
#                           (default false; 87-prune.sh says what is kept)
#   --release ID, --release-name NAME   with --prune: the release's label value (20 hex
#                           digits) and its name as the user knows it
#   --progress-to s3://BUCKET/PREFIX/, --progress-region R, --progress-owner ACCOUNT
#                           live progress: the step lines go to PREFIX/INSTANCE.log
#                           (INSTANCE: the SSM agent's AWS_SSM_INSTANCE_ID) with the AWS CLI,
#                           while the deploy runs (55-progress.sh); default: none
#   --progress-url-INSTANCE URL   the same through a presigned PUT URL (curl), for that instance
#
# Needs: bash 4.4+, coreutils, tar, gzip, kubectl; `diff` for dry-run; the AWS CLI or curl for
# live progress (optional). No jq, no python.
#
# Output: the log on stdout (kubectl's stderr merged into it); on stderr only the JSON report
# between ===K3S-DEPLOY-REPORT-BEGIN=== and ===K3S-DEPLOY-REPORT-END=== (SSM returns only
# 8,000 characters of stderr, so the report stays under 7,500).
#
# Exit codes (never 194 or 3010: the SSM agent reads those as reboot requests):
#   0  success: every workload ready and healthy (dry-run: the diff ran)
#   2  usage error (bad arguments; nothing was run)
#   3  a tool is missing (or the state dir cannot be created)
#   4  Kubernetes API not healthy (or the lock could not be read or written)
#   5  bundle rejected before anything changed (client or server dry run, missing namespace)
#   6  another deploy holds the cluster's deploy lock (after waiting --lock-timeout)
#   7  deploy failed, changed workloads rolled back
#   8  deploy failed, rollback failed
#   9  deploy failed, nothing rolled back (rollback off, or nothing had changed)
#   10 timed out, changed workloads rolled back (rollback: changed workloads undone)
#   11 timed out, rollback failed               (rollback: an undo failed)
#   12 timed out, nothing rolled back           (rollback: nothing to undo)
# A run stopped by a signal (SIGINT, SIGTERM, SIGHUP) exits 128+N (143 for SIGTERM). A deploy
# with rollback on first sends the undos of what it changed (without waiting for their
# rollouts), releases the lock and leaves only STATE/ID/rolled-back.txt and its copy of this
# script; when an undo fails it keeps STATE/ID and the lock for `rollback`.
set -euo pipefail
