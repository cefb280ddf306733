"""Pictures of episodes: frames from the simulators (minigrid draws with numpy; MuJoCo needs an
OpenGL context without a display: EGL or OSMesa) and a GIF of them."""

from __future__ import annotations

import ctypes.util
import os

import numpy as np

BACKENDS = {"egl": "EGL", "osmesa": "OSMesa"}  # MUJOCO_GL value -> the library it loads


class RenderError(ValueError):
    """Rendering cannot run here; the message says what to install or set (a ValueError: the
    CLI prints it as one line)."""


def gl_backend() -> str:
    """The headless OpenGL backend MuJoCo renders with: MUJOCO_GL when set, else the first of
    EGL and OSMesa whose library is installed (then set in MUJOCO_GL and PYOPENGL_PLATFORM for
    this process, before MuJoCo's renderer is loaded); RenderError naming both otherwise."""
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    for name, lib in BACKENDS.items():
        if ctypes.util.find_library(lib):
            os.environ["MUJOCO_GL"] = name
            os.environ.setdefault("PYOPENGL_PLATFORM", name)
            return name
    raise RenderError(
        "rendering MuJoCo needs a headless OpenGL library, and neither EGL (libEGL.so.1; "
        "Debian: libegl1, with a Mesa or GPU driver) nor OSMesa (libOSMesa.so; Debian: "
        "libosmesa6) is installed; install one, or set MUJOCO_GL to a backend that works here"
    )


def frame(env) -> np.ndarray:
    """The current picture of a `pathways.robotics.envs.Env` made with render_mode="rgb_array",
    (H, W, 3) uint8."""
    try:
        return np.asarray(env.env.render(), np.uint8)
    except Exception as e:  # noqa: BLE001 - the GL context's failure, whichever it is
        raise RenderError(
            f"rendering {env.info.gym_id} with MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r} "
            f"failed: {type(e).__name__}: {e} (set MUJOCO_GL to egl or osmesa, whichever is "
            "installed)"
        ) from None


def write_gif(path, frames: list[np.ndarray], fps: int = 10) -> None:
    """Writes frames (H, W, 3) uint8 as an animated GIF that loops."""
    import imageio.v3 as iio

    if not frames:
        raise ValueError("no frames to write")
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)


class Recorder:
    """Keeps the pictures of the first episode of a `policy.rollout`: pass `on_reset` and
    `on_step`; `frames` then holds one picture per state of that episode."""

    def __init__(self, env):
        if env.info.observation == "vector":  # MuJoCo: choose the GL backend before it loads
            gl_backend()
        self.frames: list[np.ndarray] = []
        self.seed = None

    def on_reset(self, env) -> None:
        if self.seed is None:
            self.seed = env.seed
            self.frames.append(frame(env))

    def on_step(self, env, action) -> None:
        if env.seed == self.seed and len(self.frames) <= env.steps:
            self.frames.append(frame(env))
