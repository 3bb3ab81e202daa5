"""Where a launch spends its time: bench/launch_bench.py runs this under `/usr/bin/python3 -I -S`.

    python3 -I -S bench/launch_steps.py PKG_ROOT SPEC.json N

Wraps the per-launch steps of sandbox/launch.py (module attributes only: the sandbox code is unchanged)
with CLOCK_MONOTONIC timers that report over a pipe, forks C1 N times like the zygote does, and prints
one JSON object: per step, the list of durations (ns), plus the total per launch. Steps in C2 after S9
cannot report (S9 closes the pipe): what remains is forks, exec of the agent, waits and teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time


def main() -> int:
    pkg_root, spec_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, pkg_root)
    from faramesh.sandbox import caps, cgroups, credentials, landlock, mounts, namespaces, seccomp
    from faramesh.sandbox import launch as sl

    with open(spec_path, "rb") as f:
        spec = sl.spec_from_json(f.read())
    r, w = os.pipe()
    clock = time.clock_gettime_ns
    mono = time.CLOCK_MONOTONIC
    order: list[str] = []

    def wrap(mod: object, name: str, label: str) -> None:
        fn = getattr(mod, name)
        order.append(label)

        def timed(*a: object, **kw: object) -> object:
            t0 = clock(mono)
            try:
                return fn(*a, **kw)
            finally:
                with contextlib.suppress(OSError):
                    os.write(w, f"{label}\t{clock(mono) - t0}\n".encode())

        setattr(mod, name, timed)

    for mod, name, label in (
        (credentials, "agent_environment", "env allow-list"),
        (cgroups, "join_cgroup", "R1 join cgroup"),
        (cgroups, "apply_rlimits", "R1 rlimits"),
        (cgroups, "set_oom_score_adj", "R1 oom_score_adj"),
        (sl, "check_layout", "R2 layout checks"),
        (namespaces, "switch_ids", "R3 switch ids"),
        (namespaces, "unshare", "S1 unshare"),
        (namespaces, "write_id_maps", "S2 id maps"),
        (mounts, "make_rslave", "S3 rslave"),
        (namespaces, "bring_up_loopback", "S3 lo up"),
        (caps, "set_pdeathsig", "C2 pdeathsig"),
        (mounts, "build_root", "S5 build_root+pivot"),
        (namespaces, "sethostname", "S5 sethostname"),
        (landlock, "restrict", "S6 landlock"),
        (caps, "drop_all", "S7 caps drop"),
        (caps, "set_no_new_privs", "S7 no_new_privs"),
        (caps, "set_dumpable", "S7 dumpable"),
        (seccomp, "load_filter", "S8 seccomp"),
    ):
        wrap(mod, name, label)
    totals: list[int] = []
    for _ in range(n):
        t0 = clock(mono)
        pid = os.fork()
        if pid == 0:
            code = 125
            try:
                os.close(r)
                fd = os.open("/dev/null", os.O_RDWR)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = sl.launch(spec, ["/bin/true"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        totals.append(clock(mono) - t0)
        if os.waitstatus_to_exitcode(status) != 0:
            print(json.dumps({"error": f"launch exited {os.waitstatus_to_exitcode(status)}"}))
            return 1
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    steps: dict[str, list[int]] = {label: [] for label in order}
    for line in data.decode().splitlines():
        label, ns = line.split("\t")
        steps[label].append(int(ns))
    print(json.dumps({"order": order, "steps": steps, "totals": totals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
