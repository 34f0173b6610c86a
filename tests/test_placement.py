"""Placement from the CPU topology, on fake sysfs and cgroup trees of the machines
our users have: an 8-core/16-thread laptop (both ways of numbering hyperthreads),
a 6P+8E hybrid Intel, a 2-socket 64-core server, containers with a CPU quota."""
import pytest

from workers.placement import cpu_list, place, read_topology


def fake_machine(root, cores, siblings_of, nodes=None, atoms=(), cpu_max=None, cfs=None):
    """A sysfs tree under root/sys and a cgroup tree under root/cgroup.
    siblings_of(cpu) -> that cpu's core_cpus_list; nodes: {node: [cpus]};
    cpu_max: cgroup v2 'quota period'; cfs: cgroup v1 (quota, period)."""
    sysfs = root / "sys"
    for cpu in cores:
        topo = sysfs / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_cpus_list").write_text(siblings_of(cpu) + "\n")
        package = next((n for n, cpus in (nodes or {}).items() if cpu in cpus), 0)
        (topo / "physical_package_id").write_text(f"{package}\n")
    for node, cpus in (nodes or {0: list(cores)}).items():
        d = sysfs / "devices" / "system" / "node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(",".join(map(str, cpus)) + "\n")
    if atoms:
        (sysfs / "devices" / "cpu_atom").mkdir(parents=True)
        (sysfs / "devices" / "cpu_atom" / "cpus").write_text(f"{min(atoms)}-{max(atoms)}\n")
        (sysfs / "devices" / "cpu_core").mkdir(parents=True)
        (sysfs / "devices" / "cpu_core" / "cpus").write_text(f"0-{min(atoms) - 1}\n")
    cgroup = root / "cgroup"
    (cgroup / "docker" / "abc").mkdir(parents=True)
    proc_self = root / "proc_self_cgroup"
    if cfs:
        (cgroup / "cpu" / "docker" / "abc").mkdir(parents=True)
        (cgroup / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text(f"{cfs[0]}\n")
        (cgroup / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text(f"{cfs[1]}\n")
        proc_self.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    else:
        if cpu_max:
            (cgroup / "docker" / "abc" / "cpu.max").write_text(cpu_max + "\n")
        proc_self.write_text("0::/docker/abc\n")
    return read_topology(sysfs=str(sysfs), cgroup_root=str(cgroup), proc_self=str(proc_self), cpus=list(cores))


def core_of(topo):
    return {cpu: i for i, core in enumerate(topo.cores) for cpu in core.cpus}


def assert_whole_distinct_cores(topo, groups):
    """Every logical CPU handed out sits on a physical core no other CPU handed out uses."""
    cores = [core_of(topo)[cpu] for group in groups for cpu in group]
    assert len(cores) == len(set(cores)), groups


def test_cpu_list():
    assert cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


@pytest.mark.parametrize("numbering", ["linux", "adjacent"])
def test_laptop_8_cores_16_threads(tmp_path, numbering):
    if numbering == "linux":  # cpu i and i+8 share a core
        siblings = lambda c: f"{c % 8},{c % 8 + 8}"  # noqa: E731
    else:  # some VMs and BIOSes: 2k and 2k+1 share a core
        siblings = lambda c: f"{c - c % 2}-{c - c % 2 + 1}"  # noqa: E731
    topo = fake_machine(tmp_path, range(16), siblings)
    assert topo.available() == 8 and topo.available(smt=True) == 16
    groups = place(topo, 4, 2)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert_whole_distinct_cores(topo, groups)  # no two BLAS threads on one core's hyperthreads
    smt = place(topo, 2, 8, smt=True)
    assert sorted(c for g in smt for c in g) == list(range(16))
    assert {core_of(topo)[c] for c in smt[0]}.isdisjoint({core_of(topo)[c] for c in smt[1]})
    assert "8 physical cores (16 logical CPUs, SMT not used)" in topo.describe()


def test_hybrid_6p_8e_puts_workers_on_p_cores_first(tmp_path):
    # P-cores 0-11 (hyperthreaded pairs), E-cores 12-19 (one thread each)
    topo = fake_machine(tmp_path, range(20), lambda c: f"{c - c % 2}-{c - c % 2 + 1}" if c < 12 else str(c),
                        atoms=range(12, 20))
    assert topo.available() == 14
    groups = place(topo, 2, 3)
    assert all(c < 12 for g in groups for c in g), groups  # nobody on E-cores while P-cores are free
    assert_whole_distinct_cores(topo, groups)
    groups = place(topo, 4, 2)
    assert all(c < 12 for g in groups[:3] for c in g) and all(c >= 12 for c in groups[3]), groups
    assert "hybrid: 6 P-cores + 8 E-cores" in topo.describe()


def test_two_socket_server_keeps_each_worker_on_one_numa_node(tmp_path):
    nodes = {0: list(range(0, 32)) + list(range(64, 96)), 1: list(range(32, 64)) + list(range(96, 128))}
    topo = fake_machine(tmp_path, range(128), lambda c: f"{c % 64},{c % 64 + 64}", nodes=nodes)
    assert topo.available() == 64
    for workers, threads in ((2, 32), (4, 16), (8, 8), (3, 16)):
        groups = place(topo, workers, threads)
        assert_whole_distinct_cores(topo, groups)
        for g in groups:
            assert len({0 if c in nodes[0] else 1 for c in g}) == 1, (workers, threads, g)
    assert "2 socket(s), 2 NUMA node(s)" in topo.describe()


@pytest.mark.parametrize("cgroup", ["v2", "v1"])
def test_container_cpu_quota_caps_the_cores(tmp_path, cgroup):
    """`docker run --cpus 2` on a 16-core host: affinity shows 16, the quota says 2."""
    quota = dict(cpu_max="200000 100000") if cgroup == "v2" else dict(cfs=(200000, 100000))
    topo = fake_machine(tmp_path, range(16), lambda c: str(c), **quota)
    assert topo.quota == 2 and topo.available() == 2
    assert place(topo, 2, 1) == [[0], [1]]
    assert "CPU quota 2 (cgroup)" in topo.describe()


def test_no_quota_and_fractional_quota(tmp_path):
    assert fake_machine(tmp_path / "a", range(4), str, cpu_max="max 100000").available() == 4
    assert fake_machine(tmp_path / "b", range(4), str, cpu_max="150000 100000").available() == 1


def test_mpi_ranks_on_one_machine_take_different_cores(tmp_path):
    topo = fake_machine(tmp_path, range(16), lambda c: f"{c % 8},{c % 8 + 8}")
    rank0 = place(topo, 2, 2, first_worker=0, total_workers=4)
    rank1 = place(topo, 2, 2, first_worker=2, total_workers=4)
    assert_whole_distinct_cores(topo, rank0 + rank1)


def test_no_sysfs_counts_logical_cpus(tmp_path):
    topo = read_topology(sysfs=str(tmp_path / "none"), cgroup_root=str(tmp_path / "none"),
                         proc_self=str(tmp_path / "none"), cpus=[0, 1, 2])
    assert topo.available() == 3 and "no sysfs topology" in topo.describe()
