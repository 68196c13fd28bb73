"""The package as a user gets it: a wheel built from this checkout, installed without ``-e`` into a
throwaway venv that reuses the installed dependencies but not the editable lora_ipc. Every console
subcommand starts, ``lora-ipc bench`` runs, a daemon and a client in two processes round-trip an
adapter, and vLLM can see the plugin entry point in the wheel's metadata."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import overlay_venv  # noqa: E402

from .helpers import running  # noqa: E402

SOURCES = ("pyproject.toml", "setup.py", "README.md", "lora_ipc", "csrc")


def copy_sources(dest: Path, names=SOURCES) -> None:
    """This checkout's ``names`` (committed or not, no caches or built extensions) into ``dest``, replacing
    what is there."""
    for name in names:
        if (ROOT / name).is_dir():
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(ROOT / name, dest / name)


def build_wheel(tmp: Path, env: dict | None = None) -> Path:
    """The wheel, built in ``tmp`` from a copy of the sources, so the checkout gets no build/ or egg-info."""
    src = tmp / "src"
    src.mkdir()
    copy_sources(src)
    wheel_cmd = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)]
    out = subprocess.run([sys.executable, "-m", *wheel_cmd], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [whl] = (tmp / "dist").glob("lora_ipc-*.whl")
    return whl


def install_wheel(whl: Path, venv_dir: Path) -> Path:
    """The python of a venv in ``venv_dir`` layered over this interpreter's packages, ``whl`` installed."""
    python = overlay_venv.create(venv_dir)
    # --force-reinstall: the editable install this venv sees below it would otherwise "already satisfy" it
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q", str(whl)],
        check=True,
        timeout=300,
    )
    return python


def clean_env(*drop: str) -> dict:
    """This environment without PYTHONPATH/PYTHONHOME (the checkout's lora_ipc must not be importable)
    nor ``drop``."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", *drop)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """(python, bin dir, env): the wheel installed into a venv layered over this interpreter's packages."""
    python = install_wheel(wheel, tmp_path_factory.mktemp("venv") / "v")
    return python, python.parent, clean_env()


def run(venv, *cmd, timeout=120, **kw):
    python, bindir, env = venv
    cwd = kw.pop("cwd", bindir)  # never the checkout: its lora_ipc must not be importable
    env = kw.pop("env", env)
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, **kw
    )


def test_wheel_holds_the_package_and_its_metadata_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lora_ipc/_native.abi3.so" in names and wheel.name.endswith("-cp310-abi3-linux_x86_64.whl"), names
    assert not [n for n in names if n.startswith("csrc/") or n.endswith(".c")]
    assert "lora_ipc/benchmarks/transport.py" in names and "lora_ipc/vllm/plugin.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benches/", "scripts/"))]
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lora-ipc = lora_ipc.cli:main" in text and "lora_ipc = lora_ipc.vllm.plugin:register" in text


def test_the_wheel_not_the_checkout_is_imported_and_the_vllm_plugin_is_visible(venv):
    python, bindir, _ = venv
    probe = textwrap.dedent("""
        import json, importlib.metadata as md
        import lora_ipc
        dist = md.distribution("lora-ipc")
        [ep] = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "lora_ipc"]
        print(json.dumps({"file": lora_ipc.__file__, "version": lora_ipc.__version__, "dist_version": dist.version,
                          "dist_files": str(dist.locate_file("lora_ipc/__init__.py")), "ep": ep.value,
                          "ep_dist": str(ep.dist.locate_file("")), "register": ep.load().__module__}))
    """)
    out = run(venv, python, "-c", probe)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    venv_root = str(python.parent.parent)
    assert got["file"].startswith(venv_root), got  # not the editable checkout
    assert got["dist_files"].startswith(venv_root) and got["ep_dist"].startswith(venv_root), got
    assert got["ep"] == "lora_ipc.vllm.plugin:register" and got["register"] == "lora_ipc.vllm.plugin"
    assert got["version"] == got["dist_version"] != "0+unknown"


def test_the_wheels_native_extension_loads_and_reports_the_missing_driver(venv):
    python, bindir, env = venv
    probe = (
        "import json; from lora_ipc.core.memory import native; "
        "print(json.dumps([native.extension().__file__, native.status()]))"
    )
    out = run(venv, python, "-c", probe, env={**env, "LORA_IPC_LIBCUDA": "/nonexistent/libcuda.so.1"})
    assert out.returncode == 0, out.stderr
    where, (ok, why) = json.loads(out.stdout)
    assert where.startswith(str(python.parent.parent)) and where.endswith("_native.abi3.so")
    assert not ok and why.startswith("no CUDA driver: cannot load /nonexistent/libcuda.so.1")


def test_a_failed_native_build_does_not_fail_the_install(tmp_path):
    """No working compiler: the wheel still builds (pure Python) and lora_ipc says why VMM is unavailable."""
    whl = build_wheel(tmp_path, env={**os.environ, "CC": "false", "LDSHARED": "false"})
    assert not [n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".so")]
    python = install_wheel(whl, tmp_path / "v")
    # as on a machine with only the wheel: the editable install below this venv serves submodules the wheel
    # lacks (its finder maps lora_ipc._native to the checkout's build), so its finder is taken out first
    probe = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
        "if not getattr(f, '__module__', '').startswith('__editable__')]; "
        "import json, lora_ipc; from lora_ipc.core.memory import native; "
        "print(json.dumps([lora_ipc.__file__, native.status()[1]]))"
    )
    got = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=120
    )
    assert got.returncode == 0, got.stderr
    package, why = json.loads(got.stdout)
    assert package.startswith(str(tmp_path / "v")), package  # the wheel's copy, not the checkout's
    assert why == "lora_ipc native extension not built (reinstall with a C compiler present)"


def test_an_editable_install_of_a_fresh_clone_builds_the_extension(tmp_path):
    """``pip install -e .`` from a clone of the committed tree (what scripts/setup.sh does)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    copy_sources(clone, ("setup.py", "csrc", "lora_ipc"))  # this checkout's sources, committed or not
    python = overlay_venv.create(tmp_path / "v")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(clone)],
        check=True,
        timeout=300,
    )
    probe = (
        "import json, lora_ipc; from lora_ipc.core.memory import native; print(json.dumps([lora_ipc.__file__, "
        "native.extension().__file__, native.status()]))"
    )
    out = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        env=clean_env("LORA_IPC_LIBCUDA"),
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    package, extension, (ok, _why) = json.loads(out.stdout)
    assert package.startswith(str(clone)) and extension.startswith(str(clone)), (package, extension)


@pytest.mark.parametrize("command", ["serve", "status", "bench", "demo"])
def test_every_console_subcommand_starts(venv, command):
    out = run(venv, venv[1] / "lora-ipc", command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: lora-ipc {command}")


def test_bench_runs_from_the_wheel(venv, tmp_path):
    out = run(
        venv,
        venv[1] / "lora-ipc",
        "bench",
        "--device",
        "cpu",
        "--layers",
        "1",
        "--ranks",
        "4",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--out",
        tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    # lora_ipc, the /dev/shm path, torch IPC per tensor, and the one- and two-copy floors timed in the same run
    paths = {"lora_ipc", "disk_shm", "ipc_per_tensor", "copy_floor", "two_copy_floor"}
    assert set(results["ranks"]["4"]["paths"]) == paths
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_publish_fetch_round_trip_between_two_processes(venv, tmp_path):
    python, bindir, env = venv
    endpoint = f"ipc://{tmp_path}/daemon.sock"
    serve = [str(bindir / "lora-ipc"), "serve", "--endpoint", endpoint]
    with running(serve, (tmp_path / "daemon.sock").exists, "daemon", timeout=60, env=env, cwd=bindir):
        client = textwrap.dedent(f"""
            import torch, lora_ipc
            from lora_ipc import AdapterClient, RemoteExporter
            assert lora_ipc.__file__.startswith({str(python.parent.parent)!r}), lora_ipc.__file__
            g = torch.Generator().manual_seed(0)
            tensors = {{f"base_model.model.layers.{{i}}.q_proj.lora_{{ab}}.weight": torch.randn(8, 64, generator=g)
                       for i in range(3) for ab in "AB"}}
            config = {{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}}
            with RemoteExporter({endpoint!r}) as exporter:
                version = exporter.publish("policy", tensors, config)
            with AdapterClient({endpoint!r}) as client:
                got = client.fetch("policy")
            assert got.version == version == 1 and got.peft_config["r"] == 8
            assert set(got.tensors) == set(tensors)
            assert all(torch.equal(got.tensors[k], tensors[k]) for k in tensors)
            print("ok")
        """)
        out = run(venv, python, "-c", client, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
        status = run(venv, bindir / "lora-ipc", "status", "--endpoint", endpoint, "--json")
        assert status.returncode == 0, status.stderr
        assert [(a["name"], a["version"]) for a in json.loads(status.stdout)["versions"]] == [("policy", 1)]
