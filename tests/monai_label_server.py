"""A real MONAI Label server for the tests: its own virtual environment, started on loopback, stopped by PID.

MONAI Label 0.8.5 is installed from the package registry into a virtual environment of its own, so that its many
pins never touch the project's environment. The virtual environment sees this environment's packages (MONAI,
hybridmim_components) through a ``.pth`` file, and pip is constrained to this environment's torch version:
unconstrained, MONAI Label's torchvision pulls a newer torch.

MONAI Label imports torchvision, and the registry has torchvision only for the CUDA builds of torch: with a CPU build
of torch (a CPU machine, CI), torchvision's operators do not load. There, the virtual environment gets its own CUDA
build of the same torch version (it runs on a CPU; it costs some gigabytes of disk, once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import requests
import torch

from conftest import child_venv

MONAILABEL_VERSION = "0.8.5"
# MONAI Label 0.8.5 predates pydicom 3, pynetdicom 3 and dicomweb-client 0.60; it does not import with them.
REQUIREMENTS = [f"monailabel=={MONAILABEL_VERSION}", "pydicom<3", "pynetdicom<3", "dicomweb-client<0.60"]
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "hybridmim-bundles", f"monailabel-{MONAILABEL_VERSION}")


def monailabel_venv(path: str | None = None) -> str:
    """The virtual environment's directory, created and installed on first use (minutes), reused afterwards.

    ``MONAILABEL_VENV`` overrides the default location ``~/.cache/hybridmim-bundles/monailabel-<version>``.
    """
    path = path or os.environ.get("MONAILABEL_VENV", DEFAULT_VENV)
    python = child_venv(path)
    installed = subprocess.run([python, "-c", "import monailabel; print(monailabel.__version__)"],
                               capture_output=True, text=True)
    if installed.returncode != 0 or installed.stdout.strip() != MONAILABEL_VERSION:
        version = torch.__version__.split("+")[0]
        pip = [python, "-m", "pip", "install", "--quiet"]
        if torch.version.cuda is None:
            # the registry's build, not a local +cpu wheel from a configured --find-links folder
            env = dict(os.environ, PIP_FIND_LINKS=" ")
            subprocess.run([*pip, "--ignore-installed", f"torch=={version}", "torchvision"], check=True, env=env)
        constraints = os.path.join(path, "constraints.txt")
        with open(constraints, "w") as f:
            f.write(f"torch=={version}\n")
        subprocess.run([*pip, "-c", constraints, *REQUIREMENTS], check=True)
    return path


def venv_env(venv_dir: str, **extra: str) -> dict[str, str]:
    """This environment, with the virtual environment's ``bin`` first on PATH: the ``monailabel`` script runs
    ``python`` from PATH."""
    return dict(os.environ, PATH=os.path.join(venv_dir, "bin") + os.pathsep + os.environ["PATH"], **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MonaiLabelServer:
    """``monailabel start_server`` on 127.0.0.1 and a free port; a context manager that stops it by its PID.

    Args:
        venv_dir: the virtual environment of :func:`monailabel_venv`.
        app: the app directory (e.g. the ``monaibundle`` sample app with bundles under ``model/``).
        studies: the studies folder (MONAI Label's local datastore).
        conf: ``--conf`` pairs of the app, e.g. ``{"models": "a,b"}``.
        log_path: where the server's stdout and stderr go.
        startup_timeout: seconds to wait for ``/info/`` to answer.
        env: more environment variables of the server (e.g. ``HIDE_EDITABLE_ENV``, to run without this project).
    """

    def __init__(self, venv_dir: str, app: str, studies: str, conf: dict[str, str], log_path: str,
                 startup_timeout: float = 300.0, env: dict[str, str] | None = None):
        self.venv_dir, self.app, self.studies, self.conf, self.env = venv_dir, app, studies, conf, env or {}
        self.log_path, self.startup_timeout = log_path, startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> MonaiLabelServer:
        command = [os.path.join(self.venv_dir, "bin", "monailabel"), "start_server", "--app", self.app,
                   "--studies", self.studies, "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.conf.items():
            command += ["--conf", key, value]
        env = venv_env(self.venv_dir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "w") as log:
            # a session of its own: stopping it also stops the training processes it starts
            # from the app's folder when the environment hides this project: a checkout in the working
            # directory would otherwise be importable by any `python -m` the server starts
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, cwd=self.app if self.env else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"monailabel start_server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/info/", timeout=5).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"MONAI Label did not answer /info/ within {self.startup_timeout} s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's PID, then SIGKILL to its whole session if it has not exited in ``timeout`` s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its session (a training subprocess)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def log_has(self, text: str, timeout: float = 30.0) -> bool:
        """Whether ``text`` shows up in the log within ``timeout`` s (the server logs a failure after answering)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)

    def infer(self, model: str, image: str | None = None, upload: str | None = None,
              timeout: float = 600) -> requests.Response:
        """``POST /infer/<model>?output=image`` of a datastore image id, or of an uploaded file."""
        params = {"output": "image"} | ({"image": image} if image else {})
        data = {"params": json.dumps({"device": "cpu"})}
        if upload is None:
            return requests.post(f"{self.url}/infer/{model}", params=params, data=data, timeout=timeout)
        with open(upload, "rb") as f:
            return requests.post(f"{self.url}/infer/{model}", params=params, data=data, timeout=timeout,
                                 files={"file": (os.path.basename(upload), f)})

    def train(self, model: str, params: dict, timeout: float = 900) -> dict:
        """``POST /train/<model>``, then wait for the task to leave RUNNING; the task's final status."""
        response = requests.post(f"{self.url}/train/{model}", json=params, timeout=60)
        response.raise_for_status()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get("/train/").json()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                return status
            if not self.alive():
                raise RuntimeError(f"the server died during training:\n{self.log()}")
            time.sleep(3)
        raise TimeoutError(f"training did not finish within {timeout} s:\n{self.log()}")
