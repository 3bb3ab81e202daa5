"""Confines: one module per kernel mechanism; no policy logic.

The launch sequence of DESIGN.md §5 calls these, in this order (the orchestration lives elsewhere):

    apply        spec.SandboxSpec(..., seccomp_bpf=seccomp.build_filter(profile)); preflight.run_preflight()
    C1, root     R1 cgroups.join_cgroup, cgroups.apply_rlimits, cgroups.set_oom_score_adj
                 R3 namespaces.switch_ids(host_uid, host_gid)
    C1, agent    S1 namespaces.unshare(namespaces.SANDBOX_NAMESPACES)
                 S2 namespaces.write_id_maps(1000, host_uid, 1000, host_gid)
                 S3 mounts.make_rslave(); namespaces.bring_up_loopback()
    C2 (PID 1)   S5 mounts.build_root(spec); namespaces.sethostname(spec.hostname)
                 S6 landlock.restrict(...)
                 S7 caps.drop_all(); caps.set_no_new_privs(); caps.set_dumpable(False); caps.set_pdeathsig(...)
                 S8 seccomp.load_filter(spec.seccomp_bpf)
                 S9 credentials.agent_environment(...)

The per-launch modules (caps, cgroups, credentials, landlock, mounts, namespaces, seccomp.load_filter)
import only os, sys, ctypes and struct (plus builtins such as errno and stat); pyseccomp is imported
inside seccomp.build_filter only. Every failure is a typed errors.SandboxError with a stable `code`.
"""
