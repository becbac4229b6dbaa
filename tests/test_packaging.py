"""jaxps installs as one package: the built-in transports are `jaxps.transports`, nothing is named `transports`.

Checked for the editable install the tests run from and for a wheel installed
into a fresh virtual environment, each from outside the repository.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_SMOKE = """
import importlib.util, sys
import numpy as np, optax, jaxps, jaxps.transports
assert importlib.util.find_spec("transports") is None, "a top-level package named transports is installed"
if __name__ == "__main__":
    for transport in ("inprocess", "multiprocessing"):
        with jaxps.ParameterServer({"w": np.zeros(3, np.float32)}, optax.sgd(1.0), transport=transport) as ps:
            assert ps.push({"w": np.ones(3, np.float32)}).result(60) == "applied"
            assert float(ps.pull()["w"][0]) == -1.0
    print(jaxps.__file__, jaxps.transports.__file__)
"""


def _smoke(python: str, where: Path) -> list[str]:
    script = where / "smoke.py"
    script.write_text(_SMOKE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, str(script)], cwd=where, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_editable_install_from_outside_the_repo(tmp_path):
    jaxps_file, transports_file = _smoke(sys.executable, tmp_path)
    assert Path(transports_file).parent == REPO / "transports"
    assert Path(jaxps_file).parent == REPO / "jaxps"


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment(tmp_path):
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("jaxps-*.whl")
    env_dir = tmp_path / "env"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # jax & co. from this environment
    python = str(env_dir / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    jaxps_file, transports_file = _smoke(python, tmp_path)
    assert jaxps_file.startswith(str(env_dir)) and transports_file.startswith(str(env_dir))
    assert Path(transports_file).parent.parent == Path(jaxps_file).parent  # jaxps/transports/
