"""Camera sources for the UR5 runner: OpenCV devices or streams on a real cell, the controller twin's renders in a
rehearsal. ``read()`` returns an HxWx3 uint8 RGB frame or raises :class:`CameraError`."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ...errors import CameraError, TwinError
from .protocol import ADMIN_PORT


class CameraSource(ABC):
    """A camera: ``read()`` returns an HxWx3 uint8 RGB frame or raises :class:`CameraError`."""

    name: str = "camera"

    @abstractmethod
    def read(self) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional
        pass


class OpenCVCamera(CameraSource):
    """An OpenCV ``VideoCapture`` device (index, device path or stream URL); frames converted BGR -> RGB."""

    def __init__(self, device: int | str = 0, *, width: int | None = None, height: int | None = None,
                 warmup: int = 2):
        if not isinstance(warmup, int) or warmup < 0:
            raise CameraError(f"warmup must be a number of frames >= 0, got {warmup!r}")
        try:
            import cv2
        except ImportError:
            raise CameraError("camera needs OpenCV: pip install opencv-python (or configure another camera "
                              "source, e.g. 'twin:scene' when rehearsing with the controller twin)") from None
        self._cv2 = cv2
        self.name = f"opencv:{device}"
        self.device = device
        cap = cv2.VideoCapture(device)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera {device!r} could not be opened (no such device, busy, or no permission); "
                              "check the cable and `ls /dev/video*`, or set the robot config's cameras")
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.cap = cap
        for _ in range(warmup):
            cap.read()

    def read(self) -> np.ndarray:
        ok, frame = self.cap.read()
        if not ok or frame is None:
            raise CameraError(f"camera {self.device!r} returned no frame (unplugged or stalled)")
        return self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.cap.release()


class TwinCamera(CameraSource):
    """A camera of the controller twin (``scene`` or ``wrist``), rendered by its MuJoCo scene. ``token``: the
    twin's admin token (None: the one the twin left for its user, see :class:`~.twin.process.TwinClient`)."""

    def __init__(self, host: str, camera: str = "scene", *, port: int = ADMIN_PORT, timeout: float = 10.0,
                 token: str | None = None):
        from .twin.process import TwinClient

        if camera not in ("scene", "wrist"):
            raise CameraError(f"the controller twin has cameras 'scene' and 'wrist', not {camera!r}")
        self.name = f"twin:{camera}"
        self.camera = camera
        self.client = TwinClient(host, port, timeout=timeout, token=token)
        try:
            self.read()
        except CameraError:
            self.client.close()
            raise

    def read(self) -> np.ndarray:
        try:
            return self.client.render([self.camera])[self.camera]
        except (TwinError, OSError) as e:
            raise CameraError(f"twin camera {self.camera!r} at {self.client.host}: {e}") from None

    def close(self) -> None:
        self.client.close()


def open_camera(spec: str | int, host: str | None = None) -> CameraSource:
    """A camera from a spec: ``"twin:scene"``, ``"twin:wrist"``, an OpenCV index (``"0"``), a path or a URL."""
    if isinstance(spec, str) and spec.startswith("twin:"):
        if host is None:
            raise CameraError(f"camera {spec!r} needs the twin's host")
        return TwinCamera(host, spec.split(":", 1)[1])
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    return OpenCVCamera(spec)
