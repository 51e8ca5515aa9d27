"""Distributed profiles without processes: the `distributed` table's validation, and the exact mlx.launch command
and hostfile the gateway uses (app/backends/distributed.py), for ranks on this host and for `hosts = [...]`
(no SSH needed: the command is built, not run)."""

from __future__ import annotations

import gc
import json
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from app.backends.distributed import PORT_RANGE, fresh_ports, hostfile_for, launch_plan
from app.errors import BackendStartFailed
from app.profiles import Distributed, ProfileError, load_profiles, parse_profiles

INNER = [sys.executable, "-m", "app.launcher", "--model", "/models/m", "--host", "127.0.0.1", "--port", "9000"]
WRAPPER = [sys.executable, "-m", "app.backends.mlx_launch"]
MLX_LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))


def distributed(text: str) -> Distributed:
    found = parse_profiles(f'[profiles."p"]\nmodel = "/m"\ndistributed = {text}\n', "f.toml")[0].distributed
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{ }", "set exactly one of ranks, hosts or hostfile (got none)"),
        ('{ ranks = 2, hosts = ["a"] }', "set exactly one of ranks, hosts or hostfile (got ranks, hosts)"),
        ("{ ranks = 0 }", "field 'distributed.ranks'"),
        ("{ ranks = 1.5 }", "field 'distributed.ranks'"),
        ('{ ranks = "2" }', "field 'distributed.ranks'"),
        ("{ ranks = true }", "field 'distributed.ranks'"),
        ('{ ranks = 2, backend = "gloo" }', "field 'distributed.backend'"),
        ('{ ranks = 2, mode = "data" }', "field 'distributed.mode'"),
        ("{ ranks = 2, env = { A = 1 } }", "the value of 'A' must be a string"),
        ('{ ranks = 2, env = { "A-B" = "1" } }', "'A-B' is not an environment variable name"),
        ("{ hosts = [] }", "field 'distributed.hosts'"),
        ('{ hosts = ["mac 1"] }', "'mac 1' is not a host name"),
        ('{ hosts = ["-oProxyCommand=x"] }', "is not a host name"),
        ('{ ranks = 2, backend = "jaccl" }', 'backend "jaccl" needs a hostfile'),
        ("{ ranks = 2, size = 3 }", "field 'distributed.size'"),
        ('{ hostfile = "missing.json" }', "field 'distributed.hostfile'"),
        ("3", "field 'distributed'"),
    ],
)
def test_bad_tables_name_file_profile_and_field(text: str, message: str) -> None:
    with pytest.raises(ProfileError) as error:
        distributed(text)
    assert str(error.value).startswith("f.toml: profile 'p': ")
    assert message in str(error.value)


def test_defaults_and_identity() -> None:
    table = distributed("{ ranks = 2 }")
    assert (table.backend, table.mode, table.env) == ("ring", "tensor", ())
    profiles = parse_profiles(
        '[profiles."one"]\nmodel = "/m"\n[profiles."two"]\nmodel = "/m"\ndistributed = { ranks = 2 }\n'
        '[profiles."two-b"]\nmodel = "/m"\nnum_draft_tokens = 5\ndistributed = { ranks = 2 }\n',
        "f.toml",
    )
    one, two, two_b = (profile.backend_spec for profile in profiles)
    # A distributed and a one-process profile of the same model are different backends; equal tables share one.
    assert one != two
    assert two == two_b
    assert hash(two) == hash(two_b)


def test_hostfile_relative_to_the_profile_file_and_checked(tmp_path: Path) -> None:
    (tmp_path / "hosts.json").write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]))
    (tmp_path / "p.toml").write_text('[profiles."p"]\nmodel = "/m"\ndistributed = { hostfile = "hosts.json" }\n')
    # The ring backend connects by IP: a host without "ips" is refused when the profile loads.
    with pytest.raises(ProfileError, match=r"p\.toml: profile 'p': field 'distributed.hostfile': .*host 1 \(mac2\)"):
        load_profiles(tmp_path)
    (tmp_path / "p.toml").write_text(
        '[profiles."p"]\nmodel = "/m"\ndistributed = { hostfile = "hosts.json", backend = "mpi" }\n'
    )
    table = load_profiles(tmp_path).profiles["p"].distributed
    assert table is not None
    assert table.hostfile == str((tmp_path / "hosts.json").resolve())
    (tmp_path / "hosts.json").write_text("{not json")
    with pytest.raises(ProfileError, match="is not JSON"):
        load_profiles(tmp_path)


def test_ranks_on_this_host(tmp_path: Path) -> None:
    table = distributed('{ ranks = 3, mode = "pipeline", env = { MLX_METAL_FAST_SYNCH = "1", HF_TOKEN = "hf_x" } }')
    asked: list[int] = []

    def ports(count: int) -> int:
        asked.append(count)
        return 23000

    plan = launch_plan(table, INNER, {"PYTHONUNBUFFERED": "1"}, tmp_path / "b1.hostfile.json", ports=ports)
    arguments = [
        "--backend", "ring", "--hosts", "127.0.0.1", "-n", "3", "--starting-port", "23000",
        "--env", "HF_TOKEN=hf_x", "--env", "MLX_METAL_FAST_SYNCH=1", "--env", "PYTHONUNBUFFERED=1",
        "--", *INNER, "--pipeline",
    ]  # fmt: skip
    assert plan.argv == [*WRAPPER, *arguments]
    assert asked == [3]  # one ring port per rank
    assert plan.ranks == 3
    assert plan.hostfile is None
    assert not (tmp_path / "b1.hostfile.json").exists()
    # The line shown to users: MLX's own entry point, the same arguments, a secret's value masked.
    shown = [item.replace("HF_TOKEN=hf_x", "HF_TOKEN=***") for item in arguments]
    assert plan.mlx_launch == shlex.join([MLX_LAUNCH, *shown])


def test_hosts_write_the_hostfile_mlx_launch_reads(tmp_path: Path) -> None:
    table = distributed('{ hosts = ["10.0.0.1", "me@mac2", "mac3"], backend = "ring", mode = "tensor" }')
    addresses = {"10.0.0.1": "10.0.0.1", "me@mac2": "10.0.0.2", "mac3": "10.0.0.3"}
    path = tmp_path / "run" / "b2-m.hostfile.json"
    plan = launch_plan(table, INNER, {}, path, ports=lambda count: 24000, address=addresses.__getitem__)
    assert plan.hostfile == path
    assert json.loads(path.read_text()) == [
        {"ssh": "10.0.0.1", "ips": ["10.0.0.1"]},
        {"ssh": "me@mac2", "ips": ["10.0.0.2"]},
        {"ssh": "mac3", "ips": ["10.0.0.3"]},
    ]
    assert plan.argv == [
        *WRAPPER, "--backend", "ring", "--hostfile", str(path), "--starting-port", "24000", "--", *INNER,
    ]  # fmt: skip
    assert plan.ranks == 3
    # mlx's own parser reads the file back as the same hosts in the same order (rank i = host i).
    from mlx._distributed_utils.common import Hostfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # from_file leaves its file to the collector
        parsed = Hostfile.from_file(str(path))
        gc.collect()
    assert [(host.rank, host.ssh_hostname, host.ips) for host in parsed.hosts] == [
        (0, "10.0.0.1", ["10.0.0.1"]),
        (1, "me@mac2", ["10.0.0.2"]),
        (2, "mac3", ["10.0.0.3"]),
    ]


def test_other_backends_ports(tmp_path: Path) -> None:
    nccl = launch_plan(distributed('{ hosts = ["10.0.0.1"], backend = "nccl" }'), INNER, {}, tmp_path / "h.json",
                       ports=lambda count: 25000)  # fmt: skip
    assert nccl.argv[nccl.argv.index("--nccl-port") + 1] == "25000"
    assert "--starting-port" not in nccl.argv
    mpi = launch_plan(distributed('{ ranks = 2, backend = "mpi" }'), INNER, {}, tmp_path / "h.json")
    assert "--starting-port" not in mpi.argv
    assert "--nccl-port" not in mpi.argv


def test_an_unresolvable_host_fails_the_start_clearly(tmp_path: Path) -> None:
    table = distributed('{ hosts = ["no-such-host.invalid"] }')
    with pytest.raises(BackendStartFailed, match=r"no-such-host\.invalid.*give its IP, or use a hostfile"):
        launch_plan(table, INNER, {}, tmp_path / "h.json", ports=lambda count: 26000)


def test_fresh_ports_are_consecutive_free_and_in_range() -> None:
    # Only 25000-25999 free: a draw is tried until all four ports are in it (a miss chance of about 1e-7).
    first = fresh_ports(4, is_free=lambda port: 25000 <= port < 26000)
    assert first >= 25000
    assert first + 4 <= 26000
    assert PORT_RANGE[0] <= 25000
    with pytest.raises(BackendStartFailed, match="no 2 consecutive free ports"):
        fresh_ports(2, is_free=lambda port: False, tries=5)
    assert hostfile_for(["10.1.1.1"]) == [{"ssh": "10.1.1.1", "ips": ["10.1.1.1"]}]
