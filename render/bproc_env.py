"""Run BlenderProc 2.8's API in-process on the PyPI ``bpy`` wheel: the one place that imports ``bpy``.

``blenderproc run`` downloads a Blender build, which cannot happen offline; the ``bpy`` wheel is Blender as a
Python module, and BlenderProc's API works on it once three things are handled (measured on bpy 4.2.23):

* the import guard: ``OUTSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT_BUT_IN_RUN_SCRIPT`` must be set and the
  ``blenderproc.api`` modules imported directly;
* ``bproc.init()`` fails on the wheel, which has no translations (``enum "en_US" not found``): we perform its
  steps without the language switch, and without its global random seeding (our scenes carry their own seeds);
* the wheel segfaults at interpreter shutdown, after all output is written: a worker process ends with
  ``os._exit`` once its files are flushed (see :mod:`render.worker`).
"""

import os
import tempfile
from types import SimpleNamespace

_BPROC: SimpleNamespace | None = None


def blenderproc(temp_dir: str | None = None) -> SimpleNamespace:
    """Import and initialise BlenderProc once per process; returns a namespace shaped like ``bproc``.

    Args:
        temp_dir: Where Blender keeps intermediate render output (a fresh temporary folder if None).

    Returns:
        ``bproc`` with ``.camera``, ``.renderer``, ``.writer``, ``.object``, ``.material``, ``.types``, ...,
        plus ``.bpy`` and ``.clean_up``.
    """
    global _BPROC
    if _BPROC is not None:
        return _BPROC
    os.environ.setdefault("OUTSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT_BUT_IN_RUN_SCRIPT", "1")
    import bpy

    # BlenderProc 2.8's HDF5 writer stamps its version with np.string_, an alias that NumPy 2 removed.
    import numpy as np
    from blenderproc.api import (
        camera,
        lighting,
        loader,
        material,
        math,
        object,
        renderer,
        types,
        utility,
        world,
        writer,
    )
    from blenderproc.python.renderer import RendererUtility
    from blenderproc.python.utility.GlobalStorage import GlobalStorage
    from blenderproc.python.utility.Initializer import _Initializer, clean_up
    from blenderproc.python.utility.SetupUtility import SetupUtility

    if not hasattr(np, "string_"):
        np.string_ = np.bytes_

    SetupUtility.setup_utility_paths(temp_dir or tempfile.mkdtemp(prefix="synth2real-blender-"))
    # Initializer.init() without its language switch and its global random seeding.
    clean_up(clean_up_camera=True)
    bpy.context.scene.render.engine = "CYCLES"
    RendererUtility.set_render_devices()
    _Initializer.set_default_parameters()
    GlobalStorage.add("bproc_init_complete", True)

    _BPROC = SimpleNamespace(
        bpy=bpy, camera=camera, lighting=lighting, loader=loader, material=material, math=math, object=object,
        renderer=renderer, types=types, utility=utility, world=world, writer=writer, clean_up=clean_up,
    )
    return _BPROC
