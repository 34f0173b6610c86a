"""Where the workers run: the CPU topology this process may use (Linux sysfs and
the cgroup CPU quota) and a placement of every worker on whole physical cores.

Cores are ordered performance cores first (hybrid Intel: /sys/devices/cpu_core
before cpu_atom), then by NUMA node, then by number; a worker takes one logical
CPU of each of its cores (all of a core's hyperthreads with smt=True), and its
cores come from one NUMA node when one has room.  Where the OS has no CPU
affinity (macOS) nothing is pinned and every logical CPU counts as a core.
"""
import math
import os
from dataclasses import dataclass, field


@dataclass
class Core:
    cpus: list          # logical CPUs of this physical core that we may use, ascending
    node: int = 0       # NUMA node
    package: int = 0    # socket
    efficient: bool = False  # an E-core of a hybrid CPU


@dataclass
class Topology:
    cores: list                      # physical cores in the affinity set, in placement order
    quota: float = None              # cgroup CPU quota in CPUs, if any
    pinning: bool = True             # the OS can pin (sched_setaffinity)
    notes: list = field(default_factory=list)

    def available(self, smt=False):
        """Cores (logical CPUs with smt) the workers may use, capped by the CPU quota."""
        units = sum(len(c.cpus) for c in self.cores) if smt else len(self.cores)
        if self.quota is not None:
            units = min(units, max(1, math.floor(self.quota + 1e-9)))
        return units

    def describe(self, smt=False):
        logical = sum(len(c.cpus) for c in self.cores)
        nodes = len({c.node for c in self.cores})
        sockets = len({c.package for c in self.cores})
        text = f"{len(self.cores)} physical cores ({logical} logical CPUs"
        text += ", SMT" + (" used" if smt else " not used") if logical > len(self.cores) else ""
        text += f"), {sockets} socket(s), {nodes} NUMA node(s)"
        e_cores = sum(c.efficient for c in self.cores)
        if e_cores:
            text += f", hybrid: {len(self.cores) - e_cores} P-cores + {e_cores} E-cores"
        if self.quota is not None:
            text += f", CPU quota {self.quota:g} (cgroup)"
        return "; ".join([text] + self.notes)


def cpu_list(text):
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    cpus = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def affinity():
    """Logical CPUs this process may run on, and whether the OS can pin."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0)), True
    return list(range(os.cpu_count() or 1)), False


def cgroup_dirs(controller, root="/sys/fs/cgroup", proc_self="/proc/self/cgroup"):
    """-> [(directory, v1)] of this process's cgroup for `controller`, deepest first
    up to the root: cgroup v2 (one hierarchy) or v1 (a hierarchy per controller)."""
    dirs = []
    for line in (read_text(proc_self) or "0::/").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers and controller not in controllers.split(","):
            continue
        mount = root if not controllers else next(
            (d for d in (os.path.join(root, controllers), os.path.join(root, controller)) if os.path.isdir(d)), root)
        parts = [p for p in path.split("/") if p]
        dirs += [(os.path.join(mount, *parts[:depth]), bool(controllers)) for depth in range(len(parts), -1, -1)]
    return dirs


def cgroup_quota(root="/sys/fs/cgroup", proc_self="/proc/self/cgroup"):
    """The tightest CPU quota (in CPUs) from this process's cgroup up to the root:
    cgroup v2 `cpu.max` ("200000 100000" = 2 CPUs) or v1 `cpu.cfs_quota_us`."""
    quotas = []
    for here, v1 in cgroup_dirs("cpu", root, proc_self):
        if not v1:
            limit = (read_text(os.path.join(here, "cpu.max")) or "max").split()
            if limit[0] != "max":
                quotas.append(int(limit[0]) / int(limit[1]))
        else:
            q, p = (read_text(os.path.join(here, f"cpu.cfs_{k}_us")) for k in ("quota", "period"))
            if q and p and int(q) > 0:
                quotas.append(int(q) / int(p))
    return min(quotas) if quotas else None


def read_topology(sysfs="/sys", cgroup_root="/sys/fs/cgroup", proc_self="/proc/self/cgroup", cpus=None):
    """The Topology of `cpus` (default: this process's affinity set)."""
    pinning = True
    if cpus is None:
        cpus, pinning = affinity()
    base = os.path.join(sysfs, "devices", "system", "cpu")
    node_of = {}
    for node_dir in sorted(os.listdir(os.path.join(sysfs, "devices", "system", "node"))
                           if os.path.isdir(os.path.join(sysfs, "devices", "system", "node")) else []):
        if node_dir.startswith("node") and node_dir[4:].isdigit():
            for cpu in cpu_list(read_text(os.path.join(sysfs, "devices", "system", "node", node_dir,
                                                       "cpulist")) or ""):
                node_of[cpu] = int(node_dir[4:])
    atoms = set(cpu_list(read_text(os.path.join(sysfs, "devices", "cpu_atom", "cpus")) or ""))
    cores, notes = {}, []
    for cpu in cpus:
        topo = os.path.join(base, f"cpu{cpu}", "topology")
        siblings = read_text(os.path.join(topo, "core_cpus_list")) or read_text(
            os.path.join(topo, "thread_siblings_list"))
        key = tuple(cpu_list(siblings)) if siblings else (cpu,)
        package = read_text(os.path.join(topo, "physical_package_id"))
        core = cores.setdefault(key, Core(cpus=[], node=node_of.get(cpu, 0),
                                          package=int(package) if package and package.lstrip("-").isdigit() else 0,
                                          efficient=cpu in atoms))
        core.cpus.append(cpu)
    if not os.path.isdir(base):
        notes.append("no sysfs topology: each logical CPU counted as a core")
    if not pinning:
        notes.append("no CPU pinning on this OS")
    ordered = sorted(cores.values(), key=lambda c: (c.efficient, c.node, c.package, c.cpus[0]))
    return Topology(ordered, cgroup_quota(cgroup_root, proc_self), pinning, notes)


def place(topo, n_workers, threads, smt=False, first_worker=0, total_workers=None):
    """-> [[logical CPU, ...] for each of workers first_worker … first_worker+n_workers-1]
    of a machine running total_workers workers (other MPI ranks take the others).
    Oversubscribed placements wrap around the units."""
    total = total_workers or first_worker + n_workers
    units = [(c.node, cpu) for c in topo.cores for cpu in (c.cpus if smt else c.cpus[:1])]
    units = units[:topo.available(smt)]
    groups, free = [], []
    for _ in range(total):
        if len(free) < threads:  # oversubscribed: start over from the first unit
            free = list(range(len(units)))
        by_node = {}
        for i in free:
            by_node.setdefault(units[i][0], []).append(i)
        roomy = [idx for idx in by_node.values() if len(idx) >= threads]
        take = (roomy[0] if roomy else free)[:threads]
        groups.append([units[i][1] for i in take])
        free = [i for i in free if i not in take]
    return groups[first_worker:first_worker + n_workers]


def cache_sizes(sysfs="/sys"):
    """{'L1d': '48K', 'L2': '1024K', 'L3': '32768K'} of cpu0 (per core or per group)."""
    sizes = {}
    base = os.path.join(sysfs, "devices", "system", "cpu", "cpu0", "cache")
    for index in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        level = read_text(os.path.join(base, index, "level"))
        kind = read_text(os.path.join(base, index, "type")) or ""
        if level and kind != "Instruction":
            sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = read_text(os.path.join(base, index, "size"))
    return sizes


def fingerprint():
    """What a throughput figure depends on: CPU, topology, caches, BLAS, versions."""
    import platform
    import sys
    import numpy as np
    from threadpoolctl import threadpool_info
    cpu = next((line.split(":", 1)[1].strip() for line in (read_text("/proc/cpuinfo") or "").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    topo = read_topology()
    try:
        from importlib.metadata import version
        coregpt = version("coregpt")
    except Exception:  # noqa: BLE001  (running from a checkout)
        coregpt = "checkout"
    return {
        "cpu": cpu, "physical_cores": len(topo.cores), "logical_cpus": sum(len(c.cpus) for c in topo.cores),
        "smt": any(len(c.cpus) > 1 for c in topo.cores),
        "sockets": len({c.package for c in topo.cores}), "numa_nodes": len({c.node for c in topo.cores}),
        "cpu_quota": topo.quota, "caches": cache_sizes(),
        "blas": [f"{lib['internal_api']} {lib['version']} {lib.get('architecture') or ''}".strip()
                 for lib in threadpool_info() if lib["user_api"] == "blas"],
        "kernel": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "numpy": np.__version__, "coregpt": coregpt, "argv": sys.argv[1:],
    }
