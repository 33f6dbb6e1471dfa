"""`python -m devkit bench`: how fast the action is, measured on this machine.

Everything runs against the simulated AWS account (moto's server in this process and the SSM
agent stand-in, devkit/simulate/). The action runs as the runner runs it (its own process,
INPUT_* variables). The remote side is a command of known duration (`sleep N`, put in place of
the deploy by the stand-in), so the figures are the action's own: what it adds around the
remote work, how late it notices the end, how it scales with the fleet. The table is Markdown,
printed with a pass / miss verdict next to each target; docs/PERFORMANCE.md keeps one run.

`--quick` runs every part with tiny sizes (the test suite's smoke test): its figures mean
nothing, except that the benchmark still runs.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Targets of issue 8, checked against the figures (never asserted by tests).
TARGET_DETECTION_P95 = 1.5  # seconds
TARGET_OVERHEAD = 2.0  # seconds, one instance
TARGET_FLEET_RATIO = 1.5  # 200 instances vs one
TARGET_WASTE_RATIO = 4.0  # wasted wait of 10 s polling / ours
ORIGINAL_INTERVAL = 10.0  # the original pipeline's `sleep 10` polling loop


@dataclass(frozen=True)
class Sizes:
    overhead_runs: int
    remote_seconds: float  # the one-instance deploy's known remote duration
    detection_seconds: tuple[float, ...]  # remote durations of the detection samples
    baseline_interval: float
    manifests: tuple[int, ...]
    fleet: tuple[int, ...]
    fleet_seconds: float
    import_runs: int


FULL = Sizes(
    overhead_runs=5,
    remote_seconds=3.0,
    # 40 durations from a quick failure to a long rollout, 2 to 92 s, spread by the golden ratio
    # so that every phase against the poll interval is hit.
    detection_seconds=tuple(round(2 + 90 * ((n * 0.6180339887) % 1), 2) for n in range(1, 41)),
    baseline_interval=ORIGINAL_INTERVAL,
    manifests=(10, 100, 1000),
    fleet=(1, 10, 50, 200),
    fleet_seconds=5.0,
    import_runs=7,
)
QUICK = Sizes(
    overhead_runs=1,
    remote_seconds=0.5,
    detection_seconds=(0.7, 1.3),
    baseline_interval=2.0,
    manifests=(3, 10),
    fleet=(1, 3),
    fleet_seconds=1.0,
    import_runs=1,
)


@dataclass
class Row:
    figure: str
    value: str
    target: str = ""
    verdict: str = ""


@dataclass
class Bench:
    sizes: Sizes
    log: Callable[[str], None]
    rows: list[Row] = field(default_factory=list)
    # (monotonic time, SSM operation or "") of every AWS request the simulated account got
    requests: list[tuple[float, str]] = field(default_factory=list)

    def add(self, figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("pass" if ok else "miss")
        self.rows.append(Row(figure, value, target, verdict))

    def on_request(self, environ: dict[str, Any]) -> None:
        if not environ.get("PATH_INFO", "").startswith("/moto-api"):
            self.requests.append((time.monotonic(), environ.get("HTTP_X_AMZ_TARGET", "")))

    def first_request(self, after: float, operation: str = "") -> float:
        return min(t for t, target in self.requests if t >= after and target.endswith(operation))


@dataclass
class ActionRun:
    """One run of the action as the runner starts it, timed from outside."""

    status: str
    outputs: dict[str, str]
    log: str
    started: float  # monotonic, just before the process was started
    wall: float
    cpu: float  # user + system seconds of the action's process


def run_action_timed(sim: Any, inputs: dict[str, str], files: Path) -> ActionRun:
    from devkit.simulate.aws import PROJECT_ROOT
    from devkit.simulate.runner import ENTRYPOINT, parse_key_values, runner_env

    env = runner_env(sim, inputs, PROJECT_ROOT, files)
    for name in ("output", "summary", "state"):
        (files / name).write_text("")
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    log = process.stdout.read()
    _, _, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = 0  # reaped above
    outputs = parse_key_values((files / "output").read_text())
    return ActionRun(
        outputs.get("status", ""), outputs, log, started, wall, usage.ru_utime + usage.ru_stime
    )


def run_bench(quick: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    sizes = QUICK if quick else FULL

    def log(line: str) -> None:
        print(f"[bench] {line}", file=sys.stderr, flush=True)

    bench = Bench(sizes, log)
    started = time.monotonic()
    try:
        from devkit.simulate.aws import SimulatedAWS
    except ImportError as exc:
        print(f"The benchmark needs the simulation extras ({exc}): run `make setup` first.", file=out)
        return 1
    with tempfile.TemporaryDirectory(prefix="k3s-deploy-bench-") as tmp:
        root = Path(tmp)
        measure_import(bench)
        with SimulatedAWS(root=root / "aws", on_request=bench.on_request) as sim:
            measure_one_instance(bench, sim, root)
            measure_detection(bench, sim)
        with SimulatedAWS(root=root / "fleet-aws", on_request=bench.on_request) as sim:
            measure_fleet(bench, sim, root)
        measure_bundles(bench, root)
    print(render(bench, quick, time.monotonic() - started), file=out, flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Start-up


def measure_import(bench: Bench) -> None:
    """`python -X importtime -c 'import deploykit.cli'`: what the entrypoint imports before it
    does anything (boto3 and the rest come later, when a run needs them)."""
    totals = []
    for _ in range(bench.sizes.import_runs):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import deploykit.cli"],
            capture_output=True,
            text=True,
            check=True,
            env=_project_env(),
        )
        cumulative = [
            int(m.group(1)) for m in re.finditer(r"\|\s*(\d+) \|\s*deploykit\.cli$", done.stderr, re.M)
        ]
        totals.append(cumulative[-1] / 1e6 if cumulative else float("nan"))
        heavy = re.findall(r"\|\s*\d+ \|\s*(boto3|botocore|yaml|docker|moto)$", done.stderr, re.M)
    imports = f"imports {', '.join(sorted(set(heavy)))}" if heavy else "no boto3, botocore or yaml"
    bench.add(
        "Import of the entrypoint's module (`deploykit.cli`, `-X importtime`), median",
        f"{_ms(statistics.median(totals))}; {imports}",
    )


def _project_env() -> dict[str, str]:
    from devkit.simulate.aws import PROJECT_ROOT

    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}


# --------------------------------------------------------------------------------------------
# One instance: the action's overhead and its start-up


def measure_one_instance(bench: Bench, sim: Any, root: Path) -> None:
    from devkit.demo import API, EXAMPLE, WORKER

    seconds = bench.sizes.remote_seconds
    master = sim.add_master("bench-k3s-master")
    master.replace_commands_with = f"sleep {seconds}"
    inputs = {
        "manifests": EXAMPLE,
        "images": f"{API}\n{WORKER}",
        "image-tag": "v1",
        "instance-tag": "bench-k3s-*",
        "verify-images": "false",  # the example's images are in no registry
    }
    overheads, first_requests, walls, cpus = [], [], [], []
    for number in range(bench.sizes.overhead_runs):
        bench.requests.clear()
        files = root / f"one-{number}"
        files.mkdir()
        run = run_action_timed(sim, inputs, files)
        if run.status != "success":
            raise RuntimeError(f"the benchmark's deploy failed:\n{run.log}")
        remote = sim.commands_run[-1]
        overheads.append(run.wall - (remote["ended"] - remote["started"]))
        walls.append(run.wall)
        cpus.append(run.cpu)
        first_requests.append(bench.first_request(run.started) - run.started)
        bench.log(f"one instance, run {number + 1}: {run.wall:.2f} s wall, overhead {overheads[-1]:.2f} s")
    median = statistics.median(overheads)
    bench.add(
        f"Action overhead, one instance: wall time minus remote time ({seconds:g} s), "
        f"median / worst of {len(overheads)}",
        f"{median:.2f} s / {max(overheads):.2f} s (wall {statistics.median(walls):.2f} s, "
        f"action CPU {statistics.median(cpus):.2f} s)",
        f"median ≤ {TARGET_OVERHEAD:g} s",
        median <= TARGET_OVERHEAD,
    )
    bench.add(
        "Start-up: process start to first AWS request, median",
        f"{statistics.median(first_requests):.2f} s",
    )


# --------------------------------------------------------------------------------------------
# Completion detection


@dataclass
class Sample:
    remote: float
    latency: float = 0.0
    calls: int = 0


def measure_detection(bench: Bench, sim: Any) -> None:
    """Commands of known duration, watched by the action's poller: with the policy as a first
    deploy on a master runs it (no history), as a later one (the last deploy's time known), and
    with the original pipeline's fixed interval. All run at once, each on a master of its own."""
    from deploykit import wait

    durations = bench.sizes.detection_seconds
    interval = bench.sizes.baseline_interval
    ours = [sim.add_master(f"bench-detect-{n}") for n in range(len(durations))]
    theirs = [sim.add_master(f"bench-fixed-{n}") for n in range(len(durations))]
    bench.log(f"detection: {len(durations)} samples of {min(durations)}-{max(durations)} s, three ways")
    # First round: no history (and the baseline, at the same time).
    first = _watch_all(bench, sim, ours, durations, lambda ssm, iid, d: wait.PollPolicy(deadline=600.0))
    fixed = _watch_all(bench, sim, theirs, durations, lambda ssm, iid, d: wait.FixedPolicy(interval))
    first_samples, fixed_samples = _join(first), _join(fixed)
    # Second round on the same masters: the action's own history lookup finds the first round.
    later = _join(
        _watch_all(
            bench,
            sim,
            ours,
            durations,
            lambda ssm, iid, d: wait.PollPolicy(wait.expected_from_history(ssm, iid), 600.0),
        )
    )
    for label, samples in (
        ("adaptive polling, the last deploy's time known", later),
        ("adaptive polling, first deploy (nothing known)", first_samples),
    ):
        latencies = [s.latency for s in samples]
        p95 = _percentile(latencies, 95)
        bench.add(
            f"Completion detection, {label}: p50 / p95 latency",
            f"{_percentile(latencies, 50):.2f} s / {p95:.2f} s",
            f"p95 ≤ {TARGET_DETECTION_P95:g} s",
            p95 <= TARGET_DETECTION_P95,
        )
        bench.add(
            f"GetCommandInvocation calls per deploy, {label}",
            f"{statistics.mean(s.calls for s in samples):.1f} "
            f"(remote {min(durations):g}-{max(durations):g} s, mean {statistics.mean(durations):.1f} s)",
        )
    fixed_latencies = [s.latency for s in fixed_samples]
    bench.add(
        f"Completion detection, fixed {interval:g} s polling (original pipeline): p50 / p95 latency",
        f"{_percentile(fixed_latencies, 50):.2f} s / {_percentile(fixed_latencies, 95):.2f} s",
    )
    bench.add(
        f"GetCommandInvocation calls per deploy, fixed {interval:g} s polling",
        f"{statistics.mean(s.calls for s in fixed_samples):.1f}",
    )
    for label, samples in (("last deploy's time known", later), ("first deploy", first_samples)):
        ratio = statistics.mean(fixed_latencies) / max(statistics.mean(s.latency for s in samples), 1e-3)
        bench.add(
            f"Wasted wait, fixed {interval:g} s polling ÷ adaptive ({label}), mean latency",
            f"{ratio:.1f}x ({statistics.mean(fixed_latencies):.2f} s vs "
            f"{statistics.mean(s.latency for s in samples):.2f} s)",
            f"≥ {TARGET_WASTE_RATIO:g}x",
            ratio >= TARGET_WASTE_RATIO,
        )


def _watch_all(
    bench: Bench,
    sim: Any,
    masters: list[Any],
    durations: tuple[float, ...],
    policy_for: Callable[[Any, str, float], Any],
) -> list[tuple[threading.Thread, Sample]]:
    from devkit.simulate.aws import CREDENTIALS

    started = []
    for master, seconds in zip(masters, durations, strict=True):
        master.replace_commands_with = f"sleep {seconds}"
        sample = Sample(seconds)
        thread = threading.Thread(
            target=_watch_one,
            args=(sim, master.instance_id, sample, policy_for, CREDENTIALS),
            daemon=True,
        )
        thread.start()
        started.append((thread, sample))
    return started


def _join(started: list[tuple[threading.Thread, Sample]]) -> list[Sample]:
    for thread, _ in started:
        thread.join()
    return [sample for _, sample in started]


def _watch_one(
    sim: Any,
    instance_id: str,
    sample: Sample,
    policy_for: Callable[[Any, str, float], Any],
    credentials: dict[str, str],
) -> None:
    """Send one command, wait for it as the action does, and time how late the end is seen."""
    import boto3
    from botocore.config import Config

    from deploykit import wait

    ssm = boto3.client(
        "ssm",
        endpoint_url=sim.endpoint_url,
        region_name=sim.region,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"mode": "standard", "total_max_attempts": 6}),
    )

    def count(**_: Any) -> None:
        sample.calls += 1

    ssm.meta.events.register("before-call.ssm.GetCommandInvocation", count)
    policy = policy_for(ssm, instance_id, sample.remote)
    command_id = ssm.send_command(
        InstanceIds=[instance_id],
        DocumentName="AWS-RunShellScript",
        Comment=f"k3s-deploy bench-{instance_id}",
        Parameters={"commands": ["true"]},  # replaced by the master's `sleep N`
    )["Command"]["CommandId"]
    wait.wait_for_command(
        ssm, command_id, instance_id, time.monotonic() + 600, lambda _: None, policy=policy
    )
    noticed = time.monotonic()
    run = next(r for r in reversed(sim.commands_run) if r["command_id"] == command_id)
    sample.latency = noticed - run["ended"]


# --------------------------------------------------------------------------------------------
# Fleet


def measure_fleet(bench: Bench, sim: Any, root: Path) -> None:
    """Fleets of masters whose remote command is a plain `sleep`: the wall time is the action's
    orchestration (discovery, one staging, the fan-out, the wait, the per-instance results)
    plus the simulated agents' own spread in starting 200 processes."""
    from devkit.demo import API, EXAMPLE, WORKER

    seconds = bench.sizes.fleet_seconds
    walls: dict[str, float] = {}
    for size in bench.sizes.fleet:
        for n in range(size):
            master = sim.add_master(f"fleet-{size}-{n:03d}", tags={"Role": f"fleet-{size}"})
            master.replace_commands_with = f"sleep {seconds}"
        # Either way the action sends by instance ids, 50 to a command (never SSM Targets).
        runs = [("exact", {"instance-tag-key": "Role", "instance-tag": f"fleet-{size}"})]
        if size == max(bench.sizes.fleet) and size > 1:
            runs.append(("pattern", {"instance-tag-key": "Role", "instance-tag": f"fleet-{size}*"}))
        for how, selection in runs:
            inputs = {
                "manifests": EXAMPLE,
                "images": f"{API}\n{WORKER}",
                "image-tag": "v1",
                "fleet": "true",
                "max-concurrency": "100%",
                "verify-images": "false",
                **selection,
            }
            bench.requests.clear()
            files = root / f"fleet-{size}-{how}"
            files.mkdir()
            run = run_action_timed(sim, inputs, files)
            if run.status != "success":
                raise RuntimeError(f"the benchmark's fleet deploy failed:\n{run.log[-5000:]}")
            command_ids = run.outputs["command-id"].split(",")
            remote = [r for r in sim.commands_run if r["command_id"] in command_ids]
            first_start = min(r["started"] for r in remote)
            last_end = max(r["ended"] for r in remote)
            before = bench.first_request(run.started, "SendCommand") - run.started
            after = run.started + run.wall - last_end
            walls[f"{size}-{how}"] = run.wall
            bench.log(f"fleet of {size} ({how}): {run.wall:.2f} s, {len(command_ids)} command(s)")
            ratio = run.wall / walls.get(f"{min(bench.sizes.fleet)}-exact", run.wall)
            largest = size == max(bench.sizes.fleet) and size > 1
            by = ("an exact tag value" if how == "exact" else "a tag pattern") + (
                f", by instance ids ({len(command_ids)} command(s))")
            bench.add(
                f"Fleet of {size} instance(s), {seconds:g} s remote command, max-concurrency 100%, {by}",
                f"{run.wall:.2f} s ({ratio:.2f}x one instance): {before:.2f} s to SendCommand, "
                f"{last_end - first_start:.2f} s remote span, {after:.2f} s after the last end; "
                f"action CPU {run.cpu:.2f} s",
                f"≤ {TARGET_FLEET_RATIO:g}x" if largest else "",
                ratio <= TARGET_FLEET_RATIO if largest else None,
            )


# --------------------------------------------------------------------------------------------
# Bundles


def measure_bundles(bench: Bench, root: Path) -> None:
    from deploykit.render import build_bundle

    for count in bench.sizes.manifests:
        workspace = root / f"bundle-{count}"
        folder = workspace / "k8s"
        folder.mkdir(parents=True)
        for n in range(count):
            (folder / f"app-{n:04d}.yaml").write_text(_manifest(n))
        build_bundle(folder, workspace, ())  # warm: imports and caches
        times, size = [], 0
        for _ in range(3):
            begun = time.perf_counter()
            bundle = build_bundle(folder, workspace, ())
            times.append(time.perf_counter() - begun)
            size = len(bundle.data)
        bench.add(
            f"Bundle of {count:,} manifests (parse, check, pin, tar.gz), median of 3",
            f"{_ms(statistics.median(times))}, {size / 1024:,.1f} KiB",
        )


def _manifest(n: int) -> str:
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: app-{n:04d}
  namespace: bench
  labels: {{app: app-{n:04d}, team: platform}}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: app-{n:04d}}}
  template:
    metadata:
      labels: {{app: app-{n:04d}}}
    spec:
      containers:
        - name: app
          image: registry.example.com/team/app-{n:04d}:1.{n}.0
          ports: [{{containerPort: 8080}}]
          env:
            - {{name: LOG_LEVEL, value: info}}
            - {{name: INSTANCE, value: "{n}"}}
          resources:
            requests: {{cpu: 50m, memory: 64Mi}}
            limits: {{memory: 128Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: app-{n:04d}
  namespace: bench
spec:
  selector: {{app: app-{n:04d}}}
  ports: [{{port: 80, targetPort: 8080}}]
"""


# --------------------------------------------------------------------------------------------
# The table


def machine() -> str:
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB memory"
    except OSError:
        memory = "memory unknown"
    return (
        f"{os.cpu_count()} CPU cores, {memory}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, load average {os.getloadavg()[1]:.1f} (5 min)"
    )


def render(bench: Bench, quick: bool, seconds: float) -> str:
    lines = [
        f"k3s-deploy-action benchmark ({'quick mode: tiny sizes, figures meaningless' if quick else 'full'})"
        ", "
        f"{machine()}, {seconds:.0f} s",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.figure} | {r.value} | {r.target} | {r.verdict} |" for r in bench.rows]
    return "\n".join(lines)


def _percentile(values: list[float], percent: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples, a real sample)."""
    ordered = sorted(values)
    rank = max(1, round(percent / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
